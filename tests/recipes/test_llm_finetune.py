"""The LLM SFT recipe end to end: artefacts, the HF export round trip, real SQuAD data, entry points."""

import json
import os
import shutil
import subprocess
import sys

import attrs
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import automodel
from automodel.config import load_config
from tests.helpers import ASSETS, QUICKSTART, REPO, module_eval_loss, quickstart, read_rows, shared_data

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

def greedy_exact_match(final, rows, max_new_tokens: int) -> float:
    """Exact match of a reloaded model, by transformers alone: each prompt as the instruction format renders it
    ("{instruction}\n", the tokenizer's BOS first), greedy generate(), the decoded text against the output."""
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    hits = 0
    for row in rows:
        ids = tokenizer(row["instruction"] + "\n", return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        hits += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == row["output"]
    return hits / len(rows)


def test_run_writes_config_metrics_and_a_model_that_reloads_with_the_same_eval_loss(tmp_path):
    cfg = quickstart(tmp_path, "train.max_steps=200", "schedule.warmup_steps=50", "train.log_every=50",
                     "train.eval_every=100", "eval.generate_samples=16", "data.validation.limit=64")
    result = automodel.train(cfg)
    out = result.output_dir
    assert load_config(out / "config.toml", world_size=1) == cfg

    rows = read_rows(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [50, 100, 150, 200]
    assert [r["step"] for r in eval_rows] == [0, 100, 200]  # at_start, eval_every, end
    for r in train_rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert eval_rows[0]["exact_match"] == 0.0 < eval_rows[-1]["exact_match"]
    assert result.metrics["eval_loss"] == eval_rows[-1]["eval_loss"]
    assert result.metrics["train_loss"] == train_rows[-1]["loss"] and result.metrics["steps"] == 200

    # The export is a plain HF directory; its eval loss is the one the trainer reported.
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    loss = module_eval_loss(model, cfg.data, cfg.train.micro_batch_size, AutoTokenizer.from_pretrained(final))
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    # ... and so is its exact match, decoded by transformers alone from the data file's rows.
    rows = read_rows(ASSETS / "validation.jsonl")[:16]
    assert greedy_exact_match(final, rows, cfg.eval.max_new_tokens) == result.metrics["exact_match"]
    assert not list(out.glob(".tmp-*"))


def test_micro_batch_size_does_not_change_training(tmp_path):
    """Config-level grad-accumulation invariance: 1 x 32 and 4 x 8 give the same run."""
    one = automodel.train(quickstart(tmp_path / "a", "train.max_steps=4", "train.log_every=1",
                                     "train.global_batch_size=32", "train.micro_batch_size=32",
                                     "eval.generate_samples=0", "eval.at_start=false", "checkpoint.save_final=false"))
    four = automodel.train(quickstart(tmp_path / "b", "train.max_steps=4", "train.log_every=1",
                                      "train.global_batch_size=32", "train.micro_batch_size=8",
                                      "eval.generate_samples=0", "eval.at_start=false", "checkpoint.save_final=false"))
    losses = [[r["loss"] for r in read_rows(res.output_dir / "metrics.jsonl") if "loss" in r] for res in (one, four)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert four.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-5)


def test_squad_run_on_real_data_loss_falls(tmp_path):
    squad = shared_data("squad-v1.1/dev-v1.1.json")
    gpt2 = shared_data("gpt2-tokenizer")
    cfg = load_config(QUICKSTART, [
        f"output_dir={json.dumps(str(tmp_path / 'squad'))}", f"tokenizer.name_or_path={json.dumps(str(gpt2))}",
        f"data.train.source={json.dumps(str(squad))}", "data.train.format=squad", "data.train.split=\"train[:90%]\"",
        "data.train.limit=400", f"data.validation.source={json.dumps(str(squad))}", "data.validation.format=squad",
        "data.validation.split=\"train[90%:]\"", "data.validation.limit=16", "data.seq_len=256",
        "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
        "model.config.max_position_embeddings=256", "optim.lr=2e-3", "schedule.warmup_steps=5",
        "train.max_steps=25", "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=5",
        "train.eval_every=0", "eval.generate_samples=0", "eval.at_start=true", "checkpoint.save_final=false",
        "logging.progress_bar=\"off\""], world_size=1)
    result = automodel.train(cfg)
    rows = read_rows(result.output_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    # From ln(50257) = 10.8 at random init; measured 10.66 -> 8.68 (train), 10.84 -> 9.74 (held out).
    assert len(losses) == 5 and losses[-1] < losses[0] - 1.5
    assert evals[-1] < evals[0] - 0.5


def test_train_accepts_code_built_and_evolved_configs(tmp_path):
    cfg = quickstart(tmp_path, "train.max_steps=2", "eval.generate_samples=0", "eval.at_start=false",
                     "data.validation.limit=32")
    built = automodel.config.TrainConfig(**{f.name: getattr(cfg, f.name) for f in attrs.fields(type(cfg))})
    assert automodel.train(built).metrics["steps"] == 2
    evolved = attrs.evolve(cfg, train=attrs.evolve(cfg.train, max_steps=None, epochs=0.05),
                           output_dir=str(tmp_path / "evolved"), checkpoint=attrs.evolve(cfg.checkpoint, save_final=False))
    result = automodel.train(evolved)
    assert result.metrics["steps"] == 5 and result.final_dir is None  # ceil(0.05 x 93 steps per epoch)
    with pytest.raises(automodel.ConfigError, match="divisible"):
        automodel.train(attrs.evolve(cfg, train=attrs.evolve(cfg.train, global_batch_size=33)))


@pytest.mark.parametrize("entry", ["launch", "console"])
def test_entry_points_train_with_overrides(tmp_path, entry):
    if entry == "launch":
        cmd = [sys.executable, str(REPO / "launch" / "run.py")]
    else:
        exe = shutil.which("automodel", path=os.path.dirname(sys.executable))
        if exe is None:
            pytest.skip("the automodel console script is not installed (pip install -e .)")
        cmd = [exe, "run"]
    out = tmp_path / "cli"
    # An unquoted non-TOML value (the path) is taken as a string.
    proc = subprocess.run(cmd + ["--config", "configs_toml/quickstart.toml", "train.max_steps=3", "train.log_every=1",
                                 "eval.generate_samples=4", "data.validation.limit=8", "eval.at_start=false",
                                 "schedule.warmup_steps=1",
                                 f"output_dir={out}", "optim.lr=1e-3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3/3 | loss" in proc.stdout and "exact match" in proc.stdout
    # Quiet: the libraries' warnings (DeepSpeed's accelerator notice, imported with the export) are in the run's debug
    # log, not on the console; the console names the log and the tokenisation cache.
    assert "Setting accelerator" not in proc.stdout + proc.stderr and "[WARNING]" not in proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" in (out / "logs" / "debug.log").read_text()
    assert f"go to {out / 'logs' / 'debug.log'}" in proc.stdout and "tokenisation cache" in proc.stdout
    assert (out / "final" / "model.safetensors").is_file()
    assert load_config(out / "config.toml", world_size=1).optim.lr == 1e-3


def test_weighted_sources_and_named_validation_sets_train_and_resume_exactly(tmp_path, capsys):
    """Two [[data.train]] sources 1:1 (the small one repeats), two [[data.validation]] sets: the log gives each
    source's share, eval rows hold eval_loss/<name> and their token-weighted mean; a run stopped at step 3 and
    resumed equals the uninterrupted one (the mixture is a function of seed and step)."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"instruction": f"count {i}", "output": str(i) * 3}) + "\n" for i in range(40)))
    sources = [f"data.train=[{{source = {json.dumps(str(ASSETS / 'train.jsonl'))}, format = \"instruction\", "
               f"limit = 400, weight = 1.0}}, {{source = {json.dumps(str(small))}, format = \"instruction\", "
               "weight = 1.0, name = \"small\"}]",
               f"data.validation=[{{source = {json.dumps(str(ASSETS / 'validation.jsonl'))}, format = "
               f"\"instruction\", limit = 32, name = \"quick\"}}, {{source = {json.dumps(str(small))}, format = "
               "\"instruction\", limit = 16, name = \"small\"}]"]
    common = [*sources, "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=1",
              "train.eval_every=3", "schedule.kind=\"constant\"", "schedule.warmup_steps=0", "checkpoint.every=3",
              "eval.generate_samples=0"]
    whole = automodel.train(attrs.evolve(quickstart(tmp_path / "whole", *common, "train.max_steps=6")))
    out = whole.output_dir
    printed = capsys.readouterr().out
    assert "data: train/train: 400 samples" in printed and "data: train/small: 40 samples" in printed
    assert "50.0% of each epoch's 440 samples (0.55x its samples)" in printed  # 220 of the 400
    assert "50.0% of each epoch's 440 samples (5.50x its samples)" in printed  # 220: each of the 40 5-6 times
    rows = read_rows(out / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and all({"eval_loss/quick", "eval_loss/small"} <= set(r) for r in evals)
    for r in evals:
        low, high = sorted([r["eval_loss/quick"], r["eval_loss/small"]])
        assert low < r["eval_loss"] < high
    # Interrupted after step 3 (its checkpoint), then resumed to 6: the same losses from step 4 on.
    first = automodel.train(quickstart(tmp_path / "parts", *common, "train.max_steps=3"))
    resumed = automodel.train(quickstart(tmp_path / "parts", *common, "train.max_steps=6"))
    assert resumed.output_dir == first.output_dir
    losses = lambda d: {r["step"]: r["loss"] for r in read_rows(d / "metrics.jsonl") if "loss" in r}  # noqa: E731
    assert losses(resumed.output_dir) == losses(out)


def test_streamed_sources_train_and_resume_exactly(tmp_path, capsys):
    """Two streamed [[data.train]] sources 3:1, packed (the small one goes round many passes): nothing is tokenised
    ahead (no cache entry for them), each checkpoint holds the rank's stream position, and a run stopped at step 3
    and resumed equals the uninterrupted one, row for row and loss for loss."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"instruction": f"count {i}", "output": str(i) * 3}) + "\n" for i in range(6)))
    sources = (f"data.train=[{{source = {json.dumps(str(ASSETS / 'train.jsonl'))}, format = \"instruction\", "
               f"weight = 3.0, streaming = true}}, {{source = {json.dumps(str(small))}, format = \"instruction\", "
               "weight = 1.0, name = \"small\", streaming = true}]")
    common = [sources, "data.packing=true", "train.global_batch_size=16", "train.micro_batch_size=8",
              "train.log_every=1", "schedule.kind=\"constant\"", "schedule.warmup_steps=0", "checkpoint.every=3",
              "eval.generate_samples=0", "data.validation.limit=32",
              f"data.cache_dir={json.dumps(str(tmp_path / 'c'))}"]
    whole = automodel.train(quickstart(tmp_path / "whole", *common, "train.max_steps=6"))
    printed = capsys.readouterr().out
    assert "data: train/train: instruction rows streamed from" in printed and "75.0% of the rows" in printed
    assert "data: train/small: instruction rows streamed from" in printed and "25.0% of the rows" in printed
    assert "training: 6 steps of 16 rows" in printed
    assert [p.name.split("-")[0] for p in (tmp_path / "c").iterdir()] == ["validation"]  # only validation is stored
    position = json.loads((whole.output_dir / "checkpoints" / "step_000006" / "stream" / "rank_00000.json").read_text())
    assert position["shards"] == 1
    position = position["positions"]["0"]
    assert position["rows"] == 6 * 16 and position["sources"][1]["pass"] >= 2  # 6 rows a pass, ~24 rows drawn
    passes = [r["passes"] for r in read_rows(whole.output_dir / "metrics.jsonl") if "loss" in r]
    assert passes[-1] == [1, position["sources"][1]["pass"] + 1] and passes[-1][1] >= 3  # the log row says so
    assert all(a <= b for earlier, later in zip(passes, passes[1:]) for a, b in zip(earlier, later))
    assert f"| passes 1, {passes[-1][1]}" in printed
    assert whole.metrics["train_samples"] == 6 * 16

    first = automodel.train(quickstart(tmp_path / "parts", *common, "train.max_steps=3"))
    resumed = automodel.train(quickstart(tmp_path / "parts", *common, "train.max_steps=6"))
    assert "data: stream resumed after 48 training rows of shard 0: train in pass 1, " in capsys.readouterr().out
    assert resumed.output_dir == first.output_dir
    losses = lambda d: {r["step"]: r["loss"] for r in read_rows(d / "metrics.jsonl") if "loss" in r}  # noqa: E731
    assert losses(resumed.output_dir) == losses(whole.output_dir) and len(losses(whole.output_dir)) == 6
    assert resumed.metrics["eval_loss"] == whole.metrics["eval_loss"]


def test_validation_fraction_carves_each_training_source(tmp_path, capsys):
    """data.validation_fraction with two training sources: each is carved (seeded) into its training rows and a
    validation set of its own, eval rows hold eval_loss/<label> for each, and no validation row is trained on."""
    long = ASSETS / "long_train.jsonl"
    sources = f"data.train=[{{source = {json.dumps(str(ASSETS / 'train.jsonl'))}, format = \"instruction\", " \
              f"limit = 200}}, {{source = {json.dumps(str(long))}, format = \"instruction\", limit = 100}}]"
    result = automodel.train(quickstart(tmp_path, sources, "data.validation=[]", "data.validation_fraction=0.1",
                                        "data.seq_len=48", "train.max_steps=2", "train.global_batch_size=16", "train.micro_batch_size=8",
                                        "eval.generate_samples=0", "eval.at_start=false"))
    printed = capsys.readouterr().out
    assert "data: train/train: 180 samples" in printed and "data: train/long_train: 90 samples" in printed
    assert "validation/train: 20 samples" in printed and "validation/long_train: 10 samples" in printed
    final = [r for r in read_rows(result.output_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert {"eval_loss/train", "eval_loss/long_train"} <= set(final)
    from automodel import data
    from automodel.data.tokenize import carved, split_plan

    cfg = quickstart(tmp_path, sources, "data.validation=[]", "data.validation_fraction=0.1", "eval.generate_samples=0")
    plan = split_plan(cfg.data, cfg.seed)
    assert [name for name, _, _ in plan] == ["train/train", "train/long_train", "validation/train",
                                             "validation/long_train"]
    for k in range(2):
        rows = data.load_rows(plan[k][1])
        trained = {r["instruction"] for r in carved(rows, plan[k][2])}
        held_out = {r["instruction"] for r in carved(rows, plan[k + 2][2])}
        assert trained and held_out and not trained & held_out
