"""Quantised bases (QLoRA): the linear layers of a causal LM loaded 4-bit (nf4, fp4) or 8-bit by bitsandbytes,
through transformers' BitsAndBytesConfig. The output head, embeddings and norms stay in model.dtype (transformers
leaves the output embeddings out of the conversion), so the chunked loss reads an ordinary head.

A quantised base is frozen: LoRA adapters train on top of it (peft wraps bitsandbytes' Linear4bit/Linear8bitLt).
"""

import tempfile
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch
from torch import nn

from automodel.config import ConfigError, ModelConfig
from automodel.models.tensors import DTYPES, numel

STORAGE = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_bitsandbytes(key: str) -> None:
    """One line naming the extra to install, when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key} needs bitsandbytes, which is not installed: pip install 'automodel[quant]'") \
            from None


def storage_dtype(model_cfg: ModelConfig, zero3: bool) -> torch.dtype:
    """What the packed 4-bit weights are stored in: "auto" is the compute dtype under ZeRO-3 (its partitioner
    shards floating-point tensors only), else uint8."""
    if model_cfg.quantization_storage_dtype != "auto":
        return STORAGE[model_cfg.quantization_storage_dtype]
    return STORAGE[compute_dtype_name(model_cfg)] if zero3 else torch.uint8


def compute_dtype_name(model_cfg: ModelConfig) -> str:
    return model_cfg.dtype if model_cfg.quantization_compute_dtype == "auto" else model_cfg.quantization_compute_dtype


def bnb_config(model_cfg: ModelConfig, zero3: bool = False) -> Any:
    """transformers' BitsAndBytesConfig for model.quantization (not "none")."""
    require_bitsandbytes(f'model.quantization = "{model_cfg.quantization}"')
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantization,
                              bnb_4bit_compute_dtype=STORAGE[compute_dtype_name(model_cfg)],
                              bnb_4bit_use_double_quant=model_cfg.double_quant,
                              bnb_4bit_quant_storage=storage_dtype(model_cfg, zero3))


def device_map() -> Any:
    """Where from_pretrained puts the quantised weights: this rank's GPU (bitsandbytes quantises as they move there),
    or the CPU."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def quantize_built(model: nn.Module, model_cfg: ModelConfig, save_to: Optional[Path], zero3: bool = False,
                   **load_kwargs: Any) -> nn.Module:
    """A model built from config, quantised: its full-precision weights are saved (to `save_to`, where adapters name
    their base, else to a temporary directory) and loaded back through bitsandbytes, as a pretrained base would be."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="automodel-base-") as tmp:
        where = Path(save_to) if save_to is not None else Path(tmp)
        # Every rank writes its own copy (save_pretrained writes on rank 0 only once torch.distributed is up).
        where.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(where)
        safetensors.torch.save_model(model, str(where / "model.safetensors"), metadata={"format": "pt"})
        dtype = next(model.parameters()).dtype
        del model
        quantized = AutoModelForCausalLM.from_pretrained(where, quantization_config=bnb_config(model_cfg, zero3),
                                                         device_map=device_map(), dtype=dtype, **load_kwargs)
    return quantized


def keep_one_cpu_kernel(model: nn.Module) -> None:
    """Turns off bitsandbytes' repacking of 4-bit weights for its CPU bfloat16 kernel. On a CPU with AVX512-BF16, the
    first forward in eval mode without gradients (the loss's calibration probe, an evaluation) repacks each weight in
    place and every later forward, training's included, goes through that kernel: the adapters then train on other
    numbers than the dequantised weights give (measured: the first step's gradient norm 0.27 instead of 0.47) and
    the result depends on the CPU. Off, every forward dequantises and multiplies as on a CPU without it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized_weight(p: torch.Tensor) -> bool:
    """A bitsandbytes-packed weight (Params4bit or Int8Params)."""
    return type(p).__name__ in ("Params4bit", "Int8Params")


def base_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the weights would take in `dtype` unquantised, bytes they take as stored: packed weights plus their
    scales). Each shared tensor counts once."""

    full = stored = 0
    for p in set(model.parameters()):
        local = getattr(p, "ds_tensor", p)  # under ZeRO-3: this rank's partition
        stored += local.numel() * local.element_size()
        full += numel(p) * (dtype.itemsize if is_quantized_weight(p) else p.element_size())
        state = getattr(p, "quant_state", None)
        if state is not None:  # 4-bit: the block scales (nested when double-quantised)
            for t in (state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.nested else ())):
                stored += t.numel() * t.element_size()
        scales = getattr(p, "SCB", None)  # int8: a scale per row
        stored += 0 if scales is None else scales.numel() * scales.element_size()
    return full, stored


def describe(model: nn.Module, model_cfg: ModelConfig) -> str:
    """The start-up log's line on a quantised base: its format and its weights' bytes before and after."""

    full, stored = base_bytes(model, DTYPES[model_cfg.dtype])
    kind = "int8 (LLM.int8())" if model_cfg.quantization == "int8" else (
        f"{model_cfg.quantization}{', double-quantised scales' if model_cfg.double_quant else ''}, computes in "
        f"{compute_dtype_name(model_cfg)}")
    layers = sum(1 for p in model.parameters() if is_quantized_weight(p))
    return (f"base: {layers} linear layers quantised by bitsandbytes, {kind}; weights {full / 2**20:,.2f} MiB in "
            f"{model_cfg.dtype} -> {stored / 2**20:,.2f} MiB as stored ({stored / max(full, 1):.2f}x)")
