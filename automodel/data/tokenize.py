"""Examples -> token ids with labels; the prompt's labels are -100 so it contributes nothing to the loss."""

from typing import Optional, Sequence

import attrs
from transformers import PreTrainedTokenizerBase

from automodel.config import ConfigError, DataConfig, DataSourceConfig
from automodel.data.formats import FORMATS, BadRow, Example
from automodel.data.sources import load_rows

IGNORE_INDEX = -100


@attrs.frozen
class TokenizedSet:
    """A tokenised split. Row i: `input_ids[i]`, `labels[i]` (same length, -100 where masked),
    `prompt_lens[i]` (tokens before the response) and `references[i]` (answers for exact match)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_lens: list[int]
    references: list[tuple[str, ...]]
    name: str
    rows_read: int
    dropped: int  # longer than seq_len with truncate = "drop", or no response token left
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def summary(self) -> str:
        tokens = sum(map(len, self.input_ids))
        trained = sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)
        return (f"{self.name}: {len(self):,} samples from {self.rows_read:,} rows ({self.dropped:,} dropped, "
                f"{self.truncated:,} truncated), {tokens:,} tokens, {trained:,} trained")


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                      truncate: str, name: str) -> TokenizedSet:
    """prompt (with the tokenizer's own special tokens, e.g. BOS) + response + EOS. Prompt and response are
    tokenised separately so the mask boundary is exact and never splits a token."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out_ids, out_labels, out_prompt_lens, out_refs = [], [], [], []
    dropped = truncated = 0
    for example, p, r in zip(examples, prompts, responses):
        ids = p + r + eos
        labels = [IGNORE_INDEX] * len(p) + r + eos
        cut = len(ids) > seq_len
        if cut and truncate == "drop":
            dropped += 1
            continue
        ids, labels = ids[:seq_len], labels[:seq_len]
        # Labels are shifted by one in the loss, so position 0 never counts.
        if all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        truncated += cut
        out_ids.append(ids)
        out_labels.append(labels)
        out_prompt_lens.append(len(p))
        out_refs.append(example.references)
    return TokenizedSet(out_ids, out_labels, out_prompt_lens, out_refs, name, len(examples), dropped, truncated)


def load_examples(src: DataSourceConfig, prompt_template: str) -> list[Example]:
    fmt = FORMATS[src.format]
    rows = load_rows(src)
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(fmt(row, src.columns, prompt_template))
        except BadRow as e:
            raise ConfigError(f"{src.source}: row {i} (split `{src.split}`), field `{e.field}`: {e}") from None
    return examples


def build(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[TokenizedSet, Optional[TokenizedSet]]:
    """The tokenised train and validation sets that [data] describes."""
    sets = []
    for name in ("train", "validation"):
        src = getattr(data_cfg, name)
        if src is None:
            sets.append(None)
            continue
        examples = load_examples(src, data_cfg.prompt_template)
        tset = tokenize_examples(examples, tokenizer, data_cfg.seq_len, data_cfg.truncate, name)
        if len(tset) == 0:
            raise ConfigError(f"{src.source}: no {name} samples left: {tset.summary()}; raise data.seq_len "
                              f"(now {data_cfg.seq_len}) or set data.truncate = \"right\"")
        sets.append(tset)
    return sets[0], sets[1]
