"""The DeepSpeed JSON, derived from the run's config by one pure function (`automodel config deepspeed`)."""

import difflib
from typing import Any

from automodel.config.schema import TrainConfig

# Top-level keys of DeepSpeed's config JSON (deepspeed.ai/docs/config-json), for checking overrides.
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler", "activation_checkpointing",
    "aio", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "compression_training", "curriculum_learning",
    "data_efficiency", "elasticity", "autotuning", "checkpoint", "memory_breakdown", "disable_allgather",
    "compile", "pipeline", "nebula", "weight_quantization", "hybrid_engine", "use_data_before_expert_parallelism",
    "graph_harvesting", "sparse_attention", "timers", "monitor_config", "tensor_parallel",
})
# These always come from [train] so they cannot disagree with the data pipeline.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_overrides(overrides: dict[str, Any]) -> list[str]:
    """Problems with `distributed.deepspeed_overrides`, as messages (empty when fine)."""
    problems = []
    for key in overrides:
        if key in BATCH_KEYS:
            problems.append(f"distributed.deepspeed_overrides.{key}: batch sizes come from [train] "
                            "(train.global_batch_size, train.micro_batch_size); remove it here")
        elif key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"distributed.deepspeed_overrides.{key}: not a DeepSpeed config key{hint}")
    return problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The engine's JSON. Optimizer and schedule are ours: the engine gets a torch AdamW (or, with optimizer
    offload, DeepSpeed's CPU AdamW via the "optimizer" block) and the learning rate is set every step."""
    d, t = cfg.distributed, cfg.train
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**12,  # our loop logs
        "wall_clock_breakdown": False,
    }
    if d.offload_optimizer == "cpu":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                        "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}}
    return _merge(ds, {k: v for k, v in d.deepspeed_overrides.items() if k not in BATCH_KEYS})
