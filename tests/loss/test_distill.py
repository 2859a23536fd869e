"""The distillation loss: its value against a direct computation, chunked and whole, and gradients."""

import pytest
import torch
import torch.nn.functional as F

from automodel.loss import IGNORE_INDEX, chunked_distill, distill_sum


def direct(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, t: float) -> torch.Tensor:
    """Textbook: (1 - alpha) CE + alpha T^2 sum_v p_t (log p_t - log p_s), p at temperature T, token by token."""
    total = torch.zeros(())
    for s_row, t_row, y in zip(student, teacher, targets):
        ce = -torch.log_softmax(s_row, -1)[y]
        p_t = torch.softmax(t_row / t, -1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(s_row / t, -1))).sum()
        total = total + (1 - alpha) * ce + alpha * t * t * kl
    return total


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_distill_sum_matches_the_textbook_and_the_chunks_match_it(alpha, temperature):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    teacher_hidden = torch.randn(11, 16, generator=gen)
    head = torch.nn.Linear(16, 40)
    teacher_head = torch.nn.Linear(16, 40)
    targets = torch.randint(0, 40, (11,), generator=gen)
    expected = direct(head(hidden), teacher_head(teacher_hidden), targets, alpha, temperature)
    got = distill_sum(head(hidden), teacher_head(teacher_hidden), targets, alpha, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (g_direct,) = torch.autograd.grad(expected, [hidden])
    chunked = chunked_distill(hidden, targets, teacher_hidden, head, teacher_head, 4, alpha, temperature)
    (g_chunked,) = torch.autograd.grad(chunked, [hidden])
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_chunked, g_direct, rtol=1e-5, atol=1e-6)
    # The teacher learns nothing: the loss reaches the student's head but not the teacher's weights or hidden states.
    teacher_hidden.requires_grad_(True)
    loss = chunked_distill(hidden, targets, teacher_hidden, head, teacher_head, 4, alpha, temperature)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert teacher_head.weight.grad is None and teacher_hidden.grad is None


def test_alpha_zero_is_the_cross_entropy_bit_for_bit_and_a_matching_teacher_adds_nothing():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 30, generator=gen, requires_grad=True)
    targets = torch.randint(0, 30, (7,), generator=gen)
    ce = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)
    kd = distill_sum(logits, torch.randn(7, 30, generator=gen), targets, 0.0, 2.0)
    assert kd.item() == ce.item()
    assert torch.equal(torch.autograd.grad(kd, logits)[0], torch.autograd.grad(ce, logits)[0])
    # KL(p || p) = 0: distilling from itself at alpha = 1 costs nothing and moves nothing.
    same = distill_sum(logits, logits.detach(), targets, 1.0, 3.0)
    assert abs(same.item()) < 1e-5
    assert torch.autograd.grad(same, logits)[0].abs().max() < 1e-6
