"""The DeepSpeed JSON, derived from the run's config by one pure function (`automodel config deepspeed`)."""

from typing import Any

from automodel.config import BatchShape, TrainConfig
from automodel.config.validate import BATCH_KEYS

def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The engine's JSON. Optimizer and schedule are ours: the engine gets a torch AdamW (or, with optimizer
    offload, DeepSpeed's CPU AdamW via the "optimizer" block) and the learning rate is set every step. The batch
    sizes are the run's BatchShape, the one place they are derived (the step's loss scale relies on them)."""
    d = cfg.distributed
    shape = BatchShape.of(cfg.train, world_size)
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_batch_size": shape.global_batch_size,
        "train_micro_batch_size_per_gpu": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.accumulation_steps,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**12,  # our loop logs
        "wall_clock_breakdown": False,
    }
    if cfg.optim.name == "adamw8bit":  # a client optimizer ZeRO has no test of its own for (it steps any optimizer)
        ds["zero_allow_untested_optimizer"] = True
    if d.offload_optimizer == "cpu":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                        "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}}
    return _merge(ds, {k: v for k, v in d.deepspeed_overrides.items() if k not in BATCH_KEYS})
