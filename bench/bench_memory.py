"""Peak memory of training steps on CPU: ours against a bare PyTorch loop, each variant in its own process.

    python bench/bench_memory.py                     # everything below (~10 minutes on 2 cores); a table + JSON lines
    python bench/bench_memory.py --part steps        # step peaks only; --part optimizer, --part activations
    python bench/bench_memory.py --one ours_ac_chunk --seq 2048   # one step measurement (what the grid runs)
    python bench/bench_memory.py --part qlora        # QLoRA, 8-bit states, offloading vs LoRA and the HF Trainer

Model: a 2-layer Llama, hidden 512, intermediate 1792 (3.5x, Llama-3's ratio), 8 heads / 2 KV heads (GQA 4:1), the
Llama-3 vocabulary of 128,256, untied head; float32, micro-batch 1, full fine-tuning, AdamW.

Step variants (each in a fresh process; memory = its resident set, read from /proc):
- bare: the model's own `.loss`, `.backward()`, torch.optim.AdamW(foreach=True), `zero_grad(set_to_none=True)`;
- ours: our functional step with whole logits; ours_chunk: + the chunked loss (train.loss_chunk_tokens = 256, its
  gradients computed in the forward: train.fused_loss); ours_ac: + activation checkpointing, whole logits;
  ours_ac_chunk: both (what a user of that size would run). `--one ours_ac_chunk_recompute` (or any chunked variant
  with `_recompute`): the chunks recomputed in the backward instead (train.fused_loss = false).
glibc is told to mmap every allocation over 64 KiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident
set at once; the high-water mark (VmHWM, reset through /proc/self/clear_refs just before the third step) is then
the peak of live tensors plus the interpreter's constant share, which is the same for every variant.

Optimizer phase: the resident peak of one update over 64M float32 parameters whose gradients exist, over the
trainable bytes (P): ours (grouped, in place), ours fused, torch foreach, torch fused.

Activations: bytes autograd saves per token and layer (in units of the hidden size), counted exactly with
saved-tensor hooks (each storage once), in bfloat16, at Llama-3-8B's shape ratios: full fine-tuning and LoRA
(rank 16, all-linear, dropout 0 and 0.05). With activation checkpointing a layer keeps only its input (2 bytes per
token x hidden in bfloat16) and recomputes the rest, one layer at a time, in the backward.

QLoRA (--part qlora): an 8-layer Llama, hidden 1024, intermediate 3584, 16 heads / 4 KV heads, vocabulary 32,000
(linear layers 82% of the weights, as in Llama-3-8B's 87%), saved once in float32 and loaded by each variant in its
own process; LoRA rank 16 on all linear layers, dropout 0; micro-batch 1 of 1024 tokens; without and with
activation checkpointing. Everything computes in float32: this CPU multiplies bfloat16 matrices at ~1 GFLOP/s
(float32: ~170), so the bfloat16 runs a GPU would do are out of reach here.
- lora: ours, the base unquantised; qlora: the base in NF4 (double-quantised scales); qlora_8bit: + optim.name =
  "adamw8bit"; qlora_8bit_offload: + train.activation_offloading (on a CPU the offloaded tensors are already in
  host memory, so its resident peak is unchanged: the row reports the bytes a GPU would move off the device).
- hf_qlora, hf_qlora_8bit: the same model, quantisation, adapters and batch through the HF recipe users follow:
  from_pretrained with BitsAndBytesConfig, peft.prepare_model_for_kbit_training, get_peft_model, and
  transformers.Trainer (optim "adamw_torch" / "adamw_bnb_8bit", gradient_checkpointing with use_reentrant=False when
  checkpointing). It shares no code with ours.
Every child imports the same libraries first (transformers' Trainer, peft, bitsandbytes, automodel), so the
interpreter's share of the resident set is the same; the peak is that of the third step, given whole and above the
resident set right after the imports (what a GPU would hold: it has no interpreter).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 128_256, 512, 1792, 8, 2
STEP_VARIANTS = ("bare", "ours", "ours_chunk", "ours_ac", "ours_ac_chunk")
CHUNK = 256


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def llama(layers: int, dtype=torch.float32, seq: int = 4096):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=seq,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def batch(seq: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def measure_step(variant: str, seq: int, layers: int, chunk: int = CHUNK) -> dict:
    """Run in a fresh process: two steps to reach the steady state, then the peak of the third."""
    model = llama(layers, seq=seq)
    params = sum(p.numel() for p in model.parameters())
    data = batch(seq)
    if variant == "bare":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step():
            model(**data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from automodel.config.schema import OptimConfig
        from automodel.backends import build_functional
        from automodel.models import enable_activation_checkpointing

        if "ac" in variant.split("_"):
            enable_activation_checkpointing(model)
        backend = build_functional(model, optim=OptimConfig(lr=1e-5), clip_grad_norm=1.0, lr_fn=lambda s: 1e-5,
                                   device=torch.device("cpu"), grad_method="autograd", all_reduce=None, rank=0,
                                   world_size=1, seed=0, loss_chunk_tokens=chunk if "chunk" in variant else 0,
                                   master_dtype="auto", fused_loss="recompute" not in variant.split("_"))
        state = backend.state

        def step():
            nonlocal state
            state, metrics = backend.step(state, [data])
            metrics.loss.item()

    for _ in range(2):
        step()
    before = rss_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = rss_bytes("VmHWM")
    return {"part": "steps", "variant": variant, "seq": seq, "layers": layers, "chunk": chunk, "params": params,
            "peak_gib": peak / 2**30, "before_step_gib": before / 2**30, "step_s": seconds}


def measure_optimizer(variant: str) -> dict:
    """One update over 64M float32 parameters (8 tensors) whose gradients exist; peak over trainable bytes."""
    from automodel.optim import AdamWHyper, adamw_init, adamw_update_

    shapes = [(2048, 4096)] * 8
    base = rss_bytes("VmRSS")
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    trainable = sum(p.numel() * 4 for p in params)
    if variant.startswith("torch"):
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        del grads
        opt = torch.optim.AdamW(leaves, lr=1e-3, foreach=variant == "torch_foreach", fused=variant == "torch_fused")
        opt.step()  # the moments exist from here on, as in training
        for leaf in leaves:
            leaf.grad = torch.randn_like(leaf)
        reset_peak()
        opt.step()
    else:
        names = [f"w{i}" for i in range(len(params))]
        tensors = dict(zip(names, params))
        state = adamw_init(tensors)
        hp = AdamWHyper(fused=variant == "ours_fused")
        by_name = dict(zip(names, grads))
        del grads
        reset_peak()
        adamw_update_(tensors, by_name, state, 1e-3, hp)
    peak = rss_bytes("VmHWM") - base
    return {"part": "optimizer", "variant": variant, "trainable_gib": trainable / 2**30,
            "peak_over_trainable": peak / trainable}


def saved_activation_bytes(model: torch.nn.Module, seq: int) -> int:
    """Bytes autograd saves for the backward during one forward of the decoder (each storage once, weights not)."""
    data = batch(seq)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    return sum(seen.values())


def measure_activations(mode: str, seq: int = 1024) -> dict:
    """Per token and layer, in units of the hidden size: the slope between 2 and 4 layers (what the embedding and
    the final norm save cancels)."""
    from automodel.config import PeftConfig
    from automodel.peft import apply

    counts = {}
    for layers in (2, 4):
        model = llama(layers, dtype=torch.bfloat16, seq=seq)
        if mode != "full":
            dropout = 0.05 if mode == "lora_dropout" else 0.0
            model = apply(model, PeftConfig(rank=16, alpha=32.0, dropout=dropout), seed=0, base_path="bench")
            model = model.base_model.model
        counts[layers] = saved_activation_bytes(model, seq)
    per_layer = (counts[4] - counts[2]) / 2
    return {"part": "activations", "mode": mode, "seq": seq, "bytes_per_token_hidden_layer": per_layer / (seq * HIDDEN)}


QLORA = dict(vocab_size=32_000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
QLORA_VARIANTS = ("lora", "qlora", "qlora_8bit", "qlora_8bit_offload", "hf_qlora", "hf_qlora_8bit")


def save_qlora_base(where: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**QLORA, max_position_embeddings=4096), dtype=torch.float32)
    model.save_pretrained(where)


def qlora_batch(seq: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, QLORA["vocab_size"], (1, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def own_memory(model: torch.nn.Module) -> None:
    """Copies the unquantised weights, which from_pretrained leaves in a memory-mapped file, into the process's own
    memory. The mapping keeps every page the 4-bit conversion read resident (clean file pages the kernel could
    drop); on a GPU the weights are copied to the device anyway. Done alike in every variant."""
    from automodel.models.quantize import is_quantized_weight

    for p in model.parameters():
        if not is_quantized_weight(p):
            p.data = p.data.clone()


def measure_qlora(variant: str, base: str, seq: int, checkpointing: bool) -> dict:
    """Run in a fresh process: two steps, then the resident peak of the third."""
    import bitsandbytes  # noqa: F401  (the same imports in every variant: see the module docstring)
    import peft
    from transformers import BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    import automodel.backends  # noqa: F401

    imports = rss_bytes("VmRSS")  # the interpreter and libraries, before any model exists
    data = qlora_batch(seq)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
    out: dict = {}
    if variant.startswith("hf_"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32,
                                                     device_map="cpu", attn_implementation="sdpa")
        own_memory(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))

        class Peak(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 2:
                    out["before"] = rss_bytes("VmRSS")
                    reset_peak()
                    out["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 3:
                    out["seconds"] = time.perf_counter() - out["t0"]
                    out["peak"] = rss_bytes("VmHWM")

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, max_steps=3, per_device_train_batch_size=1, learning_rate=1e-5,
                                     optim="adamw_bnb_8bit" if variant.endswith("8bit") else "adamw_torch",
                                     max_grad_norm=1.0, gradient_checkpointing=checkpointing,
                                     gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[],
                                     save_strategy="no", logging_strategy="no", use_cpu=True,
                                     dataloader_num_workers=0, disable_tqdm=True)
            rows = [{k: v[0] for k, v in data.items()}] * 3
            Trainer(model=model, args=args, train_dataset=rows, callbacks=[Peak()]).train()
    else:
        from automodel.backends import build_functional
        from automodel.config import ModelConfig, OptimConfig, PeftConfig, TrainingConfig
        from automodel.models import build_model, byte_level_tokenizer, enable_activation_checkpointing
        from automodel.peft import apply

        model_cfg = ModelConfig(name_or_path=base, dtype="float32", quantization="none" if variant == "lora" else "nf4",
                                quantization_compute_dtype="float32", double_quant=True)
        model = build_model(model_cfg, byte_level_tokenizer(["a"]), seed=0)
        own_memory(model)
        if checkpointing:
            enable_activation_checkpointing(model)
        model = apply(model, PeftConfig(rank=16, alpha=32.0, dropout=0.0), seed=0, base_path=base)
        if variant == "offload_count":  # what one forward hands to host memory (its own process: no peak)
            from automodel.training.offload import Offloaded

            with Offloaded(model, torch.device("cpu")) as offloaded:
                model(**{k: v for k, v in data.items() if k != "labels"})
            return {"offloaded_gib": offloaded.moved_bytes / 2**30}
        optim = OptimConfig(lr=1e-5, name="adamw8bit" if "8bit" in variant else "adamw")
        backend = build_functional(model, optim=optim, clip_grad_norm=1.0, lr_fn=lambda s: 1e-5,
                                   device=torch.device("cpu"), grad_method="autograd", all_reduce=None, rank=0,
                                   world_size=1, seed=0, loss_chunk_tokens=TrainingConfig().loss_chunk_tokens,
                                   master_dtype="auto", offload_activations=variant.endswith("offload"))
        state = backend.state
        for i in range(3):
            if i == 2:
                out["before"] = rss_bytes("VmRSS")
                reset_peak()
                out["t0"] = time.perf_counter()
            state, metrics = backend.step(state, [data])
            metrics.loss.item()
        out["seconds"] = time.perf_counter() - out["t0"]
        out["peak"] = rss_bytes("VmHWM")
    return {"part": "qlora", "variant": variant, "seq": seq, "checkpointing": checkpointing,
            "peak_gib": out["peak"] / 2**30, "before_step_gib": out["before"] / 2**30, "imports_gib": imports / 2**30,
            "step_s": out["seconds"]}


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "steps", "optimizer", "activations", "qlora"], default="all")
    p.add_argument("--qlora", help="measure one QLoRA variant in this process (with --base, --seq, --checkpointing)")
    p.add_argument("--base", help="the saved float32 base of the QLoRA variants")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--qlora-seq", type=int, default=1024)
    p.add_argument("--one", help="measure one step variant in this process")
    p.add_argument("--optimizer", help="measure one optimizer variant in this process")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seqs", default="2048,4096")
    p.add_argument("--chunk", type=int, default=CHUNK, help="train.loss_chunk_tokens of the chunked variants")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_step(args.one, args.seq, args.layers, args.chunk)))
        return
    if args.optimizer:
        print(json.dumps(measure_optimizer(args.optimizer)))
        return
    if args.qlora:
        print(json.dumps(measure_qlora(args.qlora, args.base, args.seq, args.checkpointing)))
        return
    rows = []
    if args.part in ("all", "steps"):
        seqs = [int(s) for s in args.seqs.split(",")]
        peaks: dict = {}
        for seq in seqs:
            for variant in STEP_VARIANTS:
                row = run_child(["--one", variant, "--seq", str(seq), "--chunk", str(args.chunk)])
                peaks[variant, seq] = row["peak_gib"]
                print(json.dumps(row), flush=True)
                rows.append(row)
        for variant in STEP_VARIANTS:
            cells = " | ".join(f"seq {s}: {peaks[variant, s]:.2f} GiB ({peaks[variant, s] / peaks['bare', s]:.2f}x)"
                               for s in seqs)
            growth = ""
            if len(seqs) >= 2:
                per_token = (peaks[variant, seqs[-1]] - peaks[variant, seqs[0]]) / (seqs[-1] - seqs[0]) * 2**30
                bare = (peaks["bare", seqs[-1]] - peaks["bare", seqs[0]]) / (seqs[-1] - seqs[0]) * 2**30
                growth = f" | growth {per_token / 2**20:.3f} MiB/token ({per_token / bare:.2f}x)"
            print(f"{variant:14s} {cells}{growth}")
    if args.part in ("all", "optimizer"):
        for variant in ("ours", "ours_fused", "torch_foreach", "torch_fused"):
            row = run_child(["--optimizer", variant])
            print(json.dumps(row), flush=True)
            print(f"optimizer {variant:14s} peak {row['peak_over_trainable']:.2f}x the trainable bytes")
    if args.part in ("all", "activations"):
        for mode in ("full", "lora", "lora_dropout"):
            row = measure_activations(mode)
            print(json.dumps(row), flush=True)
            print(f"activations {mode:12s}: {row['bytes_per_token_hidden_layer']:.1f} bytes per token x hidden per "
                  "layer (without checkpointing; with it, each layer keeps its bfloat16 input: 2)")
    if args.part in ("all", "qlora"):
        qlora_grid(args.qlora_seq)


def qlora_grid(seq: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as base:
        save_qlora_base(Path(base))
        for checkpointing in (False, True):
            peaks = {}
            for variant in QLORA_VARIANTS:
                common = ["--base", base, "--seq", str(seq)] + (["--checkpointing"] if checkpointing else [])
                row = run_child(["--qlora", variant, *common])
                if variant.endswith("offload"):
                    row.update(run_child(["--qlora", "offload_count", *common]))
                print(json.dumps(row), flush=True)
                peaks[variant] = row["peak_gib"], row["peak_gib"] - row["imports_gib"]
            pairs = (("qlora", "lora"), ("qlora", "hf_qlora"), ("qlora_8bit", "hf_qlora_8bit"),
                     ("qlora_8bit", "qlora"))
            for variant in QLORA_VARIANTS:
                print(f"qlora seq {seq} checkpointing {'on ' if checkpointing else 'off'} {variant:20s} "
                      f"peak {peaks[variant][0]:.3f} GiB, {peaks[variant][1]:.3f} GiB above the imports")
            for a, b in pairs:
                print(f"  {a} / {b}: {peaks[a][0] / peaks[b][0]:.2f}x the peak, "
                      f"{peaks[a][1] / peaks[b][1]:.2f}x above the imports")


if __name__ == "__main__":
    main()
