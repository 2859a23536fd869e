"""SOAP over dicts, in place: step for step the arithmetic of pytorch-optimizer's SOAP (the authors' algorithm),
through eigenbasis refreshes, with a dimension too large to rotate and AdamW's decay groups."""

import pytest
import torch

from automodel.optim import AdamWHyper, no_decay_names
from automodel.optim.soap import SoapHyper, soap_init, soap_update_

pytorch_optimizer = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer (a dev dependency) is the "
                                                                    "reference")


def make(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 4, generator=g), "embed": torch.randn(40, 4, generator=g),
            "b": torch.randn(4, generator=g)}


def test_matches_pytorch_optimizers_soap():
    params = make(0)
    hp = AdamWHyper(betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, no_decay=no_decay_names(params))
    soap = SoapHyper(precondition_frequency=3, max_precondition_dim=32)  # "embed"'s 40 rows are not rotated
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = pytorch_optimizer.SOAP([{"params": [ref["w"], ref["embed"]], "weight_decay": 0.01},
                                  {"params": [ref["b"]], "weight_decay": 0.0}], lr=3e-3, betas=(0.95, 0.95),
                                 precondition_frequency=3, max_precondition_dim=32)
    state = soap_init(params, soap)
    assert set(state.bases) == {"w#0", "w#1", "embed#1"}
    for step in range(8):  # refreshes at steps 3 and 6
        grads = make(100 + step)
        for k in ref:
            ref[k].grad = grads[k].clone()
        params, state = soap_update_(params, grads, state, 3e-3, hp, soap)
        opt.step()
        for k in ref:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=0, msg=f"{k} at step {step + 1}")
    for k in ref:
        assert torch.equal(state.exp_avg_sq[k], opt.state[ref[k]]["exp_avg_sq"])
    assert torch.equal(state.bases["w#1"].T, opt.state[ref["w"]]["Q"][1])  # stored as Q^T
    assert not torch.equal(params["w"], make(0)["w"])
