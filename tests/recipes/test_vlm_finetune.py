"""The VLM recipe end to end on real images: a tiny LLaVA learns LaTeX from im2latex formula pages (cropped to the
ink), the export reloads with the Auto classes and gives the reported eval loss, and so does a tiny Gemma 3 (its
processor and image tokens differ from LLaVA's); DeepSpeed ZeRO-0..3 on 2 ranks
(micro-batches with different numbers of images per rank) match the single-process run; text-only rows are
refused."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

import automodel
from automodel.config import ConfigError, load_config
from tests.helpers import REPO, gemma3_processor, im2latex_rows, shared_data, write_jsonl
from tests import helpers

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

VLM_CPU = REPO / "configs_toml" / "vlm_cpu.toml"
QUIET = ["logging.progress_bar=\"off\"", "eval.at_start=true", "eval.generate_samples=0"]


def test_tiny_llava_learns_latex_from_formula_images_and_reloads_with_the_reported_eval_loss(tmp_path):
    rows = im2latex_rows(72)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:64])
    val = write_jsonl(tmp_path / "val.jsonl", rows[64:])
    cfg = load_config(VLM_CPU, [*QUIET, f"output_dir=\"{tmp_path / 'run'}\"", f"data.train.source=\"{train}\"",
                                f"data.validation.source=\"{val}\"", "data.crop_images=true",
                                "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=24",
                                "eval.generate_samples=2", "eval.max_new_tokens=12",
                                "train.eval_every=0", "train.log_every=4", "checkpoint.every=0"], world_size=1)
    result = automodel.train(cfg)
    rows_logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows_logged if "eval_loss" in r]
    assert evals[-1] < 0.7 * evals[0], evals  # held-out formulas: it learned LaTeX, not the training rows

    model, processor = assert_reloads_with_the_reported_eval_loss(result, cfg)
    from automodel.data.vlm import VlmCollator, load_samples

    samples, _ = load_samples(cfg.data.validation[0])

    # Exact match: the reported answers are the reloaded model's greedy answers to the prompts before the answers.
    collate = VlmCollator(processor, crop_to_content=True)
    final_row = [r for r in rows_logged if "exact_match" in r][-1]
    assert final_row["exact_match"] == result.metrics["exact_match"]
    for sample, example in zip(samples, final_row["examples"]):
        inputs, reference = collate.prompt(sample)
        assert reference == sample.messages[-1]["content"][0]["text"] and example["reference"] == reference
        assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith("<|assistant|>")  # the answer is not in it
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) \
            == example["prediction"]
    assert len(final_row["examples"]) == 2


def assert_reloads_with_the_reported_eval_loss(result, cfg):
    """final/ through the Auto classes gives the eval loss the run reported; returns (model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from automodel.data.vlm import VlmCollator, load_samples
    from automodel.loss import token_cross_entropy

    model = AutoModelForImageTextToText.from_pretrained(result.final_dir).eval()
    processor = AutoProcessor.from_pretrained(result.final_dir)
    # The export carries the chat template the run rendered its conversations with (the eval loss below is computed
    # through it).
    assert processor.chat_template and processor.chat_template == AutoProcessor.from_pretrained(
        REPO / cfg.tokenizer.name_or_path if not Path(cfg.tokenizer.name_or_path).is_absolute()
        else cfg.tokenizer.name_or_path).chat_template
    samples, _ = load_samples(cfg.data.validation[0])
    batch = VlmCollator(processor, crop_to_content=cfg.data.crop_images)(samples)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    total, count = token_cross_entropy(logits, batch["labels"])
    assert (total / count).item() == pytest.approx(result.metrics["eval_loss"], rel=1e-4)
    return model, processor


def test_gemma3_built_from_config_trains_and_reloads_with_the_reported_eval_loss(tmp_path):
    # Gemma 3's processor differs from LLaVA's where the recipe depends on it: it wants the images nested per
    # prompt, and <start_of_image> in the text becomes begin/soft/end tokens, the soft one being the model's image
    # token (the token the built config must name).
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    rows = json.loads(demo.read_text())
    gemma3_processor(tmp_path, [t["content"] for r in rows for t in r["messages"]])
    gemma3 = ('{model_type="gemma3", mm_tokens_per_image=4, text_config={hidden_size=64, intermediate_size=128, '
              'num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, '
              'max_position_embeddings=512}, vision_config={hidden_size=32, intermediate_size=64, '
              'num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8}}')
    cfg = load_config(VLM_CPU, [*QUIET, f"model.config={gemma3}", f"tokenizer.name_or_path=\"{tmp_path / 'gemma3'}\"",
                                f"output_dir=\"{tmp_path / 'run'}\"", f"data.train.source=\"{demo}\"",
                                f"data.validation.source=\"{demo}\"", "train.max_steps=30", "checkpoint.every=0"],
                      world_size=1)
    result = automodel.train(cfg)
    assert result.metrics["eval_loss"] < 0.7 * result.metrics["eval_loss_at_start"], result.metrics
    model, processor = assert_reloads_with_the_reported_eval_loss(result, cfg)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")


def _frozen_vision_overrides() -> list[str]:
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    # Samples hold 1 or 2 images, so the ranks' micro-batches differ in images; each still runs the vision tower.
    return [*QUIET, "train.max_steps=4", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
            "eval.generate_samples=2", "eval.max_new_tokens=4",
            'model.freeze=["vision"]', f"data.train.source=\"{demo}\"", f"data.validation.source=\"{demo}\""]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    ref = tmp_path_factory.mktemp("vlm_ref")
    done = subprocess.run([sys.executable, "launch/run.py", "--config", str(VLM_CPU), *_frozen_vision_overrides(),
                           f"output_dir=\"{ref}\""], cwd=REPO, env=helpers.env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return ref


# Stage 1 is stage 2's optimizer without gradient partitioning (one code path in DeepSpeed): 0, 2 and 3 differ.
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_on_two_ranks_matches_one_process_with_frozen_vision(one_process_run, tmp_path, stage):
    ref, out = one_process_run, tmp_path / "ds"
    done = subprocess.run([*helpers.command("torchrun"), "launch/run.py", "--config", str(VLM_CPU),
                           *_frozen_vision_overrides(), "distributed.backend=\"deepspeed\"",
                           f"distributed.zero_stage={stage}", f"output_dir=\"{out}\""],
                          cwd=REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"2 rank(s), deepspeed (ZeRO-{stage})" in done.stdout
    assert "frozen: {'vision'" in done.stdout
    got, want = helpers.train_losses(out), helpers.train_losses(ref)
    assert sorted(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-4)
    assert helpers.eval_losses(out) == pytest.approx(helpers.eval_losses(ref), rel=1e-4)
    # Greedy answers (ZeRO-3: every rank generates in step) are the single process's.
    answers = [[(r["exact_match"], r["examples"]) for r in helpers.rows(d) if "examples" in r] for d in (out, ref)]
    assert answers[0] == answers[1] and len(answers[0]) == 2
    # The whole model is exported, the frozen tower unchanged (the same seeded weights as the reference's).
    from safetensors.torch import load_file

    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert set(a) == set(b)
    vision = [k for k in a if "vision_tower" in k]
    assert vision and all(torch.equal(a[k], b[k]) for k in vision)


def test_text_only_rows_are_refused_with_the_row_named(tmp_path):
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    rows = json.loads(demo.read_text())
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**r, "images": [str(demo.parent / p) for p in r.get("images", [])]} for r in rows]))
    cfg = load_config(VLM_CPU, [*QUIET, f"output_dir=\"{tmp_path / 'run'}\"", f"data.train.source=\"{bad}\"",
                                "train.max_steps=1"], world_size=1)
    with pytest.raises(ConfigError, match=r"bad.json row 2: .*at least one.*ZeRO-3"):
        automodel.train(cfg)
    with pytest.raises(ConfigError, match='format = "vlm"'):
        load_config(VLM_CPU, ['data.train.format="chat"'], world_size=1)


def test_lora_goes_on_the_language_model_and_leaves_the_vision_tower_out(tmp_path):
    demo = shared_data("llamafactory-demos/mllm_demo.json")
    cfg = load_config(VLM_CPU, [*QUIET, f"output_dir=\"{tmp_path / 'run'}\"", f"data.train.source=\"{demo}\"",
                                f"data.validation.source=\"{demo}\"", "peft.rank=4", "train.max_steps=2",
                                "checkpoint.every=0"], world_size=1)
    result = automodel.train(cfg)
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    names = list(load_file(result.final_dir / "adapter_model.safetensors"))
    assert names and all("lora_" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert any("language_model" in n and "q_proj" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)  # the projector is no vision tower: it adapts too
    assert adapter["r"] == 4
