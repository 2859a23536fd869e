"""AdamW over dicts, in place: bit-identical to torch's foreach AdamW, torch's fused kernel behind optim.fused."""

import pytest
import torch

from automodel.optim import AdamWHyper, adamw_init, adamw_update_, clip_by_global_norm_, no_decay_names


def make(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}


@pytest.mark.parametrize("fused,group", [(False, 1 << 25), (False, 8), (True, 1 << 25)],
                         ids=["foreach", "foreach-in-groups", "fused"])
def test_matches_torch_adamw_bit_for_bit_with_decay_groups(fused, group, monkeypatch):
    """Also when the update runs a few tensors at a time (groups of at most 8 elements here: one tensor each)."""
    monkeypatch.setattr("automodel.optim.adamw.GROUP_ELEMENTS", group)
    params = make(0)
    hp = AdamWHyper(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, no_decay=no_decay_names(params), fused=fused)
    assert hp.no_decay == {"b"}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": 0.1}, {"params": [ref["b"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.95), eps=1e-6, foreach=not fused, fused=fused)
    state = adamw_init(params)
    for step in range(5):
        grads = make(100 + step)
        for k in ref:
            ref[k].grad = grads[k].clone()
        params, state = adamw_update_(params, grads, state, 1e-2, hp)
        opt.step()
    for k in ref:
        assert torch.equal(params[k], ref[k].detach())
        assert torch.equal(state.exp_avg_sq[k], opt.state[ref[k]]["exp_avg_sq"])
    assert state.count == 5


def test_update_is_in_place_and_consumes_the_gradients():
    """The returned tensors are the ones passed in (donated), and the gradient dict is emptied so its tensors can be
    freed before the update's temporaries are made."""
    params, grads = make(0), make(1)
    state = adamw_init(params)
    pointers = {k: (v.data_ptr(), state.exp_avg[k].data_ptr(), state.exp_avg_sq[k].data_ptr()) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    new_params, new_state = adamw_update_(params, grads, state, 1e-2, AdamWHyper(weight_decay=0.1))
    assert grads == {}
    for k in params:
        assert (new_params[k].data_ptr(), new_state.exp_avg[k].data_ptr(),
                new_state.exp_avg_sq[k].data_ptr()) == pointers[k]
        assert not torch.equal(new_params[k], before[k])
    assert state.count == 0 and new_state.count == 1  # the count is the record's, not a tensor: it advances anew


def test_bfloat16_params_keep_float32_moments_and_are_rounded_once():
    params = {k: v.bfloat16() for k, v in make(0).items()}
    expected = {k: v.float() for k, v in params.items()}
    exp_state = adamw_init(expected)
    expected, _ = adamw_update_(expected, make(1), exp_state, 1e-2, AdamWHyper())
    new, state = adamw_update_(params, make(1), adamw_init(params), 1e-2, AdamWHyper())
    assert all(v.dtype == torch.bfloat16 for v in new.values())
    assert all(v.dtype == torch.float32 for v in state.exp_avg.values())
    assert all(torch.equal(new[k], expected[k].bfloat16()) for k in new)


def test_clip_matches_clip_grad_norm_():
    grads = make(3)
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ref, grads.values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    clipped = [g.clone() for g in grads.values()]
    norm = clip_by_global_norm_(clipped, 0.5)
    assert torch.equal(norm, ref_norm)
    for c, p in zip(clipped, ref):
        assert torch.equal(c, p.grad)
    unclipped = [g.clone() for g in grads.values()]
    assert torch.equal(clip_by_global_norm_(unclipped, 0.0), ref_norm)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, grads.values()))
