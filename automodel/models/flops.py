"""Training FLOPs of a step, for MFU: counted from the model's parameters and each batch's real sequence lengths.

Per token, a weight matrix of N entries costs 2N in the forward, 2N for the gradient of its input and 2N for its
own gradient: 6N when it trains, 4N when it is frozen (LoRA's base, a frozen vision tower: no weight gradient).
Attention scores and their weighted sum cost 4 L d t per token in the forward for a sequence of t tokens, 12 L d t
with the backward (PaLM, appendix B), so a sequence of t tokens costs 12 L d t^2 over all its tokens. A packed row
holds several sequences: each counts with its own length, as attention does not cross them.
"""

from typing import Mapping

import attrs
import numpy as np
import torch


@attrs.frozen
class FlopModel:
    matmul_per_token: float  # 6 x trainable + 4 x frozen weight-matrix entries
    attention_per_token_pair: float  # 12 x layers x hidden: per token, per position it attends to

    def of_batch(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Training FLOPs of one host batch (forward and backward)."""
        lengths = sequence_lengths(batch)
        return self.matmul_per_token * float(lengths.sum()) + self.attention_per_token_pair * float(
            (lengths.astype(np.float64) ** 2).sum())


def sequence_lengths(batch: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The real length of every sequence in a host batch: non-padding tokens per row, or with position_ids (packed
    rows) the length of each sample (positions restart at 0 where one begins)."""
    mask = batch["attention_mask"].numpy()
    if mask.ndim != 2:  # a 4-D mask (packed, dense): the row's real tokens are where its position ids run
        mask = (batch["input_ids"].numpy() >= 0)
    real = mask.sum(axis=1)
    if "position_ids" not in batch:
        return real.astype(np.int64)
    positions = batch["position_ids"].numpy()
    lengths = []
    for row, n in zip(positions, real):
        starts = np.flatnonzero(row[:n] == 0)
        if len(starts) == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        lengths.append(np.diff(np.concatenate([starts, [n]])))
    return np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, dtype=np.int64)


def flop_model(model: torch.nn.Module) -> FlopModel:
    """The FLOP counts of `model` as it will train (call it after LoRA and freezing: requires_grad decides).

    Weight matrices are the parameters with two or more dimensions except the input embedding (a lookup), unless it
    is tied to the output head (then it counts once, as the head). Norm weights and biases are left out (a few
    FLOPs per entry, not 2 per token per entry)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and any(p is embedding for p in head.parameters())
    trainable = frozen = 0
    seen: set[int] = set()
    for p in model.parameters():
        # (under ZeRO-3 a parameter may be partitioned away already: ds_shape and ds_numel keep its size)
        if id(p) in seen or len(getattr(p, "ds_shape", p.shape)) < 2 or (p is embedding and not tied):
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += getattr(p, "ds_numel", p.numel())
        else:
            frozen += getattr(p, "ds_numel", p.numel())
    layers, hidden = _layers_and_hidden(model.config)
    return FlopModel(matmul_per_token=6.0 * trainable + 4.0 * frozen, attention_per_token_pair=12.0 * layers * hidden)


def _layers_and_hidden(config) -> tuple[int, int]:
    """(decoder layers, hidden size) of a causal LM's config, or of a VLM's language model."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "num_hidden_layers", 0), getattr(text, "hidden_size", 0)
