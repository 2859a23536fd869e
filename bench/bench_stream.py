"""Streaming a text corpus bigger than it is sensible to tokenise ahead: memory, throughput, resume.

    python bench/bench_stream.py                      # a 2 GB and a 0.2 GB corpus of real text, GPT-2 tokenizer
    python bench/bench_stream.py --gb 8 --steps 100

Writes a JSON-lines corpus of `--gb` GB (documents of lines drawn from ../shared/data/tinyshakespeare, reused if
present) and one a tenth its size. Then, in a fresh process per corpus: `--steps` steps of a rank's streamed rows
(8 rows of 1,024 tokens each) through data/stream.py, with the process's peak resident memory (it should not grow
with the corpus) and tokens/s; on the big one, a stream resumed at a position 90% into the file (how long until its
first step, against reading up to there), and the stream with a shuffle window of 10,000 rows; the chat and
instruction demos streamed and packed (formats that do more per row). Last, a small Llama trained for 6 steps on
the big corpus, and the same run stopped after step 3 and resumed: its losses must equal the uninterrupted run's, bit
for bit.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER = SHARED / "gpt2-tokenizer"


def write_corpus(path: Path, size_bytes: int) -> None:
    if path.is_file() and path.stat().st_size >= size_bytes:
        return
    lines = [ln for ln in (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines() if ln.strip()]
    rng = random.Random(0)
    tmp = path.with_suffix(".partial")
    written = 0
    with tmp.open("w") as f:
        while written < size_bytes:
            doc = json.dumps({"text": "\n".join(rng.choices(lines, k=rng.randint(20, 120)))}) + "\n"
            f.write(doc)
            written += len(doc)
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) / 1024


def stream_config(corpus: Path, seq_len: int = 1024, shuffle_window: int = 0):
    from automodel.config import DataConfig, DataSourceConfig

    return DataConfig(seq_len=seq_len, shuffle_window=shuffle_window,
                      train=DataSourceConfig(source=str(corpus), format="text", streaming=True))


def measure(args) -> None:
    """In a fresh process: stream `steps` steps from the corpus; with --resume-at, also a resume deep into it."""
    import datasets
    from transformers import AutoTokenizer

    from automodel.config import BatchShape
    from automodel.data import format_options
    from automodel.data.sources import open_stream
    from automodel.data.stream import open_train_stream

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token  # as models.build_tokenizer does for GPT-2
    data_cfg = stream_config(Path(args.measure), shuffle_window=args.shuffle_window)
    shape = BatchShape(8, 8)
    opts = format_options(data_cfg, tokenizer)
    start = time.perf_counter()
    stream = open_train_stream(data_cfg, tokenizer, opts, shape, seed=0, rank=0)
    tokens = 0
    for _ in range(args.steps):
        batches, _ = stream.next_step()
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
    seconds = time.perf_counter() - start
    size = os.path.getsize(args.measure) / 1e9
    window = f", shuffle window {args.shuffle_window:,} rows" if args.shuffle_window else ""
    print(f"{size:.2f} GB corpus{window}: {args.steps} steps x 8 rows x 1,024 tokens streamed in {seconds:.1f} s "
          f"({tokens / seconds:,.0f} tokens/s, one process); peak resident memory {peak_rss_mb():.0f} MB")
    if args.resume_at:
        rows = open_stream(data_cfg.train[0])
        t0 = time.perf_counter()
        it = iter(rows)
        docs = int(args.resume_at)
        for _ in range(docs):
            next(it)
        state = rows.state_dict()
        read = time.perf_counter() - t0
        position = {"rows": 0, "sources": [{"pass": 0, "state": state, "rows_read": docs, "taken": 0, "offset": 0}]}
        t0 = time.perf_counter()
        resumed = open_train_stream(data_cfg, tokenizer, opts, shape, seed=0, rank=0, position=position)
        resumed.next_step()
        print(f"resume at document {docs:,} (90% of the file): first step after {time.perf_counter() - t0:.1f} s; "
              f"reading the documents up to there took {read:.1f} s; peak resident memory {peak_rss_mb():.0f} MB")
        del datasets


def formats() -> None:
    """Streamed throughput of formats that do more per row: LLaMA-Factory's chat and alpaca demos, packed."""
    from transformers import AutoTokenizer

    from automodel.config import BatchShape, DataConfig, DataSourceConfig
    from automodel.data import format_options
    from automodel.data.stream import open_train_stream

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token
    demos = SHARED / "llamafactory-demos"
    for fmt, path in (("chat", demos / "v1_sft_demo.jsonl"), ("instruction", demos / "alpaca_en_demo.json")):
        cfg = DataConfig(seq_len=2048, packing=True, chat_template="chatml",
                         train=DataSourceConfig(source=str(path), format=fmt, streaming=True))
        stream = open_train_stream(cfg, tokenizer, format_options(cfg, tokenizer), BatchShape(8, 8), seed=0, rank=0)
        stream.next_step()
        start, tokens = time.perf_counter(), 0
        for _ in range(30):
            batches, _ = stream.next_step()
            tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"{path.name} ({fmt}), packed into 2,048-token rows: {tokens / (time.perf_counter() - start):,.0f} "
              f"tokens/s over 30 steps of 8 rows")


