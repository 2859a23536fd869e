"""Build the tokenizer and the causal LM that a config names: from the hub, a local dir, or from config."""

from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from automodel.config import ConfigError, ModelConfig, TokenizerConfig
from automodel.models import quantize
from automodel.models.tensors import DTYPES, HF_LOAD, numel

def build_tokenizer(tok_cfg: TokenizerConfig, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named in [tokenizer], else the model's. A missing pad token becomes EOS (padding is
    masked out of attention and loss, so which id pads does not matter)."""
    name = tok_cfg.name_or_path or model_cfg.name_or_path
    missing_local_dir("tokenizer.name_or_path" if tok_cfg.name_or_path else "model.name_or_path", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer `{name}` could not be loaded (a hub id or a local directory): {e}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer `{name}` has neither a pad nor an EOS token; add one to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _hf_config(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> transformers.PretrainedConfig:
    fields = dict(model_cfg.config)
    if model_cfg.name_or_path:
        hf_cfg = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        for key, value in fields.items():
            setattr(hf_cfg, key, value)
        return hf_cfg
    model_type = fields.pop("model_type")
    # Vocab size and special ids follow the tokenizer unless the config pins them.
    fields.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise ConfigError(f"model.config: cannot build a `{model_type}` config: {_last_line(e)}") from None


def _last_line(error: BaseException) -> str:
    """The root cause of a chained error, on one line (transformers' validators wrap theirs)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())


def looks_local(name: str) -> bool:
    """A path, not a hub id (`namespace/name`): starts with ".", "/" or "~", or has more than one "/"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_model(model_cfg: ModelConfig, recipe: str) -> None:
    """The model's config.json, read before any data is tokenised: a mistyped or unreachable name fails in seconds,
    and a model of the wrong kind for the recipe says which recipe it needs (not transformers' list of classes)."""
    name = model_cfg.name_or_path
    if not name:
        return
    missing_local_dir("model.name_or_path", name)
    try:
        hf_cfg = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: `{name}` could not be loaded (its config.json), so nothing was "
                          f"tokenised: {_last_line(e)}") from None
    if model_cfg.trust_remote_code:
        return  # its own classes: the registries below do not list them
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    kind = f'{(hf_cfg.architectures or [type(hf_cfg).__name__])[0]} (model_type "{hf_cfg.model_type}")'
    image_text = hf_cfg.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if recipe == "vlm_finetune" and not image_text:
        raise ConfigError(f'model.name_or_path: `{name}` is {kind}, a text-only model; recipe = "vlm_finetune" '
                          "trains image-text models (AutoModelForImageTextToText: LLaVA, Qwen2-VL, Gemma 3, ...). "
                          'Use recipe = "llm_finetune" for it')
    if recipe != "vlm_finetune" and image_text and hf_cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f'model.name_or_path: `{name}` is {kind}, an image-text model that AutoModelForCausalLM '
                          f'cannot load; recipe = "{recipe}" trains text models. Use recipe = "vlm_finetune" for it')


def missing_local_dir(key: str, name: str) -> None:
    """A name that can only be a local directory, and is not there: one line naming the key, before the hub is
    asked (which would answer with a complaint about repository names)."""
    if name and looks_local(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"{key}: no such directory `{name}` (relative paths are relative to {Path.cwd()})")


