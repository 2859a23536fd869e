"""Our step time against the Hugging Face Trainer on the same work, alternating rounds in one command.

    python bench/bench_peers.py [--rounds 3] [--steps 8] [--hidden 384] [--layers 4] [--ours KEY=VALUE ...]

Same work: one initial Llama (random weights, GPT-2's 50,257-token vocabulary) saved once and loaded by both; the
same alpaca rows (../shared/data/llamafactory-demos/alpaca_en_demo.json), tokenised once by our pipeline (prompt
masked, answer + EOS trained, `plain` prompt template) and fed to both in the same order (our BatchPlan's); micro-
batches of 4 padded to their longest, 4 accumulation steps, float32, constant learning rate, AdamW, clipping at 1.0,
no evaluation. The Trainer runs its own loop (its collator pads labels with -100, the model's own loss normalised by
the tokens of the whole accumulated batch, torch's AdamW); it shares none of our training code. The first step's
losses must agree (printed), then each round times --steps steps of each after --warmup steps, and the ratio
ours / Trainer is printed per round with the median. One JSON line per round, then the summary.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def setup(root: Path, args) -> tuple[Path, Path, list[dict]]:
    """(saved model dir, alpaca jsonl, the rows in training order as token ids)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from automodel.config import BatchShape
    from automodel.data import BatchPlan, build

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "gpt2-tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    rows = json.loads((SHARED / "llamafactory-demos" / "alpaca_en_demo.json").read_text())
    data = root / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                                         intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                         num_attention_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
                                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    cfg = ours_config(root, data, args, steps=1)
    train_set, _ = build(cfg.data, tokenizer, use_cache=False)
    plan = BatchPlan(len(train_set), BatchShape.of(cfg.train, 1), cfg.seed)
    total = (args.warmup + args.steps) * args.rounds + 1
    order = [i for step in range(total) for i in plan.global_indices(step)]
    return root / "init", data, [{"input_ids": train_set.input_ids[i], "labels": train_set.labels[i]} for i in order]


def ours_config(root: Path, data: Path, args, steps: int, out: str = "ours"):
    from automodel.config import load_config

    toml = root / "ours.toml"
    toml.write_text(f"""
recipe = "llm_finetune"
seed = 0
output_dir = "{root / out}"
[model]
name_or_path = "{root / 'init'}"
[data]
seq_len = {args.seq_len}
truncate = "right"
[data.train]
source = "{data}"
format = "instruction"
[optim]
lr = 1e-4
weight_decay = 0.0
clip_grad_norm = 1.0
[schedule]
kind = "constant"
[train]
global_batch_size = 16
micro_batch_size = 4
max_steps = {steps}
log_every = 1
resume = "never"
[checkpoint]
save_final = false
[logging]
progress_bar = "off"
plot = false
""")
    return load_config(toml, list(args.ours))


def run_ours(root: Path, data: Path, args, steps: int) -> tuple[float, float]:
    """(first logged loss, ms per step over the last args.steps steps)."""
    import automodel

    result = automodel.train(ours_config(root, data, args, steps))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r["ms_per_step"] for r in rows[-args.steps:]]  # a row per step, as the Trainer logs (logging_steps=1)
    return rows[0]["loss"], sum(timed) / len(timed)


def run_trainer(root: Path, rows: list[dict], args, steps: int) -> tuple[float, float]:
    """(first step's loss, ms per step over the last args.steps steps), with the HF Trainer."""
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)

    class InOrder(Trainer):  # the rows are already in our order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    tokenizer = AutoTokenizer.from_pretrained(root / "init")
    model = AutoModelForCausalLM.from_pretrained(root / "init", dtype=torch.float32, attn_implementation="sdpa")
    clock = Clock()
    training_args = TrainingArguments(
        output_dir=str(root / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
        max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), optim="adamw_torch")
    trainer = InOrder(model=model, args=training_args, train_dataset=rows[:steps * 16],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
                      callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # its log dicts on stdout
    trainer.train()
    timed = clock.ends[-(args.steps + 1):]
    return clock.losses[0], 1000 * (timed[-1] - timed[0]) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of our config, e.g. train.loss_chunk_tokens=0 optim.fused=true")
    args = parser.parse_args()
    if not (SHARED / "llamafactory-demos" / "alpaca_en_demo.json").is_file():
        sys.exit(f"bench_peers needs the shared data at {SHARED} (alpaca_en_demo.json, gpt2-tokenizer)")
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init, data, rows = setup(root, args)
        steps = args.warmup + args.steps
        first_ours, _ = run_ours(root, data, args, 1)
        first_trainer, _ = run_trainer(root, rows, args, 1)
        print(json.dumps({"step_1_loss": {"ours": first_ours, "trainer": first_trainer},
                          "relative_difference": abs(first_ours - first_trainer) / first_trainer}), flush=True)
        ratios = []
        for r in range(args.rounds):
            _, ours_ms = run_ours(root, data, args, steps)
            _, trainer_ms = run_trainer(root, rows, args, steps)
            ratios.append(ours_ms / trainer_ms)
            print(json.dumps({"round": r, "ours_ms_per_step": round(ours_ms, 1),
                              "trainer_ms_per_step": round(trainer_ms, 1), "ratio": round(ratios[-1], 3)}),
                  flush=True)
        print(json.dumps({"median_ratio_ours_over_trainer": round(statistics.median(ratios), 3),
                          "rounds": args.rounds, "timed_steps": args.steps, "ours": args.ours}), flush=True)


if __name__ == "__main__":
    main()
