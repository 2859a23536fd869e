"""Supervised fine-tuning of an image-text-to-text model, read top to bottom.

Features:
- any `AutoModelForImageTextToText` with its `AutoProcessor` (hub id, local dir, or an architecture built
  from [model.config], e.g. LLaVA = SigLIP vision tower + Llama);
- data as image + text conversations (OpenAI content lists, `<image>` placeholders with an images list, or
  image/question/answer columns); images as RGB, optionally cropped to their content;
- the processor's chat template renders each conversation; loss on the assistant turns only (prompts,
  padding and image tokens masked);
- `[model] freeze` keeps the vision tower, the input embeddings or the language model fixed; with [peft],
  LoRA goes on the language model and the vision tower is left out;
- both backends (functional, DeepSpeed ZeRO 0-3), checkpoints, resume, preemption, as in llm_finetune. Every
  sample holds an image, so every rank runs the vision tower on every micro-batch: ZeRO-3's gathers cannot
  diverge between ranks;
- eval loss on the validation set, and exact match of greedy answers (`eval.generate_samples`, equal up to
  white space); final/ holds the model and its processor (Auto classes reload both).
"""

import math
import time
from pathlib import Path

import attrs

from automodel import checkpoint, data, distributed, models
from automodel import peft as peft_lora
from automodel.config import ConfigError, TrainConfig, save_config
from automodel.data.vlm import VlmCollator, load_samples
from automodel.distributed.backend import build_backend, model_init_context, resume
from automodel.distributed.deepspeed_config import deepspeed_config
from automodel.loggers import RunLogger
from automodel.models import vlm as vlm_models
from automodel.training.forward import to_device
from automodel.training.evaluate import eval_loss, exact_match_of_prompts
from automodel.training.loop import TrainResult, run_loop
from automodel.training.metrics import peak_flops
from automodel.training.preemption import Preempted, StopRequest
from automodel.training.state import TrainState


