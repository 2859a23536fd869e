"""Held-out evaluation: token-weighted loss, and exact match of greedily decoded answers."""

import re
import string
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from automodel.data import TokenizedSet
from automodel.training.preference import finish_stats


@torch.no_grad()
def eval_loss(model: nn.Module, loss_sum: Callable[[dict[str, torch.Tensor]], tuple],
              batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int, dict[str, float]]:
    """(summed token loss / label tokens over every batch, label tokens, statistics): each token counts once,
    however the set is batched. A preference loss counts pairs (or examples) instead and returns its statistics as
    (sum, count) pairs, pooled here the same way. `model` is put in eval mode (no dropout) while it runs."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        stats: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, n, *more = loss_sum(batch)
            total += loss.double().cpu()
            count += int(n)
            for name, value in (more[0] if more else {}).items():
                stats[name] = stats.get(name, 0) + value.double().cpu()
    finally:
        model.train(was_training)
    means = {k: v.item() for k, v in finish_stats(stats).items()}
    return (total / max(count, 1)).item(), count, means


def normalize_answer(text: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, batch_size: int, device: torch.device, **generate_kwargs) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, stopping at EOS."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(map(len, chunk))
            # Left padding, so every prompt ends where generation starts.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 **generate_kwargs)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: TokenizedSet, samples: int,
                max_new_tokens: int, batch_size: int, device: torch.device,
                **generate_kwargs) -> tuple[float, list[tuple[str, str]]]:
    """(fraction of the first `samples` validation rows whose decoded answer equals a reference after
    normalisation, [(prediction, first reference), ...])."""
    n = min(samples, len(dataset))
    prompts = [dataset.input_ids[i][:dataset.prompt_lens[i]] for i in range(n)]
    predictions = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, device, **generate_kwargs)
    hits = sum(normalize_answer(p) in {normalize_answer(r) for r in dataset.references[i]}
               for i, p in enumerate(predictions))
    return hits / max(n, 1), [(p, dataset.references[i][0]) for i, p in enumerate(predictions)]



@torch.no_grad()
def exact_match_of_prompts(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                           prompts: Iterable[tuple[Mapping[str, torch.Tensor], str]], max_new_tokens: int,
                           device: torch.device, **generate_kwargs) -> tuple[float, list[tuple[str, str]]]:
    """Exact match for prompts that are whole model inputs (a VLM's ids with pixel values ...), one at a time:
    (fraction of greedy answers equal to their reference up to white space, [(prediction, reference), ...]).
    Strict, unlike SQuAD's normalisation: punctuation is content in LaTeX or code."""
    was_training = model.training
    model.eval()
    pairs = []
    try:
        for inputs, reference in prompts:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            width = inputs["input_ids"].shape[1]
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **generate_kwargs)
            pairs.append((tokenizer.decode(out[0, width:], skip_special_tokens=True), reference))
    finally:
        model.train(was_training)
    hits = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in pairs)
    return hits / max(len(pairs), 1), pairs
