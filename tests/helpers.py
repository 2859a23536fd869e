"""Everything the tests share: paths and data, tiny models and batches, the quickstart config, preference pairs,
processors for the VLM tests, and starting runs in subprocesses (python, torchrun, the deepspeed launcher). Test modules import from
here, never from each other."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from automodel.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file under ../shared/data, or a skip that says why."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs the shared test data at {path} (absent on this machine)")
    return path


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**fields), attn_implementation="sdpa")


def random_batch(n: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """n rows of random tokens, ragged lengths (right padding), the first third of each row masked as prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, : length // 3] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def split_batch(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def module_eval_loss(model: torch.nn.Module, data_cfg, batch_size: int, tokenizer) -> float:
    """The token-weighted eval loss of a loaded model (plain module forward, no automodel step) on the
    validation set that `data_cfg` describes: the reference that reported eval losses must match."""
    from automodel.data import build, collate, eval_batches
    from automodel.loss import token_cross_entropy

    _, val = build(data_cfg, tokenizer, use_cache=False)
    total = count = 0
    model.eval()
    with torch.no_grad():
        for idx in eval_batches(val, batch_size):
            b = collate(val, idx, tokenizer.pad_token_id)
            s, n = token_cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                       b["labels"])
            total, count = total + s.item(), count + n.item()
    return total / count


# ---------------------------------------------------------------------------------------------
# The quickstart config, pointed at its assets from any working directory

QUICKSTART = REPO / "configs_toml" / "quickstart.toml"
ASSETS = REPO / "examples" / "quickstart"


def quickstart(tmp_path, *overrides):
    return load_config(QUICKSTART, [
        f"output_dir={json.dumps(str(tmp_path / 'run'))}",
        f"tokenizer.name_or_path={json.dumps(str(ASSETS / 'tokenizer'))}",
        f"data.train.source={json.dumps(str(ASSETS / 'train.jsonl'))}",
        f"data.validation.source={json.dumps(str(ASSETS / 'validation.jsonl'))}",
        "logging.progress_bar=\"off\"", "schedule.warmup_steps=2", *overrides], world_size=1)


TRAINED_QUICKSTART = "trained_quickstart"  # under the session's shared directory: the run, and its .done/.failed


def train_shared_quickstart(root: str) -> None:
    """The conftest's trained_quickstart: trains configs_toml/quickstart.toml's model under `root`, then writes the
    final directory to trained_quickstart.done, or what went wrong to trained_quickstart.failed."""
    import traceback

    import automodel

    root_dir = Path(root)
    try:
        result = automodel.train(quickstart(root_dir / TRAINED_QUICKSTART, "schedule.warmup_steps=50",
                                            "eval.generate_samples=100", "eval.at_start=false", "train.eval_every=0",
                                            "checkpoint.every=0"))
        if result.metrics["exact_match"] < 0.95:
            raise AssertionError(f"exact match {result.metrics['exact_match']} < 0.95")
    except BaseException:
        (root_dir / f"{TRAINED_QUICKSTART}.failed").write_text(traceback.format_exc())
        raise
    (root_dir / f"{TRAINED_QUICKSTART}.tmp").write_text(str(result.final_dir))
    os.replace(root_dir / f"{TRAINED_QUICKSTART}.tmp", root_dir / f"{TRAINED_QUICKSTART}.done")  # whole, or absent


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# VLM: processors of four kinds built locally, a tiny LLaVA, real formula images

def chat_template(image: str) -> str:
    """role tags, the image part as `image`, answers closed by EOS."""
    return ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}{{ '" + image + "' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
            "{{ eos_token if m['role'] == 'assistant' else '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def tiny_processor(tmp_path: Path, texts: list[str]):
    """A LlavaProcessor: SigLIP PIL image processor (32x32, 16 patches -> 16 image tokens) and a byte-level
    tokenizer with an <image> token and a chat template; saved and reloaded through AutoProcessor."""
    from transformers import AutoProcessor, LlavaProcessor, SiglipImageProcessorPil

    from automodel.models import byte_level_tokenizer

    tok = byte_level_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    proc = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                          patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=chat_template("<image>"))
    proc.save_pretrained(tmp_path / "processor")
    return AutoProcessor.from_pretrained(tmp_path / "processor")


def llava_next_processor(tmp_path: Path, texts: list[str]):
    """LLaVA-NeXT's any-resolution tiling: an image's token count depends on its size."""
    from transformers import AutoProcessor, LlavaNextImageProcessorPil, LlavaNextProcessor

    from automodel.models import byte_level_tokenizer

    tok = byte_level_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    proc = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8, num_additional_image_tokens=0,
                              vision_feature_select_strategy="full", chat_template=chat_template("<image>"))
    proc.save_pretrained(tmp_path / "llava_next")
    return AutoProcessor.from_pretrained(tmp_path / "llava_next")


def gemma3_processor(tmp_path: Path, texts: list[str]):
    """Gemma 3's: <start_of_image> becomes blank lines around begin/soft/end image tokens; images per prompt."""
    from transformers import AutoProcessor, AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    from automodel.models import byte_level_tokenizer

    tok = byte_level_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]})
    tok.save_pretrained(tmp_path / "gemma3_tokenizer")
    tok = AutoTokenizer.from_pretrained(tmp_path / "gemma3_tokenizer", extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                           image_seq_length=4, chat_template=chat_template("<start_of_image>"))
    proc.save_pretrained(tmp_path / "gemma3")
    return AutoProcessor.from_pretrained(tmp_path / "gemma3")


