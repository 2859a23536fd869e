"""Runs that cannot be corrupted: a locked run directory, verified checkpoints with fallback, config fingerprints,
non-finite steps never committed, a torn metrics tail, signals for the whole run, bounded chat templates, one-line
errors. Each finding of the fault-injection review (issue #14) is a test here that failed before the fix."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import automodel
from automodel.checkpoint import RunLock, fingerprint, manifest, store
from automodel.config import ConfigError
from automodel.data import formats
from tests import helpers
from tests.helpers import REPO, quickstart, read_rows, wait_for_line

# Constant LR so that runs of different lengths compare step for step; a checkpoint every 2 steps.
COMMON = ["schedule.kind=constant", "schedule.warmup_steps=0", "train.log_every=1", "checkpoint.every=2",
          "checkpoint.keep_last=3", "checkpoint.save_final=false", "eval.generate_samples=0", "eval.at_start=false",
          "data.validation.limit=32", "train.global_batch_size=16", "train.micro_batch_size=8"]


def losses(out):
    return {r["step"]: r["loss"] for r in read_rows(out / "metrics.jsonl") if "loss" in r}


def cli(out, *overrides, timeout=300):
    return subprocess.run([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON,
                           f"output_dir={out}", 'logging.progress_bar="off"', *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=helpers.env())


def start(out, *overrides):
    return subprocess.Popen([sys.executable, "launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON,
                             f"output_dir={out}", 'logging.progress_bar="off"', *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=helpers.env())


# ---------------------------------------------------------------------------------------------
# 1. One run per output directory


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another run \(host \S+ pid {os.getpid()} since"):
        RunLock(tmp_path).acquire()


def test_a_lock_left_by_a_dead_process_never_blocks(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from automodel.checkpoint import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    RunLock(tmp_path).acquire()  # the kernel released it with the process


@pytest.mark.slow
def test_two_runs_on_one_output_dir_cannot_corrupt_each_other(tmp_path):
    out = tmp_path / "shared"
    first = start(out, "train.max_steps=100000")
    wait_for_line(first, r"^step 2/")
    config_before = (out / "config.toml").read_text()
    second = cli(out, "train.max_steps=4", "optim.lr=1e-2")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {out} is in use by another run " + re.search(r"\(host .*\)", second.stderr).group(0) + "; wait for "
        "it to end, or give this run another output_dir"]
    assert f"pid {first.pid}" in second.stderr
    # The second run wrote nothing: not its config, not a metrics row, not a log line.
    assert (out / "config.toml").read_text() == config_before
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    # metrics.jsonl is the first run's alone: one row per step, in order, up to the step it stopped at.
    steps = [r["step"] for r in read_rows(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert store.read_train_state(out / "checkpoints" / f"step_{steps[-1]:06d}")["step"] == steps[-1]
    assert "max_steps = 100000" in (out / "config.toml").read_text()


# ---------------------------------------------------------------------------------------------
# 2. A torn metrics.jsonl tail; 9. a finished run re-run


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_and_resume_goes_on(tmp_path):
    out = automodel.train(quickstart(tmp_path, *COMMON, "train.max_steps=4")).output_dir
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "los')  # the disk filled up mid-write
    resumed = cli(out, "train.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in resumed.stdout
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


# ---------------------------------------------------------------------------------------------
# 3. Nothing non-finite is committed


@pytest.mark.slow
def test_non_finite_steps_are_never_checkpointed_and_the_run_stops_in_one_line(tmp_path):
    out = tmp_path / "nan"
    proc = cli(out, "optim.lr=1e6", "train.log_every=10", "checkpoint.every=1", "train.max_steps=30",
               "checkpoint.keep_last=2")
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    step = int(re.search(r"not finite at step (\d+)", line).group(1))
    assert line.startswith("error: the loss or gradient norm is not finite at step")
    saved = store.complete_checkpoints(out)
    assert saved and all(int(p.name.split("_")[1]) < step for p in saved)  # the newest is before the first bad step
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path / "params.safetensors").values())
    # The newest checkpoint is where the next run resumes (here: at its end, so it only evaluates).
    newest = int(saved[-1].name.split("_")[1])
    again = cli(out, "optim.lr=1e6", "checkpoint.keep_last=2", f"train.max_steps={newest}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {saved[-1]} at step {newest}" in again.stdout


@pytest.mark.slow
def test_skip_drops_non_finite_updates_and_counts_them(tmp_path):
    result = automodel.train(quickstart(tmp_path, *COMMON, "optim.lr=1e6", "train.on_nonfinite=\"skip\"",
                                        "train.max_steps=12", "train.log_every=12", "train.max_skipped_steps=12"))
    [row] = [r for r in read_rows(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert 0 < row["skipped_steps"] <= 12
    newest = store.complete_checkpoints(result.output_dir)[-1]
    assert all(torch.isfinite(t).all() for t in load_file(newest / "params.safetensors").values())
    # With the default bound (5% of 12 steps: 1), a run that skips step after step stops in one line, exit 1.
    again = cli(tmp_path / "bounded", "optim.lr=1e6", "train.on_nonfinite=\"skip\"", "train.max_steps=12")
    assert again.returncode == 1, again.stderr[-2000:]
    assert re.search(r"error: 2 of the \d+ steps this process ran .* skipped \(more than train.max_skipped_steps = 1\)",
                     again.stderr)


# ---------------------------------------------------------------------------------------------
# 4, 5. Verified checkpoints: digests, shapes, fallback


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, and its uninterrupted continuation to 6."""
    root = tmp_path_factory.mktemp("four")
    run = automodel.train(quickstart(root / "run", *COMMON, "train.max_steps=4")).output_dir
    whole = automodel.train(quickstart(root / "whole", *COMMON, "train.max_steps=6")).output_dir
    return run, losses(whole)


