"""The final Hugging Face model directory."""

import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase


def save_hf_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
                  state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """safetensors + config + tokenizer, loadable with AutoModelForCausalLM.from_pretrained. Written to a
    temporary directory and swapped in, so a crash never leaves a half-written model at `out_dir`.
    `state_dict` replaces the module's own tensors (a ZeRO-3 model holds only placeholders)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(f".old-{out_dir.name}")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
