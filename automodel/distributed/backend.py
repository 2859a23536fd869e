"""What a recipe needs from a backend, as one record of functions; `functional` and `deepspeed` build it."""

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Optional

import attrs
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from automodel.checkpoint.export import save_hf_model
from automodel.optim import AdamWHyper, AdamWState, no_decay_names
from automodel.training.state import ParamBinding, TrainState, init_state
from automodel.training.forward import Batch, ModelLoss
from automodel.training.step import AllReduce, StepMetrics, make_train_step

if TYPE_CHECKING:
    from automodel.config import TrainConfig


@attrs.frozen
class Backend:
    name: str
    state: TrainState  # the initial state
    step: Callable[[TrainState, list[Batch]], tuple[TrainState, StepMetrics]]
    loss_sum: Callable[[TrainState, Batch], tuple[torch.Tensor, torch.Tensor]]  # (summed loss, label tokens)
    model_for_generation: Callable[[TrainState], ContextManager[nn.Module]]
    save: Callable[[TrainState, Path], None]  # every rank, into a staging directory
    load: Callable[[TrainState, Path], TrainState]  # every rank; returns the restored state
    export: Callable[[TrainState, PreTrainedTokenizerBase, Path], None]  # every rank (may be collective)
    trainable_params: int
    loss_description: str  # how the loss is computed (chunks of hidden states or whole logits), for the log
    generate_kwargs: dict = attrs.field(factory=dict)  # e.g. synced_gpus under ZeRO-3


def build_functional(model: nn.Module, *, optim, clip_grad_norm: float, lr_fn: Callable[[int], float],
                     device: torch.device, grad_method: str, all_reduce: AllReduce, rank: int, world_size: int,
                     seed: int, loss_chunk_tokens: int, master_dtype: str) -> Backend:
    """The functional step with in-place AdamW; several ranks all-reduce the gradient dict, nothing else. With a
    low-precision model and master_dtype "float32"/"auto" the state holds float32 masters of its trainable tensors."""
    binding = ParamBinding(model)
    params = binding.take()
    compute_dtype = next(iter(model.parameters())).dtype  # the model's dtype: forward and backward run in it
    if master_dtype in ("auto", "float32"):
        params = {k: v.float() for k, v in params.items()}
    hyper = AdamWHyper(betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                       no_decay=no_decay_names(params), fused=optim.fused)
    loss = ModelLoss(model, loss_chunk_tokens if grad_method == "autograd" else 0, compute_dtype)
    loss.calibrate(lambda inputs: model(**inputs), device, weights=lambda: binding.bound(params))
    step = make_train_step(binding, loss, hyper=hyper, lr_fn=lr_fn, clip_grad_norm=clip_grad_norm, device=device,
                           grad_method=grad_method, all_reduce=all_reduce, world_size=world_size)

    def loss_sum(state: TrainState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with binding.bound(state.params) as bound:
            return loss(lambda inputs: bound(**inputs), batch)

    def save(state: TrainState, tmp: Path) -> None:
        if rank == 0:  # every rank holds the same weights and moments
            save_file(_contiguous(state.params), tmp / "params.safetensors")
            save_file(_contiguous(state.opt_state.exp_avg), tmp / "exp_avg.safetensors")
            save_file(_contiguous(state.opt_state.exp_avg_sq), tmp / "exp_avg_sq.safetensors")

    def load(state: TrainState, path: Path) -> TrainState:
        dev = str(device)
        loaded = {name: load_file(path / f"{name}.safetensors", device=dev)
                  for name in ("params", "exp_avg", "exp_avg_sq")}
        if set(loaded["params"]) != set(state.params):
            missing = sorted(set(state.params) ^ set(loaded["params"]))[:5]
            raise ValueError(f"{path}: its parameters do not match this model's (differ: {missing})")
        wrong = [f"{k} {tuple(loaded['params'][k].shape)} vs {tuple(v.shape)}" for k, v in state.params.items()
                 if loaded["params"][k].shape != v.shape]
        if wrong:
            raise ValueError(f"{path}: its tensor shapes do not match this model's ({', '.join(wrong[:3])})")
        params = {k: loaded["params"][k].to(state.params[k].dtype) for k in state.params}
        opt = AdamWState(count=state.step, exp_avg=loaded["exp_avg"], exp_avg_sq=loaded["exp_avg_sq"])
        return attrs.evolve(state, params=params, opt_state=opt)

    def export(state: TrainState, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
        if rank == 0:
            with binding.bound(state.params) as bound:
                save_hf_model(bound, tokenizer, out)

    return Backend(
        name="functional", state=init_state(params, device, seed, rank), step=step, loss_sum=loss_sum,
        model_for_generation=lambda state: binding.bound(state.params),
        save=save, load=load, export=export, trainable_params=sum(p.numel() for p in params.values()),
        loss_description=loss.description,
    )


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def model_init_context(backend: str, ds_config: Optional[dict], pretrained: bool) -> ContextManager:
    """Where the model must be built. DeepSpeed ZeRO-3 loading pretrained weights: inside transformers'
    HfDeepSpeedConfig, so from_pretrained creates the weights already partitioned. A model built from
    config is built whole (seeded, so every backend starts from the same weights) and partitioned by
    deepspeed.initialize."""
    if backend == "deepspeed" and pretrained and ds_config["zero_optimization"]["stage"] == 3:
        from automodel.distributed.deepspeed_backend import zero3_init

        return zero3_init(ds_config)
    return contextlib.nullcontext()


def build_backend(cfg: "TrainConfig", model: nn.Module, ds_config: Optional[dict], max_steps: int, device: torch.device,
                  all_reduce: AllReduce, rank: int, world_size: int) -> Backend:
    """The backend [distributed] names, with the config's optimizer and a pure LR schedule over max_steps."""
    import functools

    from automodel.optim import lr_at

    lr_fn = functools.partial(lr_at, sched=cfg.schedule, base_lr=cfg.optim.lr, max_steps=max_steps)
    if cfg.distributed.backend == "deepspeed":
        from automodel.distributed.deepspeed_backend import build_deepspeed

        return build_deepspeed(model, ds_config=ds_config, optim=cfg.optim, lr_fn=lr_fn, device=device,
                               all_reduce=all_reduce, rank=rank, world_size=world_size, seed=cfg.seed,
                               loss_chunk_tokens=cfg.train.loss_chunk_tokens)
    return build_functional(model.to(device), optim=cfg.optim, clip_grad_norm=cfg.optim.clip_grad_norm, lr_fn=lr_fn,
                            device=device, grad_method=cfg.train.grad_method, all_reduce=all_reduce, rank=rank,
                            world_size=world_size, seed=cfg.seed, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                            master_dtype=cfg.optim.master_dtype)


def resume(cfg: "TrainConfig", backend: Backend, out: Path, rank: int, world_size: int,
           device: torch.device) -> tuple[TrainState, dict, Optional[Path]]:
    """(state, checkpoint meta, the checkpoint resumed from or None) per train.resume."""
    from automodel import checkpoint

    meta = {"backend": backend.name, "global_batch_size": cfg.train.global_batch_size, "seed": cfg.seed,
            "world_size": world_size}
    path = checkpoint.store.resume_path(out, cfg.train.resume)
    state = backend.state
    if path is not None:
        state = checkpoint.restore(backend.load, state, path, rank, device, meta)
    return state, meta, path
