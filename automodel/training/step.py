"""The training step: (state, micro_batches) -> (new state, metrics).

Loss normalisation is exact: with N the label tokens of the whole global batch (summed over micro-batches and,
when distributed, over ranks before the first backward) and l_m the summed token cross-entropy of micro-batch m,
the step minimises sum_m l_m / N. (The loss object decides N and l_m: `prepare` and `terms`; a preference loss
counts pairs, training/preference.py.) So one micro-batch of 8 and four of 2 give the same update, and so do R ranks.

The step donates its input state: the new state's weights and moments are the old state's tensors, updated in
place (see optim/adamw.py). Treat a state as consumed once it has been stepped; clone it to keep it.

Several ranks: the last micro-batch's gradients are all-reduced in float32 buckets launched from gradient hooks while
its backward still runs (distributed/buckets.py); earlier micro-batches accumulate locally first. With
bucket_mb = 0 (or grad_method "grad_and_value") one flat all-reduce follows the last backward instead.

Precision: the state's weights may be float32 masters of a lower-precision model. The forward and backward then
run in the model's dtype (the masters are cast as they are bound), the gradients reach the float32 masters
through that cast, and they accumulate, all-reduce and update in float32.
"""

import contextlib
import functools
from typing import Callable, Sequence

import attrs
import torch

from automodel.config import DistributedConfig, TrainingConfig
from automodel.distributed import AllReduce
from automodel.distributed.buckets import GradBuckets
from automodel.loss import token_cross_entropy
from automodel.optim import AdamWHyper, Optimizer, clip_by_global_norm_, optimizer
from automodel.models.masks import rows_not_packed
from automodel.training.forward import Batch, ModelLoss, model_inputs
from automodel.training.offload import Offloaded
from automodel.training.preference import PreferenceLoss, add_stats, finish_stats
from automodel.training.state import ParamBinding, Tensors, TrainState, rng_scope



@attrs.frozen
class StepMetrics:
    loss: torch.Tensor  # sum_m l_m / N, 0-d; read it with .item() only when logging (it syncs a GPU)
    grad_norm: torch.Tensor  # global L2 norm before clipping
    lr: float
    label_tokens: torch.Tensor  # N (label tokens; pairs or examples for a preference loss)
    skipped: bool = False  # train.on_nonfinite = "skip" dropped this update (its loss or gradients were not finite)
    extras: dict = attrs.field(factory=dict)  # the loss's statistics over the global batch (0-d tensors)


def reduce_stats(stats: dict, all_reduce: AllReduce) -> dict:
    """A loss's (sum, count) statistics summed over ranks and divided: name -> 0-d tensor (no sync)."""
    if not stats:
        return {}
    names = sorted(stats)
    flat = [torch.stack([stats[k] for k in names])]
    if all_reduce is not None:
        all_reduce(flat)
    return finish_stats(dict(zip(names, flat[0])))


