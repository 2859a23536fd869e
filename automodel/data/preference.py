"""Preference data: chosen/rejected pairs (format = "preference") and KTO's labelled completions (format = "kto"),
tokenised as TRL's DPOTrainer and KTOTrainer tokenise them, stored as two rows per sample.

Rows: a pair i is rows 2i (prompt + chosen) and 2i + 1 (prompt + rejected); a KTO example i is rows 2i (its prompt
+ completion) and 2i + 1 (its prompt + the previous example's completion: the mismatched pair whose log-ratio
estimates KTO's reference point). Labels are -100 on the prompt. The rows live in the token store
(data/token_store.py), cached like any tokenised split.

Tokenisation (TRL 1.16's): text rows get the EOS appended to each completion (as text, unless it ends with it);
the prompt and prompt + completion are tokenised whole (the tokenizer's own specials, e.g. BOS, included), and the
completion starts where the two token sequences part (a token merged across the boundary belongs to the
completion). Conversations are rendered with the chat template: the prompt with the generation prompt, prompt +
completion without, each tokenised without specials. Then `data.max_prompt_tokens` keeps the prompt's end and
`data.seq_len` keeps the start of prompt + completion; a sample whose prompt alone fills seq_len is dropped.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import attrs
import numpy as np
import torch

from automodel.config import ConfigError, DataConfig, DataSourceConfig
from automodel.data.batching import collate_rows
from automodel.data.formats import BadRow, FormatOptions, render_chat_template, turns_of
from automodel.data.sources import load_rows
from automodel.data.token_store import Rows, concat
from automodel.data import token_store as store
from automodel.data.tokenize import _source_identity, _tokenizer_identity, cache_root, carved, row_where, split_plan
from automodel.loss import IGNORE_INDEX

CACHE_VERSION = 1
FORMATS = ("preference", "kto")  # DataSourceConfig.format values read here
Text = Any  # a string, or a list of {"role", "content"} messages


@attrs.frozen
class PreferenceSet:
    """Tokenised pairs or KTO examples, two rows each (see the module doc); `desirable` (KTO) per example."""

    input_ids: Any  # Rows
    labels: Any  # Rows
    desirable: Optional[np.ndarray]  # bool per example (KTO), None for pairs
    name: str
    rows_read: int
    dropped: int  # the prompt alone fills seq_len
    prompts_cut: int
    completions_cut: int
    skipped: int = 0
    kind: str = "pairs"  # or "kto"

    def __len__(self) -> int:
        return len(self.input_ids) // 2

    def summary(self) -> str:
        unit = "pairs" if self.kind == "pairs" else "examples"
        tokens = int(self.input_ids.lengths().sum())
        extra = ""
        if self.desirable is not None:
            extra = f" ({int(self.desirable.sum()):,} desirable, {int((~self.desirable).sum()):,} undesirable)"
        skipped = f", {self.skipped:,} bad rows skipped" if self.skipped else ""
        return (f"{self.name}: {len(self):,} {unit}{extra} from {self.rows_read:,} rows ({self.dropped:,} dropped: "
                f"prompt fills seq_len; {self.prompts_cut:,} prompts cut to data.max_prompt_tokens, "
                f"{self.completions_cut:,} completions cut to seq_len{skipped}), {tokens:,} tokens")


# ---------------------------------------------------------------------------------------------
# Rows -> (prompt, chosen, rejected) or (prompt, completion, desirable)


def _value(row: Mapping[str, Any], columns: Mapping[str, str], field: str, required: bool = True) -> Any:
    column = columns.get(field, field)
    if column not in row or row[column] is None:
        if not required:
            return None
        raise BadRow(field, f"missing column `{column}` (columns here: {', '.join(row)}); map it with "
                            f"data.<split>.columns.{field} = \"<your column>\"")
    return row[column]


def _text_or_turns(value: Any, column: str, field: str) -> Text:
    """A string, or messages (a ShareGPT turn object counts as a list of one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    return turns_of(value, column, field)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's extract_prompt: the shared beginning of chosen and rejected is the prompt (whole turns for messages;
    for text, characters, the space before the first difference left to the completions)."""
    idx = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and 0 < idx < min(len(chosen), len(rejected)) and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def preference_row(row: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected), each text or messages, from any of: TRL's prompt/chosen/rejected (prompt optional:
    implicit prompts are split at the common beginning); ShareGPT `conversations` + `chosen`/`rejected` turns;
    `chosen_messages`/`rejected_messages`."""
    if "chosen_messages" in row and "chosen" not in columns:
        chosen = turns_of(row["chosen_messages"], "chosen_messages", "chosen")
        rejected = turns_of(_value(row, {}, "rejected_messages"), "rejected_messages", "rejected")
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    else:
        chosen_col, rejected_col = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
        chosen = _text_or_turns(_value(row, columns, "chosen"), chosen_col, "chosen")
        rejected = _text_or_turns(_value(row, columns, "rejected"), rejected_col, "rejected")
        conversation_col = columns.get("prompt", "conversations" if "conversations" in row else "prompt")
        prompt = row.get(conversation_col)
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        else:
            prompt = _text_or_turns(prompt, conversation_col, "prompt")
    _check_completions(prompt, [("chosen", chosen), ("rejected", rejected)])
    if chosen == rejected:
        raise BadRow("chosen", "chosen and rejected are the same; a pair needs two different completions")
    return prompt, chosen, rejected


