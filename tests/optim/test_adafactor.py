"""Adafactor over dicts, in place: bit-identical to torch.optim.Adafactor (its single-tensor form), with the decay
groups AdamW uses."""

import torch

from automodel.optim import AdamWHyper, no_decay_names
from automodel.optim.adafactor import AdafactorHyper, adafactor_init, adafactor_update_


def make(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 4, generator=g), "conv": torch.randn(3, 2, 5, generator=g),
            "b": torch.randn(4, generator=g)}


def test_matches_torch_adafactor_bit_for_bit_with_decay_groups():
    params = make(0)
    hp = AdamWHyper(weight_decay=0.1, no_decay=no_decay_names(params))
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adafactor([{"params": [ref["w"], ref["conv"]], "weight_decay": 0.1},
                                 {"params": [ref["b"]], "weight_decay": 0.0}], lr=1e-2, foreach=False)
    state = adafactor_init(params)
    for step in range(6):
        grads = make(100 + step)
        for k in ref:
            ref[k].grad = grads[k].clone()
        params, state = adafactor_update_(params, grads, state, 1e-2, hp, AdafactorHyper())
        opt.step()
    for k in ref:
        assert torch.equal(params[k], ref[k].detach()), k
    assert torch.equal(state.row_var["conv"], opt.state[ref["conv"]]["row_var"])
    assert torch.equal(state.col_var["w"], opt.state[ref["w"]]["col_var"])
    assert torch.equal(state.variance["b"], opt.state[ref["b"]]["variance"])
    assert state.count == 6


def test_state_is_factored():
    """A 1000 x 500 matrix keeps 1,500 floats of state, not AdamW's 1,000,000."""
    state = adafactor_init({"w": torch.zeros(1000, 500), "b": torch.zeros(500)})
    assert state.row_var["w"].shape == (1000, 1) and state.col_var["w"].shape == (1, 500)
    assert sum(t.numel() for table in (state.row_var, state.col_var, state.variance) for t in table.values()) == 2000
