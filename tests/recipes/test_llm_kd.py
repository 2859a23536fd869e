"""Knowledge distillation (recipe llm_kd): alpha = 0 is llm_finetune's step bit for bit, the loss of a step equals a
direct computation from both models' logits, a distilled student carries its teacher's knowledge past bad labels,
and 2-rank ZeRO-3 (teacher partitioned too) equals one process."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import automodel
from automodel.backends import build_functional
from automodel.config import ConfigError
from automodel.config.schema import OptimConfig
from automodel.loss import distill_sum, next_token_targets, target_index
from automodel.training.teacher import Teacher, local_head_weights
from tests import helpers
from tests.helpers import ASSETS, random_batch, read_rows, split_batch, tiny_llama, write_jsonl

CPU = torch.device("cpu")


def teacher_of(model, alpha: float, temperature: float) -> Teacher:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, run=lambda inputs: model(**inputs), dtype=torch.float32,
                   head_weights=local_head_weights(model), alpha=alpha, temperature=temperature)


def backend(model, chunk: int, teacher=None, fused: bool = True):
    return build_functional(model, optim=OptimConfig(lr=3e-3), clip_grad_norm=1.0, lr_fn=lambda s: 3e-3, device=CPU,
                            grad_method="autograd", all_reduce=None, rank=0, world_size=1, seed=0,
                            loss_chunk_tokens=chunk, master_dtype="auto", teacher=teacher, fused_loss=fused)


def steps(b, batches):
    state, losses = b.state, []
    for batch in batches:
        state, metrics = b.step(state, split_batch(batch, 2))
        losses.append(metrics.loss.item())
    return state, losses


@pytest.mark.parametrize("chunk, fused", [(8, True), (8, False), (0, False)],
                         ids=["chunked-fused", "chunked-recomputed", "whole-logits"])
def test_alpha_zero_is_the_fine_tuning_step_bit_for_bit(chunk, fused):
    batches = [random_batch(4, 16, 64, seed=10 + i) for i in range(3)]
    plain, plain_losses = steps(backend(tiny_llama(), chunk, fused=fused), batches)
    kd_backend = backend(tiny_llama(), chunk, teacher_of(tiny_llama(seed=7), 0.0, 2.0), fused=fused)
    assert ("gradients in the forward" in kd_backend.loss_description) == fused
    kd, kd_losses = steps(kd_backend, batches)
    assert kd_losses == plain_losses
    assert all(torch.equal(kd.params[k], plain.params[k]) for k in plain.params)
    # With alpha > 0 the teacher is in the loss: the first step's is distill_sum over both models' own logits.
    mixed, mixed_losses = steps(backend(tiny_llama(), chunk, teacher_of(tiny_llama(seed=7), 0.5, 2.0), fused=fused),
                                batches)
    first = batches[0]
    with torch.no_grad():
        logits = tiny_llama()(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        teacher_logits = tiny_llama(seed=7)(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    index = target_index(first["labels"])
    targets = next_token_targets(first["labels"]).reshape(-1)[index]
    expected = distill_sum(logits.flatten(0, 1)[index], teacher_logits.flatten(0, 1)[index], targets, 0.5, 2.0)
    assert mixed_losses[0] == pytest.approx(expected.item() / len(index), rel=1e-6)
    assert abs(mixed_losses[0] - plain_losses[0]) > 1e-3


def test_a_lora_student_trains_only_its_adapters_from_the_teacher():
    from automodel.config import PeftConfig
    from automodel.peft import apply

    student = apply(tiny_llama(), PeftConfig(rank=4, target_modules=["*_proj"]), seed=0, base_path="base")
    b = backend(student, 8, teacher_of(tiny_llama(seed=7), 0.5, 2.0))
    assert set(b.state.params) == {n for n, p in student.named_parameters() if "lora_" in n}
    before = {k: v.clone() for k, v in b.state.params.items()}
    state, losses = steps(b, [random_batch(4, 16, 64, seed=20 + i % 2) for i in range(6)])
    assert losses[-1] < losses[0]
    assert any(not torch.equal(state.params[k], before[k]) for k in before)


@pytest.mark.parametrize("chunk", [5, 0], ids=["chunked", "whole-logits"])
def test_the_step_loss_and_gradients_equal_a_direct_computation_from_both_models(chunk):
    """One micro-batch through the backend's loss (teacher run, hidden states captured, trained positions selected,
    chunks) against distill_sum over the two models' own logits at the trained positions."""
    student, teacher_model = tiny_llama(), tiny_llama(seed=3)
    batch = random_batch(3, 14, 64, seed=4)
    expected_model = tiny_llama()
    logits = expected_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    index = target_index(batch["labels"])
    targets = next_token_targets(batch["labels"]).reshape(-1)[index]
    expected = distill_sum(logits.flatten(0, 1)[index], teacher_logits.flatten(0, 1)[index], targets, 0.7, 1.5)
    n = len(index)
    expected_grads = torch.autograd.grad(expected / n, list(expected_model.parameters()))

    b = backend(student, chunk, teacher_of(teacher_model, 0.7, 1.5))
    names = list(b.state.params)
    before = {k: v.clone() for k, v in b.state.params.items()}
    state, metrics = b.step(b.state, [batch])
    assert metrics.loss.item() == pytest.approx(expected.item() / n, rel=1e-6)
    # One AdamW step from zero moments moves each weight by -lr * g / (|g| + eps): the update's sign is the gradient's.
    for name, grad in zip(names, expected_grads):
        moved = state.params[name] - before[name]
        big = grad.abs() > 1e-5
        assert torch.equal(torch.sign(moved[big]), -torch.sign(grad[big])), name


