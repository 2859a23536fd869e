"""Our pure train_step vs a plain PyTorch loop: same model, batch and optimizer, one process.

    python bench/bench_step.py                      # CPU-sized Llama
    python bench/bench_step.py --hidden 1024 --layers 8 --device cuda --dtype bfloat16

Rounds alternate between the two (this machine is noisy), each timing --steps steps after warmup; it
prints the per-round ratios and their median (ours / plain; target <= 1.03).
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from automodel.loss import token_cross_entropy
from automodel.optim import AdamWHyper, no_decay_names
from automodel.training.state import ParamBinding, init_state
from automodel.training.step import make_train_step


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
        labels[:, : args.seq // 4] = -100
        out.append({"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device),
                    "labels": labels.to(args.device)})
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
    p.add_argument("--grad-method", default="autograd", choices=["autograd", "grad_and_value"])
    args = p.parse_args()
    device = torch.device(args.device)
    data = batches(args, args.accum)
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    # Ours.
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    binding = ParamBinding(model)
    params = binding.take()
    step = make_train_step(model, hyper=AdamWHyper(betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                                                   no_decay=no_decay_names(params)),
                           lr_fn=lambda s: hp["lr"], clip_grad_norm=1.0, device=device, grad_method=args.grad_method)
    state = init_state(params, device, seed=0)

    # Plain PyTorch.
    ref = build(args)
    decay = [q for q in ref.parameters() if q.ndim >= 2]
    no_decay = [q for q in ref.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], foreach=True)

    def plain_step():
        n = sum((b["labels"][:, 1:] != -100).sum() for b in data)
        for b in data:
            logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            loss_sum, _ = token_cross_entropy(logits, b["labels"])
            (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step():
        nonlocal state
        state, _ = step(state, data)

    def timed(fn):
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(args.device)
        return (time.perf_counter() - t0) / args.steps

    for fn in (ours_step, plain_step):  # warmup
        for _ in range(3):
            fn()
    print(f"Llama {n_params / 1e6:.1f}M params, {args.accum} x {args.micro} x {args.seq} tokens per step, "
          f"{args.dtype} on {args.device}, grad_method={args.grad_method}, torch {torch.__version__}")
    ratios = []
    for r in range(args.rounds):
        # Alternate which goes first, so drift in machine load hits both equally.
        order = (ours_step, plain_step) if r % 2 == 0 else (plain_step, ours_step)
        times = {fn.__name__: timed(fn) for fn in order}
        ratios.append(times["ours_step"] / times["plain_step"])
        print(f"round {r}: ours {1000 * times['ours_step']:.1f} ms/step, plain {1000 * times['plain_step']:.1f} "
              f"ms/step, ratio {ratios[-1]:.3f}")
    print(f"median ratio (ours / plain): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
