"""LoRA through peft: module selection, frozen base, adapter and merged exports, real data, resume."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import automodel
from automodel.config import ConfigError, PeftConfig
from automodel.config.schema import OptimConfig
from automodel.backends import build_functional
from automodel.peft import apply, resolve_targets
from tests.helpers import REPO, module_eval_loss, random_batch, shared_data, split_batch, tiny_llama
from tests.helpers import quickstart, read_rows

LORA = ["peft.rank=8", "peft.alpha=16.0", 'peft.target_modules=["*_proj"]']


def test_patterns_select_modules_by_full_or_last_name():
    model = tiny_llama(tie_word_embeddings=False)
    projections = resolve_targets(model, ["*_proj"], [])
    assert len(projections) == 2 * 7 and "model.layers.0.self_attn.q_proj" in projections
    assert resolve_targets(model, ["all-linear"], []) == projections  # every linear but the lm_head
    attention = resolve_targets(model, ["model.layers.*.self_attn.*"], [])
    assert attention == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert resolve_targets(model, ["*_proj"], ["*.mlp.*", "model.layers.1.*"]) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    with pytest.raises(ConfigError, match=r"`attn\.c_attn` matches no adaptable module; modules here include "
                                          r"model\.embed_tokens, model\.layers\.0\.self_attn\.q_proj"):
        resolve_targets(model, ["attn.c_attn"], [])
    with pytest.raises(ConfigError, match="peft.exclude_modules: `lm_head` matches none"):
        resolve_targets(model, ["*_proj"], ["lm_head"])


def test_only_adapters_train_and_the_base_stays_bit_identical():
    model = apply(tiny_llama(), PeftConfig(rank=4, target_modules=["*_proj"]), seed=0, base_path="base")
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    backend = build_functional(model, optim=OptimConfig(lr=1e-2), clip_grad_norm=1.0, lr_fn=lambda s: 1e-2,
                               device=torch.device("cpu"), grad_method="autograd", all_reduce=None, rank=0,
                               world_size=1, seed=0, loss_chunk_tokens=16, master_dtype="auto")
    state = backend.state
    assert set(state.params) == {n for n, p in model.named_parameters() if "lora_" in n}
    assert set(state.opt_state.exp_avg) == set(state.params)  # no optimizer state for the base
    # r x (in + out) per adapted module: A is r x in, B is out x r.
    expected = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if n.endswith("_proj") and hasattr(m, "in_features"))
    assert backend.trainable_params == sum(p.numel() for p in state.params.values()) == expected
    before = {k: v.clone() for k, v in state.params.items()}
    losses = []
    for i in range(5):
        state, metrics = backend.step(state, split_batch(random_batch(8, 16, 64, seed=i % 2), 4))
        losses.append(metrics.loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), name
    assert all(not torch.equal(state.params[k], before[k]) for k in before if "lora_B" in k)


@pytest.mark.slow
def test_adapter_and_merged_exports_reload_with_the_reported_eval_loss(tmp_path):
    cfg = quickstart(tmp_path, *LORA, "train.max_steps=20", "optim.lr=1e-2", "eval.generate_samples=0",
                     "data.validation.limit=64", "checkpoint.export_merged=true")
    result = automodel.train(cfg)
    out = result.output_dir
    adapter = out / "final"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["base_model_name_or_path"] == str(out / "base")
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * 4 * 7 and all("lora_" in k for k in weights)  # A and B per module per layer
    assert all(w.shape[0] == 8 or w.shape[1] == 8 for w in weights.values())

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), adapter).eval()
    assert module_eval_loss(peft_model, cfg.data, cfg.train.micro_batch_size, tokenizer) == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "final_merged").eval()
    assert module_eval_loss(merged, cfg.data, cfg.train.micro_batch_size, tokenizer) == pytest.approx(result.metrics["eval_loss"], rel=1e-4)

    # The same merge offline, through the CLI.
    proc = subprocess.run([sys.executable, "-m", "automodel.cli", "merge", "--base", str(out / "base"),
                           "--adapter", str(adapter), "--out", str(tmp_path / "merged_cli")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(out / "final_merged" / "model.safetensors"), load_file(tmp_path / "merged_cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    proc = subprocess.run([sys.executable, "-m", "automodel.cli", "merge", "--base", str(out / "base"),
                           "--adapter", str(out / "base"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr


@pytest.mark.slow
def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = LORA + ["schedule.kind=constant", "schedule.warmup_steps=0", "train.log_every=1", "checkpoint.every=2",
                     "checkpoint.save_final=false", "eval.generate_samples=0", "data.validation.limit=32",
                     "optim.lr=1e-2", "peft.dropout=0.1"]
    whole = automodel.train(quickstart(tmp_path / "whole", *common, "train.max_steps=6"))
    automodel.train(quickstart(tmp_path / "cut", *common, "train.max_steps=3"))
    resumed = automodel.train(quickstart(tmp_path / "cut", *common, "train.max_steps=6"))
    rows = lambda r: {x["step"]: x["loss"] for x in read_rows(r.output_dir / "metrics.jsonl") if "loss" in x}  # noqa
    assert rows(resumed) == rows(whole) and len(rows(whole)) == 6


@pytest.mark.slow
def test_lora_on_real_data_loss_falls(tmp_path):
    """LoRA as people use it: on a pretrained base. The base is a short full fine-tune on real alpaca text
    (byte-level tokenizer, so it is quick); the adapter then learns LLaMA-Factory's identity set."""
    alpaca = shared_data("llamafactory-demos/alpaca_en_demo.json")
    identity = shared_data("llamafactory-demos/identity.json")
    text = ["data.seq_len=192", "data.truncate=right", "model.config.max_position_embeddings=192",
            "data.prompt_template=alpaca", "eval.generate_samples=0", "eval.at_start=true", "train.log_every=5",
            "train.global_batch_size=16", "train.micro_batch_size=8"]
    base = automodel.train(quickstart(tmp_path / "base", *text, f"data.train.source={json.dumps(str(alpaca))}",
                                      "data.train.limit=400", f"data.validation.source={json.dumps(str(alpaca))}",
                                      "data.validation.split=\"train[-16:]\"", "train.max_steps=25",
                                      "checkpoint.save_final=true"))
    lora = automodel.train(quickstart(
        tmp_path / "lora", *text, *LORA, "model.init=pretrained", f"model.name_or_path={base.final_dir}",
        "model.config={}", f"data.train.source={json.dumps(str(identity))}", "data.train.split=\"train[:80]\"",
        f"data.validation.source={json.dumps(str(identity))}", "data.validation.split=\"train[80:]\"",
        "train.max_steps=15", "optim.lr=5e-3", 'peft.target_modules=["all-linear"]'))
    rows = read_rows(lora.output_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < losses[0] - 0.3 and evals[-1] < evals[0] - 0.3, (losses, evals)
    assert (lora.final_dir / "adapter_config.json").is_file()


def test_an_adapter_of_a_run_started_with_a_relative_output_dir_loads_from_anywhere(tmp_path, monkeypatch, capsys):
    """The adapter names its base (<output_dir>/base for a model built from config) by an absolute path, so
    PeftModel.from_pretrained, `automodel generate` and the model card's code work from any working directory."""
    from peft import AutoPeftModelForCausalLM

    from automodel.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = quickstart(tmp_path, *LORA, "train.max_steps=2", "eval.generate_samples=0", "eval.at_start=false",
                     "data.validation.limit=8", 'output_dir="runs/lora"')
    final = automodel.train(cfg).final_dir.absolute()
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tmp_path / "runs" / "lora" / "base")
    assert f"# the adapter names its base: {base}" in (final / "README.md").read_text()
    assert f'from_pretrained("{final}")' in (final / "README.md").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert AutoPeftModelForCausalLM.from_pretrained(final).peft_config["default"].r == 8
    capsys.readouterr()
    assert main(["generate", str(final), "--prompt", "Reverse: abc", "--max-new-tokens", "3"]) == 0
