"""The functional step against a plain PyTorch loop (the model's own `.loss`, torch.optim.AdamW), exact gradient
accumulation, activation checkpointing, the chunked loss, float32 masters of a bfloat16 model, and donation."""

import copy

import attrs
import pytest
import torch

from automodel.config import PeftConfig, ScheduleConfig, TrainingConfig
from automodel.config.schema import OptimConfig
from automodel.backends import build_functional
from automodel.models import enable_activation_checkpointing
from automodel.optim import lr_at
from automodel.peft import apply as apply_lora
from tests.helpers import random_batch, split_batch, tiny_llama

CPU = torch.device("cpu")
SCHED = ScheduleConfig(kind="cosine", warmup_steps=3, min_lr=1e-4)
LR, STEPS, WD, CLIP = 3e-3, 12, 0.1, 0.5
OPTIM = OptimConfig(lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8)


def backend_for(model, grad_method="autograd", chunk_tokens=0, master_dtype="auto", optim=OPTIM, lr_fn=None,
                offload=False, fused=TrainingConfig().fused_loss):
    return build_functional(model, optim=optim, clip_grad_norm=CLIP, device=CPU,
                            lr_fn=lr_fn or (lambda s: lr_at(s, SCHED, LR, STEPS)), grad_method=grad_method,
                            all_reduce=None, rank=0, world_size=1, seed=0, loss_chunk_tokens=chunk_tokens,
                            master_dtype=master_dtype, offload_activations=offload, fused_loss=fused)


def functional_run(model, batches, micro_batch_size, **backend_kwargs):
    backend = backend_for(model, **backend_kwargs)
    state, losses, norms = backend.state, [], []
    for batch in batches:
        state, metrics = backend.step(state, split_batch(batch, micro_batch_size))
        losses.append(metrics.loss.item())
        norms.append(metrics.grad_norm.item())
    return state, losses, norms


