"""The loss: (sum, count) token cross-entropy, from whole logits or from hidden states in chunks."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from automodel.loss import IGNORE_INDEX, linear_cross_entropy, target_index, token_cross_entropy


def test_sum_and_count_over_shifted_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]])
    loss_sum, count = token_cross_entropy(logits, labels)
    # Position t predicts label t+1; position 0's label is never a target.
    targets = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (0, 3, 5), (1, 0, 7), (1, 2, 9)]
    expected = sum(F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in targets)
    assert count.item() == 6
    torch.testing.assert_close(loss_sum, expected)


def test_masked_positions_contribute_nothing():
    """Prompt tokens (label -100) cannot move the loss or receive gradient, whatever their logits are."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]])  # 3 prompt tokens
    loss_sum, count = token_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss_sum, logits)
    assert count.item() == 3
    assert torch.count_nonzero(grad[0, :2]) == 0 and torch.count_nonzero(grad[0, 5]) == 0  # only t=2,3,4 predict
    changed = logits.detach().clone()
    changed[0, :2] += 100.0
    assert token_cross_entropy(changed, labels)[0].item() == loss_sum.item()


def test_bfloat16_logits_are_upcast():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    full, _ = token_cross_entropy(logits.bfloat16().float(), labels)
    half, _ = token_cross_entropy(logits.bfloat16(), labels)
    assert half.dtype == torch.float32 and half.item() == full.item()


def _hidden_head_labels(tokens: int = 13, hidden: int = 16, vocab: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, hidden, generator=gen, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return h, head, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
def test_chunked_loss_and_gradients_equal_the_whole_logits(chunk):
    h, head, labels = _hidden_head_labels()
    whole, n_whole = token_cross_entropy(head(h), labels)
    grads_whole = torch.autograd.grad(whole, [h, head.weight, head.bias])
    chunked, n = linear_cross_entropy(h, labels, head, chunk)
    grads = torch.autograd.grad(chunked, [h, head.weight, head.bias])
    assert n.item() == n_whole.item() == (12 - 3) + (12 - 3)  # a target per next token, minus the masked
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for g, ref in zip(grads, grads_whole):  # within float32 rounding of the norm (matmul shapes differ per chunk)
        assert ((g - ref).norm() / ref.norm()).item() <= 1e-6


def test_host_index_gives_the_same_loss_and_no_trained_token_gives_zero():
    h, head, labels = _hidden_head_labels()
    index = target_index(labels)
    assert index.tolist() == [t for t in range(4 - 1, 12)] + [13 + t for t in range(0, 13 - 4)]
    a, _ = linear_cross_entropy(h, labels, head, 5)
    b, _ = linear_cross_entropy(h, labels, head, 5, index=index)
    assert a.item() == b.item()
    none = torch.full_like(labels, IGNORE_INDEX)
    loss, n = linear_cross_entropy(h, none, head, 5)
    (grad,) = torch.autograd.grad(loss, [h], allow_unused=True, materialize_grads=True)
    assert loss.item() == 0.0 and n.item() == 0 and torch.count_nonzero(grad) == 0


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_whole_logits_never_exist():
    """64 tokens x a 1,000-word vocabulary in chunks of 8: no op, forward or backward, makes anything larger than the
    head's weight (16,000) or its gradient; the whole logits (2 x 32 x 1,000 = 64,000) are never built."""
    h, head, labels = _hidden_head_labels(tokens=32, hidden=16, vocab=1000)
    with _LargestTensor() as seen:
        loss, _ = linear_cross_entropy(h, labels, head, 8)
        torch.autograd.grad(loss, [h, head.weight])
    assert seen.largest <= 16_000
    with _LargestTensor() as whole:
        loss, _ = token_cross_entropy(head(h), labels)
    assert whole.largest >= 64_000  # the measure sees what the whole path builds
