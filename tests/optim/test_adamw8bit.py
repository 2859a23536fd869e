"""8-bit AdamW: equal to bitsandbytes' own AdamW8bit step for step, and 2 bytes of state per parameter."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="optim.name = \"adamw8bit\" needs bitsandbytes (the quant extra)")

from automodel.optim import (AdamWHyper, adamw8bit_init, adamw8bit_update_, adamw_init, adamw_update_,  # noqa: E402
                             no_decay_names, state_bytes)
from tests.helpers import tiny_llama  # noqa: E402


def model_params() -> dict[str, torch.Tensor]:
    """Real shapes: embeddings and projections (8-bit states) and norms (under 4,096 elements: float32 states)."""
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw8bit_equals_bitsandbytes_adamw8bit_step_for_step(weight_decay):
    params = model_params()
    assert any(p.numel() < 4096 for p in params.values()) and any(p.numel() >= 4096 for p in params.values())
    hp = AdamWHyper(betas=(0.9, 0.95), eps=1e-6, weight_decay=weight_decay, no_decay=no_decay_names(params))
    ours, state = {k: v.clone() for k, v in params.items()}, adamw8bit_init(params)
    # bitsandbytes' optimizer over the same tensors, with the same decay groups.
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [{"params": [p for k, p in theirs.items() if k not in hp.no_decay], "weight_decay": weight_decay},
              {"params": [p for k, p in theirs.items() if k in hp.no_decay], "weight_decay": 0.0}]
    reference = bnb.optim.AdamW8bit(groups, lr=1e-2, betas=hp.betas, eps=hp.eps)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        grads = {k: torch.randn(v.shape, generator=gen) * (1 + step) for k, v in params.items()}
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        reference.step()
        ours, state = adamw8bit_update_(ours, dict(grads), state, 1e-2, hp)
        for k, p in theirs.items():
            assert torch.equal(ours[k], p.detach()), (step, k)
            bnb_state = reference.state[p]
            assert torch.equal(state.exp_avg[k], bnb_state["state1"]) and torch.equal(state.exp_avg_sq[k],
                                                                                      bnb_state["state2"])
            if k in state.absmax1:
                assert torch.equal(state.absmax1[k], bnb_state["absmax1"])
    assert state.count == 6
    moved = [k for k in params if not torch.equal(ours[k], params[k])]
    assert len(moved) == len(params)


def test_adamw8bit_keeps_a_quarter_of_adamw_state_and_tracks_it():
    params = {"w": torch.randn(512, 1024), "b": torch.randn(1024)}
    eight, full = adamw8bit_init(params), adamw_init(params)
    assert state_bytes(full) == 8 * (512 * 1024 + 1024)
    # uint8 codes (2 bytes per element for the two moments) + one float32 scale per 256 elements per moment; the bias
    # (under 4,096 elements) keeps float32 moments.
    assert state_bytes(eight) == 2 * 512 * 1024 + 2 * 4 * (512 * 1024 // 256) + 8 * 1024
    assert state_bytes(eight) / (512 * 1024 + 1024) == pytest.approx(2.05, abs=0.01)
    # Over a few steps the 8-bit update tracks the 32-bit one.
    hp = AdamWHyper()
    a, b = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    for step in range(5):
        grads = {k: v * 0.1 for k, v in params.items()}
        a, eight = adamw8bit_update_(a, dict(grads), eight, 1e-3, hp)
        b, full = adamw_update_(b, dict(grads), full, 1e-3, hp)
    eight_bit, full_bit = (a["w"] - params["w"]).flatten(), (b["w"] - params["w"]).flatten()
    # The update is the same direction (cosine 0.9989 here) with about 1% mean error; single elements whose
    # gradients are small beside their block's largest can be far off (their first moment rounds towards 0).
    assert torch.nn.functional.cosine_similarity(eight_bit, full_bit, dim=0) > 0.99
    assert 0 < (eight_bit - full_bit).abs().mean() < 0.05 * full_bit.abs().mean()