def run(cfg: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    ranks = distributed.rank_info()
    device = distributed.device_for(ranks)
    use_deepspeed = cfg.distributed.backend == "deepspeed"
    all_reduce = distributed.setup(ranks, device, group_on_one_rank=use_deepspeed)
    is_main = ranks.rank == 0
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.toml")

    # Processor, model (partitioned at load under ZeRO-3), frozen parts, LoRA off the vision tower.
    processor = vlm_models.build_processor(cfg.tokenizer, cfg.model)
    ds_config = deepspeed_config(cfg, ranks.world_size) if use_deepspeed else None
    with model_init_context(cfg.distributed.backend, ds_config, pretrained=cfg.model.init == "pretrained"):
        model = vlm_models.build_vlm(cfg.model, processor, cfg.seed)
    if cfg.train.activation_checkpointing:
        models.enable_activation_checkpointing(model)
    frozen = vlm_models.freeze(model, cfg.model.freeze)
    base_path = cfg.model.name_or_path if cfg.model.init == "pretrained" else str(out / "base")
    if cfg.peft is not None and cfg.model.init == "random" and is_main:
        checkpoint.save_hf_model(model, processor, out / "base")
    peft_cfg = cfg.peft
    if peft_cfg is not None:
        peft_cfg = attrs.evolve(peft_cfg, exclude_modules=[*peft_cfg.exclude_modules,
                                                           *vlm_models.lora_exclusions(model)])
    model = peft_lora.apply(model, peft_cfg, cfg.seed, base_path)

    train_samples, skipped = load_samples(cfg.data.train, cfg.data.on_bad_row)
    val_samples = load_samples(cfg.data.validation, cfg.data.on_bad_row)[0] if cfg.data.validation else None
    collate = VlmCollator(processor, cfg.data.crop_images, cfg.data.seq_len, models.DTYPES[cfg.model.dtype])
    plan = data.BatchPlan(len(train_samples), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                          ranks.world_size, cfg.seed)
    max_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))
    if cfg.schedule.warmup_steps > max_steps:
        raise ConfigError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) is larger than the run's "
                          f"{max_steps} steps ({cfg.train.epochs} epochs of {plan.steps_per_epoch})")

    # The backend owns weights and optimizer state and provides the pure step; resume per train.resume.
    backend = build_backend(cfg, model, ds_config, max_steps, device, all_reduce, ranks.rank, ranks.world_size)
    state, meta, resume_from = resume(cfg, backend, out, ranks.rank, ranks.world_size, device)

    logger = RunLogger(out, max_steps, cfg.logging.progress_bar, enabled=is_main, start_step=state.step)
    logger.info(f"model: {type(model).__name__}, {models.count_params(model):,} parameters "
                f"({backend.trainable_params:,} trainable; frozen: {frozen or 'nothing'}), {cfg.model.dtype} on "
                f"{device}; {ranks.world_size} rank(s), {backend.name} backend")
    logger.info(f"data: train: {len(train_samples):,} conversations ({skipped} rows skipped), "
                f"{sum(len(s.images) for s in train_samples):,} images"
                + (f"; validation: {len(val_samples):,}" if val_samples else ""))
    logger.info(f"training: {max_steps} steps of {cfg.train.global_batch_size} samples "
                f"({plan.accumulation_steps} accumulation x {cfg.train.micro_batch_size} per rank), "
                f"{plan.steps_per_epoch} steps per epoch")
    logger.info(f"memory: activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}; loss "
                f"from {backend.loss_description}")
    if resume_from is not None:
        logger.info(f"resumed from {resume_from} at step {state.step}")

    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def evaluate(st: TrainState) -> dict:
        batches = (to_device(collate([val_samples[i] for i in idx]), device)
                   for idx in data.eval_batches(val_samples, eval_size, cfg.eval.max_batches))
        with backend.model_for_generation(st) as module:
            loss, tokens = eval_loss(module, lambda batch: backend.loss_sum(st, batch), batches)
            row = {"step": st.step, "eval_loss": loss, "eval_tokens": tokens}
            if cfg.eval.generate_samples > 0:  # every rank decodes the same prompts (ZeRO-3 generates in step)
                prompts = (collate.prompt(s) for s in val_samples[:cfg.eval.generate_samples])
                row["exact_match"], pairs = exact_match_of_prompts(module, processor.tokenizer, prompts,
                                                                   cfg.eval.max_new_tokens, device,
                                                                   **backend.generate_kwargs)
                row["examples"] = [{"prediction": p, "reference": r} for p, r in pairs[:3]]
        return row

    def save_checkpoint(st: TrainState) -> None:
        logger.info(f"checkpoint: {checkpoint.save(backend.save, st, out, ranks.rank, cfg.checkpoint.keep_last, meta)}")

    first_eval = None
    if val_samples and cfg.eval.at_start and state.step == 0:
        first_eval = evaluate(state)
        logger.row(first_eval)

    start_step = state.step
    with StopRequest() as stop:
        try:
            state, last_row = run_loop(
                state, train_step=backend.step, plan=plan, collate=lambda idx: collate([train_samples[i] for i in idx]),
                max_steps=max_steps, rank=ranks.rank, device=device, logger=logger, log_every=cfg.train.log_every,
                eval_every=cfg.train.eval_every, evaluate=evaluate if val_samples else None,
                flops_per_token=models.flops_per_token(model, cfg.data.seq_len),
                peak_flops=peak_flops(device, cfg.logging.peak_tflops), checkpoint_every=cfg.checkpoint.every,
                save_checkpoint=save_checkpoint, stop=stop,
            )
        except Preempted as e:
            logger.info(str(e))
            logger.close()
            raise
    if state.step > start_step:
        save_checkpoint(state)

    metrics = {"steps": state.step, "train_loss": last_row.get("loss"), "train_samples": state.data_position}
    if val_samples:
        final_eval = evaluate(state)
        logger.row(final_eval)
        metrics.update({k: v for k, v in final_eval.items() if k in ("eval_loss", "exact_match")})
        if first_eval is not None:
            metrics.update({f"{k}_at_start": first_eval[k] for k in ("eval_loss", "exact_match") if k in first_eval})
    final_dir = out / "final" if cfg.checkpoint.save_final else None
    if final_dir is not None:
        backend.export(state, processor, final_dir)  # every rank: ZeRO-3 gathers
    distributed.barrier()
    metrics["wall_s"] = time.perf_counter() - started
    parts = [f"done: {state.step} steps in {metrics['wall_s']:.1f}s"]
    if metrics["train_loss"] is not None:
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    if "eval_loss" in metrics:
        was = f" (was {metrics['eval_loss_at_start']:.4f})" if "eval_loss_at_start" in metrics else ""
        parts.append(f"eval loss {metrics['eval_loss']:.4f}{was}")
    if "exact_match" in metrics:
        was = (f" (was {100 * metrics['exact_match_at_start']:.1f}%)" if "exact_match_at_start" in metrics
               else "")
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%{was}")
    if final_dir is not None:
        parts.append(f"model and processor saved to {final_dir}")
    logger.info(" | ".join(parts))
    logger.summary({**metrics, "final_dir": str(final_dir) if final_dir else None})
    logger.close()
    return TrainResult(output_dir=out, metrics=metrics, final_dir=final_dir)
