"""LoRA vs full fine-tuning of the same model: trainable parameters, step time, peak memory.

    python bench/bench_lora.py                       # CPU-sized Llama, 3 alternating rounds
    python bench/bench_lora.py --hidden 2048 --layers 16 --device cuda --dtype bfloat16

Each measurement runs in a fresh subprocess (so peak memory is that run's own: max RSS on CPU,
torch.cuda.max_memory_allocated on a GPU) through the functional backend's real step.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def measure(args) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from automodel.config import PeftConfig
    from automodel.config.schema import OptimConfig
    from automodel.backends import build_functional
    from automodel.peft import apply

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      max_position_embeddings=args.seq)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype)).to(device)
    total = sum(p.numel() for p in model.parameters())
    if args.mode == "lora":
        model = apply(model, PeftConfig(rank=args.rank, alpha=2.0 * args.rank), seed=0, base_path="bench")
    backend = build_functional(model, optim=OptimConfig(lr=1e-4), clip_grad_norm=1.0, lr_fn=lambda s: 1e-4,
                               device=device, grad_method="autograd", all_reduce=None, rank=0, world_size=1, seed=0,
                               loss_chunk_tokens=1024, master_dtype="auto")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
    state = backend.state
    for _ in range(2):  # warmup
        state, m = backend.step(state, [batch])
    m.loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = backend.step(state, [batch])
    m.loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": args.mode, "total": total, "trainable": backend.trainable_params,
            "ms_per_step": 1000 * (time.perf_counter() - t0) / args.steps, "peak_mib": peak}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # a child: measure one mode and print it
        print(json.dumps(measure(args)))
        return
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for r in range(args.rounds):
        for mode in (("full", "lora") if r % 2 == 0 else ("lora", "full")):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                                 text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    full, lora = results["full"], results["lora"]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(f"Llama {full[0]['total'] / 1e6:.1f}M params, {args.micro} x {args.seq} tokens per step, {args.dtype} on "
          f"{args.device}, LoRA rank {args.rank} on all linear layers, medians of {args.rounds} rounds")
    print(f"{'':6} {'trainable':>12} {'ms/step':>10} {'peak MiB':>10}")
    for name, rows in (("full", full), ("lora", lora)):
        print(f"{name:6} {rows[0]['trainable']:>12,} {med(rows, 'ms_per_step'):>10.1f} {med(rows, 'peak_mib'):>10.0f}")
    print(f"lora / full: trainable {lora[0]['trainable'] / full[0]['trainable']:.4f}, step time "
          f"{med(lora, 'ms_per_step') / med(full, 'ms_per_step'):.3f}, peak memory "
          f"{med(lora, 'peak_mib') / med(full, 'peak_mib'):.3f}")


if __name__ == "__main__":
    main()
