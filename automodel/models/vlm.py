"""Parts of an image-text-to-text model, found by role rather than by one architecture's names, so that
`[model] freeze = ["vision", "embeddings", "language"]` and LoRA's default exclusion work across families
(LLaVA, Gemma 3, Qwen-VL, Idefics, Mllama). The projector between the towers belongs to no group: it stays
trainable unless every group around it is frozen and it is frozen by name."""

from typing import Any, Iterable

import torch
import torch.nn as nn

from automodel.config import ConfigError, ModelConfig, TokenizerConfig
from automodel.models.tensors import HF_LOAD

VISION_MODULES = ("vision_tower", "visual", "vision_model", "vision_encoder")
LANGUAGE_MODULES = ("language_model", "text_model")
GROUPS = ("vision", "embeddings", "language")


def _top_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Qualified names of the outermost submodules whose last name is one of `names`."""
    found: list[str] = []
    for qualified, _ in model.named_modules():
        if qualified.rsplit(".", 1)[-1] in names and not any(qualified.startswith(f + ".") for f in found):
            found.append(qualified)
    return found


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """{"vision": [...], "embeddings": [...], "language": [...]}: parameter names of each part. Language includes
    its embeddings and the output head; embeddings is the input embedding table alone."""
    names = {id(p): n for n, p in model.named_parameters()}

    def params_under(prefixes: list[str]) -> list[str]:
        return [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)]

    head = model.get_output_embeddings()
    head_names = [names[id(p)] for p in head.parameters()] if head is not None else []
    return {
        "vision": params_under(_top_modules(model, VISION_MODULES)),
        "embeddings": [names[id(p)] for p in model.get_input_embeddings().parameters()],
        "language": sorted(set(params_under(_top_modules(model, LANGUAGE_MODULES)) + head_names)),
    }


def freeze(model: nn.Module, groups: Iterable[str]) -> dict[str, int]:
    """Stops gradients for the named groups; returns the number of parameters frozen per group."""
    parts = parameter_groups(model)
    frozen = {}
    params = dict(model.named_parameters())
    for group in groups:
        if group not in GROUPS:
            raise ConfigError(f"model.freeze: unknown group `{group}`; choose from {', '.join(GROUPS)}")
        if not parts[group]:
            raise ConfigError(f"model.freeze: {type(model).__name__} has no {group} part (looked for modules named "
                              f"{', '.join(VISION_MODULES if group == 'vision' else LANGUAGE_MODULES)})")
        for name in parts[group]:
            params[name].requires_grad_(False)
        frozen[group] = sum(params[n].numel() for n in parts[group])
    return frozen


def lora_exclusions(model: nn.Module) -> list[str]:
    """Module-name globs that keep LoRA off the vision tower (the default for VLMs)."""
    return [f"{m}.*" for m in _top_modules(model, VISION_MODULES)]


def build_processor(tok_cfg: TokenizerConfig, model_cfg: ModelConfig) -> Any:
    """AutoProcessor from [tokenizer] name_or_path, else the model's; right padding, a pad token."""
    from transformers import AutoProcessor

    from automodel.models.build import missing_local_dir

    name = tok_cfg.name_or_path or model_cfg.name_or_path
    missing_local_dir("tokenizer.name_or_path" if tok_cfg.name_or_path else "model.name_or_path", name)
    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"processor `{name}` could not be loaded (a hub id or a local directory with "
                          f"preprocessor_config.json): {e}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"`{name}` is not an image-text processor (no tokenizer or image processor)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def build_vlm(model_cfg: ModelConfig, processor: Any, seed: int) -> nn.Module:
    """AutoModelForImageTextToText: pretrained, or built from [model.config] (model_type plus text_config and
    vision_config tables; the image token and vocabulary follow the processor unless given)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from automodel.models.build import attention_for
    from automodel.models.tensors import DTYPES

    dtype = DTYPES[model_cfg.dtype]
    common: dict[str, Any] = dict(attn_implementation=attention_for(model_cfg),
                                  trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.init == "random" and not model_cfg.name_or_path:
        fields = dict(model_cfg.config)
        model_type = fields.pop("model_type")
        tokenizer = processor.tokenizer
        # The token the model replaces with image features: the tokenizer names it where it differs from the one the
        # processor expands (Gemma 3: soft tokens between <start_of_image> and <end_of_image>).
        image_token = getattr(tokenizer, "image_token", None) or processor.image_token
        fields.setdefault("image_token_index", tokenizer.convert_tokens_to_ids(image_token))
        fields["text_config"] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                 **fields.get("text_config", {})}
        try:
            hf_cfg = AutoConfig.for_model(model_type, **fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.config: cannot build a `{model_type}` config: {e}") from None
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, **common)
    elif model_cfg.init == "random":
        hf_cfg = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(hf_cfg, dtype=dtype, **common)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_cfg.name_or_path, dtype=dtype,
                                                                **model_cfg.config, **common, **HF_LOAD)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model `{model_cfg.name_or_path}` could not be loaded as an image-text-to-text "
                              f"model: {e}") from None
    model.train()
    return model


__all__ = ["GROUPS", "build_processor", "build_vlm", "freeze", "lora_exclusions", "parameter_groups"]