def kto_row(row: Mapping[str, Any], columns: Mapping[str, str]) -> tuple[Text, Text, bool]:
    """(prompt, completion, desirable) from prompt/completion/label (text or messages) or `messages` (the last turn,
    an assistant's, is the completion) plus `label`."""
    label = _value(row, columns, "label")
    if not isinstance(label, (bool, np.bool_)):
        raise BadRow("label", f"column `{columns.get('label', 'label')}` should be true or false, got {label!r:.40}")
    messages_col = columns.get("messages", "messages" if "messages" in row else "conversations")
    if messages_col in row and "completion" not in columns:
        turns = turns_of(row[messages_col], messages_col)
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise BadRow("messages", "the last turn should be the assistant's completion, after at least one prompt "
                                     "turn")
        prompt, completion = turns[:-1], turns[-1:]
    else:
        completion = _text_or_turns(_value(row, columns, "completion"), columns.get("completion", "completion"),
                                    "completion")
        prompt = _text_or_turns(_value(row, columns, "prompt"), columns.get("prompt", "prompt"), "prompt")
    _check_completions(prompt, [("completion", completion)])
    return prompt, completion, bool(label)


def _check_completions(prompt: Text, completions: list[tuple[str, Text]]) -> None:
    for field, completion in completions:
        if isinstance(completion, str) != isinstance(prompt, str):
            raise BadRow(field, f"the prompt is {'text' if isinstance(prompt, str) else 'messages'} and the {field} "
                                f"is {'text' if isinstance(completion, str) else 'messages'}; give both alike")
        if not completion or (isinstance(completion, str) and not completion.strip()):
            raise BadRow(field, f"the {field} completion is empty")


# ---------------------------------------------------------------------------------------------
# Tokenisation


