"""Preference tuning of a causal LM: DPO and its family on chosen/rejected pairs, or KTO on labelled completions,
read top to bottom (the steps every recipe shares are in skeleton.py; docs/preference.md).

Features:
- the losses of [preference], as TRL defines them: sigmoid (DPO), ipo, robust (label smoothing), simpo and orpo
  (reference-free), kto (unpaired), plus an NLL term on the chosen completions (sft_weight, RPO);
- data: TRL's prompt/chosen/rejected (text or messages, implicit prompts split at the common beginning), ShareGPT
  conversations + chosen/rejected turns, chosen_messages/rejected_messages; KTO's prompt/completion or messages +
  label; tokenised as TRL tokenises them, cached, weighted mixtures, validation pairs; or streamed (read as
  training goes, each rank its share, exact resume), as SFT data streams;
- the reference: the initial policy (a frozen copy; with LoRA the base with the adapter off, no second copy), a
  model of your choice, or log-probs precomputed in one pass and stored in <output_dir>/reference/ (the model is
  then freed; resume reuses them);
- per-sequence log-probs through the output head in chunks of trained positions (no tokens x vocab logits);
- exact normalisation: every pair (KTO example) weighs the same over micro-batches, accumulation and ranks;
- both backends (functional, DeepSpeed ZeRO 0-3), full or LoRA, activation checkpointing, checkpoints, resume,
  preemption; TRL's metric names (rewards/chosen, rewards/accuracies, ...) in the log, metrics.jsonl and trackers,
  and on validation pairs (eval_rewards/accuracies); export as llm_finetune's, with a model card naming the method.
"""

import hashlib
import json
from pathlib import Path
from typing import Optional

import attrs
import numpy as np
import torch
import xxhash

from automodel import data, distributed, models
from automodel.backends import build_frozen
from automodel.config import BatchShape, ConfigError, TrainConfig
from automodel.data import preference as pairs
from automodel.recipes.skeleton import Parts, Setup, ValidationSet, run as run_recipe
from automodel.training.teacher import FrozenModel
from automodel.training.loop import TrainResult
from automodel.training.preference import PreferenceLoss, nll_tokens, sub_batch


def run(cfg: TrainConfig) -> TrainResult:
    return run_recipe(cfg, parts)


def parts(setup: Setup) -> Parts:
    cfg, pref = setup.cfg, setup.cfg.preference
    # The tokenizer, then the pairs (tokenised and cached once): a data problem is reported before any weights load.
    tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.model)
    if cfg.data.chat_template:  # saved with the tokenizer: prompts are built as in training
        tokenizer.chat_template = data.CHAT_TEMPLATES.get(cfg.data.chat_template, cfg.data.chat_template)
    options = data.format_options(cfg.data, tokenizer)
    train_sets, val_sets = pairs.build_sources(cfg.data, tokenizer, options, seed=cfg.seed, rank=setup.ranks.rank,
                                               log=print)
    streamed = cfg.data.train[0].streaming  # then read as training goes (train_sets is empty): opened and checked
    stream_lines = data.stream.preflight(cfg.data, options) if streamed else []
    train_set = pairs.chain(train_sets, "train") if train_sets else None
    weights = [src.weight for src in cfg.data.train]
    mixture = (data.Mixture.of([len(s) for s in train_sets], weights, cfg.seed)
               if weights[0] is not None and not streamed else None)

    # The policy (under ZeRO-3 a pretrained model loads already partitioned), then the reference, then LoRA.
    model = setup.build_causal_lm(cfg.model, tokenizer)
    chunk = cfg.train.loss_chunk_tokens
    ref_logps: dict[str, Optional[np.ndarray]] = {}
    if pref.precompute_reference:
        # Every row's reference log-prob, read back (a resumed run) or computed in one pass by a reference built for
        # it (with LoRA too: the base, before adapters), which is then freed.
        reference = None
        sets = [train_set, *val_sets]  # never streamed
        files = {s.name: reference_files(setup, s) for s in sets}  # hashes each set's tokens once
        ref_logps = {s.name: stored_reference(setup, s, files[s.name]) for s in sets}
        if any(v is None for v in ref_logps.values()):
            frozen, _ = build_reference(setup, tokenizer, model, copy_for_adapter=True)
            ref_logps = {s.name: ref_logps[s.name] if ref_logps[s.name] is not None else
                         compute_reference(setup, frozen, s, tokenizer.pad_token_id, chunk, files[s.name])
                         for s in sets}
            del frozen
        reference_note = f"reference log-probs precomputed, in {setup.out / 'reference'}"
    else:
        reference, reference_note = build_reference(setup, tokenizer, model)
    model, base_path = setup.apply_lora(model, tokenizer)

    def objective(module, chunk_tokens, dtype, partitioned):
        return PreferenceLoss(module, pref, chunk_tokens, dtype, reference=reference, partitioned=partitioned)

    nll = nll_tokens(pref)
    pad = tokenizer.pad_token_id
    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def validation_set(vset: pairs.PreferenceSet) -> ValidationSet:
        return ValidationSet(lambda: (pairs.collate(vset, idx, pad, nll, ref_logps.get(vset.name))
                                      for idx in pairs.eval_batches(vset, eval_size, cfg.eval.max_batches)))

    def stream(position):  # this rank's part of the streamed sources, from a checkpoint's position or the start
        return data.stream.open_rank_stream(cfg.data, tokenizer, options,
                                            BatchShape.of(cfg.train, setup.ranks.world_size), cfg.seed,
                                            setup.ranks.rank, position,
                                            collate=lambda samples: pairs.collate_samples(samples, pad, nll))

    names = data.validation_names(cfg.data)
    unit = "pairs" if pref.loss != "kto" else "examples"
    return Parts(
        model=model, processing_class=tokenizer, base_path=base_path, num_train=len(train_set or ()), mixture=mixture,
        collate=(lambda idx: pairs.collate(train_set, idx, pad, nll, ref_logps.get(train_set.name)))
        if train_set is not None else None,
        stream=stream if streamed else None,
        validation={name: validation_set(v) for name, v in zip(names, val_sets)},
        data_lines=stream_lines + [s.summary() for s in [*train_sets, *val_sets]], objective=objective, unit=unit,
        model_note=f"preference.loss {pref.loss}, beta {pref.beta}; {reference_note}",
        flops=models.flop_model(model),
    )


