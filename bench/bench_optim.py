"""Each optimizer of optim/ against the implementation it reproduces, and what each does for the quickstart.

    python bench/bench_optim.py                  # update time and state size, then the quickstart at 150 steps
    python bench/bench_optim.py --steps 0        # the update comparison only

1. The update alone, on a Llama's trainable tensors (hidden --hidden, --layers layers, vocabulary --vocab) with
   fixed random gradients: ours (optim/, in place over a dict) against the reference stepping nn.Parameters
   (torch.optim.AdamW foreach; torch.optim.Muon on the hidden matrices + torch's AdamW on the rest;
   torch.optim.Adafactor; pytorch-optimizer's SOAP, when installed). Rounds alternate which goes first; the
   median of the per-round ratios (ours / reference) is printed, with the state's bytes per trainable parameter.
2. The quickstart (configs_toml/quickstart.toml, --steps steps) with each optimizer at its documented rate: eval
   loss and held-out exact match at the end (which converges faster on this task).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automodel.optim import (AdamWHyper, MuonHyper, SoapHyper, hidden_matrices, no_decay_names, optimizer,  # noqa
                             state_bytes)

RATES = {  # optimizer -> the quickstart's overrides: each at its documented rate
    "adamw": [],
    "muon": ["optim.name=muon", "optim.muon_lr=0.02"],
    "adafactor": ["optim.name=adafactor", "optim.lr=1e-2"],
    "soap": ["optim.name=soap", "optim.betas=[0.95,0.95]"],
}


def model(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64))
    return AutoModelForCausalLM.from_config(cfg)


def reference(name, params, matrices):
    """torch-style optimizer(s) over nn.Parameter copies of `params`: a step function and its state's bytes."""
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    no_decay = no_decay_names(params)
    groups = lambda keys: [{"params": [ref[k] for k in keys if k not in no_decay], "weight_decay": 0.01},  # noqa
                           {"params": [ref[k] for k in keys if k in no_decay], "weight_decay": 0.0}]
    if name == "adamw":
        opts = [torch.optim.AdamW(groups(list(ref)), lr=1e-3, foreach=True)]
    elif name == "muon":
        opts = [torch.optim.Muon([ref[k] for k in matrices], lr=0.02, weight_decay=0.01),
                torch.optim.AdamW(groups([k for k in ref if k not in matrices]), lr=1e-3, foreach=True)]
    elif name == "adafactor":
        opts = [torch.optim.Adafactor(groups(list(ref)), lr=1e-3, foreach=False)]
    else:
        import pytorch_optimizer

        opts = [pytorch_optimizer.SOAP(groups(list(ref)), lr=1e-3, betas=(0.9, 0.999))]

    def step(grads):
        for k, p in ref.items():
            p.grad = grads[k]
        for opt in opts:
            opt.step()

    def size():
        return sum(t.numel() * t.element_size() for opt in opts for s in opt.state.values()
                   for v in s.values() for t in (v if isinstance(v, list) else [v])
                   if isinstance(t, torch.Tensor) and t.numel() > 1)

    return step, size


def update_comparison(args):
    m = model(args)
    params = {k: p.detach().clone() for k, p in m.named_parameters()}
    n = sum(p.numel() for p in params.values())
    matrices = hidden_matrices(m, list(params))
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    hp = AdamWHyper(weight_decay=0.01, no_decay=no_decay_names(params))
    print(f"update of {n / 1e6:.1f}M parameters ({len(matrices)} hidden matrices), {args.rounds} rounds of "
          f"{args.updates} updates")
    print(f"{'optimizer':<10} {'ours/ref':>9} {'spread':>15} {'ours B/param':>13} {'ref B/param':>12}")
    for name in args.optimizers:
        if name == "soap":
            try:
                import pytorch_optimizer  # noqa: F401
            except ImportError:
                print(f"{name:<10} (pytorch-optimizer not installed: no reference)")
                continue
        opt = optimizer(name, muon=MuonHyper(matrices=matrices, lr=0.02, peak_lr=1e-3),
                        soap=SoapHyper())
        ours = {k: v.clone() for k, v in params.items()}
        state = opt.init(ours)
        ref_step, ref_size = reference(name, params, matrices)

        def run_ours():
            nonlocal ours, state
            for _ in range(args.updates):
                ours, state = opt.update_(ours, dict(grads), state, 1e-3, hp)

        def run_ref():
            for _ in range(args.updates):
                ref_step({k: g.clone() for k, g in grads.items()})

        run_ours(), run_ref()  # warm up (SOAP's first update only gathers statistics)
        ratios = []
        for r in range(args.rounds):
            times = {}
            for side, fn in ((("ours", run_ours), ("ref", run_ref)) if r % 2 == 0 else
                             (("ref", run_ref), ("ours", run_ours))):
                t0 = time.perf_counter()
                fn()
                times[side] = time.perf_counter() - t0
            ratios.append(times["ours"] / times["ref"])
        print(f"{name:<10} {statistics.median(ratios):>9.3f} {min(ratios):>7.3f}-{max(ratios):<7.3f} "
              f"{state_bytes(state) / n:>13.2f} {ref_size() / n:>12.2f}")


def quickstart_comparison(args):
    import tempfile

    import automodel

    repo = Path(__file__).resolve().parents[1]
    print(f"\nquickstart, {args.steps} steps (configs_toml/quickstart.toml; eval on 200 held-out strings)")
    print(f"{'optimizer':<10} {'eval loss':>10} {'exact match':>12} {'s':>6}  overrides")
    for name in args.optimizers:
        with tempfile.TemporaryDirectory() as out:
            overrides = [f'output_dir="{out}"', f"train.max_steps={args.steps}", "train.eval_every=0",
                         "eval.at_start=false", "checkpoint.every=0", "checkpoint.save_final=false",
                         'logging.progress_bar="off"', "train.log_every=1000", *RATES[name]]
            cfg = automodel.load_config(repo / "configs_toml" / "quickstart.toml", overrides)
            t0 = time.perf_counter()
            result = automodel.train(cfg)
            took = time.perf_counter() - t0
        print(f"{name:<10} {result.metrics['eval_loss']:>10.4f} {result.metrics['exact_match']:>12.1%} {took:>6.0f}  "
              f"{' '.join(RATES[name]) or '(as shipped)'}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)  # above soap_max_precondition_dim: not rotated
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--steps", type=int, default=150, help="quickstart steps per optimizer; 0 skips it")
    p.add_argument("--optimizers", nargs="+", default=list(RATES))
    args = p.parse_args()
    update_comparison(args)
    if args.steps:
        quickstart_comparison(args)


if __name__ == "__main__":
    main()
