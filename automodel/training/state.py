"""The training state: an immutable record that a step maps to a new one."""

import contextlib
from typing import Any, Callable, Iterator, Optional

import attrs
import torch
from torch import nn

from automodel.optim import adamw_init

Tensors = dict[str, torch.Tensor]


@attrs.frozen
class TrainState:
    step: int  # optimizer updates applied
    params: Tensors  # trainable tensors only, by parameter name
    opt_state: Any  # the optimizer's state record (optim: AdamWState, AdamW8bitState); None under DeepSpeed
    rng: dict[str, torch.Tensor]  # generator states ("cpu", and "cuda" on a GPU) for dropout
    data_position: int  # samples of the training order consumed (step x global batch)
    # Streamed data (data/stream.py): where this rank's stream stands after `step`; None for data read in full,
    # whose batches are a function of the step alone.
    stream: Optional[dict] = None


def rng_snapshot(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


@contextlib.contextmanager
def rng_scope(rng: dict[str, torch.Tensor], device: torch.device) -> Iterator[list]:
    """Runs the body with the global generators set from `rng` and leaves the caller's untouched; the
    yielded list receives the generator states at the end of the body."""
    out: list = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        yield out
        out.append(rng_snapshot(device))


class ParamBinding:
    """Separates a module's trainable tensors from the module, so the state alone owns them.

    The module keeps its structure, buffers and frozen weights; each trainable parameter is replaced by a
    meta placeholder (tied aliases share one placeholder), so weights are not held twice. `bound(params)`
    puts real tensors back for as long as it is open: for a forward and its backward (activation checkpointing
    recomputes layers during the backward, so the tensors must still be there), generate() and save_pretrained().
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._aliases: dict[str, list[str]] = {}
        first_name: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                canonical = first_name.setdefault(id(p), name)
                self._aliases.setdefault(canonical, []).append(name)
        self.dtypes: dict[str, torch.dtype] = {}  # each trainable tensor's dtype in the module (the compute dtype)

    def take(self) -> Tensors:
        """The trainable tensors (detached, sharing storage); the module is left holding placeholders."""
        params = {name: self.model.get_parameter(name).detach() for name in self._aliases}
        self.dtypes = {name: p.dtype for name, p in params.items()}
        self._assign({name: nn.Parameter(torch.empty_like(p, device="meta")) for name, p in params.items()})
        return params

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        for canonical, names in self._aliases.items():
            for name in names:
                module_name, _, attr = name.rpartition(".")
                self.model.get_submodule(module_name)._parameters[attr] = tensors[canonical]

    def in_module_dtype(self, params: Tensors) -> Tensors:
        """`params` cast to the dtypes the module computes in (a no-op unless the state keeps float32 masters)."""
        return {k: v if v.dtype == self.dtypes.get(k, v.dtype) else v.to(self.dtypes[k]) for k, v in params.items()}

    @contextlib.contextmanager
    def bound(self, params: Tensors, as_parameters: bool = True) -> Iterator[nn.Module]:
        """The module with `params` in place of its placeholders, in the module's dtypes. as_parameters=False binds
        the tensors themselves (not nn.Parameter wrappers), so gradients flow back to them."""
        placeholders = {name: self.model.get_parameter(name) for name in self._aliases}
        tensors = self.in_module_dtype(params)
        if as_parameters:
            tensors = {name: nn.Parameter(t, requires_grad=False) for name, t in tensors.items()}
        self._assign(tensors)
        try:
            yield self.model
        finally:
            self._assign(placeholders)


def initial_rng(seed: int, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Generator states for dropout, distinct per rank."""
    seed = seed + 7919 * rank
    rng = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return rng


def init_state(params: Tensors, device: torch.device, seed: int, rank: int = 0,
               opt_init: Callable[[Tensors], Any] = adamw_init) -> TrainState:
    return TrainState(step=0, params=params, opt_state=opt_init(params), rng=initial_rng(seed, rank, device),
                      data_position=0)

