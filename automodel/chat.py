"""Talk to what you trained: `automodel chat MODEL_DIR` (a terminal chat) and `automodel generate MODEL_DIR --prompt`.

MODEL_DIR is a run's final/ (or final_merged/), any saved causal LM, or a LoRA adapter (adapter_config.json: its
base is loaded from the path the adapter names). Prompts are built with the chat template saved on the tokenizer
(the one the run trained with); tokens are printed as they are generated.
"""

import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import attrs
import torch
from jinja2 import TemplateError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from automodel.config import ConfigError
from automodel.data import CHAT_TEMPLATES
from automodel.data.formats import RENDER_SECONDS, TemplateTimeout, time_limit
from automodel.models import DTYPES, HF_LOAD

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits"


@attrs.frozen
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        sampled = self.temperature > 0
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sampled,
                               "repetition_penalty": self.repetition_penalty}
        if sampled:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: no sampling knobs (transformers warns about unused ones)
            out.update(temperature=None, top_p=None, top_k=None)
        return out


# What a truncated, garbled or half-written model directory raises while it loads (safetensors' and tokenizers'
# errors are RuntimeError/Exception subclasses of their own; a bad config.json is a ValueError).
DAMAGE = (ValueError, RuntimeError, KeyError, EOFError, SafetensorError)


def _damaged(model_dir: str, what: str, error: BaseException) -> str:
    cause = " ".join(str(error).split())[:300] or type(error).__name__
    return (f"{model_dir}: {what} cannot be loaded, the directory looks damaged or incomplete ({type(error).__name__}: "
            f"{cause}); export it again, or give another saved model")


def load(model_dir: str, dtype: str = "float32", device: str = "cpu", chat_template: str = "") -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) from a saved model or LoRA adapter directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"{model_dir}: not a directory; give a run's final/ or another saved model")
    config = path / ("adapter_config.json" if (path / "adapter_config.json").is_file() else "config.json")
    if not config.is_file():
        raise ConfigError(f"{model_dir}: no config.json or adapter_config.json; give a run's final/ (or "
                          "final_merged/)")
    if (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file():
        raise ConfigError(f"{model_dir}: an image-text model; `automodel chat` talks to text models only (load it "
                          "with AutoModelForImageTextToText, see its README.md)")
    torch_dtype = DTYPES[dtype]
    if config.name == "adapter_config.json":
        from peft import AutoPeftModelForCausalLM

        base = json.loads(config.read_text()).get("base_model_name_or_path")
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        except OSError as e:
            raise ConfigError(f"{model_dir}: the adapter's base model `{base}` cannot be loaded ({e})") from None
        except DAMAGE as e:
            raise ConfigError(_damaged(model_dir, "the adapter", e)) from None
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **HF_LOAD)
        except (OSError, *DAMAGE) as e:
            raise ConfigError(_damaged(model_dir, "the model", e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, *DAMAGE) as e:
        raise ConfigError(_damaged(model_dir, "the tokenizer", e)) from None
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
    return model.to(device).eval(), tokenizer


class _Stream(TextStreamer):
    """Prints the reply as it is generated, to `out`, without the end-of-turn marker."""

    def __init__(self, tokenizer: Any, out: TextIO, stop: Optional[str]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.stop, self.text = out, stop, ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        shown = len(self._visible())
        self.text += text
        self.out.write(self._visible()[shown:] + ("\n" if stream_end else ""))
        self.out.flush()

    def _visible(self) -> str:
        if self.stop and self.stop in self.text:
            return self.text[:self.text.index(self.stop)]
        # hold back what could be the start of the stop marker
        for k in range(min(len(self.stop or ""), len(self.text)), 0, -1):
            if self.stop.startswith(self.text[-k:]):
                return self.text[:-k]
        return self.text


def _stop_marker(tokenizer: Any) -> Optional[str]:
    """ChatML's end of turn when it is not a special token the tokenizer stops on by itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_end|>" in template and "<|im_end|>" not in tokenizer.all_special_tokens:
        return "<|im_end|>"
    return None


def reply(model: Any, tokenizer: Any, messages: Optional[list[dict]], settings: GenerationSettings, out: TextIO,
          prompt: str = "") -> str:
    """Generates one answer to `messages` (with the chat template) or to the raw `prompt`, streaming it to `out`;
    returns its text."""
    if messages is not None:
        try:
            with time_limit(RENDER_SECONDS):  # a template that loops would hang the chat for ever
                enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        except TemplateTimeout as e:
            raise ConfigError(f"the tokenizer's chat template: {e} (a loop without end?); fix it, or give "
                              "--chat-template chatml") from None
        except (TemplateError, OverflowError) as e:
            raise ConfigError(f"the tokenizer's chat template fails: {type(e).__name__}: {e}; fix it, or give "
                              "--chat-template chatml") from None
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    stop = _stop_marker(tokenizer) if messages is not None else None
    stream = _Stream(tokenizer, out, stop)
    torch.manual_seed(settings.seed)
    extra = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        model.generate(**enc, **settings.kwargs(), **extra, streamer=stream, pad_token_id=pad)
    return stream._visible().strip()


def require_template(tokenizer: Any, name: str, otherwise: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{name}: the tokenizer has no chat template; pass --chat-template chatml (or a Jinja "
                          f"template), or {otherwise}")


def chat(model: Any, tokenizer: Any, settings: GenerationSettings, system: str = "", inp: TextIO = sys.stdin,
         out: TextIO = sys.stdout, name: str = "") -> int:
    """The conversation loop: one line per user turn."""
    require_template(tokenizer, name, "use `automodel generate --raw` for plain text")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"chat with {name} ({HELP})\n")
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:  # Ctrl-D / end of input
            out.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, settings, out)
        messages.append({"role": "assistant", "content": answer})
