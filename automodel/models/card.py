"""The model card written into final/: what was trained from what, on what, how well, and how to load it."""

from pathlib import Path
from typing import Any

import yaml

PIPELINE = {"llm_finetune": "text-generation", "llm_kd": "text-generation", "vlm_finetune": "image-text-to-text"}


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~"))


def duration(seconds: float) -> str:
    """65.3 -> "1 min 5 s"; 7384 -> "2 h 3 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def model_card(cfg: Any, config_toml: str, metrics: dict[str, Any], data_lines: list[str], base_path: str,
               adapter: bool, final_dir: Path) -> str:
    """README.md text: YAML front matter (huggingface_hub's ModelCard reads it) and a body a person reads."""
    where = str(Path(final_dir).absolute())  # the code below runs from any working directory
    pretrained = cfg.model.init == "pretrained"
    base = cfg.model.name_or_path if pretrained else None
    sources = [s.source for s in (*cfg.data.train, *cfg.data.validation)]
    front: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": PIPELINE.get(cfg.recipe, "text-generation"),
        "tags": ["automodel", cfg.recipe, "lora" if adapter else "full-fine-tune"],
    }
    if base and not _is_local(base):
        front["base_model"] = base
    hub_sets = sorted({s for s in sources if not _is_local(s)})
    if hub_sets:
        front["datasets"] = hub_sets

    what = "A LoRA adapter" if adapter else "A fine-tuned model"
    origin = (f"`{base}`" if base else f"a `{cfg.model.config.get('model_type', 'model')}` architecture initialised "
              f"at random (seed {cfg.seed})" + (f", saved to `{base_path}`" if adapter else ""))
    lines = [f"# {Path(cfg.output_dir).name}", "",
             f"{what} trained with automodel's recipe `{cfg.recipe}` from {origin}.", ""]
    if cfg.preference is not None:
        pref = cfg.preference
        names = {"sigmoid": "DPO", "ipo": "IPO", "robust": "robust DPO", "simpo": "SimPO", "orpo": "ORPO",
                 "kto": "KTO"}
        reference = ("" if pref.loss in ("simpo", "orpo") else
                     f", against the reference `{pref.reference}`" if pref.reference else
                     ", against its initial weights as the reference")
        lines += [f"Preference-tuned with {names[pref.loss]} (preference.loss = \"{pref.loss}\", beta "
                  f"{pref.beta}){reference}.", ""]
    if cfg.distill is not None:
        lines += [f"Distilled from the teacher `{cfg.distill.teacher}` (alpha {cfg.distill.alpha}, temperature "
                  f"{cfg.distill.temperature}).", ""]
    lines += ["## Data", ""]
    for src_name in ("train", "validation"):
        for src in getattr(cfg.data, src_name):
            weight = f", weight {src.weight:g}" if src.weight is not None else ""
            # A local file has no splits: "train" (datasets' name for a whole file) is left out, a slice is shown.
            split = ((f", rows `{src.split}`" if src.split != "train" else "") if _is_local(src.source)
                     else f", split `{src.split}`")
            kind = "file" if _is_local(src.source) else "dataset"
            lines.append(f"- {src_name}: {kind} `{src.source}` (format `{src.format}`{split}"
                         + (f", first {src.limit} rows" if src.limit else "") + weight + ")")
    lines += [f"- {line}" for line in data_lines]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for key in ("steps", "train_loss", "eval_loss", "eval_loss_at_start", "exact_match", "exact_match_at_start",
                "best_step", "stopped_early", "wall_s"):
        if metrics.get(key) is not None:
            value = metrics[key]
            text = (f"{100 * value:.1f}%" if key.startswith("exact_match") else duration(value) if key == "wall_s"
                    else f"{value:.4f}" if isinstance(value, float) else str(value))
            lines.append(f"| {'wall time' if key == 'wall_s' else key} | {text} |")
    lines += ["", "## How to load it", "", "```python"]
    if adapter:
        lines += ["from peft import AutoPeftModelForCausalLM" if cfg.recipe != "vlm_finetune"
                  else "from peft import PeftModel",
                  "from transformers import AutoTokenizer", "",
                  f"# the adapter names its base: {base_path}"]
        if cfg.recipe != "vlm_finetune":
            lines += [f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")']
        else:
            lines += ["from transformers import AutoModelForImageTextToText",
                      f'base = AutoModelForImageTextToText.from_pretrained("{base_path}")',
                      f'model = PeftModel.from_pretrained(base, "{where}")']
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    elif cfg.recipe == "vlm_finetune":
        lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                  f'model = AutoModelForImageTextToText.from_pretrained("{where}")',
                  f'processor = AutoProcessor.from_pretrained("{where}")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    lines += ["```", ""]
    if cfg.recipe != "vlm_finetune":
        lines += [f"Or talk to it: `automodel chat {where}`.", ""]
    lines += ["## Training config", "", "```toml", config_toml.rstrip(), "```", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines)