def reference_run(model, batches, micro_batch_size):
    """What a careful PyTorch user writes: the model's own loss (summed over the global batch's label tokens via
    num_items_in_batch), backward per micro-batch, clip, torch's AdamW."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, SCHED, LR, STEPS)
        n = (batch["labels"][:, 1:] != -100).sum()
        total = 0.0
        for mb in split_batch(batch, micro_batch_size):
            out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"],
                        num_items_in_batch=n)
            out.loss.backward()
            total += out.loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, losses, norms


def assert_params(state, model, rel: float = 0.0):
    for name, p in model.named_parameters():
        if rel == 0.0:
            torch.testing.assert_close(state.params[name], p.detach(), rtol=0, atol=0)
        else:
            assert ((state.params[name] - p.detach()).norm() / p.norm()).item() <= rel, name


def test_functional_step_matches_the_models_own_loss_and_torch_adamw():
    batches = [random_batch(8, 24, 64, seed=i % 2) for i in range(STEPS)]  # two batches, memorisable
    model = tiny_llama()
    ref_model, ref_losses, ref_norms = reference_run(copy.deepcopy(model), batches, micro_batch_size=4)
    # Whole logits: the same ops in the same order as the model's own loss, so the same weights bit for bit.
    state, losses, norms = functional_run(copy.deepcopy(model), batches, micro_batch_size=4, chunk_tokens=0)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert norms == pytest.approx(ref_norms, rel=1e-6)
    assert_params(state, ref_model)
    assert losses[-1] < losses[0] - 0.2  # and it learns
    # The chunked loss sums the same terms in another order: equal to float32 rounding after 12 updates.
    state, losses, _ = functional_run(copy.deepcopy(model), batches, micro_batch_size=4, chunk_tokens=16)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_params(state, ref_model, rel=1e-5)


@pytest.mark.parametrize("lora", [None, ["*_proj"], ["*_proj", "lm_head"]], ids=["full", "lora", "lora-head"])
def test_the_fused_loss_gives_the_recomputing_losses_steps(lora):
    """train.fused_loss: the chunks' gradients from the forward give the recomputing path's losses and weights to
    float32 rounding over 12 updates (the sum is scaled after the products instead of before); with LoRA the head is
    frozen and only the hidden states' gradient is computed; with LoRA on the head too, its adapter's."""
    batches = [random_batch(8, 24, 64, seed=i % 2) for i in range(STEPS)]

    def run(fused: bool):
        model = tiny_llama()
        if lora:
            model = apply_lora(model, PeftConfig(rank=4, target_modules=lora), seed=0, base_path="base")
        backend = backend_for(model, chunk_tokens=16, fused=fused)
        assert ("gradients in the forward" in backend.loss_description) == fused
        assert lora is None or any(k.endswith("lm_head.lora_B.default.weight") for k in backend.state.params) == \
            ("lm_head" in lora)
        state, losses = backend.state, []
        for batch in batches:
            state, metrics = backend.step(state, split_batch(batch, 4))
            losses.append(metrics.loss.item())
        return state, losses

    state_fused, losses_fused = run(True)
    state, losses = run(False)
    assert losses_fused == pytest.approx(losses, rel=1e-6) and losses[-1] < losses[0] - 0.05
    for name in state.params:  # (as a whole: Adam lifts a near-zero gradient's last-bit difference to 1e-6)
        diff = (state_fused.params[name] - state.params[name]).norm() / state.params[name].norm()
        assert diff.item() <= 1e-5, name


def test_grad_accumulation_matches_one_big_batch():
    """micro_batch_size 8 (no accumulation) == 2 (4 accumulations) on the same global batch; the batch has
    ragged lengths, so a per-micro-batch mean would differ: only exact token normalisation passes."""
    batches = [random_batch(8, 24, 64, seed=100 + i) for i in range(4)]
    state_big, losses_big, _ = functional_run(tiny_llama(), batches, micro_batch_size=8, chunk_tokens=32)
    state_acc, losses_acc, _ = functional_run(tiny_llama(), batches, micro_batch_size=2, chunk_tokens=32)
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


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_steps(lora):
    """Recomputing every layer in the backward (dropout included: the recompute replays the RNG) changes nothing:
    the same losses and weights, bit for bit, with the chunked loss on top."""
    batches = [random_batch(4, 16, 64, seed=300 + i) for i in range(3)]

    def run(checkpointing: bool):
        model = tiny_llama(attention_dropout=0.3)
        if checkpointing:
            enable_activation_checkpointing(model)
        if lora:
            model = apply_lora(model, PeftConfig(rank=4, dropout=0.2, target_modules=["*_proj"]), seed=0,
                               base_path="base")
        return functional_run(model, batches, micro_batch_size=2, chunk_tokens=8)

    state_ac, losses_ac, _ = run(True)
    state, losses, _ = run(False)
    assert losses_ac == losses
    for name in state.params:
        assert torch.equal(state_ac.params[name], state.params[name]), name


def test_activation_checkpointing_keeps_only_the_layer_inputs():
    """Checkpointing is really on, in the step: the tensors autograd saves outside the recomputed layers fall from
    every layer's activations to little more than each layer's input."""

    def saved_bytes(checkpointing: bool) -> int:
        model = tiny_llama(num_hidden_layers=4)
        if checkpointing:
            enable_activation_checkpointing(model)
        backend = backend_for(model, chunk_tokens=8)
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backend.step(backend.state, [random_batch(2, 64, 64, seed=0)])
        return sum(seen.values())

    full, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < full / 4


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_offloading_gives_the_same_steps(checkpointing):
    """Saved activations through host memory: the same losses and weights, bit for bit (LoRA with dropout, the
    chunked loss, float32 masters of a bfloat16 model)."""
    batches = [random_batch(4, 16, 64, seed=400 + i) for i in range(3)]

    def run(offload: bool):
        model = tiny_llama(attention_dropout=0.3).to(torch.bfloat16)
        if checkpointing:
            enable_activation_checkpointing(model)
        model = apply_lora(model, PeftConfig(rank=4, dropout=0.2, target_modules=["*_proj"]), seed=0, base_path="b")
        return functional_run(model, batches, micro_batch_size=2, chunk_tokens=8, offload=offload)

    state_off, losses_off, _ = run(True)
    state, losses, _ = run(False)
    assert losses_off == losses
    for name in state.params:
        assert torch.equal(state_off.params[name], state.params[name]), name


def test_activation_offloading_moves_activations_not_weights():
    """What goes to host memory: every saved activation without checkpointing; with it, only the layers' inputs
    (one hidden state per layer and token). Weights stay put."""
    from automodel.training.offload import Offloaded

    batch = random_batch(2, 64, 64, seed=0)

    def moved(checkpointing: bool, batch: dict, **shape) -> int:
        model = tiny_llama(num_hidden_layers=4, **shape)
        if checkpointing:
            enable_activation_checkpointing(model)
        with Offloaded(model, CPU) as offloaded:
            model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        return offloaded.moved_bytes

    full, checkpointed = moved(False, batch), moved(True, batch)
    layer_inputs = 4 * 2 * 64 * 32 * 4  # layers x batch x tokens x hidden x float32
    assert layer_inputs <= checkpointed < full / 4
    # Wide layers, 3 tokens: 3.8 MiB of weights (each saved by the matmuls that read them), 0.2 MiB of activations;
    # only the activations move.
    wide = dict(hidden_size=128, intermediate_size=512)
    weights = sum(p.numel() * 4 for p in tiny_llama(num_hidden_layers=4, **wide).parameters())
    assert moved(False, random_batch(1, 3, 64, seed=0), **wide) < weights / 10


def test_step_donates_its_state_and_a_clone_replays_it():
    """The new state's weights and moments are the old state's tensors, updated in place; a state cloned before its
    step replays it exactly, with the RNG it carries (dropout), leaving the caller's generator untouched."""
    backend = backend_for(tiny_llama(attention_dropout=0.5), chunk_tokens=8)
    state0 = backend.state
    batch = random_batch(4, 16, 64, seed=1)

    def clone(state):
        t = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
        return attrs.evolve(state, params=t(state.params), rng=t(state.rng), opt_state=attrs.evolve(
            state.opt_state, exp_avg=t(state.opt_state.exp_avg), exp_avg_sq=t(state.opt_state.exp_avg_sq)))

    kept = clone(state0)
    torch.manual_seed(123)
    global_rng = torch.get_rng_state()
    s1, m1 = backend.step(state0, [batch])
    assert torch.equal(torch.get_rng_state(), global_rng)
    for name, p in s1.params.items():
        assert p.data_ptr() == state0.params[name].data_ptr()  # donated
        assert s1.opt_state.exp_avg[name].data_ptr() == state0.opt_state.exp_avg[name].data_ptr()
    assert not torch.equal(s1.params["model.layers.0.mlp.up_proj.weight"],
                           kept.params["model.layers.0.mlp.up_proj.weight"])
    replay, m1b = backend.step(clone(kept), [batch])
    assert m1.loss.item() == m1b.loss.item()
    assert all(torch.equal(replay.params[k], s1.params[k]) for k in s1.params)
    assert kept.opt_state.count == 0 and s1.opt_state.count == 1
    s2, _ = backend.step(s1, [batch])  # advanced rng -> different dropout masks
    assert not torch.equal(s2.rng["cpu"], kept.rng["cpu"])


