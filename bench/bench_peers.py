"""Our step time against the Hugging Face Trainer and TRL's SFTTrainer on the same work, alternating rounds in one
command.

    python bench/bench_peers.py [--rounds 5] [--steps 4] [--warmup 1] [--seq-len 256] [--only NAME ...]

Same work: one initial Llama (random weights, GPT-2's 50,257-token vocabulary, float32; its parameter count is
printed from the model) saved once and loaded by every side; the same alpaca rows
(../shared/data/llamafactory-demos/alpaca_en_demo.json), tokenised once by our pipeline (prompt masked, answer + EOS
trained, `plain` prompt template) and fed to every side in the same order (our BatchPlan's); micro-batches of 4,
4 accumulation steps, lr 1e-4 constant, no weight decay, clipping at 1.0, no evaluation. The peers run their own
loops, collators, losses and optimizers: they share none of our training code.

Five comparisons, each its own pair of runs (`--only` picks some):

- `trainer_equal_math`: our whole-logits loss (`train.loss_chunk_tokens = 0`) and foreach AdamW against the
  Trainer with `optim = "adamw_torch"` (foreach): the same arithmetic, so what differs is the loop;
- `trainer_defaults`: ours as shipped (the fused chunked loss) against the Trainer's defaults (its fused AdamW);
- `trl_padding_free`: ours as shipped (rows padded to the longest of each micro-batch) against TRL's SFTTrainer with
  `padding_free = True` (each micro-batch flattened into one row) and its other defaults (its chunked log-prob head,
  activation checkpointing on: TRL's default, printed);
- `trl_padding_free_no_checkpointing`: the same with TRL's activation checkpointing off, as ours is: like for like;
- `trl_packed`: ours with `data.packing = true` against TRL with `packing = true` (its best-fit-decreasing packing),
  rows of --seq-len tokens. The two pack differently, so their first losses are not comparable and the ratio is of
  time per trained token, not per step.

For all but the packed one, one step of each side is run first and the step-1 losses must agree (relative difference <=
1e-5; the bench exits 1 if not: the comparison would not be of the same work). Then each round times --steps steps
of each after --warmup steps, the side that goes first alternating by round; per round the ratio ours / peer, then
the median and the spread. One JSON line per measurement, then a summary line per comparison.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

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
    print(json.dumps({"model": "LlamaForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
                      "hidden": args.hidden, "layers": args.layers, "vocab": len(tokenizer)}), flush=True)
    cfg = ours_config(root, data, args, steps=1)
    train_set, _ = build(cfg.data, tokenizer, use_cache=False)
    plan = BatchPlan(len(train_set), BatchShape.of(cfg.train, 1), cfg.seed)
    total = (args.warmup + args.steps) * args.rounds + 1
    order = [i for step in range(total) for i in plan.global_indices(step)]
    return root / "init", data, [{"input_ids": train_set.input_ids[i], "labels": train_set.labels[i]} for i in order]


def ours_config(root: Path, data: Path, args, steps: int, out: str = "ours", overrides: Sequence[str] = ()):
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
    return load_config(toml, [*overrides, *args.ours])


def run_ours(root: Path, data: Path, args, steps: int, overrides: Sequence[str] = ()) -> dict:
    """{first logged loss, ms per step and trained tokens per step over the last args.steps steps}."""
    import automodel

    result = automodel.train(ours_config(root, data, args, steps, overrides=overrides))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    timed = rows[-args.steps:]  # a row per step, as the peers log (logging_steps=1)
    ms = sum(r["ms_per_step"] for r in timed) / len(timed)
    tokens = sum(r["tokens_per_s"] * r["ms_per_step"] / 1e3 for r in timed) / len(timed)
    return {"loss": rows[0]["loss"], "ms_per_step": ms, "tokens_per_step": tokens}


class _Clock:
    """A TrainerCallback (made on first use: transformers is imported late) recording step ends and logged losses."""

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.ends, self.seen, self.losses = [], [], []

            def on_step_end(self, _args, state, control, **k):
                self.ends.append(time.perf_counter())
                self.seen.append(state.num_input_tokens_seen)

            def on_log(self, _args, state, control, logs=None, **k):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return Clock()


def _timed(trainer, clock, args) -> dict:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its log dicts on stdout
    trainer.train()
    ends, seen = clock.ends[-(args.steps + 1):], clock.seen[-(args.steps + 1):]
    steps = len(ends) - 1  # the timed steps: from the end of the last warm-up step
    ms = 1000 * (ends[-1] - ends[0]) / steps if steps else float("nan")
    tokens = (seen[-1] - seen[0]) / steps if steps else float("nan")
    return {"loss": clock.losses[0], "ms_per_step": ms, "tokens_per_step": tokens}


def shared_arguments(output_dir: Path, steps: int) -> dict:
    """The TrainingArguments every peer run shares (SFTConfig extends them): our batch shape, optimisation settings
    and logging, no saving; the tokens each step saw counted without padding."""
    return dict(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                include_num_input_tokens_seen="non_padding")


def run_trainer(root: Path, rows: list[dict], args, steps: int, optim: Optional[str] = None) -> dict:
    """{first step's loss, ms per step over the last args.steps steps, tokens per step}, with the HF Trainer (its
    default optimizer unless `optim`)."""
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    class InOrder(Trainer):  # the rows are already in our order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    tokenizer = AutoTokenizer.from_pretrained(root / "init")
    model = AutoModelForCausalLM.from_pretrained(root / "init", dtype=torch.float32, attn_implementation="sdpa")
    clock = _Clock.make()
    training_args = TrainingArguments(**shared_arguments(root / "trainer", steps),
                                      **({"optim": optim} if optim else {}))
    trainer = InOrder(model=model, args=training_args, train_dataset=rows[:steps * 16],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
                      callbacks=[clock])
    return _timed(trainer, clock, args)


def run_trl(root: Path, rows: list[dict], args, steps: int, packed: bool, checkpointing: Optional[bool] = None) -> dict:
    """The same with TRL's SFTTrainer: padding-free (our rows and order), or packed (its own packing of all the rows,
    its own order); activation checkpointing as TRL defaults (on) unless `checkpointing`."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    model = AutoModelForCausalLM.from_pretrained(root / "init", dtype=torch.float32, attn_implementation="sdpa")
    clock = _Clock.make()
    config = SFTConfig(
        **shared_arguments(root / "trl", steps), bf16=False, completion_only_loss=True,  # the prompt masked, as ours
        # (padding-free: our rows, already cut to seq_len; packed: TRL's rows of seq_len)
        **({"packing": True, "max_length": args.seq_len} if packed else {"padding_free": True, "max_length": None}),
        **({} if checkpointing is None else {"gradient_checkpointing": checkpointing}))
    used = rows if packed else rows[:steps * 16]
    data = Dataset.from_list([{"input_ids": list(map(int, r["input_ids"])),
                               "completion_mask": [int(label != -100) for label in r["labels"]]} for r in used])
    trainer = (SFTTrainer if packed else InOrder)(model=model, args=config, train_dataset=data, callbacks=[clock])
    result = _timed(trainer, clock, args)
    result["activation_checkpointing"] = bool(config.gradient_checkpointing)
    return result


