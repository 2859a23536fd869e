"""LoRA through the peft library: which modules (glob patterns), applying it, and merging offline.

Module names are matched in full (`model.layers.*.self_attn.q_proj`) or by their last part (`*_proj`);
`all-linear` means every linear layer except the output head. The matched names are handed to peft as an
explicit list, so what is adapted is exactly what the patterns say.
"""

import fnmatch
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from automodel.models.export import save_hf_model
from automodel.models.tensors import HF_LOAD
from automodel.config import ConfigError, PeftConfig

ALL_LINEAR = "all-linear"
# Layer types peft's LoRA can wrap (Conv1D: GPT-2's linear layers).
ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def _examples(names: list[str]) -> str:
    """A few real names, one per distinct last part, to show what patterns can match."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(name.rsplit(".", 1)[-1], name)
    return ", ".join(list(seen.values())[:8])


def resolve_targets(model: nn.Module, patterns: list[str], exclude: list[str]) -> list[str]:
    """Full names of the modules LoRA adapts. A pattern that matches nothing is an error naming real modules."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adaptable = [(n, m) for n, m in model.named_modules() if n and isinstance(m, ADAPTABLE)]
    names = [n for n, _ in adaptable]
    chosen = set()
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [n for n, m in adaptable if isinstance(m, (nn.Linear, Conv1D)) and m is not output_head]
        else:
            hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise ConfigError(f"peft.target_modules: `{pattern}` matches no adaptable module; modules here "
                              f"include {_examples(names)}")
        chosen.update(hits)
    for pattern in exclude:
        hits = [n for n in chosen if _matches(n, pattern)]
        if not hits:
            raise ConfigError(f"peft.exclude_modules: `{pattern}` matches none of the targeted modules, e.g. "
                              f"{_examples(sorted(chosen))}")
        chosen.difference_update(hits)
    if not chosen:
        raise ConfigError("peft: peft.exclude_modules removes every module that target_modules selects")
    return sorted(chosen)


def apply(model: nn.Module, cfg: Optional[PeftConfig], seed: int, base_path: str) -> nn.Module:
    """The model with LoRA adapters (base weights frozen), or the model itself without [peft]. Seeded, so
    every backend starts from the same adapter weights. `base_path` is what adapter_config.json names as
    the base model."""
    if cfg is None:
        return model
    targets = resolve_targets(model, cfg.target_modules, cfg.exclude_modules)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, modules_to_save=cfg.modules_to_save or None,
                      base_model_name_or_path=base_path, task_type="CAUSAL_LM")
    model.name_or_path = model.config._name_or_path = base_path  # peft copies the base's name from here
    torch.manual_seed(seed + 1)
    # Adapters in the base's dtype: peft's default keeps them in float32 and casts every adapted input up, which
    # doubles the activations LoRA saves. The optimizer keeps float32 masters of them instead (optim.master_dtype).
    return get_peft_model(model, lora, autocast_adapter_dtype=False)


def merge(base: str, adapter: str, out: str, dtype: torch.dtype = torch.float32) -> Path:
    """Base model + adapter -> one HF model directory with the adapter merged into the weights. The base loads in
    full precision: an adapter trained on a quantised base (QLoRA) merges into the weights that were quantised, never
    into their 4-bit rounding (a base stored quantised is refused)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json; point --adapter at a PEFT adapter directory")
    try:
        quantized = getattr(AutoConfig.from_pretrained(base), "quantization_config", None)
    except OSError as e:
        raise ConfigError(f"base model `{base}` could not be loaded: {e}") from None
    if quantized:
        # Merging into packed 4-bit weights would round the merged weights again (and lose the adapter's precision).
        raise ConfigError(f"base model `{base}` is stored quantised (its config.json has a quantization_config); merge "
                          "into the full-precision model it was quantised from (a QLoRA run trains on the hub or local "
                          "model that model.name_or_path names, quantised as it loads: merge into that)")
    try:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **HF_LOAD)
    except OSError as e:
        raise ConfigError(f"base model `{base}` could not be loaded: {e}") from None
    merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload()
    tokenizer_dir = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    save_hf_model(merged, AutoTokenizer.from_pretrained(tokenizer_dir), Path(out))
    return Path(out)


__all__ = ["apply", "merge", "resolve_targets"]