def test_bfloat16_model_with_float32_masters_follows_the_float32_run():
    """100 steps at lr 1e-5 (llm.toml's rate): float32 masters of a bfloat16 model move with the float32 run; without
    them ("same") most bfloat16 weights never change, as each update rounds away."""
    batches = [random_batch(4, 16, 64, seed=400 + i % 4) for i in range(100)]
    optim = OptimConfig(lr=1e-5, betas=(0.9, 0.95))
    runs = {}
    for name, dtype, masters in (("fp32", torch.float32, "auto"), ("masters", torch.bfloat16, "float32"),
                                 ("same", torch.bfloat16, "same")):
        model = tiny_llama(initializer_range=0.02).to(dtype)
        init = {k: p.detach().float().clone() for k, p in model.named_parameters()}
        state, losses, _ = functional_run(model, batches, micro_batch_size=4, chunk_tokens=8, master_dtype=masters,
                                          optim=optim, lr_fn=lambda s: 1e-5)
        runs[name] = (state, init, losses)
    fp32, masters, same = runs["fp32"], runs["masters"], runs["same"]
    assert all(v.dtype == torch.float32 for v in masters[0].params.values())
    assert all(v.dtype == torch.bfloat16 for v in same[0].params.values())
    name = "model.layers.0.mlp.up_proj.weight"
    delta = {k: (state.params[name].float() - init[name]).flatten() for k, (state, init, _) in runs.items()}
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(delta["masters"], delta["fp32"], dim=0) > 0.999  # measured 0.99998
    assert cosine(delta["same"], delta["fp32"], dim=0) < 0.6  # measured 0.34
    rounded = masters[0].params[name].bfloat16().float()
    assert (rounded != masters[1][name]).float().mean() > 0.9  # 94% of the bf16 weights moved
    assert (same[0].params[name].float() == same[1][name]).float().mean() > 0.75  # 84% never moved
    assert abs(masters[2][-1] - fp32[2][-1]) < 1e-3 < abs(same[2][-1] - fp32[2][-1])


@pytest.mark.slow  # compiling takes ~30 s on CPU
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_like_eager_ones(checkpointing):
    """train.compile: each decoder layer through torch.compile (inductor on CPU); the same steps to float tolerance,
    with activation checkpointing recomputing the compiled layers too."""
    from automodel.models import compile_layers

    batches = [random_batch(8, 24, 64, seed=s) for s in range(4)]
    runs = []
    for compiled in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_activation_checkpointing(model)
        if compiled:
            assert compile_layers(model) == 2
        runs.append(functional_run(model, batches, 4, chunk_tokens=16))
    (eager_state, eager_losses, eager_norms), (state, losses, norms) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-5) and norms == pytest.approx(eager_norms, rel=1e-4)
    for name, value in eager_state.params.items():
        torch.testing.assert_close(state.params[name], value, rtol=1e-4, atol=1e-5, msg=name)