def idefics3_processor(tmp_path: Path, texts: list[str]):
    """Idefics3 (SmolVLM): an image splits into a grid of tiles, each framed by row/column tokens."""
    from transformers import AutoProcessor, Idefics3ImageProcessorPil, Idefics3Processor

    from automodel.models import byte_level_tokenizer

    tok = byte_level_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                             chat_template=chat_template("<image>"))
    proc.save_pretrained(tmp_path / "idefics3")
    return AutoProcessor.from_pretrained(tmp_path / "idefics3")


def tiny_llava(processor, seed: int = 0):
    from transformers import AutoModelForImageTextToText, LlavaConfig

    cfg = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(processor.tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg)


def im2latex_rows(n: int) -> list[dict]:
    root = shared_data("im2latex-sample")
    formulas = (root / "formulas.lst").read_text(encoding="latin-1").splitlines()
    rows = []
    for line in (root / "train.lst").read_text().splitlines():
        index, name, _ = line.split()
        if formulas[int(index)].strip() and len(formulas[int(index)]) < 60:
            rows.append({"image": str(root / "images" / f"{name}.png"), "question": "LaTeX:",
                         "answer": formulas[int(index)].strip()})
        if len(rows) == n:
            return rows
    return rows


# ---------------------------------------------------------------------------------------------
# Preference tuning: pairs, a policy some way from its reference, sets built from token ids

PAIRS = [
    {"prompt": "Reverse: abc\n", "chosen": "cba", "rejected": "abc"},
    {"prompt": "Reverse: hello\n", "chosen": "olleh", "rejected": "olelh"},
    {"prompt": "Reverse: xy\n", "chosen": "yx", "rejected": "xyxyxy"},
    {"prompt": "Reverse: moon\n", "chosen": "noom", "rejected": "moon"},
]


def preference_tokenizer(chat: bool = False):
    """The quickstart's byte-level tokenizer (259 tokens), with ChatML when asked."""
    from transformers import AutoTokenizer

    from automodel.data import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    if chat:
        tok.chat_template = CHAT_TEMPLATES["chatml"]
    return tok


def policy_and_reference() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A reference and a policy some way from it (so log-ratios, rewards and KTO's KL are not zero)."""
    import copy

    reference = tiny_llama(vocab_size=259, seed=0)
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, reference


def frozen_copy(model: torch.nn.Module):
    """A frozen copy of `model` as the preference loss's reference (FrozenModel)."""
    import copy

    from automodel.training.teacher import FrozenModel, local_head_weights

    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FrozenModel(model, lambda inputs: model(**inputs), torch.float32, local_head_weights(model))


def preference_set(rows: list[tuple[list[int], list[int]]], kind: str = "pairs", desirable=None):
    """Rows of (prompt ids, completion ids) in data/preference.py's order (pair i: rows 2i, 2i + 1)."""
    import numpy as np

    from automodel.data import preference
    from automodel.data.token_store import Rows
    from automodel.loss import IGNORE_INDEX

    ids = Rows.from_lists([p + c for p, c in rows])
    labels = Rows.labels_of(ids, [[IGNORE_INDEX] * len(p) + c for p, c in rows])
    return preference.PreferenceSet(ids, labels, None if desirable is None else np.array(desirable), "test",
                                    len(rows) // 2, 0, 0, 0, 0, kind)


def tokenize_pairs(rows: list[dict], fmt: str = "preference", tok=None, **data):
    """`rows` (preference or kto) tokenised as the recipe tokenises them (no cache)."""
    import datasets

    from automodel.config import DataConfig, DataSourceConfig
    from automodel.data import FormatOptions
    from automodel.data import preference

    tok = tok or preference_tokenizer()
    cfg = DataConfig(**{"seq_len": 512, **data}, train=DataSourceConfig(source="rows.jsonl", format=fmt))
    return preference.tokenize_rows(datasets.Dataset.from_list(rows), cfg.train[0], cfg, tok,
                                    FormatOptions(tokenizer=tok), "train", kto=fmt == "kto")


# ---------------------------------------------------------------------------------------------
# Runs in subprocesses: `deepspeed --num_gpus 2` (CPU: 2 processes, gloo), torchrun, or plain python

# DeepSpeed compiles a small shared-memory op on first use; keep it between tests and runs.
EXTENSIONS = REPO / "build" / "torch_extensions"
BIN = Path(sys.executable).parent


def wait_for_line(proc, pattern, timeout=240):
    """Reads the process's output until a line matches; returns everything read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"no line matched {pattern!r}:\n" + "".join(seen)[-3000:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "PYTHONUNBUFFERED": "1"}


def command(launcher: str, nproc: int = 2) -> list[str]:
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())]
    return [sys.executable]


def launch_run(launcher: str, overrides: list[str], nproc: int = 2, config: str = "configs_toml/quickstart.toml",
               **popen) -> subprocess.CompletedProcess:
    cmd = command(launcher, nproc) + ["launch/run.py", "--config", config, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, **popen)


def launch_start(launcher: str, overrides: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = command(launcher, nproc) + ["launch/run.py", "--config", "configs_toml/quickstart.toml", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def eval_losses(run_dir: Path) -> list[float]:
    return [r["eval_loss"] for r in rows(run_dir) if "eval_loss" in r]
