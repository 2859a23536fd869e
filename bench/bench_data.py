"""Tokenisation throughput, and the padding fraction of training batches with and without packing.

    python bench/bench_data.py                          # SQuAD v1.1 dev from ../shared/data, GPT-2 tokenizer
    python bench/bench_data.py --source rajpurkar/squad --tokenizer openai-community/gpt2 --split train
    python bench/bench_data.py --synthetic 1000000 --num-proc 2   # at scale: ours against datasets.map, memory

--synthetic N writes N instruction rows (random words) and measures, with the same tokenizer: automodel's build
(read, format, tokenise in --num-proc processes, write the token store) against `datasets.map(batched=True,
num_proc=...)` doing the same tokenisation and masking; then, in a fresh process each, the memory a training process
holds per token: the mapped token store (private and file-backed pages after reading every row once) against the
same rows as Python lists (what the loader held before the store).

Padding is measured over one epoch of real micro-batches (right-padded to the longest row of each).
"""

import argparse
import statistics
import time
from pathlib import Path

from transformers import AutoTokenizer

from automodel.config import BatchShape, DataSourceConfig
from automodel.data import BatchPlan, FormatOptions, collate, load_examples, pack, tokenize_examples

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def padding(dataset, micro_batch_size: int) -> float:
    plan = BatchPlan(len(dataset), BatchShape(micro_batch_size, micro_batch_size), seed=0)
    real = slots = 0
    for step in range(plan.steps_per_epoch):
        batch = collate(dataset, plan.micro_batches(step)[0], 0)
        real += int(batch["attention_mask"].sum())
        slots += batch["input_ids"].numel()
    return 1 - real / slots


def synthetic(args) -> None:
    import json
    import random
    import subprocess
    import sys
    import tempfile

    import datasets

    from automodel.config import DataConfig
    from automodel.data import build

    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    path = root / "rows.jsonl"
    with path.open("w") as f:
        for _ in range(args.synthetic):
            f.write(json.dumps({"instruction": " ".join(rng.choices(words, k=rng.randint(5, 40))),
                                "output": " ".join(rng.choices(words, k=rng.randint(5, 60)))}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DataConfig(seq_len=args.seq_len, num_proc=args.num_proc, cache_dir=str(root / "cache"),
                     train=DataSourceConfig(source=str(path), format="instruction"))
    t0 = time.perf_counter()
    train, _ = build(cfg, tokenizer)
    ours = time.perf_counter() - t0
    tokens = int(train.input_ids.lengths().sum())

    eos = tokenizer.eos_token_id

    def tokenise(batch):  # the same work: prompt masked, response + EOS trained
        prompts = tokenizer([i + "\n" for i in batch["instruction"]], add_special_tokens=False)["input_ids"]
        answers = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        ids = [p + a + [eos] for p, a in zip(prompts, answers)]
        labels = [[-100] * len(p) + a + [eos] for p, a in zip(prompts, answers)]
        return {"input_ids": ids, "labels": labels}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(root / "hf"))
    mapped = ds.map(tokenise, batched=True, num_proc=args.num_proc, remove_columns=ds.column_names)
    peer = time.perf_counter() - t0
    print(f"{args.synthetic:,} instruction rows, {tokens:,} tokens, {type(tokenizer).__name__}, "
          f"{args.num_proc} process(es)")
    print(f"automodel build (read, format, tokenise, write the store): {ours:.1f} s, {tokens / ours:,.0f} tokens/s")
    print(f"datasets.map(batched=True, num_proc={args.num_proc}) (read, tokenise, write Arrow): {peer:.1f} s, "
          f"{tokens / peer:,.0f} tokens/s; ratio ours / datasets {ours / peer:.2f}")
    assert len(mapped) == len(train)
    for form in ("store", "lists"):
        out = subprocess.run([sys.executable, __file__, "--memory-of", str(root / "cache"), "--form", form,
                              "--tokenizer", args.tokenizer, "--source", str(path), "--seq-len", str(args.seq_len)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


def memory_of(args) -> None:
    """In a fresh process: the set read from the cache, every row read once, the memory it added per token."""
    from automodel.config import DataConfig
    from automodel.data import build

    def rss() -> tuple[int, int]:
        fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Rss"))
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DataConfig(seq_len=args.seq_len, cache_dir=args.memory_of,
                     train=DataSourceConfig(source=args.source, format="instruction"))
    build(cfg, tokenizer)  # once: imports, the tokenizer's identity hash and the allocator's arenas warm
    anon0, file0 = rss()
    train, _ = build(cfg, tokenizer)
    tokens = int(train.input_ids.lengths().sum())
    if args.form == "lists":
        held = ([train.input_ids[i] for i in range(len(train))], [train.labels[i] for i in range(len(train))])
    else:
        held = train
        for i in range(len(train)):
            train.input_ids.array(i), train.labels.array(i)
    anon1, file1 = rss()
    what = "token store, mapped" if args.form == "store" else "Python lists (the old loader)"
    print(f"memory per token, {what}: private {1024 * (anon1 - anon0) / tokens:.2f} B, file-backed (page cache, "
          f"shared by the ranks of a node) {1024 * (file1 - file0) / tokens:.2f} B")
    del held


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", default=str(SHARED / "squad-v1.1" / "dev-v1.1.json"))
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic", type=int, default=0, help="rows of a synthetic instruction set (see above)")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
    p.add_argument("--form", default="store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        return memory_of(args)
    if args.synthetic:
        return synthetic(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    examples, _ = load_examples(DataSourceConfig(source=args.source, split=args.split, format="squad"),
                                FormatOptions())
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tset = tokenize_examples(examples, tokenizer, args.seq_len, "drop", "train")
        times.append(time.perf_counter() - t0)
    tokens = sum(map(len, tset.input_ids))
    seconds = statistics.median(times)
    t0 = time.perf_counter()
    packed = pack(tset, args.seq_len)
    pack_s = time.perf_counter() - t0
    print(f"{len(examples):,} SQuAD rows -> {len(tset):,} samples ({tset.dropped} over {args.seq_len} tokens), "
          f"{tokens:,} tokens")
    print(f"tokenisation: {seconds:.2f} s, {tokens / seconds:,.0f} tokens/s, {len(examples) / seconds:,.0f} rows/s "
          f"(median of {args.repeats}, {type(tokenizer).__name__})")
    unpacked_pad, packed_pad = padding(tset, args.micro), padding(packed, max(1, args.micro // 2))
    print(f"packing: {len(tset):,} samples -> {len(packed):,} rows of <= {args.seq_len} tokens in {pack_s:.2f} s")
    print(f"padding fraction: unpacked {100 * unpacked_pad:.1f}% (micro-batch {args.micro}), packed "
          f"{100 * packed_pad:.1f}% (micro-batch {max(1, args.micro // 2)})")


if __name__ == "__main__":
    main()