def make_train_step(
    binding: ParamBinding,
    loss: "ModelLoss | PreferenceLoss",
    *,
    hyper: AdamWHyper,
    lr_fn: Callable[[int], float],
    clip_grad_norm: float,
    device: torch.device,
    grad_method: str = "autograd",
    all_reduce: AllReduce = None,
    world_size: int = 1,
    on_nonfinite: str = TrainingConfig().on_nonfinite,
    bucket_mb: float = DistributedConfig().bucket_mb,
    opt: Optimizer = optimizer("adamw"),
    offload_activations: bool = False,
) -> Callable[[TrainState, Sequence[Batch]], tuple[TrainState, StepMetrics]]:
    """The functional step over `binding.model`, whose trainable tensors the state holds; `opt` updates them (AdamW,
    or 8-bit AdamW). on_nonfinite = "skip": a step whose loss or gradient norm is not finite leaves weights and
    moments as they were (deciding that reads the norm on the host: one device sync per step); "stop" applies every
    update and leaves the check to the loop. offload_activations: what the forward saves for the backward waits in
    host memory (training/offload.py)."""

    def saving(model: torch.nn.Module) -> contextlib.AbstractContextManager:
        # Around each forward (not the backward): what it saves for the backward waits in host memory.
        return Offloaded(model, device) if offload_activations else contextlib.nullcontext()

    def grads_autograd(params: Tensors, batch: Batch, totals: dict) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        # Bound through the backward too: activation checkpointing recomputes layers there.
        with binding.bound(leaves, as_parameters=False) as model:
            with saving(model):
                loss_sum, stats = loss.terms(lambda inputs: model(**inputs), batch, totals)
            # Unused weights (a VLM's vision head or post-norm that the projector never reads) get zero gradients.
            grads = torch.autograd.grad(loss_sum / totals["n"], list(leaves.values()), allow_unused=True,
                                        materialize_grads=True)
        return list(grads), loss_sum.detach(), stats

    def grads_func(params: Tensors, batch: Batch, totals: dict) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        # torch.func's transform over functional_call; it refuses saved-tensor hooks, hence no recompute of any kind
        # (the config loader requires whole-logits loss and no activation checkpointing with it).
        model, n = binding.model, totals["n"]
        inputs = model_inputs(batch, loss.attn, loss.dtype)

        def objective(p: Tensors):
            out = torch.func.functional_call(model, binding.in_module_dtype(p), (), inputs)
            loss_sum, _ = token_cross_entropy(out.logits, batch["labels"])
            return loss_sum / n, loss_sum

        with rows_not_packed(inputs):
            grads, (_, loss_sum) = torch.func.grad_and_value(objective, has_aux=True)(params)
        return [grads[k] for k in params], loss_sum.detach(), {}

    def grads_reduced(params: Tensors, batch: Batch, totals: dict,
                      earlier: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        # The last micro-batch: each gradient, added to what earlier micro-batches gave it, goes into its bucket the
        # moment the backward has accumulated it (and is freed there); full buckets all-reduce during the backward.
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        buckets = GradBuckets([v.shape for v in leaves.values()], device, int(bucket_mb * 2**20), earlier or None)
        for i, leaf in enumerate(leaves.values()):
            leaf.register_post_accumulate_grad_hook(functools.partial(_into_bucket, buckets, i))
        with binding.bound(leaves, as_parameters=False) as model:
            with saving(model):
                loss_sum, stats = loss.terms(lambda inputs: model(**inputs), batch, totals)
            torch.autograd.backward(loss_sum / totals["n"], inputs=list(leaves.values()))
        return buckets.finish(), loss_sum.detach(), stats

    micro_grads = {"autograd": grads_autograd, "grad_and_value": grads_func}[grad_method]
    overlap = all_reduce is not None and grad_method == "autograd" and bucket_mb > 0

    def train_step(state: TrainState, micro_batches: Sequence[Batch]) -> tuple[TrainState, StepMetrics]:
        stats: dict = {}
        with rng_scope(state.rng, device) as rng_out:
            # The global batch's normaliser (label tokens, or pairs), and whatever else the loss needs of the whole
            # global batch first (KTO's reference point: a no-grad pass with the state's weights).
            totals = loss.prepare(lambda: _running(binding, state.params), micro_batches, all_reduce)
            n = totals["n"]
            grads: list[torch.Tensor] = []
            loss_total = torch.zeros((), device=device)
            for m, batch in enumerate(micro_batches):
                if overlap and m == len(micro_batches) - 1:
                    grads, loss_sum, more = grads_reduced(state.params, batch, totals, grads)
                    loss_total = loss_total + loss_sum
                    stats = add_stats(stats, more)
                    break
                g, loss_sum, more = micro_grads(state.params, batch, totals)
                stats = add_stats(stats, more)
                if grads:
                    torch._foreach_add_(grads, g)
                else:
                    grads = [x.float() for x in g]  # accumulate in float32 whatever the compute dtype
                del g
                loss_total = loss_total + loss_sum
        if overlap:
            all_reduce([loss_total])
        elif all_reduce is not None:
            reduced = grads + [loss_total]
            all_reduce(reduced)
            loss_total = reduced.pop()
            del reduced
        extras = reduce_stats(stats, all_reduce)
        grad_norm = clip_by_global_norm_(grads, clip_grad_norm)
        samples = world_size * sum(loss.samples(b) for b in micro_batches)
        lr = lr_fn(state.step)
        if on_nonfinite == "skip" and not bool(torch.isfinite(grad_norm) & torch.isfinite(loss_total)):
            unchanged = attrs.evolve(state, step=state.step + 1, rng=rng_out[0],
                                     data_position=state.data_position + samples)
            return unchanged, StepMetrics(loss=loss_total / n, grad_norm=grad_norm, lr=lr, label_tokens=n,
                                          skipped=True, extras=extras)
        grads_by_name = dict(zip(state.params, grads))
        del grads  # the update frees each gradient once read
        params, opt_state = opt.update_(state.params, grads_by_name, state.opt_state, lr, hyper)
        new_state = attrs.evolve(state, step=state.step + 1, params=params, opt_state=opt_state, rng=rng_out[0],
                                 data_position=state.data_position + samples)
        return new_state, StepMetrics(loss=loss_total / n, grad_norm=grad_norm, lr=lr, label_tokens=n, extras=extras)

    return train_step


@contextlib.contextmanager
def _running(binding: ParamBinding, params: Tensors):
    """The model run with `params` bound (no gradients are taken through it)."""
    with binding.bound(params) as model:
        yield lambda inputs: model(**inputs)


def _into_bucket(buckets: GradBuckets, i: int, leaf: torch.Tensor) -> None:
    buckets.add(i, leaf.grad)
    leaf.grad = None
