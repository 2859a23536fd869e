"""What reliability costs and whether it holds: digest throughput, and kill -9 at random moments, resumed.

    python bench/bench_reliability.py --digest             # XXH3-128 vs SHA-256 over a 2 GiB file, and fsync
    python bench/bench_reliability.py --kill 10            # 10 trials on 2-rank DeepSpeed ZeRO-3, 10 on the functional backend

Each kill trial starts the quickstart (4 x 16 samples per step, a checkpoint every 2 steps), waits until its first
checkpoint is complete, kills the whole process group with SIGKILL after a random 0-3 s (mid-step, mid-evaluation,
mid-checkpoint: writing, hashing, committing), runs the same command again, and compares every step's loss and the
final eval loss with an uninterrupted run's: a trial passes only if they are identical.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def digest_speed(size_gib: float = 2.0) -> None:
    from automodel.checkpoint.manifest import file_digest

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.bin"
        block = os.urandom(64 << 20)
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(int(size_gib * 16)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
        file_digest(path)  # warm the page cache: what a checkpoint just written finds
        t0 = time.perf_counter()
        file_digest(path)
        xxh_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(8 << 20):
                h.update(b)
        sha_s = time.perf_counter() - t0
        print(json.dumps({"bytes_gib": size_gib, "write_and_fsync_gib_s": size_gib / write_s,
                          "xxh3_128_gib_s": size_gib / xxh_s, "sha256_gib_s": size_gib / sha_s}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = ["schedule.kind=constant", "schedule.warmup_steps=0", "train.log_every=1", "checkpoint.every=2",
          "checkpoint.keep_last=2", "checkpoint.save_final=false", "eval.generate_samples=0", "eval.at_start=false",
          "data.validation.limit=16", "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=3",
          'logging.progress_bar="off"']
# Long enough that a kill 0-3 s after the first checkpoint lands mid-run (a ZeRO-3 step on 2 CPU ranks is ~10x slower).
STEPS = {"functional": 40, "zero3": 12}


def command(backend: str) -> list[str]:
    run = ["launch/run.py", "--config", "configs_toml/quickstart.toml", *COMMON, f"train.max_steps={STEPS[backend]}"]
    if backend == "zero3":
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(free_port())]
        return launcher + run + ["distributed.backend=deepspeed", "distributed.zero_stage=3"]
    return [sys.executable] + run


def losses(out: Path) -> tuple[dict, list]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["eval_loss"] for r in rows if "eval_loss" in r]


def kill_trials(backend: str, trials: int, root: Path) -> None:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions"), "PYTHONUNBUFFERED": "1"}
    whole = root / f"{backend}-whole"
    subprocess.run(command(backend) + [f"output_dir={whole}"], cwd=REPO, env=env, check=True, capture_output=True)
    reference = losses(whole)
    passed, moments = 0, []
    for trial in range(trials):
        out = root / f"{backend}-{trial}"
        victim = subprocess.Popen(command(backend) + [f"output_dir={out}"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while not (out / "checkpoints" / "step_000002" / "COMPLETE").exists() and victim.poll() is None:
            time.sleep(0.02)
        delay = random.uniform(0.0, 3.0)
        time.sleep(delay)
        try:
            os.killpg(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        victim.wait()
        newest = max((int(p.name[5:]) for p in (out / "checkpoints").glob("step_*")
                      if (p / "COMPLETE").exists()), default=0)
        subprocess.run(command(backend) + [f"output_dir={out}"], cwd=REPO, env=env, check=True, capture_output=True)
        ok = losses(out) == reference
        passed += ok
        moments.append({"delay_s": round(delay, 2), "resumed_at": newest, "identical": ok})
    print(json.dumps({"backend": backend, "trials": trials, "identical": passed, "moments": moments}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digest", action="store_true")
    p.add_argument("--kill", type=int, default=0, help="trials per backend")
    args = p.parse_args()
    if args.digest:
        digest_speed()
    if args.kill:
        with tempfile.TemporaryDirectory() as d:
            for backend in ("functional", "zero3"):
                kill_trials(backend, args.kill, Path(d))


if __name__ == "__main__":
    main()
