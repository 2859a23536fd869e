"""Tokenisation throughput, and the padding fraction of training batches with and without packing.

    python bench/bench_data.py                          # SQuAD v1.1 dev from ../shared/data, GPT-2 tokenizer
    python bench/bench_data.py --source rajpurkar/squad --tokenizer openai-community/gpt2 --split train

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", default=str(SHARED / "squad-v1.1" / "dev-v1.1.json"))
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
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
