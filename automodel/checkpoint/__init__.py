"""Writing results: the final Hugging Face model directory."""

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from automodel.training.state import ParamBinding, Tensors


def save_hf_model(binding: ParamBinding, params: Tensors, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """safetensors + config + tokenizer, loadable with AutoModelForCausalLM.from_pretrained. Written to a
    temporary directory and swapped in, so a crash never leaves a half-written model at `out_dir`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with binding.bound(params) as model:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(f".old-{out_dir.name}")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["save_hf_model"]
