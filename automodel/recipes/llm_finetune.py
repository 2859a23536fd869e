"""Supervised fine-tuning of a causal LM, read top to bottom.

Features:
- any `AutoModelForCausalLM` (hub id, local dir, or an architecture built from [model.config]);
- SQuAD and instruction data, prompt tokens masked out of the loss;
- a pure torch.func step with exact loss normalisation over micro-batches and ranks, pure AdamW,
  global-norm clipping and a pure LR schedule;
- token-weighted eval loss and greedy exact match on the validation set;
- console/tqdm progress, metrics.jsonl, the resolved config.toml, and a final HF model directory.
"""

import math
import time
from pathlib import Path

from automodel import checkpoint, data, distributed, models
from automodel.config import ConfigError, TrainConfig, save_config
from automodel.loggers import RunLogger
from automodel.optim import AdamWHyper, lr_at, no_decay_names
from automodel.training.evaluate import eval_loss, exact_match
from automodel.training.loop import TrainResult, run_loop
from automodel.training.metrics import peak_flops
from automodel.training.state import ParamBinding, TrainState, init_state
from automodel.training.step import make_loss_fn, make_train_step


def run(cfg: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    ranks = distributed.rank_info()
    device = distributed.device_for(ranks)
    all_reduce = distributed.setup(ranks, device)
    is_main = ranks.rank == 0
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.toml")

    # Tokenizer, model, data.
    tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.model)
    model = models.build_model(cfg.model, tokenizer, cfg.seed).to(device)
    train_set, val_set = data.build(cfg.data, tokenizer)
    plan = data.BatchPlan(len(train_set), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                          ranks.world_size, cfg.seed)
    max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))
    if cfg.schedule.warmup_steps > max_steps:
        raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) is larger than the run's "
                          f"{max_steps} steps ({cfg.train.epochs} epochs of {plan.steps_per_epoch})")

    # The state owns the trainable weights; the module keeps structure, buffers and frozen weights.
    flops_per_token = models.flops_per_token(model, cfg.data.seq_len)
    total_params = models.count_params(model)
    binding = ParamBinding(model)
    params = binding.take()
    state = init_state(params, device, cfg.seed)
    train_step = make_train_step(
        model,
        hyper=AdamWHyper(betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                         no_decay=no_decay_names(params)),
        lr_fn=lambda step: lr_at(step, cfg.schedule, cfg.optim.lr, max_steps),
        clip_grad_norm=cfg.optim.clip_grad_norm, device=device, grad_method=cfg.train.grad_method,
        all_reduce=all_reduce, world_size=ranks.world_size,
    )

    logger = RunLogger(out, max_steps, cfg.logging.progress_bar, enabled=is_main)
    trainable = sum(p.numel() for p in params.values())
    logger.info(f"model: {type(model).__name__}, {total_params:,} parameters ({trainable:,} trainable), "
                f"{cfg.model.dtype} on {device}; {ranks.world_size} rank(s)")
    for tset in (train_set, val_set):
        if tset is not None:
            logger.info(f"data: {tset.summary()}")
    logger.info(f"training: {max_steps} steps of {cfg.train.global_batch_size} samples "
                f"({plan.accumulation_steps} accumulation x {cfg.train.micro_batch_size} per rank), "
                f"{plan.steps_per_epoch} steps per epoch")

    # Evaluation: token-weighted loss over the validation set, and exact match of greedy answers.
    loss_fn = make_loss_fn(model)
    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def evaluate(st: TrainState) -> dict:
        batches = ({k: v.to(device) for k, v in data.collate(val_set, idx, tokenizer.pad_token_id).items()}
                   for idx in data.eval_batches(val_set, eval_size, cfg.eval.max_batches))
        loss, tokens = eval_loss(model, loss_fn, st.params, batches)
        row = {"step": st.step, "eval_loss": loss, "eval_tokens": tokens}
        if cfg.eval.generate_samples > 0:
            with binding.bound(st.params) as bound_model:
                row["exact_match"], pairs = exact_match(bound_model, tokenizer, val_set, cfg.eval.generate_samples,
                                                        cfg.eval.max_new_tokens, eval_size, device)
            row["examples"] = [{"prediction": p, "reference": r} for p, r in pairs[:3]]
        return row

    first_eval = None
    if val_set is not None and cfg.eval.at_start:
        first_eval = evaluate(state)
        logger.row(first_eval)

    state, last_row = run_loop(
        state, train_step=train_step, plan=plan, train_set=train_set, max_steps=max_steps, rank=ranks.rank,
        device=device, pad_id=tokenizer.pad_token_id, logger=logger, log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every, evaluate=evaluate if val_set is not None else None,
        flops_per_token=flops_per_token, peak_flops=peak_flops(device, cfg.logging.peak_tflops),
    )

    metrics = {"steps": state.step, "train_loss": last_row.get("loss"), "train_samples": state.data_position}
    if val_set is not None:
        final_eval = evaluate(state)
        logger.row(final_eval)
        metrics.update({k: v for k, v in final_eval.items() if k in ("eval_loss", "exact_match")})
        if first_eval is not None and "exact_match" in first_eval:
            metrics["exact_match_at_start"] = first_eval["exact_match"]

    final_dir = None
    if cfg.checkpoint.save_final and is_main:
        final_dir = out / "final"
        checkpoint.save_hf_model(binding, state.params, tokenizer, final_dir)
    distributed.barrier()
    metrics["wall_s"] = time.perf_counter() - started
    logger.info(_summary(metrics, final_dir))
    logger.close()
    return TrainResult(output_dir=out, metrics=metrics, final_dir=final_dir)


def _summary(metrics: dict, final_dir: Path | None) -> str:
    parts = [f"done: {metrics['steps']} steps in {metrics['wall_s']:.1f}s", f"train loss {metrics['train_loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    if "exact_match" in metrics:
        start = metrics.get("exact_match_at_start")
        was = f" (was {100 * start:.1f}% at step 0)" if start is not None else ""
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%{was}")
    if final_dir is not None:
        parts.append(f"model saved to {final_dir}")
    return " | ".join(parts)
