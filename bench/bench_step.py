"""Our training step vs a bare PyTorch loop on the same model, batch and optimizer, in one process.

    python bench/bench_step.py                      # CPU-sized Llama
    python bench/bench_step.py --hidden 1024 --layers 8 --device cuda --dtype bfloat16
    python bench/bench_step.py --compile            # train.compile on our side (its first steps compile)
    python bench/bench_step.py --hidden 128 --layers 2 --vocab 50257 --seq 256 --micro 4 --accum 1 --chunk 256 --trained 1.0 --recompute-loss

The bare loop shares none of our code: the model's own `.loss` (summed over the global batch's label tokens via
num_items_in_batch, so it is the same objective), `.backward()` per micro-batch, clip_grad_norm_, and
torch.optim.AdamW (fused where torch has it for the device, else foreach). Ours: the functional backend's step as a
run builds it (`--chunk` tokens per loss chunk; 0 = whole logits). Rounds alternate between the two (this machine is
noisy), each timing --steps steps after warmup; it prints the per-round ratios and their median (ours / bare).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automodel.config.schema import OptimConfig  # noqa: E402
from automodel.backends import build_functional  # noqa: E402
from automodel.models import compile_layers, enable_activation_checkpointing  # noqa: E402


def build(args, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      max_position_embeddings=args.seq)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                            dtype=getattr(torch, args.dtype)).to(args.device)


def batches(args, n):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=gen)
        labels = ids.clone()
        labels[:, : round(args.seq * (1 - args.trained))] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens; 0 = whole logits")
    p.add_argument("--recompute-loss", action="store_true", help="train.fused_loss = false: each chunk's logits "
                   "recomputed in the backward (default: the fused loss, its gradients computed in the forward)")
    p.add_argument("--trained", type=float, default=0.75, help="share of each row's positions that are trained "
                   "(labels; the rest is a masked prompt)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--fused", action="store_true", help="optim.fused on our side (the bare loop is fused anyway)")
    p.add_argument("--compile", action="store_true", help="train.compile on our side (the bare loop stays eager)")
    p.add_argument("--grad-method", default="autograd", choices=["autograd", "grad_and_value"])
    args = p.parse_args()
    device = torch.device(args.device)
    host = batches(args, args.accum)
    data = [{k: v.to(device) for k, v in b.items()} for b in host]
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    # Ours: the functional backend, as a run builds it (from the target positions the loop computes on the host).
    from automodel.training.forward import to_device

    model = build(args)
    n_params = sum(q.numel() for q in model.parameters())
    if args.checkpointing:
        enable_activation_checkpointing(model)
    if args.compile:
        compile_layers(model)
    backend = build_functional(model, optim=OptimConfig(**hp, fused=args.fused), clip_grad_norm=1.0, lr_fn=lambda s: hp["lr"],
                               device=device, grad_method=args.grad_method, all_reduce=None, rank=0, world_size=1,
                               seed=0, loss_chunk_tokens=args.chunk, master_dtype="auto",
                               fused_loss=not args.recompute_loss)
    state = backend.state
    ours_data = [to_device(b, device) for b in host]

    # Bare PyTorch.
    ref = build(args)
    if args.checkpointing:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [q for q in ref.parameters() if q.ndim >= 2]
    no_decay = [q for q in ref.parameters() if q.ndim < 2]
    fused = device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], fused=fused)

    def bare_step():
        n = sum((b["labels"][:, 1:] != -100).sum() for b in data)
        for b in data:
            ref(**b, num_items_in_batch=n, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step():
        nonlocal state
        state, _ = backend.step(state, ours_data)

    def timed(fn):
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(args.device)
        return (time.perf_counter() - t0) / args.steps

    for fn in (ours_step, bare_step):  # warmup
        for _ in range(3):
            fn()
    print(f"Llama {n_params / 1e6:.1f}M params, {args.accum} x {args.micro} x {args.seq} tokens per step, "
          f"{args.dtype} on {args.device}, loss chunks {args.chunk or 'off'}"
          f"{(' (recomputed)' if args.recompute_loss else ' (fused)') if args.chunk else ''}, "
          f"{100 * args.trained:.0f}% trained, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, our layers {'compiled' if args.compile else 'eager'}, our AdamW {'fused' if args.fused else 'foreach'}, bare AdamW "
          f"{'fused' if fused else 'foreach'}, torch "
          f"{torch.__version__}")
    ratios = []
    for r in range(args.rounds):
        # Alternate which goes first, so drift in machine load hits both equally.
        order = (ours_step, bare_step) if r % 2 == 0 else (bare_step, ours_step)
        times = {fn.__name__: timed(fn) for fn in order}
        ratios.append(times["ours_step"] / times["bare_step"])
        print(f"round {r}: ours {1000 * times['ours_step']:.1f} ms/step, bare {1000 * times['bare_step']:.1f} "
              f"ms/step, ratio {ratios[-1]:.3f}")
    print(f"median ratio (ours / bare): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
