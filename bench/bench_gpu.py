"""Throughput, MFU and memory at the sizes people train, on CUDA: one JSON line per case.

    python bench/bench_gpu.py                 # every case (needs CUDA)
    python bench/bench_gpu.py --case lora8b   # one: lora8b, qlora8b, full1b, full1b_zero
    python bench/bench_gpu.py --smoke         # the same code path on CPU, on tiny shapes (no figures worth keeping)

Cases (random weights: nothing is downloaded; synthetic documents packed into full rows):
- lora8b: LoRA (r 16, all linear layers) on a Llama-3-8B shape, seq 4096, micro-batch 1, bf16, activation
  checkpointing, one GPU (configs_toml/llm_lora_8b.toml's settings);
- qlora8b: the same with the base in 4-bit NF4 (double-quantised scales, bf16 compute) and 8-bit AdamW
  (configs_toml/qlora_8b.toml's settings): the peak memory is the figure to hold against 24 GB. The random bf16
  base is written to disk once (16 GB) and loaded back quantised, as a pretrained one would be;
- full1b: full fine-tuning of a Llama-3.2-1B shape, seq 4096, micro-batch 4, bf16 with float32 masters, one GPU;
- full1b_zero: the same on every visible GPU with DeepSpeed (ZeRO stage --zero-stage, default 2), launched with the
  deepspeed launcher.

Each line: tokens/s per GPU, TFLOP/s per GPU and MFU by the formula of docs/performance.md ("The MFU meter"), and
the peak GPU memory of rank 0, from the run's own metrics.jsonl (the mean of its log windows after the first).

Beside ours, the same step time counted as NeMo Automodel counts it, so the figures compare with its published
table (`nemo_tflops_per_gpu`, `nemo_mfu`): its Llama formula (flops_utils.py's llama2_flops: causal attention
halved, the head's 6 x vocab term included, every row a full seq_len) times, for LoRA, (2 + adapter / frozen) / 3
(its benchmark recipe: forward, input gradients and weight gradients a third each, only the last scaling with what
trains; "frozen" is every other parameter, embeddings and head included). Ours counts 6 per trainable and 4 per
frozen weight entry per token, without the input embedding, and attention over each sample's own length.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from automodel.training.throughput import peak_tflops_of  # noqa: E402

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": False}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}


def parameter_counts(shape: dict, lora_rank: int) -> tuple[int, int]:
    """(all parameters, LoRA's on every linear layer of the decoder at `lora_rank`; 0 without) of a Llama shape:
    embeddings, head (unless tied), attention, MLP and norms, as the model holds them (4-bit ones unpacked)."""
    h, ffn = shape["hidden_size"], shape["intermediate_size"]
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, ffn), (h, ffn), (ffn, h)]  # q k v o gate up down: (in, out)
    per_layer = sum(i * o for i, o in linears) + 2 * h  # + two RMSNorm weights
    total = vocab * h * (1 if shape["tie_word_embeddings"] else 2) + layers * per_layer + h
    lora = layers * sum(lora_rank * (i + o) for i, o in linears)
    return total + lora, lora


def nemo_step_flops(shape: dict, seq: int, rows: int, lora_rank: int) -> float:
    """A step's FLOPs as NeMo Automodel's benchmark counts them (see the module docstring)."""
    h, ffn = shape["hidden_size"], shape["intermediate_size"]
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    heads, groups = shape["num_attention_heads"], shape["num_key_value_heads"]
    flops = rows * seq * layers * h * h * (12 + 12 * groups / heads + 18 * ffn / h + 12 * seq / h * 0.5
                                           + 6 * vocab / (layers * h))
    if lora_rank:
        total, adapter = parameter_counts(shape, lora_rank)
        flops *= (2 + adapter / (total - adapter)) / 3
    return flops


def corpus(root: Path, rows: int) -> tuple[Path, Path]:
    """A byte-level tokenizer and `rows` synthetic documents (random words): tokens are tokens to a FLOP count."""
    import random

    from automodel.models import byte_level_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 1500))) for _ in range(rows)]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = byte_level_tokenizer(docs[:50])
    tokenizer.save_pretrained(root / "tokenizer")
    return data, root / "tokenizer"


def case_shape(case: str, args) -> tuple[bool, dict, int, int]:
    """(LoRA or not, model shape, seq_len, micro-batch) of a case."""
    lora = case in ("lora8b", "qlora8b")
    shape = TINY if args.smoke else (LLAMA_8B if lora else LLAMA_1B)
    return lora, shape, 128 if args.smoke else 4096, 1 if lora else (2 if args.smoke else 4)


def toml_for(case: str, root: Path, data: Path, tokenizer: Path, args) -> Path:
    lora, shape, seq, micro = case_shape(case, args)
    steps = 6 if args.smoke else args.steps
    lines = [
        'recipe = "llm_finetune"', "seed = 0", f'output_dir = "{root / case}"',
        "[model]", 'init = "random"', f'dtype = "{"float32" if args.smoke else "bfloat16"}"',
        f'attn_implementation = "{args.attn}"',
        "[model.config]", 'model_type = "llama"', *(f"{k} = {json.dumps(v)}" for k, v in shape.items()),
        "[tokenizer]", f'name_or_path = "{tokenizer}"',
        "[data]", f"seq_len = {seq}", "packing = true",
        "[data.train]", f'source = "{data}"', 'format = "text"',
        "[optim]", "lr = 1e-4", f"fused = {'false' if args.smoke else 'true'}",
        "[schedule]", 'kind = "constant"',
        "[train]", f"global_batch_size = {micro * 4 * (args.gpus if case == 'full1b_zero' else 1)}",
        f"micro_batch_size = {micro}", f"max_steps = {steps}", f"log_every = {max(1, steps // 4)}",
        f"activation_checkpointing = {'true' if lora else 'false'}", 'resume = "never"',
        "[checkpoint]", "save_final = false", "every = 0",
        "[logging]", 'progress_bar = "off"', "plot = false",
    ]
    if args.peak_tflops:
        lines.append(f"peak_tflops = {args.peak_tflops}")
    if lora:
        lines += ["[peft]", "rank = 16", "alpha = 32.0", 'target_modules = ["all-linear"]']
    if case == "qlora8b":
        compute = "float32" if args.smoke else "bfloat16"
        lines[lines.index("[model.config]"):lines.index("[model.config]")] = [
            'quantization = "nf4"', f'quantization_compute_dtype = "{compute}"', "double_quant = true"]
        lines[lines.index("[schedule]"):lines.index("[schedule]")] = [
            'name = "adamw8bit"', f"paged = {'false' if args.smoke else 'true'}"]
        lines = [line for line in lines if not line.startswith("fused = ")]
    if case == "full1b_zero":
        lines += ["[distributed]", 'backend = "deepspeed"', f"zero_stage = {args.zero_stage}"]
    path = root / f"{case}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_case(case: str, root: Path, data: Path, tokenizer: Path, args) -> dict:
    config = toml_for(case, root, data, tokenizer, args)
    if case == "full1b_zero":
        import socket

        with socket.socket() as sock:  # a free port: another job may hold DeepSpeed's default
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(args.gpus), "--master_port", str(port), str(ROOT / "launch" / "run.py"),
               "--config", str(config)]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--config", str(config)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stderr or proc.stdout)[-2000:]}
    rows = [json.loads(line) for line in (root / case / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][1:] or [r for r in rows if "loss" in r]  # after the first window
    gpus = args.gpus if case == "full1b_zero" else 1

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    lora, shape, seq, micro = case_shape(case, args)
    total, adapter = parameter_counts(shape, 16 if lora else 0)
    logged = re.search(r"model: \S+, ([\d,]+) parameters \(([\d,]+) trainable", proc.stdout)
    if args.smoke and case != "qlora8b" and logged:  # the count NeMo's convention divides by is the model's own
        counted = (int(logged[1].replace(",", "")), int(logged[2].replace(",", "")))
        assert counted == (total, adapter or total), (logged[0], total, adapter)
    global_rows = micro * 4 * gpus
    nemo = nemo_step_flops(shape, seq, global_rows, 16 if lora else 0) / gpus / (mean("ms_per_step") / 1e3) / 1e12
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or peak_tflops_of(device)
    return {"case": case, "gpus": gpus, "tokens_per_s_per_gpu": mean("tokens_per_s") / gpus,
            "tflops_per_gpu": mean("tflops"), "mfu": mean("mfu"),
            "nemo_tflops_per_gpu": nemo, "nemo_mfu": nemo / peak if peak else None,
            "parameters": total, "trainable": adapter or total, "ms_per_step": mean("ms_per_step"),
            "peak_memory_gb": max((r.get("peak_memory_gb") or 0) for r in rows) or None,
            "loss": rows[-1]["loss"], "device": device}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["lora8b", "qlora8b", "full1b", "full1b_zero"], action="append")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--attn", default="auto", help="model.attn_implementation (auto: flash-attn where installed, else flex_attention for the packed rows)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="0: the built-in table of known GPUs")
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, not the speed")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("bench_gpu: no CUDA device here; run it on a GPU machine (or --smoke to check the script on CPU)")
    args.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    cases = args.case or (["lora8b", "qlora8b", "full1b"] + (["full1b_zero"] if args.gpus > 1 or args.smoke else []))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tokenizer = corpus(root, rows=60 if args.smoke else 3000)
        for case in cases:
            if args.smoke and case == "full1b_zero":
                args.gpus = 2
            print(json.dumps(run_case(case, root, data, tokenizer, args)), flush=True)


if __name__ == "__main__":
    main()