def pick_attention(requested: str, device: torch.device, dtype: str, packing: bool) -> tuple[str, str]:
    """(the attention kernel to build the model with, why: a phrase for the log). "auto" takes the fastest one
    installed: flash-attention 3 (Hopper) or 2 for bfloat16/float16 on CUDA; else flex_attention on CUDA for packed
    rows (a block mask: attention across samples is skipped, not masked); else sdpa."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    on_cuda = device.type == "cuda"
    if requested == "flex_attention" and not on_cuda:
        raise ConfigError("model.attn_implementation = \"flex_attention\" trains on CUDA only (torch has no "
                          "FlexAttention backward on CPU); use \"sdpa\" or \"auto\" here")
    if requested != "auto":
        choice, why = requested, "model.attn_implementation"
    elif on_cuda and dtype != "float32" and is_flash_attn_3_available() and torch.cuda.get_device_capability()[0] == 9:
        choice, why = "flash_attention_3", "auto: flash-attn 3 is installed"
    elif on_cuda and dtype != "float32" and is_flash_attn_2_available():
        choice, why = "flash_attention_2", "auto: flash-attn is installed"
    elif on_cuda and packing:
        choice, why = "flex_attention", "auto: packed rows on CUDA, flash-attn not installed"
    else:
        choice, why = "sdpa", "auto"
    if packing and choice in ("sdpa", "eager"):
        why += ("; packed rows get a dense (batch, 1, T, T) block-causal mask and attention runs over whole rows "
                "(flash_attention_2 or flex_attention on CUDA skip what crosses samples)")
    elif packing:
        why += "; packed rows: " + ("a block mask from position ids" if choice == "flex_attention"
                                    else "varlen over sample boundaries")
    return choice, why


def attention_for(model_cfg: ModelConfig) -> str:
    """The kernel to build with: the config's, with "auto" resolved for this machine's first device and no packing
    (recipes resolve it earlier, knowing both)."""
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return pick_attention("auto", device, model_cfg.dtype, packing=False)[0]


def build_model(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                base_dir: Optional[Path] = None, zero3: bool = False) -> torch.nn.Module:
    """A causal LM in train mode. Random init is seeded, so the same config gives the same weights. With
    model.quantization its linear layers load quantised (models/quantize.py); a quantised model built from config
    keeps its full-precision weights in `base_dir` (where adapters name their base) or a temporary directory.
    `zero3`: the model will be partitioned by ZeRO-3 (the 4-bit storage dtype follows)."""
    dtype = DTYPES[model_cfg.dtype]
    common: dict[str, Any] = dict(attn_implementation=attention_for(model_cfg),
                                  trust_remote_code=model_cfg.trust_remote_code)
    loading = {**common, **HF_LOAD}
    quantized = model_cfg.quantization != "none"
    missing_local_dir("model.name_or_path", model_cfg.name_or_path)
    if model_cfg.init == "random":
        hf_cfg = _hf_config(model_cfg, tokenizer)
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **common)
        except (ValueError, StrictDataclassError) as e:
            raise ConfigError(f"model.config: cannot build the model: {_last_line(e)}") from None
        if quantized:
            model = quantize.quantize_built(model, model_cfg, base_dir, zero3, **loading)
    else:
        extra: dict[str, Any] = {}
        if quantized:
            # Under ZeRO-3 transformers places the weights itself (zero.Init partitions them as they load).
            extra = dict(quantization_config=quantize.bnb_config(model_cfg, zero3),
                         **({} if zero3 else {"device_map": quantize.device_map()}))
        try:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=dtype, **model_cfg.config,
                                                         **loading, **extra)
        except OSError as e:
            raise ConfigError(f"model `{model_cfg.name_or_path}` could not be loaded: {e}") from None
    if quantized:
        quantize.keep_one_cpu_kernel(model)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows; "
            "use the model's own tokenizer or set model.config.vocab_size"
        )
    model.train()
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer in the backward (transformers' per-layer checkpointing, non-reentrant, so it
    needs no input that requires grad and works under torch.autograd.grad with frozen embeddings). Call it before
    LoRA is applied and before a DeepSpeed engine is built."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support activation "
                          "checkpointing in transformers; set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (transformers' layers are GradientCheckpointingLayer instances);
    the layers of one type share their compiled code, so a model compiles once per layer type, at its first step.
    Returns how many layers were compiled. Per layer, not the whole model: the loss, the chunked head and the
    optimizer stay outside, activation checkpointing still recomputes layer by layer, and a graph break in one
    model's unusual code costs one layer, not the step."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"train.compile: {type(model).__name__} has no transformers decoder layers to compile; "
                          "set it to false")
    for layer in layers:
        layer.compile()
    return len(layers)


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output head (the logits' width), also under ZeRO-3 partitioning."""
    head = model.get_output_embeddings()
    shape = getattr(head.weight, "ds_shape", head.weight.shape)
    return int(shape[0])


def count_params(model: torch.nn.Module) -> int:
    return sum(numel(p) for p in model.parameters())