def train_and_resume(corpus: Path, root: Path) -> None:
    import automodel
    from automodel.config import load_config

    repo = Path(__file__).resolve().parents[1]

    def cfg(out: str, steps: int):
        return load_config(repo / "configs_toml" / "quickstart.toml", [
            f"output_dir={json.dumps(str(root / out))}", f"tokenizer.name_or_path={json.dumps(str(TOKENIZER))}",
            f"data.train.source={json.dumps(str(corpus))}", "data.train.format=\"text\"", "data.train.streaming=true",
            f"data.validation.source={json.dumps(str(repo / 'examples' / 'quickstart' / 'validation.jsonl'))}",
            "data.validation.limit=16", "data.seq_len=256", "model.config.max_position_embeddings=256",
            "model.config.vocab_size=50257", "train.global_batch_size=8", "train.micro_batch_size=4",
            "schedule.kind=\"constant\"", "schedule.warmup_steps=0", "checkpoint.every=3", "train.log_every=1",
            "eval.generate_samples=0", "logging.progress_bar=\"off\"", f"train.max_steps={steps}",
            f"data.cache_dir={json.dumps(str(root / 'cache'))}"], world_size=1)

    def losses(out: str) -> dict:
        rows = [json.loads(line) for line in (root / out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    automodel.train(cfg("whole", 6))
    automodel.train(cfg("parts", 3))
    automodel.train(cfg("parts", 6))
    same = losses("parts") == losses("whole")
    print(f"streamed run stopped at step 3 and resumed: losses {'equal' if same else 'DIFFERENT'} to the "
          f"uninterrupted run's, bit for bit ({len(losses('whole'))} steps: "
          + ", ".join(f"{v:.6f}" for v in losses("whole").values()) + ")")
    if not same:
        raise SystemExit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the corpora are written (kept for reuse)")
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)
    p.add_argument("--resume-at", default="", help=argparse.SUPPRESS)
    p.add_argument("--shuffle-window", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args)
    if not TOKENIZER.exists():
        raise SystemExit(f"needs the shared data at {SHARED}")
    big = Path(args.dir) / f"automodel_stream_{args.gb:g}gb.jsonl"
    small = Path(args.dir) / f"automodel_stream_{args.gb / 10:g}gb.jsonl"
    t0 = time.perf_counter()
    write_corpus(big, int(args.gb * 1e9))
    write_corpus(small, int(args.gb * 1e8))
    print(f"corpora ready in {time.perf_counter() - t0:.0f} s: {big} ({big.stat().st_size / 1e9:.2f} GB), "
          f"{small} ({small.stat().st_size / 1e9:.2f} GB)")
    with big.open("rb") as f:
        docs = sum(1 for _ in f)
    for corpus, resume_at, window in ((small, "", 0), (big, str(int(docs * 0.9)), 0), (big, "", 10_000)):
        out = subprocess.run([sys.executable, __file__, "--measure", str(corpus), "--steps", str(args.steps),
                              "--resume-at", resume_at, "--shuffle-window", str(window)], capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        print(out.stdout.strip())
    formats()
    train_and_resume(big, Path(tempfile.mkdtemp(prefix="bench_stream_")))


if __name__ == "__main__":
    main()