def test_teacher_with_another_vocabulary_is_refused_before_training(tmp_path):
    cfg = helpers.quickstart(tmp_path, 'recipe="llm_kd"', f'distill.teacher="{tmp_path / "teacher"}"',
                             "train.max_steps=2")
    tiny_llama(vocab_size=300).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError, match=r"distill.teacher .* 300-token output vocabulary, the student 259"):
        automodel.train(cfg)
    tiny_llama(vocab_size=200).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError, match=r"distill.teacher: the tokenizer has 259 tokens but the model's embedding "
                                          "has 200 rows"):
        automodel.train(cfg)
    with pytest.raises(ConfigError, match=r'recipe = "llm_kd" and a \[distill\] section go together'):
        helpers.quickstart(tmp_path, 'recipe="llm_kd"')


@pytest.fixture(scope="module")
def trained_teacher(trained_quickstart):
    return trained_quickstart


@pytest.mark.slow
def test_a_distilled_student_carries_its_teachers_knowledge_past_bad_labels(tmp_path, trained_teacher):
    """The student's labels are unreliable: in 55% of its training rows the answer is the string copied instead of
    reversed. Trained on the labels alone it learns to copy (held-out exact match near 0); distilled (alpha 0.9) it
    learns part of what the teacher knows. Measured with the packages resolved on 2026-12-02 (transformers 5.24,
    datasets 5.2, tokenizers 0.23) and the shipped quickstart model as the teacher (500 steps): after 250 steps,
    1% against 20% (of 100 held-out prompts), eval loss 1.83 against 1.10 (after 400 steps: 3.5% against 45.0%,
    1.41 against 0.49)."""
    rng = random.Random(0)
    rows = read_rows(ASSETS / "train.jsonl")
    noisy = [{**r, "output": r["instruction"].split(": ", 1)[1]} if rng.random() < 0.55 else r for r in rows]
    train = write_jsonl(tmp_path / "noisy.jsonl", noisy)
    student = ["model.config.hidden_size=128", "model.config.intermediate_size=384", "model.config.num_hidden_layers=2",
               f'data.train.source="{train}"', "train.max_steps=250", "eval.generate_samples=100",
               "eval.at_start=false", "train.eval_every=0", "checkpoint.save_final=false"]
    labels = automodel.train(helpers.quickstart(tmp_path / "labels", *student))
    distilled = automodel.train(helpers.quickstart(tmp_path / "kd", *student, 'recipe="llm_kd"',
                                                   f'distill.teacher="{trained_teacher}"', "distill.alpha=0.9",
                                                   "distill.temperature=1.0"))
    assert labels.metrics["exact_match"] < 0.1
    assert distilled.metrics["exact_match"] > labels.metrics["exact_match"] + 0.1
    assert distilled.metrics["eval_loss"] < labels.metrics["eval_loss"] - 0.3  # the student's own cross-entropy


@pytest.mark.slow
def test_two_rank_zero3_distillation_equals_one_process(tmp_path):
    """Student and teacher both partitioned over 2 ranks (the teacher an engine of its own, its head gathered once
    per micro-batch), the loss in chunks of 16: the same losses and eval losses as one functional process."""
    teacher = tiny_llama(vocab_size=len(AutoTokenizer.from_pretrained(ASSETS / "tokenizer")), seed=5,
                         hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    teacher.save_pretrained(tmp_path / "teacher")
    common = ['recipe="llm_kd"', f'distill.teacher="{tmp_path / "teacher"}"', "distill.alpha=0.5",
              "distill.temperature=2.0", "train.max_steps=4", "train.log_every=1", "schedule.warmup_steps=1",
              "train.global_batch_size=32", "train.micro_batch_size=8", "train.loss_chunk_tokens=16",
              "eval.generate_samples=0", "eval.at_start=false", "data.validation.limit=16",
              "checkpoint.save_final=false", "logging.progress_bar=\"off\""]
    one = helpers.launch_run("python", common + [f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = helpers.launch_run("torchrun", common + ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                                   f"output_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "2 rank(s), deepspeed (ZeRO-3) backend" in two.stdout and "teacher: LlamaForCausalLM" in two.stdout
    ref, got = helpers.train_losses(tmp_path / "one"), helpers.train_losses(tmp_path / "two")
    assert list(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-5)
    assert helpers.eval_losses(tmp_path / "two") == pytest.approx(helpers.eval_losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])  # the training rows read in full, or streamed
def test_shipped_kd_cpu_config_trains(tmp_path, trained_teacher, streaming):
    cfg = automodel.load_config(helpers.REPO / "configs_toml" / "kd_cpu.toml", [
        f'distill.teacher="{trained_teacher}"', f'output_dir="{tmp_path / "kd_cpu"}"', "train.max_steps=60",
        "eval.generate_samples=0", "train.eval_every=0", 'logging.progress_bar="off"',
        f"data.train.streaming={str(streaming).lower()}"], world_size=1)
    result = automodel.train(cfg)
    assert result.metrics["eval_loss"] < 0.6 * result.metrics["eval_loss_at_start"]
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).config.num_hidden_layers == 2
