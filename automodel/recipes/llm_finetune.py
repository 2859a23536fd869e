"""Supervised fine-tuning of a causal LM, read top to bottom.

Features:
- any `AutoModelForCausalLM` (hub id, local dir, or an architecture built from [model.config]);
- full fine-tuning, or LoRA through peft ([peft]): only adapter tensors are trained and saved;
- SQuAD, instruction, chat (chat templates, assistant-only loss) and plain-text data, cached once
  tokenised; optional packing with per-sample positions and block-diagonal attention;
- two backends behind one step interface: a pure torch.func step (pure AdamW, explicit all-reduce over
  ranks) and DeepSpeed ZeRO 0-3 with CPU offload; exact loss normalisation over micro-batches and ranks,
  global-norm clipping, a pure LR schedule;
- atomic checkpoints every `checkpoint.every` steps and at the end; `train.resume = "auto"` continues
  from the newest complete one, reproducing the uninterrupted run step for step;
- token-weighted eval loss and greedy exact match on the validation set;
- preemption: on SIGUSR1/SIGTERM every rank stops at the same step boundary, checkpoints and exits with
  status 75; the same command resumes;
- console/tqdm progress, metrics.jsonl, the resolved config.toml, and a final HF model directory
  (gathered from ZeRO-3 shards onto rank 0).
"""

import math
import time
from pathlib import Path

from automodel import checkpoint, data, distributed, models
from automodel import peft as peft_lora
from automodel.config import ConfigError, TrainConfig, save_config
from automodel.distributed.backend import build_backend, model_init_context, resume
from automodel.distributed.deepspeed_config import deepspeed_config
from automodel.loggers import RunLogger
from automodel.training.forward import to_device
from automodel.training.evaluate import eval_loss, exact_match
from automodel.training.loop import TrainResult, run_loop
from automodel.training.metrics import peak_flops
from automodel.training.preemption import Preempted, StopRequest
from automodel.training.state import TrainState


