"""Parts of an image-text-to-text model, found by role rather than by one architecture's names, so that
`[model] freeze = ["vision", "embeddings", "language"]` and LoRA's default exclusion work across families
(LLaVA, Gemma 3, Qwen-VL, Idefics, Mllama). The projector between the towers belongs to no group: it stays
trainable unless every group around it is frozen and it is frozen by name."""

from typing import Iterable

import torch.nn as nn

from automodel.config import ConfigError

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


__all__ = ["GROUPS", "freeze", "lora_exclusions", "parameter_groups"]
