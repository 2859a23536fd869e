import torch
import torch.nn.functional as F

from automodel.loss import IGNORE_INDEX, token_cross_entropy


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
