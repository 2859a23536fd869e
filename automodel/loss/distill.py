"""The knowledge-distillation loss over trained positions, as a sum (normalised by the caller, exactly as the
cross-entropy is):

    sum over trained tokens i of (1 - alpha) CE_i + alpha T^2 KL(p_teacher^T || p_student^T)_i

with p^T the softmax at temperature T (Hinton et al. 2015: the T^2 keeps the soft term's gradients on the scale of
the hard term's as T changes).
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def distill_sum(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float,
                temperature: float) -> torch.Tensor:
    """`student`, `teacher`: (n, vocab) logits of n trained positions (any dtype; computed in float32);
    `targets`: (n,) token ids. The teacher's logits carry no gradient."""
    student = student.float()
    ce = F.cross_entropy(student, targets, reduction="sum")
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return (1.0 - alpha) * ce + (alpha * temperature * temperature) * kl


def _distill_chunk(project: Callable[[torch.Tensor], torch.Tensor], project_teacher: Callable[[torch.Tensor], torch.Tensor],
                   alpha: float, temperature: float, hidden: torch.Tensor, targets: torch.Tensor,
                   teacher_hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        teacher = project_teacher(teacher_hidden)
    return distill_sum(project(hidden), teacher, targets, alpha, temperature)


def chunked_distill(hidden: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor,
                    project: Callable[[torch.Tensor], torch.Tensor],
                    project_teacher: Callable[[torch.Tensor], torch.Tensor], chunk_tokens: int, alpha: float,
                    temperature: float) -> torch.Tensor:
    """distill_sum over rows of hidden states, `chunk_tokens` at a time: each chunk's student and teacher logits
    exist only while its loss is computed (both are recomputed in the backward, the teacher's without gradient)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    recompute = torch.is_grad_enabled()
    chunks = zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), teacher_hidden.split(chunk_tokens))
    for h, t, ht in chunks:
        args = (project, project_teacher, alpha, temperature, h, t, ht)
        total = total + (checkpoint(_distill_chunk, *args, use_reentrant=False) if recompute else _distill_chunk(*args))
    return total


__all__ = ["chunked_distill", "distill_sum"]
