"""The functional backend's gradient all-reduce on 2 ranks: buckets launched during the backward against one flat
all-reduce after it, same model, batches and process group, alternating rounds in one command.

    python bench/bench_overlap.py                       # 2 CPU processes over gloo
    python bench/bench_overlap.py --hidden 1024 --layers 8 --device cuda   # 2 GPUs over NCCL

Each rank runs both steps (distributed.bucket_mb = 25 and = 0) on the same weights; rank 0 prints ms per step of
each and the median ratio (buckets / flat). What overlap can save is bounded by the all-reduce's time: on CPU the
ranks' compute and gloo's transfers share the same cores.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank: int, args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from automodel.backends import build_functional
    from automodel.config.schema import OptimConfig
    from automodel.distributed import RankInfo, setup
    from automodel.training.forward import to_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    all_reduce = setup(RankInfo(rank, rank, 2), device)

    def backend(bucket_mb: float):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          max_position_embeddings=args.seq)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
        return build_functional(model, optim=OptimConfig(lr=1e-4), clip_grad_norm=1.0, lr_fn=lambda s: 1e-4,
                                device=device, grad_method="autograd", all_reduce=all_reduce, rank=rank, world_size=2,
                                seed=0, loss_chunk_tokens=256, master_dtype="auto", bucket_mb=bucket_mb)

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=gen)
    batch = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, device)
    runs = {"buckets": backend(args.bucket_mb), "flat": backend(0)}
    states = {name: b.state for name, b in runs.items()}
    params = sum(v.numel() for v in states["flat"].params.values())

    def timed(name: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            states[name], metrics = runs[name].step(states[name], [batch])
        metrics.loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    for name in runs:  # warmup
        timed(name)
    flat = torch.ones(params, device=device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(flat)
    flat.sum().item()
    reduce_ms = 1000 * (time.perf_counter() - start) / 3
    del flat
    ratios = []
    if rank == 0:
        print(f"Llama {params / 1e6:.1f}M params ({4 * params / 2**20:.0f} MB of float32 gradients, one all-reduce of "
              f"them alone {reduce_ms:.0f} ms), "
              f"{args.micro} x {args.seq} tokens per rank per step, 2 ranks on {args.device}, buckets of "
              f"{args.bucket_mb} MB, torch {torch.__version__}")
    for r in range(args.rounds):
        order = ["buckets", "flat"] if r % 2 == 0 else ["flat", "buckets"]
        times = {name: timed(name) for name in order}
        ratios.append(times["buckets"] / times["flat"])
        if rank == 0:
            print(f"round {r}: buckets {1000 * times['buckets']:.1f} ms/step, flat {1000 * times['flat']:.1f} "
                  f"ms/step, ratio {ratios[-1]:.3f}")
    if rank == 0:
        print(f"median ratio (buckets / flat): {statistics.median(ratios):.3f}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--port", type=int, default=29517)
    args = p.parse_args()
    mp.spawn(worker, args=(args,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
