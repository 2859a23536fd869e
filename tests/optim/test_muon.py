"""Muon over dicts, in place: bit-identical to torch.optim.Muon on a model's hidden matrices with torch's foreach
AdamW on the rest, the split its docs prescribe."""

import pytest
import torch

from automodel.optim import AdamWHyper, no_decay_names
from automodel.optim.muon import MuonHyper, hidden_matrices, muon_init, muon_update_
from tests.helpers import tiny_llama


def grads_like(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


def test_the_hidden_matrices_are_the_layers_2d_weights_not_the_embeddings_or_the_head():
    for tied in (False, True):
        model = tiny_llama(tie_word_embeddings=tied)
        names = [n for n, p in model.named_parameters()]
        chosen = hidden_matrices(model, names)
        assert chosen == {n for n in names if ".layers." in n and n.endswith("proj.weight")}
        assert not any("embed" in n or "lm_head" in n or "norm" in n for n in chosen)


@pytest.mark.parametrize("nesterov,adjust", [(True, "original"), (False, "match_rms_adamw")])
def test_matches_torch_muon_and_adamw_bit_for_bit(nesterov, adjust):
    model = tiny_llama(hidden_size=48, intermediate_size=80)  # tall and wide matrices
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    matrices = hidden_matrices(model, list(params))
    hp = AdamWHyper(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, no_decay=no_decay_names(params))
    muon = MuonHyper(matrices=matrices, lr=0.02, peak_lr=1e-3, momentum=0.9, nesterov=nesterov, adjust_lr=adjust)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    reference_muon = torch.optim.Muon([ref[k] for k in params if k in matrices], lr=0.02, weight_decay=0.1,
                                      momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    rest = [k for k in params if k not in matrices]
    reference_adamw = torch.optim.AdamW(
        [{"params": [ref[k] for k in rest if k not in hp.no_decay], "weight_decay": 0.1},
         {"params": [ref[k] for k in rest if k in hp.no_decay], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    state = muon_init(params, muon)
    for step in range(4):
        grads = grads_like(params, step)
        for k in ref:
            ref[k].grad = grads[k].clone()
        params, state = muon_update_(params, grads, state, 1e-3, hp, muon)
        reference_muon.step()
        reference_adamw.step()
    for k in ref:
        assert torch.equal(params[k], ref[k].detach()), k
    for k in matrices:
        assert torch.equal(state.momentum[k], reference_muon.state[ref[k]]["momentum_buffer"])
    assert state.count == 4 and set(state.exp_avg) == set(rest)


def test_the_schedule_scales_muons_rate_as_it_scales_adamws():
    """At half the peak rate the Muon matrices move as torch's Muon does at half of muon_lr."""
    model = tiny_llama()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    matrices = hidden_matrices(model, list(params))
    muon = MuonHyper(matrices=matrices, lr=0.04, peak_lr=2e-3)
    ref = {k: torch.nn.Parameter(v.clone()) for k in matrices for v in [params[k]]}
    reference = torch.optim.Muon(list(ref.values()), lr=0.02, weight_decay=0.0)
    grads = grads_like(params, 0)
    for k in ref:
        ref[k].grad = grads[k].clone()
    params, _ = muon_update_(params, grads, muon_init(params, muon), 1e-3, AdamWHyper(), muon)
    reference.step()
    assert all(torch.equal(params[k], ref[k].detach()) for k in matrices)


def test_optimizers_that_need_whole_matrices_are_refused_under_deepspeed_but_zero0_float32_in_one_line(tmp_path):
    from automodel.config import ConfigError
    from tests.helpers import quickstart

    for name in ("muon", "adafactor", "soap"):
        quickstart(tmp_path, f"optim.name={name}")  # the functional backend takes each
        # ... and so does DeepSpeed's ZeRO-0 in float32, which steps the model's own weights
        quickstart(tmp_path, f"optim.name={name}", "distributed.backend=deepspeed", "distributed.zero_stage=0")
        for refused in (["distributed.zero_stage=1"], ["distributed.zero_stage=3"],
                        ["distributed.zero_stage=0", "model.dtype=bfloat16"]):
            with pytest.raises(ConfigError, match=f'optim.name = "{name}" needs each weight whole, as a matrix, and '
                                                  "DeepSpeed hands its optimizer flat shards") as e:
                quickstart(tmp_path, f"optim.name={name}", "distributed.backend=deepspeed", *refused)
            assert ('use distributed.zero_stage = 0 with model.dtype = "float32", or distributed.backend = '
                    '"functional"') in str(e.value)
    with pytest.raises(ConfigError, match=r"optim.muon_momentum must be in \[0, 1\) \(got 1.5\)"):
        quickstart(tmp_path, "optim.name=muon", "optim.muon_momentum=1.5")
    with pytest.raises(ConfigError, match='optim.fused is torch\'s AdamW kernel; optim.name = "soap" has none'):
        quickstart(tmp_path, "optim.name=soap", "optim.fused=true")
