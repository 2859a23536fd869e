"""One of optim/'s in-place optimizers as a `torch.optim.Optimizer` over a module's own parameters: for an engine
that steps a torch optimizer and hands it the weights whole (DeepSpeed ZeRO-0 in float32), so that Muon, Adafactor
and SOAP run there with the arithmetic the functional backend runs (tests/distributed/test_deepspeed_optim.py)."""

from typing import Any

import attrs
import torch
from torch import nn

from automodel.optim import AdamWHyper, Optimizer


class TorchOptimizer(torch.optim.Optimizer):
    """`opt` over `named` (trainable parameters by name), updating each parameter in place at
    `param_groups[0]["lr"]` (the engine's loop sets it every step) with `hyper`'s betas, eps and weight decay. The
    state is opt's own record (`opt_state`); `state_dict()` holds its tables of tensors and its count."""

    def __init__(self, named: dict[str, nn.Parameter], opt: Optimizer, hyper: AdamWHyper, lr: float):
        super().__init__([{"params": list(named.values()), "lr": lr}], {"lr": lr})
        self.named, self.opt, self.hyper = named, opt, hyper
        self.opt_state = opt.init({k: p.detach() for k, p in named.items()})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("TorchOptimizer.step takes no closure: the engine computes the gradients")
        params = {k: p.detach() for k, p in self.named.items()}  # the parameters' own storage: updated in place
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in self.named.items()}
        _, self.opt_state = self.opt.update_(params, grads, self.opt_state, self.param_groups[0]["lr"], self.hyper)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.name, **attrs.asdict(self.opt_state, recurse=False)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = dict(state_dict)
        name = saved.pop("optimizer", None)
        if name != self.opt.name:
            raise ValueError(f"the checkpoint's optimizer state is {name!r}'s, not optim.name = \"{self.opt.name}\"'s")
        fields = attrs.asdict(self.opt_state, recurse=False)
        if set(saved) != set(fields):
            raise ValueError(f"the checkpoint's {name} state has {sorted(saved)}, expected {sorted(fields)}")
        loaded = {}
        for field, now in fields.items():
            if isinstance(now, dict):
                if set(saved[field]) != set(now):
                    differ = sorted(set(saved[field]) ^ set(now))[:3]
                    raise ValueError(f"the checkpoint's {name} state ({field}) does not match this model's: {differ}")
                loaded[field] = {k: saved[field][k].to(device=v.device, dtype=v.dtype) for k, v in now.items()}
            else:
                loaded[field] = saved[field]
        self.opt_state = attrs.evolve(self.opt_state, **loaded)
