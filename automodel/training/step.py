"""The pure training step: (state, micro_batches) -> (new state, metrics).

Loss normalisation is exact (DESIGN.md): with N the label tokens of the whole global batch (summed over
micro-batches and, when distributed, over ranks before the first backward) and l_m the summed token
cross-entropy of micro-batch m, the step minimises sum_m l_m / N. So one micro-batch of 8 and four of 2
give the same update, and so do R ranks.
"""

from typing import Callable, Optional, Sequence

import attrs
import torch
from torch import nn

from automodel.data.packing import model_inputs
from automodel.loss import count_label_tokens, token_cross_entropy
from automodel.optim import AdamWHyper, adamw_update, clip_by_global_norm
from automodel.training.state import Tensors, TrainState, rng_scope

Batch = dict[str, torch.Tensor]
# In-place SUM all-reduce of a list of tensors across ranks; None on one rank.
AllReduce = Optional[Callable[[list[torch.Tensor]], None]]


@attrs.frozen
class StepMetrics:
    loss: torch.Tensor  # sum_m l_m / N, 0-d; read it with .item() only when logging (it syncs a GPU)
    grad_norm: torch.Tensor  # global L2 norm before clipping
    lr: float
    label_tokens: torch.Tensor  # N


def make_loss_fn(model: nn.Module) -> Callable[[Tensors, Batch], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed token cross-entropy, label tokens), running `model` with `params` in
    place of its trainable weights."""

    attn = getattr(model.config, "_attn_implementation", "sdpa")
    dtype = next(iter(model.parameters())).dtype

    def loss_fn(params: Tensors, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.func.functional_call(model, params, (), model_inputs(batch, attn, dtype))
        return token_cross_entropy(out.logits, batch["labels"])

    return loss_fn


def make_train_step(
    model: nn.Module,
    *,
    hyper: AdamWHyper,
    lr_fn: Callable[[int], float],
    clip_grad_norm: float,
    device: torch.device,
    grad_method: str = "autograd",
    all_reduce: AllReduce = None,
    world_size: int = 1,
) -> Callable[[TrainState, Sequence[Batch]], tuple[TrainState, StepMetrics]]:
    loss_fn = make_loss_fn(model)

    def grads_autograd(params: Tensors, batch: Batch, n: torch.Tensor):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss_sum, _ = loss_fn(leaves, batch)
        # Unused weights (a VLM's vision head or post-norm that the projector never reads) get zero gradients.
        grads = torch.autograd.grad(loss_sum / n, list(leaves.values()), allow_unused=True, materialize_grads=True)
        return list(grads), loss_sum.detach()

    def grads_func(params: Tensors, batch: Batch, n: torch.Tensor):
        def objective(p: Tensors):
            loss_sum, _ = loss_fn(p, batch)
            return loss_sum / n, loss_sum

        grads, (_, loss_sum) = torch.func.grad_and_value(objective, has_aux=True)(params)
        return [grads[k] for k in params], loss_sum.detach()

    micro_grads = {"autograd": grads_autograd, "grad_and_value": grads_func}[grad_method]

    def train_step(state: TrainState, micro_batches: Sequence[Batch]) -> tuple[TrainState, StepMetrics]:
        n = torch.stack([count_label_tokens(b["labels"]) for b in micro_batches]).sum()
        if all_reduce is not None:
            all_reduce([n])
        with rng_scope(state.rng, device) as rng_out:
            grads: list[torch.Tensor] = []
            loss_total = torch.zeros((), device=device)
            for batch in micro_batches:
                g, loss_sum = micro_grads(state.params, batch, n)
                if grads:
                    torch._foreach_add_(grads, g)
                else:
                    grads = g
                loss_total = loss_total + loss_sum
        reduced = grads + [loss_total]
        if all_reduce is not None:
            all_reduce(reduced)
        grads, loss_total = reduced[:-1], reduced[-1]
        grads, grad_norm = clip_by_global_norm(grads, clip_grad_norm)
        lr = lr_fn(state.step)
        params, opt_state = adamw_update(state.params, dict(zip(state.params, grads)), state.opt_state, lr, hyper)
        samples = world_size * sum(b["input_ids"].shape[0] for b in micro_batches)
        new_state = attrs.evolve(state, step=state.step + 1, params=params, opt_state=opt_state, rng=rng_out[0],
                                 data_position=state.data_position + samples)
        return new_state, StepMetrics(loss=loss_total / n, grad_norm=grad_norm, lr=lr, label_tokens=n)

    return train_step