def corrupted_copy(tmp_path, run, damage):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(run, out)
    damage(out / "checkpoints" / "step_000004")
    return out


def garble(path):
    data = bytearray((path / "params.safetensors").read_bytes())
    data[-64:-56] = b"\x13\x37\x13\x37\x13\x37\x13\x37"  # 8 bytes of weights
    (path / "params.safetensors").write_bytes(bytes(data))


def truncate(path):
    with open(path / "exp_avg.safetensors", "r+b") as f:
        f.truncate(100)


def wrong_step(path):
    state = json.loads((path / "train_state.json").read_text())
    (path / "train_state.json").write_text(json.dumps({**state, "step": 3}))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [garble, truncate, wrong_step, lambda p: (p / "params.safetensors").unlink(),
                                    lambda p: (p / "manifest.json").unlink()],
                         ids=["garbled", "truncated", "wrong-step", "missing-file", "missing-manifest"])
def test_a_damaged_checkpoint_is_reported_set_aside_and_the_one_before_it_resumes(tmp_path, four_steps, damage):
    run, whole = four_steps
    out = corrupted_copy(tmp_path, run, damage)
    proc = cli(out, "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"checkpoint: .*step_000004 fails its check: .*; moved to .*step_000004\.broken", proc.stdout)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert losses(out) == whole  # steps 3-6 redone from step 2: the uninterrupted run, exactly
    assert (out / "checkpoints" / "step_000004.broken").is_dir()


def with_strays(path):
    (path / "notes.txt").write_text("why this run was paused")
    (path / ".nfs000000000123").write_bytes(b"\0" * 10)  # what NFS leaves of a file deleted while open


@pytest.mark.slow
def test_files_a_checkpoint_does_not_list_are_ignored_not_a_reason_to_set_it_aside(tmp_path, four_steps):
    run, whole = four_steps
    out = corrupted_copy(tmp_path, run, with_strays)
    proc = cli(out, "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"step_000004 holds 2 file\(s\) its manifest does not list \(\.nfs000000000123, notes\.txt\); "
                     "they are ignored", proc.stdout)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout and "fails its check" not in proc.stdout
    assert losses(out) == whole


@pytest.mark.slow
def test_a_stray_complete_directory_is_skipped_not_trusted(tmp_path, four_steps):
    run, whole = four_steps
    out = corrupted_copy(tmp_path, run, lambda p: None)
    stray = out / "checkpoints" / "step_000099"
    stray.mkdir()
    (stray / "COMPLETE").write_text("")
    (stray / "train_state.json").write_text("{}")
    proc = cli(out, "train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"step_000099 fails its check: .*train_state.json lacks step", proc.stdout)
    assert "at step 4" in proc.stdout and losses(out) == whole


def test_manifest_lists_files_tensors_and_config_and_finds_damage(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "r.pt").write_bytes(b"y" * 10)
    files = manifest.hash_share(tmp_path, 0, 1)
    manifest.write(tmp_path, files, manifest.tensor_table({"w": ((2, 3), "float32")}), {"seed": 1})
    listed = manifest.read(tmp_path)
    assert sorted(listed["files"]) == ["a.bin", "rng/r.pt"] and listed["tensors"] == {"w": [[2, 3], "float32"]}
    assert manifest.check_share(tmp_path, listed, 0, 1) == []
    # Shared out over two ranks, each checks its half; together they cover every file.
    assert manifest.check_share(tmp_path, listed, 0, 2) == manifest.check_share(tmp_path, listed, 1, 2) == []
    (tmp_path / "a.bin").write_bytes(b"x" * 999 + b"z")
    (tmp_path / "extra.bin").write_bytes(b"")  # an unlisted file is ignored, unless a loader would find it by pattern
    assert manifest.check_share(tmp_path, listed, 0, 1) == ["a.bin does not match its digest"]
    assert manifest.unlisted(tmp_path, listed) == ["extra.bin"]
    (tmp_path / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert manifest.check_share(tmp_path, listed, 0, 1) == [
        "a.bin does not match its digest",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt is not in the manifest, and DeepSpeed would load it"]
    assert manifest.tensor_problems({"w": [[2, 3], "float32"]}, {"w": [[2, 4], "float32"]}) == [
        "w: shape [2, 3] in the checkpoint, [2, 4] in this model"]


# ---------------------------------------------------------------------------------------------
# 4, 6. Config fingerprints


def test_fingerprint_refuses_what_is_trained_allows_cadence_and_asks_for_optimizer_changes():
    old = {"seed": 1, "model": {"config": {"hidden_size": 128}, "dtype": "float32", "attn_implementation": "sdpa"},
           "data": {"seq_len": 32, "train": {"source": "a.jsonl"}, "validation": {"limit": 8}},
           "optim": {"lr": 1e-3}, "schedule": {"kind": "cosine"}, "train": {"max_steps": 10, "log_every": 1}}
    new = json.loads(json.dumps(old))
    new["model"]["config"]["hidden_size"] = 256
    new["data"]["seq_len"] = 64
    new["optim"]["lr"] = 2e-3
    new["train"]["max_steps"] = 20
    new["model"]["attn_implementation"] = "eager"
    new["data"]["validation"]["limit"] = 16
    refused, accepted = fingerprint.compare(old, new)
    assert refused == ["data.seq_len: 32 -> 64", "model.config.hidden_size: 128 -> 256", "optim.lr: 0.001 -> 0.002"]
    assert accepted == ["data.validation.limit: 8 -> 16", "model.attn_implementation: 'sdpa' -> 'eager'",
                        "train.max_steps: 10 -> 20"]
    refused, _ = fingerprint.compare(old, new, allowed=("optim",))
    assert "optim.lr: 0.001 -> 0.002" not in refused


@pytest.mark.slow
def test_resume_refuses_a_changed_model_or_lr_and_records_allowed_changes(tmp_path, four_steps):
    run, whole = four_steps
    out = corrupted_copy(tmp_path, run, lambda p: None)
    bigger = cli(out, "train.max_steps=6", "model.config.intermediate_size=512")
    assert bigger.returncode == 2
    assert bigger.stderr.strip().splitlines() == [bigger.stderr.strip()]  # one line
    assert "model.config.intermediate_size: 384 -> 512" in bigger.stderr
    faster = cli(out, "train.max_steps=6", "optim.lr=1e-2")
    assert faster.returncode == 2 and "optim.lr: 0.003 -> 0.01" in faster.stderr
    assert "train.resume_allow_changes" in faster.stderr
    allowed = cli(out, "train.max_steps=6", "optim.lr=1e-2", 'train.resume_allow_changes=["optim.lr"]')
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "config changed since: optim.lr: 0.003 -> 0.01; train.max_steps: 4 -> 6" in allowed.stdout
    # Every segment's config is kept; config.toml is the latest.
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["step_000000.toml", "step_000004.toml"]
    assert "lr = 0.01" in (out / "config.toml").read_text()
    assert "lr = 0.003" in (out / "configs" / "step_000000.toml").read_text()


# ---------------------------------------------------------------------------------------------
# 7. Signals for the whole run


@pytest.mark.slow
def test_a_signal_during_start_up_exits_75_with_nothing_to_save(tmp_path):
    proc = start(tmp_path / "early", "train.max_steps=20", "data.train.source=\"examples/quickstart/train.jsonl\"")
    wait_for_line(proc, r"^data: .*(tokenised train|train read from)")  # the data is read before the model loads
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log[-2000:]
    assert "stopped before training (step 0) on SIGTERM; nothing new to save" in log
    assert not store.complete_checkpoints(tmp_path / "early")


@pytest.mark.slow
def test_a_signal_after_the_last_step_lets_the_run_finish(tmp_path):
    out = tmp_path / "late"
    proc = start(out, "train.max_steps=4", "checkpoint.every=0", "eval.generate_samples=200", "data.validation.limit=200",
                 "checkpoint.save_final=true")
    wait_for_line(proc, r"checkpoint: .*step_000004")  # the final checkpoint; the final evaluation comes next
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-2000:]
    assert "done: 4 steps" in log and (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 8. Chat templates render under a bound


def test_a_chat_template_that_loops_for_ever_is_stopped_naming_the_key(tmp_path, monkeypatch):
    from automodel.config import DataSourceConfig
    from automodel.data import FormatOptions, load_examples
    from automodel.models import byte_level_tokenizer

    monkeypatch.setattr(formats, "RENDER_SECONDS", 0.5)
    rows = tmp_path / "chat.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    endless = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for m in messages %}{{ m['content'] }}"
               "{% endfor %}{% endfor %}{% endfor %}")
    options = FormatOptions(chat_template=endless, tokenizer=byte_level_tokenizer(["hi yo"]))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data.chat_template: .*chat.jsonl line 1: rendering one conversation took "
                                          r"more than 0.5 s"):
        load_examples(DataSourceConfig(source=str(rows), format="chat"), options)
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# 10. One-line errors, before the model loads


@pytest.mark.parametrize("override, expected", [
    ("data.train.source=/dev/null/empty.jsonl", "no such file"),
    ("data.train.source=./examples/quickstart/trian.jsonl", "./examples/quickstart/trian.jsonl: no such file"),
    ("output_dir=/etc/hostname", "output_dir /etc/hostname: a file is in the way; give a directory"),
    ("model.config.hidden_size=130", "The hidden size (130) is not a multiple of the number of attention heads (4)"),
    ("tokenizer.name_or_path=./examples/quickstart/tokenizr", "tokenizer.name_or_path: no such directory"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0 (got nan)"),
])
def test_bad_input_is_one_line_naming_what_to_fix(tmp_path, capsys, override, expected):
    """What `automodel run` prints and returns, in this process (each fails before any training)."""
    from automodel.cli import main

    code = main(["run", "--config", str(REPO / "configs_toml" / "quickstart.toml"), *COMMON, f"output_dir={tmp_path / 'bad'}",
                 "train.max_steps=2", override])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    [line] = err.strip().splitlines()
    assert expected in line and line.startswith("error: ")


def test_empty_and_non_utf8_data_files_are_one_line_errors(tmp_path):
    from automodel.config import DataSourceConfig
    from automodel.data import FormatOptions, load_examples

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty.jsonl: the file is empty"):
        load_examples(DataSourceConfig(source=str(empty), format="instruction"), FormatOptions())
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(ConfigError, match=r"latin.jsonl: line 2 \(split `train`\) is not UTF-8 text .* re-encode"):
        load_examples(DataSourceConfig(source=str(latin), format="instruction"), FormatOptions())


def test_a_checkpoint_from_before_source_arrays_resumes_with_the_same_config():
    from automodel.checkpoint.fingerprint import compare

    source = {"source": "train.jsonl", "format": "instruction", "split": "train", "columns": {}}
    old = {"seed": 1, "data": {"seq_len": 64, "train": dict(source)}}
    new = {"seed": 1, "data": {"seq_len": 64, "train": [dict(source)]}}
    assert compare(old, new) == ([], [])
    changed = {"seed": 1, "data": {"seq_len": 64, "train": [dict(source, limit=5)]}}
    assert compare(old, changed)[0]  # a changed source is still refused


@pytest.mark.slow
def test_when_every_checkpoint_fails_the_run_refuses_and_no_metrics_are_lost(tmp_path, four_steps):
    """Both checkpoints damaged: each is set aside, the run refuses in one line (exit 2) instead of starting over
    from step 0, and metrics.jsonl is untouched; train.resume = "never" then starts afresh and keeps the old rows."""
    run, _ = four_steps
    out = corrupted_copy(tmp_path, run, garble)
    garble(out / "checkpoints" / "step_000002")
    before = (out / "metrics.jsonl").read_text()
    proc = cli(out, "train.max_steps=6")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"none of the 2 checkpoint\(s\) in .* passes its check .*nothing was trained", proc.stderr)
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".broken")) == [
        "step_000002.broken", "step_000004.broken"]
    fresh = cli(out, "train.max_steps=2", 'train.resume="never"')
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    kept = list(out.glob("metrics-before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == before and max(losses(out)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["read-in-full", "streamed"])
def test_training_data_replaced_under_the_same_path_is_refused_on_resume(tmp_path, streaming):
    """The checkpoint records the training file's bytes (size and digest): the same bytes touched resume; the file
    shuffled, or cut short just past where the stream stood, is refused in one line naming the file."""
    data = tmp_path / "train.jsonl"
    lines = (REPO / "examples" / "quickstart" / "train.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    out = tmp_path / "run"
    args = [f"data.train.source={json.dumps(str(data))}", f"data.train.streaming={str(streaming).lower()}"]
    first = cli(out, "train.max_steps=2", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    os.utime(data, (1, 1))  # copied without its times, or touched: the same bytes
    touched = cli(out, "train.max_steps=4", *args)
    assert touched.returncode == 0 and "resumed from" in touched.stdout, touched.stderr[-2000:]
    before = (out / "metrics.jsonl").read_text()
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    for changed in ("".join(shuffled), "".join(lines[:4 * 16 + 1])):  # 4 steps of 16 rows were read, and one more
        data.write_text(changed)
        proc = cli(out, "train.max_steps=6", *args)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert re.search(rf"the training data {re.escape(str(data))} is not what it trained on \(then \d+ bytes, "
                         r"sha256 \w+, now \d+ bytes, sha256 \w+\).*put the original back", proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
        assert (out / "metrics.jsonl").read_text() == before
