"""Our DPO step against TRL's DPOTrainer on the same work: step time and peak memory, each in a fresh process.

    python bench/bench_preference.py [--seq 2048] [--steps 4] [--warmup 2] [--hidden 256] [--layers 4]
                                     [--precompute] [--rounds 1]

Same work: one initial Llama (random weights, GPT-2's 50,257-token vocabulary, float32) saved once and loaded by
both, and its frozen copy as the reference; text pairs cut from tinyshakespeare (../shared/data) whose prompt (256
tokens, or seq / 4) and completions are long enough that every sequence is truncated to exactly --seq tokens, so every step does
the same work whatever order the pairs come in; 2 pairs per micro-batch, 2 accumulation steps, AdamW at a constant
learning rate, clipping at 1.0, beta 0.1, no evaluation. TRL tokenises the same text (its tokenisation is ours:
tests/training/test_preference.py), runs its own loop and its own loss (its fused log-prob head) and shares none of
our code. --precompute: both compute the reference log-probs before training (TRL's precompute_ref_log_probs, our
precompute_reference), which the step time then leaves out.

Step time: the median over the steps after --warmup (ours: ms_per_step of metrics.jsonl at log_every = 1; TRL: the
time between its on_step_end callbacks). Peak memory: the process's resident high-water mark (VmHWM) at the end, which
includes each library's imports and set-up (RSS after set-up is printed too). One JSON line per measurement, then the
ratios ours / TRL.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def setup(root: Path, args) -> None:
    """The initial model and tokenizer (root/init) and the pairs (root/pairs.jsonl)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "gpt2-tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                         num_attention_heads=max(1, args.hidden // 64),
                                         max_position_embeddings=args.seq, pad_token_id=tokenizer.eos_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         tie_word_embeddings=False))
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    ids = tokenizer(text[:400_000])["input_ids"]
    prompt_len = min(256, args.seq // 4)
    pairs, span = [], prompt_len + 2 * args.seq
    for k in range(args.pairs):
        start = (k * 997) % (len(ids) - 2 * span)
        prompt = tokenizer.decode(ids[start:start + prompt_len])
        chosen = tokenizer.decode(ids[start + prompt_len:start + span])
        rejected = tokenizer.decode(ids[start + span:start + 2 * span])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def run_ours(root: Path, args) -> dict:
    import automodel
    from automodel.config import load_config

    toml = root / "ours.toml"
    toml.write_text(f"""
recipe = "llm_dpo"
seed = 0
output_dir = "{root / 'ours'}"
[model]
name_or_path = "{root / 'init'}"
dtype = "float32"
attn_implementation = "sdpa"
[preference]
beta = 0.1
precompute_reference = {str(args.precompute).lower()}
[data]
seq_len = {args.seq}
cache_dir = "{root / 'cache'}"
[data.train]
source = "{root / 'pairs.jsonl'}"
format = "preference"
[optim]
lr = 1e-5
[schedule]
kind = "constant"
[train]
global_batch_size = 4
micro_batch_size = 2
max_steps = {args.warmup + args.steps}
log_every = 1
[checkpoint]
save_final = false
[logging]
progress_bar = "off"
plot = false
""")
    cfg = load_config(toml, [], world_size=1)
    automodel.train(cfg)
    rows = [json.loads(line) for line in (root / "ours" / "metrics.jsonl").read_text().splitlines()]
    times = [r["ms_per_step"] / 1000 for r in rows if "loss" in r][args.warmup:]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"step_s": statistics.median(times), "peak_gib": rss_bytes("VmHWM") / 2**30, "first_loss": losses[0]}


def run_trl(root: Path, args) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(root / "init", attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(root / "init", attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(root / "init")
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    config = trl.DPOConfig(output_dir=str(root / "trl"), use_cpu=True, report_to="none", bf16=False,
                           gradient_checkpointing=False, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           max_length=args.seq, beta=0.1, learning_rate=1e-5, lr_scheduler_type="constant",
                           weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
                           max_steps=args.warmup + args.steps, save_strategy="no", seed=0,
                           precompute_ref_log_probs=args.precompute, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[Stamp()])
    set_up = rss_bytes("VmRSS")
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)][args.warmup:]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"step_s": statistics.median(times), "peak_gib": rss_bytes("VmHWM") / 2**30,
            "rss_after_setup_gib": set_up / 2**30, "first_loss": losses[0]}


def child(which: str, root: Path, args) -> None:
    out = run_ours(root, args) if which == "ours" else run_trl(root, args)
    print(json.dumps({"which": which, "seq": args.seq, "precompute": args.precompute, **out}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precompute", action="store_true")
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root), args)
        return
    if not (SHARED / "tinyshakespeare").is_dir():
        sys.exit(f"needs the shared data at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, args)
        flags = [f"--seq={args.seq}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--hidden={args.hidden}",
                 f"--layers={args.layers}", f"--pairs={args.pairs}"] + (["--precompute"] if args.precompute else [])
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.rounds):
            for which in ("ours", "trl"):  # alternating, each in a fresh process
                out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root), *flags],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                if out.returncode != 0:
                    sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                results[which].append(row)
                (root / "ours").exists() and subprocess.run(["rm", "-rf", str(root / "ours"), str(root / "trl")])
    ours = {k: statistics.median(r[k] for r in results["ours"]) for k in ("step_s", "peak_gib")}
    theirs = {k: statistics.median(r[k] for r in results["trl"]) for k in ("step_s", "peak_gib")}
    print(json.dumps({"seq": args.seq, "precompute": args.precompute,
                      "step_time_ratio": ours["step_s"] / theirs["step_s"],
                      "peak_memory_ratio": ours["peak_gib"] / theirs["peak_gib"],
                      "first_losses": [results["ours"][0]["first_loss"], results["trl"][0]["first_loss"]]}))


if __name__ == "__main__":
    main()
