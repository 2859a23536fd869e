"""The chunked loss on real architectures: the output head is found, what the model does to its logits is
calibrated against the model itself, and loss and gradients equal the whole-logits loss of the model's output."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from automodel.loss import token_cross_entropy
from automodel.training.forward import ModelLoss
from tests.helpers import random_batch

CPU = torch.device("cpu")
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
# Each family with what it does after its head (the config key the calibration must find).
FAMILIES = {
    "llama": ({"tie_word_embeddings": False}, "none"),
    "qwen2": ({"tie_word_embeddings": True}, "none"),
    "gemma2": ({"final_logit_softcapping": 0.5}, "final_logit_softcapping = 0.5"),  # small: the cap bites
    "cohere": ({"logit_scale": 0.25}, "logit_scale = 0.25"),
    "granite": ({"logits_scaling": 4.0}, "logits_scaling = 4.0"),
}


def build(model_type: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **fields})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def loss_and_grads(model, loss_fn):
    batch = random_batch(3, 20, 96, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, n = loss_fn(batch)
    return loss.detach(), n, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_loss_equals_the_models_own_logits(family):
    fields, transform = FAMILIES[family]
    model = build(family, **fields)
    run = lambda inputs: model(**inputs)  # noqa: E731
    loss = ModelLoss(model, chunk_tokens=7, dtype=torch.float32)
    assert loss.calibrate(run, CPU).startswith("chunks of 7 tokens")
    assert loss.head.transform_name == transform
    whole, n_whole, g_whole = loss_and_grads(
        model, lambda b: token_cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                             b["labels"]))
    chunked, n, g = loss_and_grads(model, lambda b: loss(run, b))
    assert n.item() == n_whole.item()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for a, ref in zip(g, g_whole):
        assert ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item() <= 1e-6


def test_a_head_the_calibration_cannot_explain_falls_back_to_whole_logits():
    """A forward that rescales its logits in a way no config key names: the probe sees the mismatch, the loss says
    so and computes from whole logits (still the model's own loss)."""
    model = build("llama")
    plain = model.forward

    def rescaled(**kwargs):
        out = plain(**kwargs)
        out.logits = out.logits * 3.0 + 1.0
        return out

    model.forward = rescaled
    run = lambda inputs: model(**inputs)  # noqa: E731
    loss = ModelLoss(model, chunk_tokens=7, dtype=torch.float32)
    assert "could not be split off (its output does not match the model's logits)" in loss.calibrate(run, CPU)
    batch = random_batch(2, 12, 96, seed=1)
    expected, _ = token_cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"])
    assert loss(run, batch)[0].item() == expected.item()


def test_under_zero3_a_head_with_submodules_takes_the_whole_logits_path():
    """peft's modules_to_save wraps the head in a module whose forward calls another: under ZeRO-3 each chunk would
    gather again (and ranks with different numbers of chunks would disagree), so partitioned runs keep such a head on
    whole logits; unpartitioned ones chunk it."""
    from automodel.config import PeftConfig
    from automodel.peft import apply

    model = apply(build("llama", tie_word_embeddings=False), PeftConfig(rank=4, target_modules=["*_proj"],
                                                                       modules_to_save=["lm_head"]), 0, "base")
    run = lambda inputs: model(**inputs)  # noqa: E731
    assert ModelLoss(model, 7, torch.float32).calibrate(run, CPU).startswith("chunks of 7 tokens")
    line = ModelLoss(model, 7, torch.float32, partitioned=True).calibrate(run, CPU)
    assert line.startswith("whole logits: under ZeRO-3 the output head (ModulesToSaveWrapper) must be a single module")