def build_reference(setup: Setup, tokenizer, policy, copy_for_adapter: bool = False) -> tuple[Optional[FrozenModel], str]:
    """(the frozen reference model, or None where the loss needs none or LoRA's adapter-off base serves; a note for
    the log). `copy_for_adapter`: build the base anyway (to precompute with it, then free it)."""
    cfg, pref = setup.cfg, setup.cfg.preference
    if pref.loss in ("simpo", "orpo"):
        return None, "no reference model (reference-free loss)"
    if not pref.reference and cfg.peft is not None and not copy_for_adapter:
        return None, "reference: the base model with the LoRA adapter switched off (no second copy)"
    dtype = cfg.model.dtype if pref.reference_dtype == "auto" else pref.reference_dtype
    if pref.reference:
        ref_cfg = attrs.evolve(cfg.model, name_or_path=pref.reference, init="pretrained", dtype=dtype, config={})
        what = f"`{pref.reference}`"
    else:  # the initial policy: built again (a pretrained model loads again; one from config is seeded alike)
        ref_cfg = attrs.evolve(cfg.model, dtype=dtype)
        what = "a frozen copy of the initial policy"
    try:
        model = setup.build_causal_lm(ref_cfg, tokenizer, trained=False)
    except ConfigError as e:
        raise ConfigError(f"preference.reference: {e}") from None
    if models.vocab_size(model) != models.vocab_size(policy):
        raise ConfigError(f"preference.reference `{pref.reference}` has a {models.vocab_size(model):,}-token output "
                          f"vocabulary, the policy {models.vocab_size(policy):,}: the log-probs of the same tokens are "
                          "compared, so they must share the tokenizer")
    note = f"reference: {what}, {models.count_params(model):,} parameters, {dtype}"
    return build_frozen(model, setup.ds_config, setup.device), note


def reference_files(setup: Setup, pset: pairs.PreferenceSet) -> tuple[Path, Path, dict]:
    """(<output_dir>/reference/<set>.npy, its .json, what it must have been computed for: these rows, this
    reference)."""
    cfg = setup.cfg
    tokens = pset.input_ids.flat[:pset.input_ids.offsets[-1]]
    identity = {"rows": len(pset.input_ids), "tokens": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(tokens).tobytes()),
                "reference": cfg.preference.reference, "reference_dtype": cfg.preference.reference_dtype,
                "model": cfg.model.name_or_path, "init": cfg.model.init, "model_config": cfg.model.config,
                "seed": cfg.seed}
    identity["key"] = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    stem = setup.out / "reference" / pset.name.replace("/", "--")
    return stem.with_suffix(".npy"), stem.with_suffix(".json"), identity


def stored_reference(setup: Setup, pset: pairs.PreferenceSet, files: tuple[Path, Path, dict]) -> Optional[np.ndarray]:
    """The set's precomputed reference log-probs if a run wrote them for these rows and this reference (`files`:
    reference_files), else None."""
    path, meta, identity = files
    if not (meta.is_file() and path.is_file()) or json.loads(meta.read_text()).get("key") != identity["key"]:
        return None
    values = np.load(path)
    if values.shape != (len(pset.input_ids),):
        return None
    if setup.is_main:
        print(f"data: {pset.name}: reference log-probs read from {path}")
    return values


def compute_reference(setup: Setup, frozen: FrozenModel, pset: pairs.PreferenceSet, pad: int, chunk_tokens: int,
                      files: tuple[Path, Path, dict]) -> np.ndarray:
    """Every row's summed reference log-prob (float32, row order), computed on every rank alike (under ZeRO-3 the
    forward is collective) and written by rank 0 to <output_dir>/reference/ (atomically, its .json last)."""
    cfg = setup.cfg
    loss = PreferenceLoss(frozen.model, cfg.preference, chunk_tokens, frozen.dtype, reference=frozen)
    loss.calibrate(frozen.run, setup.device)
    out = np.zeros(len(pset.input_ids), dtype=np.float32)
    size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    for idx in pairs.eval_batches(pset, size):
        batch = {k: v.to(setup.device) if isinstance(v, torch.Tensor) else v
                 for k, v in pairs.collate(pset, idx, pad).items()}
        with torch.no_grad():
            first = loss.reference_logps(frozen.run, batch).cpu().numpy()
            second = (loss.reference_logps(frozen.run, sub_batch(batch, "kl_")).cpu().numpy()
                      if pset.kind == "kto" else first[len(idx):])
        out[[2 * i for i in idx]] = first[:len(idx)]
        out[[2 * i + 1 for i in idx]] = second
    path, meta, identity = files
    if setup.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        meta.write_text(json.dumps(identity, default=str) + "\n")
        print(f"data: {pset.name}: reference log-probs of {len(out):,} rows computed in one pass, written to {path}")
    distributed.barrier()
    return out
