"""FLOPs for MFU: a hand count on a tiny model (full and LoRA), real sequence lengths (padded and packed rows), and
1 rank against 2 doing the same work per rank."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from automodel.config import load_config
from automodel.data import build
from automodel.models import FlopModel, build_model, build_tokenizer, flop_model
from tests.helpers import REPO, tiny_llama, write_jsonl

# tiny_llama: hidden 32, 4 heads of 8 (2 key/value heads: k and v project to 16), MLP 64, 2 layers, vocab 64, untied.
PER_LAYER = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k, v, o, gate/up/down = 9,216
HEAD = 64 * 32


def test_full_fine_tuning_counts_6_per_weight_entry_and_leaves_the_embedding_out():
    flops = flop_model(tiny_llama())
    assert flops == FlopModel(matmul_per_token=6.0 * (2 * PER_LAYER + HEAD), attention_per_token_pair=12.0 * 2 * 32)


def test_lora_counts_4_per_frozen_entry_and_6_per_adapter_entry():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # per layer: q (A 4x32, B 32x4), v (A 4x32, B 16x4)
    assert adapters == sum(p.numel() for p in model.parameters() if p.requires_grad) == 896
    flops = flop_model(model)
    assert flops.matmul_per_token == 6.0 * 896 + 4.0 * (2 * PER_LAYER + HEAD) == 87_296
    assert flops.attention_per_token_pair == 768


def test_a_batch_counts_each_sequence_with_its_real_length():
    flops = FlopModel(matmul_per_token=100.0, attention_per_token_pair=10.0)
    padded = {"input_ids": torch.zeros(2, 6, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])}
    assert flops.of_batch(padded) == 100 * 8 + 10 * (5 ** 2 + 3 ** 2)
    # A packed row of samples of 3, 2 and 4 tokens then 1 of padding (its positions continue from 0): attention does
    # not cross samples, so 3^2 + 2^2 + 4^2, not 9^2.
    packed = {"input_ids": torch.zeros(1, 10, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 9 + [0]]),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])}
    assert flops.of_batch(packed) == 100 * 9 + 10 * (9 + 4 + 16)


@pytest.mark.slow
def test_one_and_two_ranks_doing_the_same_work_per_rank_log_the_same_flops_per_device(tmp_path):
    """Every sample has the same length, so each rank's micro-batches cost the same FLOPs: a 2-rank run with twice the
    global batch does per device what the 1-rank run does, and must log the same FLOPs per step per device (MFU x step
    time x peak), where the old meter logged twice as much (tokens over all ranks against one device's peak)."""
    rows = [{"instruction": f"Reverse: {chr(97 + i % 26)}bcdef", "output": f"fedcb{chr(97 + i % 26)}"}
            for i in range(256)]
    data = write_jsonl(tmp_path / "same_length.jsonl", rows)
    common = ["launch/run.py", "--config", "configs_toml/quickstart.toml", "train.max_steps=4", "train.log_every=2",
              "train.micro_batch_size=8", "schedule.warmup_steps=1", "eval.at_start=false", "eval.generate_samples=0",
              f'data.train.source="{data}"', f'data.validation.source="{data}"', "data.validation.limit=8",
              "checkpoint.save_final=false", "logging.peak_tflops=1.0", f"data.cache_dir={tmp_path / 'cache'}"]
    runs = {1: [sys.executable, *common, "train.global_batch_size=16", f"output_dir={tmp_path / 'one'}"],
            2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                "train.global_batch_size=32", f"output_dir={tmp_path / 'two'}"]}
    per_device = {}
    for ranks, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = tmp_path / ("one" if ranks == 1 else "two")
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in logged if "loss" in r]
        assert [r["step"] for r in logged] == [2, 4]
        for r in logged:  # MFU is TFLOP/s per device over the configured 1 TFLOP/s peak
            assert r["mfu"] == pytest.approx(r["tflops"] / 1.0, rel=1e-9)
        per_device[ranks] = [r["mfu"] * 1e12 * r["ms_per_step"] / 1000 for r in logged]  # FLOPs per step per device
    assert per_device[2] == pytest.approx(per_device[1], rel=1e-6)
    # ... and equal the formula: 16 samples of t tokens per step per device, 6N (nothing frozen) and 12 L d t^2.
    cfg = load_config(REPO / "configs_toml" / "quickstart.toml", [f'data.train.source="{data}"',
                                                                   f'data.validation.source="{data}"'])
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.model)
    train_set, _ = build(cfg.data, tokenizer, use_cache=False)
    [t] = {len(ids) for ids in train_set.input_ids}
    counts = flop_model(build_model(cfg.model, tokenizer, cfg.seed))
    expected = counts.matmul_per_token * 16 * t + counts.attention_per_token_pair * 16 * t * t
    assert per_device[1][0] == pytest.approx(expected, rel=1e-6)