class Encoder:
    """(prompt, completions) -> (prompt ids, [completion ids]) as TRL tokenises them (module doc)."""

    def __init__(self, tokenizer: Any, options: FormatOptions, chat: bool):
        self.tokenizer = tokenizer
        self.render = render_chat_template(tokenizer, options.chat_template) if chat else None

    def __call__(self, prompt: Text, completions: Sequence[Text]) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            eos = tok.eos_token or ""
            prompt_ids = tok(prompt)["input_ids"]
            fulls = [tok(prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
        else:
            if self.render is None:
                raise ConfigError("conversations need a chat template")
            prompt_ids = tok(self.render(prompt, True), add_special_tokens=False)["input_ids"]
            fulls = [tok(self.render(prompt + c, False), add_special_tokens=False)["input_ids"] for c in completions]
        n = min(_common_prefix(prompt_ids, full) for full in fulls)
        return prompt_ids[:n], [full[n:] for full in fulls]


def _cut(prompt: list[int], completion: list[int], seq_len: int, max_prompt: int) -> tuple[list[int], list[int]]:
    if max_prompt and len(prompt) > max_prompt:
        prompt = prompt[len(prompt) - max_prompt:]
    return prompt, completion[:max(0, seq_len - len(prompt))]


def _row(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def tokenize_rows(rows: Any, src: DataSourceConfig, data_cfg: DataConfig, tokenizer: Any, options: FormatOptions,
                  name: str, kto: bool, where: Any = None) -> PreferenceSet:
    """The source's rows as a PreferenceSet (bad rows: an error naming file, row and field, or skipped). `where(i)`
    names row i in errors (default: tokenize.row_where, "line N" of a .jsonl file; a stream's window says its row in the rank's share and the pass)."""
    where = where or (lambda i: row_where(src, i))
    encode = None
    ids_rows, label_rows, desirable = [], [], []
    completions: list[list[int]] = []  # KTO: each kept example's completion, for the mismatched rows
    prompts: list[list[int]] = []
    dropped = prompts_cut = completions_cut = skipped = 0
    for i in range(len(rows)):
        try:
            parsed = kto_row(rows[i], src.columns) if kto else preference_row(rows[i], src.columns)
        except BadRow as e:
            if data_cfg.on_bad_row == "skip":
                skipped += 1
                continue
            raise ConfigError(f"{src.source}: {where(i)} (split `{src.split}`), field `{e.field}`: {e}; fix the row "
                              "or set data.on_bad_row = \"skip\"") from None
        prompt, *rest = parsed
        texts = rest[:1] if kto else rest
        if encode is None:
            encode = Encoder(tokenizer, options, chat=not isinstance(prompt, str))
        elif (encode.render is None) != isinstance(prompt, str):
            raise ConfigError(f"{src.source}: {where(i)} (split `{src.split}`): mixes text and conversation rows; "
                              "give one kind per source")
        prompt_ids, completion_ids = encode(prompt, texts)
        cut = [_cut(prompt_ids, c, data_cfg.seq_len, data_cfg.max_prompt_tokens) for c in completion_ids]
        if len(cut[0][0]) >= data_cfg.seq_len:
            dropped += 1
            continue
        prompts_cut += len(cut[0][0]) < len(prompt_ids)
        completions_cut += any(len(c) < len(full) for (_, c), full in zip(cut, completion_ids))
        if kto:
            prompts.append(cut[0][0])
            completions.append(completion_ids[0])
            desirable.append(rest[1])
        for p, c in cut:
            if not kto:
                ids, labels = _row(p, c)
                ids_rows.append(ids)
                label_rows.append(labels)
    if kto:  # example i's mismatched row: its prompt with the previous example's completion (cyclically)
        for k, prompt_ids in enumerate(prompts):
            for completion in (completions[k], completions[k - 1]):
                ids, labels = _row(*_cut(prompt_ids, completion, data_cfg.seq_len, 0))
                ids_rows.append(ids)
                label_rows.append(labels)
    ids = Rows.from_lists(ids_rows)
    return PreferenceSet(ids, Rows.labels_of(ids, label_rows), np.array(desirable, dtype=bool) if kto else None,
                         name, len(rows), dropped, prompts_cut, completions_cut, skipped, "kto" if kto else "pairs")


def cache_key(src: DataSourceConfig, data_cfg: DataConfig, tokenizer_id: str) -> str:
    parts = [CACHE_VERSION, _source_identity(src.source), src.split, src.limit, src.format, sorted(src.columns.items()),
             data_cfg.seq_len, data_cfg.max_prompt_tokens, data_cfg.chat_template, data_cfg.on_bad_row, tokenizer_id]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _save(pset: PreferenceSet, path: Path) -> None:
    meta = {"name": pset.name, "rows_read": pset.rows_read, "dropped": pset.dropped, "prompts_cut": pset.prompts_cut,
            "completions_cut": pset.completions_cut, "skipped": pset.skipped, "kind": pset.kind,
            "desirable": None if pset.desirable is None else pset.desirable.astype(int).tolist()}
    store.write(path, pset.input_ids, pset.labels, [0] * len(pset.input_ids), [()] * len(pset.input_ids), meta)


def _load(path: Path) -> PreferenceSet:
    ids, labels, _, _, meta = store.read(path)
    desirable = None if meta["desirable"] is None else np.array(meta["desirable"], dtype=bool)
    return PreferenceSet(ids, labels, desirable, meta["name"], meta["rows_read"], meta["dropped"],
                         meta["prompts_cut"], meta["completions_cut"], meta["skipped"], meta["kind"])


def build_sources(data_cfg: DataConfig, tokenizer: Any, options: FormatOptions, seed: int = 0, rank: int = 0,
                  log=None, use_cache: bool = True) -> tuple[list[PreferenceSet], list[PreferenceSet]]:
    """(training sets, validation sets) of [data], tokenised once by rank 0 into the cache, read by every rank.
    data.validation_fraction carves a seeded share of the training rows. Streamed training sources are not built
    here (their list is empty)."""
    from automodel.distributed import barrier

    plan = split_plan(data_cfg, seed)
    tokenizer_id = _tokenizer_identity(tokenizer) if use_cache else ""
    train, validation = [], []
    for name, src, carve in plan:
        key = cache_key(src, data_cfg, tokenizer_id) + (f"-{carve[0]}-{carve[1]}-{carve[2]}" if carve else "")
        path = cache_root(data_cfg) / f"{name.replace('/', '--')}-{key}"
        if not use_cache or (rank == 0 and not (path / "meta.json").is_file()):
            started = time.perf_counter()
            rows = carved(load_rows(src, data_cfg.on_bad_row), carve)
            pset = tokenize_rows(rows, src, data_cfg, tokenizer, options, name, kto=src.format == "kto")
            if log is not None:
                log(f"data: rank {rank} tokenised {name} ({len(rows):,} rows) in {time.perf_counter() - started:.1f}s")
            if use_cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                _save(pset, path)
        if use_cache:
            barrier()
            pset = _load(path)
        if len(pset) == 0:
            raise ConfigError(f"{src.source}: no {name} samples left: {pset.summary()}; raise data.seq_len (now "
                              f"{data_cfg.seq_len}) or set data.max_prompt_tokens")
        (train if name.startswith("train") else validation).append(pset)
    return train, validation


def chain(sets: Sequence[PreferenceSet], name: str) -> PreferenceSet:
    """The sets' samples end to end (a copy of the token arrays: preference sets are small next to SFT corpora)."""
    if len(sets) == 1:
        return sets[0]
    desirable = None if sets[0].desirable is None else np.concatenate([s.desirable for s in sets])
    return PreferenceSet(concat([s.input_ids for s in sets]), concat([s.labels for s in sets]), desirable, name,
                         sum(s.rows_read for s in sets), sum(s.dropped for s in sets),
                         sum(s.prompts_cut for s in sets), sum(s.completions_cut for s in sets),
                         sum(s.skipped for s in sets), sets[0].kind)


# ---------------------------------------------------------------------------------------------
# Batches


Sample = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], Optional[bool]]  # rows 2i, 2i+1, label


def samples_of(pset: PreferenceSet, indices: Sequence[int]) -> list[Sample]:
    """Samples `indices` of the set as (first row, second row, KTO label or None), each row (ids, labels)."""
    return [((pset.input_ids.array(2 * i), pset.labels.array(2 * i)),
             (pset.input_ids.array(2 * i + 1), pset.labels.array(2 * i + 1)),
             None if pset.desirable is None else bool(pset.desirable[i])) for i in indices]


def collate(pset: PreferenceSet, indices: Sequence[int], pad_id: int, nll: str = "none",
            ref_logps: Optional[np.ndarray] = None) -> dict[str, torch.Tensor]:
    """Samples `indices` as one batch: pairs as 2k rows [chosen 1..k, rejected 1..k] (TRL's layout); KTO as the k
    completions, their mismatched rows under `kl_` keys, and `desirable`. `nll`: which tokens the NLL term covers
    ("completion": chosen completions; "all": every chosen token, as ORPO; "none"). `ref_logps`: the precomputed
    reference log-prob of every row of the set."""
    refs = None
    if ref_logps is not None:
        refs = [(float(ref_logps[2 * i]), float(ref_logps[2 * i + 1])) for i in indices]
    return collate_samples(samples_of(pset, indices), pad_id, nll, refs)


def collate_samples(samples: Sequence[Sample], pad_id: int, nll: str = "none",
                    refs: Optional[Sequence[tuple[float, float]]] = None) -> dict[str, torch.Tensor]:
    """`collate` of samples given as (first row, second row, KTO label or None), e.g. read from a stream; `refs`:
    each sample's two reference log-probs."""
    k = len(samples)
    refs = list(refs) if refs is not None else None
    if samples[0][2] is None:  # pairs
        rows = [s[0] for s in samples] + [s[1] for s in samples]
        ref_rows = [r[0] for r in refs] + [r[1] for r in refs] if refs is not None else None
        return _rows_batch(rows, pad_id, nll, k, ref_rows)
    batch = _rows_batch([s[0] for s in samples], pad_id, "none", 0, [r[0] for r in refs] if refs else None)
    mismatched = _rows_batch([s[1] for s in samples], pad_id, "none", 0, [r[1] for r in refs] if refs else None)
    batch.update({f"kl_{name}": value for name, value in mismatched.items()})
    batch["desirable"] = torch.tensor([bool(s[2]) for s in samples], dtype=torch.bool)
    return batch


def _rows_batch(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int, nll: str, chosen: int,
                ref_logps: Optional[list[float]]) -> dict[str, torch.Tensor]:
    """(ids, labels) rows right-padded, with host-side index tensors naming the next-token log-probs the loss needs
    (so the device is never asked): `logp_index` (flat positions), `logp_row`, `logp_completion` (summed into the
    row's log-prob) and `logp_nll` (in the NLL term; the first `chosen` rows are the chosen ones)."""
    batch = collate_rows([(ids, labels, None) for ids, labels in rows], pad_id)
    rows, length = batch["input_ids"].shape
    completion = torch.zeros(rows, length, dtype=torch.bool)
    completion[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    wanted = completion.clone()
    nll_mask = torch.zeros_like(completion)
    if nll == "all":
        nll_mask[:chosen, :-1] = batch["attention_mask"][:chosen, 1:].bool()
        wanted |= nll_mask
    elif nll == "completion":
        nll_mask[:chosen] = completion[:chosen]
    index = wanted.reshape(-1).nonzero().squeeze(1)
    batch.update(logp_index=index, logp_row=index // length, logp_completion=completion.reshape(-1)[index],
                 logp_nll=nll_mask.reshape(-1)[index])
    if ref_logps is not None:
        batch["ref_logps"] = torch.tensor(ref_logps, dtype=torch.float32)
    return batch


def eval_batches(pset: PreferenceSet, batch_size: int, max_batches: int = 0) -> list[list[int]]:
    batches = [list(range(i, min(i + batch_size, len(pset)))) for i in range(0, len(pset), batch_size)]
    return batches[:max_batches] if max_batches > 0 else batches


__all__ = ["Encoder", "PreferenceSet", "Sample", "build_sources", "chain", "collate", "collate_samples", "eval_batches",
           "kto_row", "preference_row", "samples_of", "split_implicit_prompt", "tokenize_rows"]
