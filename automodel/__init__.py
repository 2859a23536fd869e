"""automodel: fine-tune Hugging Face LLMs with pure torch.func steps.

    cfg = automodel.load_config("configs_toml/quickstart.toml", overrides=["optim.lr=3e-4"])
    result = automodel.train(cfg)
    result.output_dir, result.metrics["eval_loss"]
"""

import logging
from typing import TYPE_CHECKING, Any

from automodel.config import ConfigError, TrainConfig, load_config, validate

if TYPE_CHECKING:
    from automodel.training.loop import TrainResult

__version__ = "0.1.0"


# On a CPU with AVX512-BF16, importing bitsandbytes (peft imports it) tries to fetch a CPU kernel from the Hugging Face
# hub and logs two warnings when it cannot (offline). automodel never runs that kernel (models/quantize.py:
# keep_one_cpu_kernel), so the attempt's failure is not news: those two messages, and only they, are dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not str(record.msg).startswith("Skipping publisher trust check for "
                                                  "'kernels-community/quantization-bitsandbytes'"))


def __getattr__(name: str) -> Any:
    # torch and the training loop load when first needed, not when the `automodel` command starts (--help, config,
    # launch and plot need neither).
    if name == "TrainResult":
        from automodel.training.loop import TrainResult

        return TrainResult
    raise AttributeError(f"module 'automodel' has no attribute {name!r}")


def train(cfg: TrainConfig) -> "TrainResult":
    """Runs the recipe the config names. Accepts a loaded config, one built in code, or an attrs.evolve
    variant; it is validated again here, since code-built configs skip the loader."""
    from automodel import distributed
    from automodel.recipes import RECIPES

    validate(cfg, world_size=distributed.rank_info().world_size)
    return RECIPES[cfg.recipe](cfg)


__all__ = ["ConfigError", "TrainConfig", "TrainResult", "load_config", "train"]
