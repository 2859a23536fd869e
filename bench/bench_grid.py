"""Our default step against a bare PyTorch loop over a grid of model shapes, each cell interleaved in one process.

    python bench/bench_grid.py                       # the CPU grid (below), ~15 minutes on 2 cores
    python bench/bench_grid.py --hidden 128 512 2048 --vocab 32000 128256 151936 --seq 512 2048 \
        --device cuda --dtype bfloat16               # the whole grid, on a GPU

A cell is (hidden size, vocabulary, share of positions trained, sequence length, full or LoRA); every cell is a
2-layer Llama (intermediate 3 x hidden, heads of 64), micro-batches of --micro rows of --seq tokens, --accum of
them per step, random tokens with the first (1 - share) of each row a masked prompt. Ours: the functional backend
with the shipped defaults (TrainingConfig's and OptimConfig's: 256-token fused loss chunks, foreach AdamW in place)
and the batches as the loop hands them over (`to_device`: trained positions found on the host). The bare loop
shares none of our code: the model's own `.loss` (summed over the step's label tokens via num_items_in_batch, the
same objective), `.backward()` per micro-batch, clip_grad_norm_, torch.optim.AdamW (fused where torch has it); for
LoRA, peft's `get_peft_model` with the same adapter (rank 16 on every linear layer, alpha 32, no dropout) and
AdamW over the adapters. Both start from the same weights. Per cell: warm-up steps, then --rounds rounds of
--steps steps of each, the side that goes first alternating by round; the ratio ours / bare per round, its median
and spread. One JSON line per cell, then a markdown table. `--compile` times ours with train.compile = true.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automodel.backends import build_functional  # noqa: E402
from automodel.config import PeftConfig, TrainingConfig  # noqa: E402
from automodel.config.schema import OptimConfig  # noqa: E402
from automodel.models import compile_layers  # noqa: E402
from automodel.peft import apply as apply_lora  # noqa: E402
from automodel.training.forward import to_device  # noqa: E402

HP = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LORA = dict(rank=16, alpha=32.0)


def model_of(hidden: int, vocab: int, seq: int, dtype: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=2,
                      num_attention_heads=max(1, hidden // 64), max_position_embeddings=seq, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=getattr(torch, dtype)).to(device)


def host_batches(vocab: int, seq: int, trained: float, micro: int, accum: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(accum):
        ids = torch.randint(0, vocab, (micro, seq), generator=gen)
        labels = ids.clone()
        labels[:, : round(seq * (1 - trained))] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def cell(hidden: int, vocab: int, trained: float, seq: int, mode: str, args) -> dict:
    device = torch.device(args.device)
    host = host_batches(vocab, seq, trained, args.micro, args.accum)

    ours_model = model_of(hidden, vocab, seq, args.dtype, args.device)
    if mode == "lora":
        ours_model = apply_lora(ours_model, PeftConfig(**LORA, target_modules=["all-linear"]), seed=0,
                                base_path="grid")
    if args.compile:
        compile_layers(ours_model)
    defaults = TrainingConfig()
    backend = build_functional(ours_model, optim=OptimConfig(**HP), clip_grad_norm=1.0, lr_fn=lambda s: HP["lr"],
                               device=device, grad_method="autograd", all_reduce=None, rank=0, world_size=1, seed=0,
                               loss_chunk_tokens=defaults.loss_chunk_tokens, master_dtype="auto",
                               fused_loss=defaults.fused_loss)
    state = backend.state
    ours_data = [to_device(b, device) for b in host]

    bare = model_of(hidden, vocab, seq, args.dtype, args.device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        bare = get_peft_model(bare, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                               target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [q for q in bare.parameters() if q.requires_grad]
    fused = device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    opt = torch.optim.AdamW([{"params": [q for q in trainable if q.ndim >= 2], "weight_decay": HP["weight_decay"]},
                             {"params": [q for q in trainable if q.ndim < 2], "weight_decay": 0.0}],
                            lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], fused=fused)
    data = [{k: v.to(device) for k, v in b.items()} for b in host]

    def bare_step():
        n = sum((b["labels"][:, 1:] != -100).sum() for b in data)
        for b in data:
            bare(**b, num_items_in_batch=n, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step():
        nonlocal state
        state, _ = backend.step(state, ours_data)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    for fn in (ours_step, bare_step):
        for _ in range(args.warmup):
            fn()
    ratios = []
    for r in range(args.rounds):
        order = (ours_step, bare_step) if r % 2 == 0 else (bare_step, ours_step)
        times = {fn.__name__: timed(fn) for fn in order}
        ratios.append(times["ours_step"] / times["bare_step"])
    return {"hidden": hidden, "vocab": vocab, "trained": trained, "seq": seq, "mode": mode,
            "parameters": sum(q.numel() for q in bare.parameters()), "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3), "max": round(max(ratios), 3), "rounds": args.rounds,
            "ours_ms": round(1000 * times["ours_step"], 1), "bare_ms": round(1000 * times["bare_step"], 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    p.add_argument("--trained", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--seq", type=int, nargs="+", default=[512])
    p.add_argument("--mode", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="train.compile = true on our side")
    args = p.parse_args()
    print(json.dumps({"torch": torch.__version__, "device": args.device, "dtype": args.dtype, "micro": args.micro,
                      "accum": args.accum, "steps": args.steps, "rounds": args.rounds, "compile": args.compile}),
          flush=True)
    rows = []
    for hidden, vocab, seq, mode, trained in itertools.product(args.hidden, args.vocab, args.seq, args.mode,
                                                                args.trained):
        rows.append(cell(hidden, vocab, trained, seq, mode, args))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| hidden | vocab | seq | mode | trained | ours / bare (median) | spread |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']} | {r['vocab']:,} | {r['seq']} | {r['mode']} | {100 * r['trained']:.0f}% | "
              f"**{r['median']:.3f}** | {r['min']:.3f}-{r['max']:.3f} |")


if __name__ == "__main__":
    main()
