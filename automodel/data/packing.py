"""Packing: several samples per seq_len row, each with its own positions and no attention across samples.

Rows are filled best-fit, longest sample first, so the padding left is small. In a packed row the label
of each sample's first token is masked: the token before it belongs to another sample, and in the
unpacked sample that label is never predicted either. The loss over a packed batch therefore equals the
loss over the same samples unpacked (tested).
"""

import bisect
import functools

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from automodel.data.token_store import Packed
from automodel.data.tokenize import TokenizedSet


def pack(tset: TokenizedSet, seq_len: int) -> TokenizedSet:
    """The samples of `tset` in rows of at most seq_len tokens. The packed rows are views that reference their
    samples in `tset`'s arrays (data/token_store.py: Packed): no token is copied."""
    lengths = tset.input_ids.lengths().tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = seq_len - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 1:
            bisect.insort(free, (room, b))
    members = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
    row_offsets = np.concatenate([[0], np.cumsum([len(m) for m in bins])]).astype(np.int64)
    ids, labels = tset.input_ids, tset.labels
    return TokenizedSet(Packed(ids, members, row_offsets, "ids"), Packed(labels, members, row_offsets, "labels"),
                        [0] * len(bins), [()] * len(bins), tset.name, tset.rows_read, tset.dropped, tset.truncated,
                        tset.skipped, position_ids=Packed(ids, members, row_offsets, "positions"),
                        samples=len(tset))


def flex_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """flex_attention's BlockMask for packed rows: causal within each sample (a sample starts where its position id
    is 0). It stores which 128 x 128 blocks are empty, full or partial, so the kernel skips whole blocks across
    samples and no (T x T) mask exists; built on the device from `position_ids`, with no host read."""
    sample = (position_ids == 0).cumsum(-1)

    def same_sample_causal(b, h, q, kv):
        return (q >= kv) & (sample[b, q] == sample[b, kv])

    batch, length = position_ids.shape
    build = _compiled_create_block_mask() if position_ids.device.type == "cuda" else create_block_mask
    return build(same_sample_causal, batch, None, length, length, device=position_ids.device)


@functools.cache
def _compiled_create_block_mask():
    # Compiled, the mask is made block by block; eager, it evaluates all T x T pairs once (fine on CPU, where flex
    # attention only runs without gradients, and at the lengths tests use).
    return torch.compile(create_block_mask)


def varlen_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flash-attention's varlen arguments for packed rows, over the (batch x T) tokens flattened into one sequence:
    the cumulative sample starts (int32, batch x samples + 1 entries) and the longest sample. Worked out on the host:
    transformers infers them from position_ids itself only for a batch of one row, and reads the device to do it."""
    flat = position_ids.reshape(-1).cpu()
    starts = torch.nonzero(flat == 0).view(-1)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, T, T) additive mask: a token sees earlier tokens of its own sample only. A sample starts
    where its position id is 0 (padding continues as a sample of its own)."""
    sample = (position_ids == 0).cumsum(-1)
    allowed = (sample[:, :, None] == sample[:, None, :]) & torch.ones(
        position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
