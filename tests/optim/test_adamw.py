import torch

from automodel.optim import AdamWHyper, adamw_init, adamw_update, clip_by_global_norm, no_decay_names


def make(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_matches_torch_adamw_bit_for_bit_with_decay_groups():
    params = make(0)
    hp = AdamWHyper(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, no_decay=no_decay_names(params))
    assert hp.no_decay == {"b"}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": 0.1}, {"params": [ref["b"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.95), eps=1e-6, foreach=True)
    state = adamw_init(params)
    for step in range(5):
        grads = make(100 + step)
        params, state = adamw_update(params, grads, state, 1e-2, hp)
        for k in ref:
            ref[k].grad = grads[k].clone()
        opt.step()
    for k in ref:
        assert torch.equal(params[k], ref[k].detach())
        assert torch.equal(state.exp_avg_sq[k], opt.state[ref[k]]["exp_avg_sq"])
    assert state.count == 5


def test_update_does_not_mutate_its_inputs():
    params, grads = make(0), make(1)
    state = adamw_init(params)
    snapshot = {k: v.clone() for k, v in params.items()}
    new_params, new_state = adamw_update(params, grads, state, 1e-2, AdamWHyper(weight_decay=0.1))
    for k in params:
        assert torch.equal(params[k], snapshot[k])
        assert not torch.equal(new_params[k], params[k])
        assert torch.count_nonzero(state.exp_avg[k]) == 0
    assert state.count == 0 and new_state.count == 1


def test_bfloat16_params_keep_float32_moments():
    params = {k: v.bfloat16() for k, v in make(0).items()}
    new, state = adamw_update(params, make(1), adamw_init(params), 1e-2, AdamWHyper())
    assert all(v.dtype == torch.bfloat16 for v in new.values())
    assert all(v.dtype == torch.float32 for v in state.exp_avg.values())


def test_clip_matches_clip_grad_norm_():
    grads = make(3)
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ref, grads.values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    clipped, norm = clip_by_global_norm(list(grads.values()), 0.5)
    assert torch.equal(norm, ref_norm)
    for c, p in zip(clipped, ref):
        assert torch.equal(c, p.grad)
    unclipped, _ = clip_by_global_norm(list(grads.values()), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, grads.values()))