def run(cfg: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    ranks = distributed.rank_info()
    device = distributed.device_for(ranks)
    use_deepspeed = cfg.distributed.backend == "deepspeed"
    all_reduce = distributed.setup(ranks, device, group_on_one_rank=use_deepspeed)
    is_main = ranks.rank == 0
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.toml")

    # Tokenizer, model, data. Under ZeRO-3 a pretrained model loads already partitioned.
    tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.model)
    ds_config = deepspeed_config(cfg, ranks.world_size) if use_deepspeed else None
    with model_init_context(cfg.distributed.backend, ds_config, pretrained=cfg.model.init == "pretrained"):
        model = models.build_model(cfg.model, tokenizer, cfg.seed)
    if cfg.train.activation_checkpointing:
        models.enable_activation_checkpointing(model)
    # LoRA (no-op without [peft]). A base built from config is saved, so the adapter has a base to load onto.
    base_path = cfg.model.name_or_path if cfg.model.init == "pretrained" else str(out / "base")
    if cfg.peft is not None and cfg.model.init == "random" and is_main:
        checkpoint.save_hf_model(model, tokenizer, out / "base")
    model = peft_lora.apply(model, cfg.peft, cfg.seed, base_path)
    train_set, val_set = data.build(cfg.data, tokenizer, seed=cfg.seed, rank=ranks.rank, log=print)
    if cfg.data.packing:
        train_set = data.pack(train_set, cfg.data.seq_len)
    plan = data.BatchPlan(len(train_set), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                          ranks.world_size, cfg.seed)
    max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))
    if cfg.schedule.warmup_steps > max_steps:
        raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) is larger than the run's "
                          f"{max_steps} steps ({cfg.train.epochs} epochs of {plan.steps_per_epoch})")
    flops_per_token = models.flops_per_token(model, cfg.data.seq_len)
    total_params = models.count_params(model)

    # The backend owns weights and optimizer state and provides the pure step; resume per train.resume.
    backend = build_backend(cfg, model, ds_config, max_steps, device, all_reduce, ranks.rank, ranks.world_size)
    state, meta, resume_from = resume(cfg, backend, out, ranks.rank, ranks.world_size, device)

    logger = RunLogger(out, max_steps, cfg.logging.progress_bar, enabled=is_main, start_step=state.step)
    logger.info(f"model: {type(model).__name__}, {total_params:,} parameters ({backend.trainable_params:,} "
                f"trainable), {cfg.model.dtype} on {device}; {ranks.world_size} rank(s), {backend.name} backend")
    for tset in (train_set, val_set):
        if tset is not None:
            logger.info(f"data: {tset.summary()}")
    logger.info(f"training: {max_steps} steps of {cfg.train.global_batch_size} samples "
                f"({plan.accumulation_steps} accumulation x {cfg.train.micro_batch_size} per rank), "
                f"{plan.steps_per_epoch} steps per epoch")
    logger.info(f"memory: activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}; loss "
                f"from {backend.loss_description}")
    if resume_from is not None:
        logger.info(f"resumed from {resume_from} at step {state.step}")

    # Evaluation: token-weighted loss over the validation set, and exact match of greedy answers.
    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def evaluate(st: TrainState) -> dict:
        batches = (to_device(data.collate(val_set, idx, tokenizer.pad_token_id), device)
                   for idx in data.eval_batches(val_set, eval_size, cfg.eval.max_batches))
        with backend.model_for_generation(st) as module:
            loss, tokens = eval_loss(module, lambda batch: backend.loss_sum(st, batch), batches)
            row = {"step": st.step, "eval_loss": loss, "eval_tokens": tokens}
            if cfg.eval.generate_samples > 0:
                row["exact_match"], pairs = exact_match(module, tokenizer, val_set, cfg.eval.generate_samples,
                                                        cfg.eval.max_new_tokens, eval_size, device,
                                                        **backend.generate_kwargs)
                row["examples"] = [{"prediction": p, "reference": r} for p, r in pairs[:3]]
        return row

    def save_checkpoint(st: TrainState) -> None:
        path = checkpoint.save(backend.save, st, out, ranks.rank, cfg.checkpoint.keep_last, meta)
        logger.info(f"checkpoint: {path}")

    first_eval = None
    if val_set is not None and cfg.eval.at_start and state.step == 0:
        first_eval = evaluate(state)
        logger.row(first_eval)

    start_step = state.step
    # SIGUSR1/SIGTERM (cluster preemption): checkpoint at the next step boundary and exit with status 75.
    with StopRequest() as stop:
        try:
            state, last_row = run_loop(
                state, train_step=backend.step, plan=plan,
                collate=lambda idx: data.collate(train_set, idx, tokenizer.pad_token_id), max_steps=max_steps,
                rank=ranks.rank, device=device, logger=logger,
                log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
                evaluate=evaluate if val_set is not None else None, flops_per_token=flops_per_token,
                peak_flops=peak_flops(device, cfg.logging.peak_tflops), checkpoint_every=cfg.checkpoint.every,
                save_checkpoint=save_checkpoint, stop=stop,
            )
        except Preempted as e:
            logger.info(str(e))
            logger.close()
            raise
    if state.step > start_step:
        save_checkpoint(state)

    metrics = {"steps": state.step, "train_loss": last_row.get("loss"), "train_samples": state.data_position,
               "padding_fraction": last_row.get("run_padding")}
    if val_set is not None:
        final_eval = evaluate(state)
        logger.row(final_eval)
        metrics.update({k: v for k, v in final_eval.items() if k in ("eval_loss", "exact_match")})
        if first_eval is not None and "exact_match" in first_eval:
            metrics["exact_match_at_start"] = first_eval["exact_match"]

    # Every rank calls export (under ZeRO-3 it gathers); with [peft] it writes the adapter, which the merge needs.
    final_dir = out / "final" if cfg.checkpoint.save_final or cfg.checkpoint.export_merged else None
    if final_dir is not None:
        backend.export(state, tokenizer, final_dir)
    if cfg.checkpoint.export_merged and is_main:
        peft_lora.merge(base_path, str(final_dir), str(out / "final_merged"), models.DTYPES[cfg.model.dtype])
        logger.info(f"merged model saved to {out / 'final_merged'}")
    distributed.barrier()
    metrics["wall_s"] = time.perf_counter() - started
    logger.info(_summary(metrics, final_dir))
    logger.summary({**metrics, "final_dir": str(final_dir) if final_dir else None})
    logger.close()
    return TrainResult(output_dir=out, metrics=metrics, final_dir=final_dir)


def _summary(metrics: dict, final_dir: Path | None) -> str:
    parts = [f"done: {metrics['steps']} steps in {metrics['wall_s']:.1f}s"]
    if metrics["train_loss"] is not None:  # None: resumed at the end, no step ran in this process
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    if "exact_match" in metrics:
        start = metrics.get("exact_match_at_start")
        was = f" (was {100 * start:.1f}% at step 0)" if start is not None else ""
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%{was}")
    if final_dir is not None:
        parts.append(f"model saved to {final_dir}")
    return " | ".join(parts)