# name -> (our overrides, the peer's runner, step-1 losses must agree, ratio of: "step" or "token")
COMPARISONS = {
    "trainer_equal_math": (["train.loss_chunk_tokens=0"],
                           lambda root, rows, args, steps: run_trainer(root, rows, args, steps, optim="adamw_torch"),
                           True, "step"),
    "trainer_defaults": ([], run_trainer, True, "step"),
    "trl_padding_free": ([], lambda root, rows, args, steps: run_trl(root, rows, args, steps, packed=False), True,
                         "step"),
    "trl_padding_free_no_checkpointing": (
        [], lambda root, rows, args, steps: run_trl(root, rows, args, steps, packed=False, checkpointing=False), True,
        "step"),
    "trl_packed": (["data.packing=true"], lambda root, rows, args, steps: run_trl(root, rows, args, steps, packed=True),
                   False, "token"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), default=sorted(COMPARISONS))
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides of our config on every comparison, e.g. optim.fused=true")
    args = parser.parse_args()
    if not (SHARED / "llamafactory-demos" / "alpaca_en_demo.json").is_file():
        sys.exit(f"bench_peers needs the shared data at {SHARED} (alpaca_en_demo.json, gpt2-tokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init, data, rows = setup(root, args)
        steps = args.warmup + args.steps
        for name in args.only:  # the same work first: every comparison's step-1 losses, before any timing
            overrides, peer, agree, _ = COMPARISONS[name]
            if agree:
                ours, theirs = run_ours(root, data, args, 1, overrides), peer(root, rows, args, 1)
                difference = abs(ours["loss"] - theirs["loss"]) / theirs["loss"]
                print(json.dumps({"comparison": name, "step_1_loss": {"ours": ours["loss"], "peer": theirs["loss"]},
                                  "relative_difference": difference}), flush=True)
                if not difference <= 1e-5:
                    sys.exit(f"bench_peers: {name}: the step-1 losses differ ({difference:.2e} relative): not the "
                             "same work, so no timing")
        summary = []
        for name in args.only:
            overrides, peer, _, per = COMPARISONS[name]
            ratios = []
            for r in range(args.rounds):
                sides = [("ours", lambda: run_ours(root, data, args, steps, overrides)),
                         ("peer", lambda: peer(root, rows, args, steps))]
                got = dict((side, run()) for side, run in (sides if r % 2 == 0 else sides[::-1]))
                ours, theirs = got["ours"], got["peer"]
                if per == "token":
                    ratio = (ours["ms_per_step"] / ours["tokens_per_step"]) / (theirs["ms_per_step"] /
                                                                                  theirs["tokens_per_step"])
                else:
                    ratio = ours["ms_per_step"] / theirs["ms_per_step"]
                ratios.append(ratio)
                print(json.dumps({"comparison": name, "round": r, "first": "ours" if r % 2 == 0 else "peer",
                                  "ours_ms_per_step": round(ours["ms_per_step"], 1),
                                  "peer_ms_per_step": round(theirs["ms_per_step"], 1),
                                  "ours_tokens_per_step": round(ours["tokens_per_step"]),
                                  "peer_tokens_per_step": round(theirs["tokens_per_step"]),
                                  **({"peer_activation_checkpointing": theirs["activation_checkpointing"]}
                                     if "activation_checkpointing" in theirs else {}),
                                  f"ratio_per_{per}": round(ratio, 3)}), flush=True)
            summary.append({"comparison": name, f"median_ratio_per_{per}": round(statistics.median(ratios), 3),
                            "min": round(min(ratios), 3), "max": round(max(ratios), 3), "rounds": args.rounds,
                            "timed_steps": args.steps, "ours": overrides + list(args.ours)})
        for line in summary:
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
