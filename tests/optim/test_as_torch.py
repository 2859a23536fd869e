"""optim/'s optimizers as a torch.optim.Optimizer (what DeepSpeed's ZeRO-0 steps): the functional update's bits on the
module's own parameters, and a state_dict that round-trips through torch.save (as the engine's checkpoint does)."""

import io

import pytest
import torch

from automodel.backends.functional import functional_optimizer
from automodel.config import OptimConfig
from automodel.optim import AdamWHyper, no_decay_names
from automodel.optim.as_torch import TorchOptimizer
from tests.helpers import tiny_llama


def grads_like(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


@pytest.mark.parametrize("name", ["muon", "adafactor", "soap"])
def test_steps_are_the_functional_updates_bits_and_the_state_round_trips(name):
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, soap_precondition_frequency=2)
    model = tiny_llama()
    named = dict(model.named_parameters())
    params = {k: p.detach().clone() for k, p in named.items()}
    hyper = AdamWHyper(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, no_decay=no_decay_names(params))
    opt = functional_optimizer(cfg, model, list(params))
    wrapped = TorchOptimizer(named, opt, hyper, cfg.lr)
    state = opt.init(params)
    saved = None
    for step in range(5):
        grads = grads_like(params, step)
        for k, p in named.items():
            p.grad = grads[k].clone()
        lr = cfg.lr * (step + 1) / 5  # the engine's loop sets the group's rate each step
        wrapped.param_groups[0]["lr"] = lr
        wrapped.step()
        params, state = opt.update_(params, grads, state, lr, hyper)
        assert all(torch.equal(p.detach(), params[k]) for k, p in named.items()), step
        if step == 2:
            buffer = io.BytesIO()
            torch.save(wrapped.state_dict(), buffer)
            saved, weights = buffer.getvalue(), {k: p.detach().clone() for k, p in named.items()}
    assert wrapped.opt_state.count == 5
    final = {k: p.detach().clone() for k, p in named.items()}

    # A fresh optimizer loaded with step 3's state (its weights put back) takes steps 4 and 5 to the same bits.
    fresh = TorchOptimizer(named, opt, hyper, cfg.lr)
    fresh.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    assert fresh.opt_state.count == 3
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(weights[k])
    for step in (3, 4):
        grads = grads_like(params, step)
        for k, p in named.items():
            p.grad = grads[k].clone()
        fresh.param_groups[0]["lr"] = cfg.lr * (step + 1) / 5
        fresh.step()
    assert all(torch.equal(p.detach(), final[k]) for k, p in named.items())
    with pytest.raises(ValueError, match=f"the checkpoint's optimizer state is '{name}''s, not optim.name = \"adamw\""):
        TorchOptimizer(named, functional_optimizer(OptimConfig(), model, list(named)), hyper,
                       cfg.lr).load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
