import os
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing here may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised-data caches of this test session stay in a temporary directory (subprocesses inherit it).
os.environ["AUTOMODEL_CACHE"] = tempfile.mkdtemp(prefix="automodel-test-cache-")

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
