"""The functional backend on 2 processes (gloo) trains exactly like 1 process on the same global batch."""

import json
import shutil
import subprocess
import sys

import pytest

from automodel.checkpoint import store
from automodel.config import ConfigError
from tests.helpers import REPO

COMMON = ["train.max_steps=4", "train.log_every=1", "schedule.warmup_steps=1", "train.global_batch_size=32",
          "train.micro_batch_size=8", "eval.generate_samples=0", "data.validation.limit=16", "eval.at_start=false",
          "checkpoint.save_final=false", "logging.progress_bar=\"off\""]

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_two_ranks_match_one_rank(tmp_path):
    """1 rank x 4 accumulation x 8 == 2 ranks x 2 accumulation x 8: same loss every step."""
    base = ["launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON]
    one = subprocess.run([sys.executable, *base, f"output_dir={tmp_path / 'one'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *base, f"output_dir={tmp_path / 'two'}", f"data.cache_dir={tmp_path / 'cache'}",
                          'logging.backends=["tensorboard"]'],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout and "(2 accumulation x 8 per rank)" in two.stdout
    # With an empty cache, rank 0 tokenises and writes it while rank 1 waits and reads it.
    assert "data: rank 0 tokenised train" in two.stdout and "rank 1 tokenised" not in two.stdout
    train_one, eval_one = losses(tmp_path / "one")
    train_two, eval_two = losses(tmp_path / "two")
    assert len(train_one) == 4
    assert train_two == pytest.approx(train_one, rel=1e-5)
    assert eval_two == pytest.approx(eval_one, rel=1e-5)
    # Trackers are rank 0's: one event file, holding the losses of metrics.jsonl; each rank has its debug log.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 1
    events = EventAccumulator(str(tmp_path / "two" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(train_two, rel=1e-6)
    assert (tmp_path / "two" / "logs" / "debug.log").is_file()
    assert (tmp_path / "two" / "logs" / "debug_rank1.log").is_file()


def test_two_ranks_stream_their_own_shares_and_resume_exactly(tmp_path):
    """A streamed source on 2 ranks: each rank's checkpoint holds its own shard's stream position; resumed from the
    step-2 checkpoint (a copy without the later one), the losses equal the uninterrupted run's; the positions are
    gathered from every rank's file (tests/distributed/test_deepspeed_resume.py resumes them on 1 rank)."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/run.py",
            "--config", "configs_toml/quickstart.toml", *COMMON, "data.train.streaming=true", "data.packing=true",
            "schedule.kind=\"constant\"", "checkpoint.every=2", f"data.cache_dir={tmp_path / 'c'}"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = subprocess.run([*base, f"output_dir={whole}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = whole / "checkpoints" / "step_000004" / "stream"
    positions = [json.loads((saved / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    shards = [p["positions"][str(r)] for r, p in enumerate(positions)]
    assert [p["shards"] for p in positions] == [2, 2] and [len(p["positions"]) for p in positions] == [1, 1]
    assert shards[0]["rows"] == shards[1]["rows"] == 4 * 16  # 16 rows per rank per step
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step_000004")
    resumed = subprocess.run([*base, f"output_dir={parts}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stream resumed after 32 training rows of shard 0" in resumed.stdout
    assert losses(parts)[0] == losses(whole)[0]
    assert store.load_stream(saved.parent) == {"shards": 2, "positions": {"0": shards[0], "1": shards[1]}}
    (saved / "rank_00001.json").unlink()
    with pytest.raises(ConfigError, match=r"lacks the position of shard\(s\) 1 of 2"):
        store.load_stream(saved.parent)
