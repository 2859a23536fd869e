"""Backends: who owns the weights and optimizer state and how a step runs. `functional` (training/step.py's step,
any number of ranks) and `deepspeed` (a DeepSpeed engine, ZeRO 0-3) build the same `Backend` record."""

import contextlib
import functools
from typing import ContextManager, Optional

import torch
from torch import nn

from automodel.backends.base import Backend
from automodel.backends.functional import build_functional
from automodel.config import ConfigError, TrainConfig
from automodel.distributed import AllReduce
from automodel.optim import lr_at
from automodel.training.teacher import FrozenModel, Teacher, local_head_weights
from automodel.training.forward import Objective


def _deepspeed():
    """backends/deepspeed.py, or one line saying how to install DeepSpeed."""
    try:
        from automodel.backends import deepspeed
    except ImportError as e:
        if e.name != "deepspeed":
            raise
        raise ConfigError("distributed.backend = \"deepspeed\" needs DeepSpeed, which is not installed: "
                          "pip install 'automodel[deepspeed]' (or use distributed.backend = \"functional\")") from None
    return deepspeed


def model_init_context(backend: str, ds_config: Optional[dict], pretrained: bool) -> ContextManager:
    """Where the model must be built. DeepSpeed ZeRO-3 loading pretrained weights: inside transformers'
    HfDeepSpeedConfig, so from_pretrained creates the weights already partitioned. A model built from
    config is built whole (seeded, so every backend starts from the same weights) and partitioned by
    deepspeed.initialize."""
    if backend == "deepspeed" and pretrained and ds_config["zero_optimization"]["stage"] == 3:
        zero3_init = _deepspeed().zero3_init

        return zero3_init(ds_config)
    return contextlib.nullcontext()


def build_backend(cfg: TrainConfig, model: nn.Module, ds_config: Optional[dict], max_steps: int, device: torch.device,
                  all_reduce: AllReduce, rank: int, world_size: int, teacher: Optional[Teacher] = None,
                  objective: Optional[Objective] = None) -> Backend:
    """The backend [distributed] names, with the config's optimizer and a pure LR schedule over max_steps; with a
    `teacher`, the loss is the distillation loss of [distill]; an `objective` builds a loss of its own (preference)."""
    lr_fn = functools.partial(lr_at, sched=cfg.schedule, base_lr=cfg.optim.lr, max_steps=max_steps)
    if cfg.distributed.backend == "deepspeed":
        build_deepspeed = _deepspeed().build_deepspeed

        return build_deepspeed(model, ds_config=ds_config, optim=cfg.optim, lr_fn=lr_fn, device=device,
                               all_reduce=all_reduce, rank=rank, world_size=world_size, seed=cfg.seed,
                               loss_chunk_tokens=cfg.train.loss_chunk_tokens, teacher=teacher, objective=objective,
                               offload_activations=cfg.train.activation_offloading, fused_loss=cfg.train.fused_loss)
    return build_functional(model.to(device), optim=cfg.optim, clip_grad_norm=cfg.optim.clip_grad_norm, lr_fn=lr_fn,
                            device=device, grad_method=cfg.train.grad_method, all_reduce=all_reduce, rank=rank,
                            world_size=world_size, seed=cfg.seed, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                            master_dtype=cfg.optim.master_dtype, teacher=teacher,
                            on_nonfinite=cfg.train.on_nonfinite, bucket_mb=cfg.distributed.bucket_mb,
                            objective=objective, offload_activations=cfg.train.activation_offloading,
                            fused_loss=cfg.train.fused_loss)


def build_frozen(model: nn.Module, ds_config: Optional[dict], device: torch.device) -> FrozenModel:
    """A frozen model (a teacher, a reference): in eval mode, without gradients, on the device; under DeepSpeed
    ZeRO-3 partitioned like the trained model (an engine of its own), otherwise whole on every rank."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    dtype = next(model.parameters()).dtype
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        teacher_engine = _deepspeed().teacher_engine

        run, head_weights = teacher_engine(model, ds_config)
    else:
        model.to(device)
        run, head_weights = (lambda inputs: model(**inputs)), local_head_weights(model)
    return FrozenModel(model=model, run=run, dtype=dtype, head_weights=head_weights)


def build_teacher(model: nn.Module, cfg: TrainConfig, ds_config: Optional[dict], device: torch.device) -> Teacher:
    """The frozen teacher of [distill] (build_frozen)."""
    frozen = build_frozen(model, ds_config, device)
    return Teacher(model=frozen.model, run=frozen.run, dtype=frozen.dtype, head_weights=frozen.head_weights,
                   alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)


__all__ = ["Backend", "build_backend", "build_frozen", "build_functional", "build_teacher", "model_init_context"]
