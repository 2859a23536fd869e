"""The functional step against a plain nn.Module + torch.optim.AdamW loop, and exact grad accumulation."""

import copy

import pytest
import torch

from automodel.config import ScheduleConfig
from automodel.loss import token_cross_entropy
from automodel.optim import AdamWHyper, lr_at, no_decay_names
from automodel.training.state import ParamBinding, init_state
from automodel.training.step import make_train_step
from tests.conftest import random_batch, split_batch, tiny_llama

CPU = torch.device("cpu")
SCHED = ScheduleConfig(kind="cosine", warmup_steps=3, min_lr=1e-4)
LR, STEPS, WD, CLIP = 3e-3, 12, 0.1, 0.5


def functional_run(model, batches, micro_batch_size, grad_method="autograd"):
    binding = ParamBinding(model)
    params = binding.take()
    hyper = AdamWHyper(betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, no_decay=no_decay_names(params))
    step = make_train_step(model, hyper=hyper, lr_fn=lambda s: lr_at(s, SCHED, LR, STEPS), clip_grad_norm=CLIP,
                           device=CPU, grad_method=grad_method)
    state = init_state(params, CPU, seed=0)
    losses, norms = [], []
    for batch in batches:
        state, metrics = step(state, split_batch(batch, micro_batch_size))
        losses.append(metrics.loss.item())
        norms.append(metrics.grad_norm.item())
    return state, losses, norms


def reference_run(model, batches, micro_batch_size):
    """What a careful PyTorch user writes: module forward, backward per micro-batch, clip, AdamW."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, SCHED, LR, STEPS)
        n = (batch["labels"][:, 1:] != -100).sum()
        total = torch.zeros(())
        for mb in split_batch(batch, micro_batch_size):
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss_sum, _ = token_cross_entropy(logits, mb["labels"])
            (loss_sum / n).backward()
            total = total + loss_sum.detach()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((total / n).item())
    return model, losses, norms


def test_functional_step_matches_module_adamw_loop():
    batches = [random_batch(8, 24, 64, seed=i % 2) for i in range(STEPS)]  # two batches, memorisable
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    state, losses, norms = functional_run(model, batches, micro_batch_size=4)
    ref_model, ref_losses, ref_norms = reference_run(ref_model, batches, micro_batch_size=4)
    assert losses == ref_losses  # bit-identical: same ops in the same order
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=0, atol=0)
    assert losses[-1] < losses[0] - 0.2  # and it learns


def test_grad_accumulation_matches_one_big_batch():
    """micro_batch_size 8 (no accumulation) == 2 (4 accumulations) on the same global batch; the batch has
    ragged lengths, so a per-micro-batch mean would differ: only exact token normalisation passes."""
    batches = [random_batch(8, 24, 64, seed=100 + i) for i in range(4)]
    state_big, losses_big, _ = functional_run(tiny_llama(), batches, micro_batch_size=8)
    state_acc, losses_acc, _ = functional_run(tiny_llama(), batches, micro_batch_size=2)
    assert losses_acc == pytest.approx(losses_big, rel=1e-6)
    for name in state_big.params:
        torch.testing.assert_close(state_acc.params[name], state_big.params[name], rtol=1e-5, atol=1e-6)
    assert state_acc.step == state_big.step == 4 and state_acc.data_position == 32


def test_grad_and_value_matches_autograd():
    batches = [random_batch(4, 16, 64, seed=200 + i) for i in range(3)]
    state_a, losses_a, _ = functional_run(tiny_llama(), batches, micro_batch_size=2)
    state_f, losses_f, _ = functional_run(tiny_llama(), batches, micro_batch_size=2, grad_method="grad_and_value")
    assert losses_f == pytest.approx(losses_a, rel=1e-6)
    for name in state_a.params:
        torch.testing.assert_close(state_f.params[name], state_a.params[name], rtol=1e-5, atol=1e-6)


def test_step_is_pure_and_rng_is_carried():
    """Inputs are not mutated; dropout randomness comes from state.rng, so replaying a state gives the same
    step, and the global generator of the caller is untouched."""
    model = tiny_llama(attention_dropout=0.5)
    binding = ParamBinding(model)
    params = binding.take()
    step = make_train_step(model, hyper=AdamWHyper(), lr_fn=lambda s: 1e-3, clip_grad_norm=1.0, device=CPU)
    state0 = init_state(params, CPU, seed=0)
    before = {k: v.clone() for k, v in state0.params.items()}
    batch = random_batch(4, 16, 64, seed=1)
    torch.manual_seed(123)
    global_rng = torch.get_rng_state()
    s1, m1 = step(state0, [batch])
    s1b, m1b = step(state0, [batch])
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert m1.loss.item() == m1b.loss.item()
    for k in before:
        assert torch.equal(state0.params[k], before[k])
        assert torch.equal(s1.params[k], s1b.params[k])
    assert state0.opt_state.count == 0 and s1.opt_state.count == 1
    s2, m2 = step(s1, [batch])  # advanced rng -> different dropout masks
    assert not torch.equal(s2.rng["cpu"], s1.rng["cpu"])
