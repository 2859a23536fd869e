"""The DeepSpeed backend on 2 CPU processes: agreement with the functional backend, export, resume, bf16."""

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import module_eval_loss
from tests import helpers

pytestmark = pytest.mark.slow  # every test here starts processes or trains a whole run

pytest.importorskip("deepspeed")

QUIET = ["logging.progress_bar=\"off\"", "eval.at_start=false", "eval.generate_samples=0", "data.validation.limit=16"]
# 1 rank x 4 accumulation x 8 (the reference) == 2 ranks x 2 accumulation x 8.
AGREE = QUIET + ["train.max_steps=4", "train.log_every=1", "schedule.warmup_steps=1", "train.global_batch_size=32",
                 "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = helpers.launch_run("python", AGREE + [f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name, launcher, overrides", [
    ("functional", "deepspeed", []),  # the functional backend under the deepspeed launcher (torchrun: test_functional_ranks)
    ("zero0", "deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=0"]),
    # Activation checkpointing on the engine's module changes nothing either.
    ("zero2", "deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=2",
                            "train.activation_checkpointing=true"]),
    # ZeRO-3 with the loss in chunks of 16 tokens: the ranks' batches need different numbers of chunks, and the
    # head's weight is still gathered once per forward and backward on every rank (one call of the head module).
    ("zero3", "deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                            "train.activation_checkpointing=true", "train.loss_chunk_tokens=16"]),
    ("zero3-offload", "deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                    "distributed.offload_optimizer=cpu", "distributed.offload_params=cpu"]),
])
def test_two_ranks_match_the_single_process_functional_run(reference, tmp_path, name, launcher, overrides):
    out = tmp_path / name
    proc = helpers.launch_run(launcher, AGREE + overrides + [f"output_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "(2 accumulation x 8 per rank)" in proc.stdout
    ref = helpers.train_losses(reference)
    got = helpers.train_losses(out)
    assert list(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-5)
    assert helpers.eval_losses(out) == pytest.approx(helpers.eval_losses(reference), rel=1e-5)

    # The final export is the full model, gathered (under ZeRO-3 from shards) onto rank 0.
    exported = load_file(out / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert set(exported) == set(expected)
    for key, tensor in expected.items():
        assert exported[key].shape == tensor.shape, key
        # After 4 AdamW steps: an element whose gradient is near zero turns a last-bit difference of reduction order
        # into a visible one (Adam divides by sqrt(v)); 1.3e-5 on 1 of 49,152 ZeRO-3 elements was seen.
        torch.testing.assert_close(exported[key], tensor, rtol=1e-4, atol=3e-5)
    if name == "zero3":  # and it reloads with the eval loss the trainer reported
        assert reload_eval_loss(out) == pytest.approx(helpers.eval_losses(out)[-1], rel=1e-5)


def test_deepspeed_in_one_plain_process_matches_too(reference, tmp_path):
    """`python launch/run.py` with backend = "deepspeed": no launcher, one rank, 4 accumulation steps; and with
    train.compile, the engine's module runs compiled decoder layers (the reference is eager)."""
    out = tmp_path / "one"
    proc = helpers.launch_run("python", AGREE + ["distributed.backend=deepspeed", "distributed.zero_stage=2",
                                                 "train.compile=true", "checkpoint.save_final=false",
                                                 f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 rank(s), deepspeed (ZeRO-2) backend" in proc.stdout
    assert "compile: 4 decoder layers compiled" in proc.stdout
    assert list(helpers.train_losses(out).values()) == pytest.approx(list(helpers.train_losses(reference).values()),
                                                                    rel=1e-5)


def reload_eval_loss(run_dir):
    """Eval loss of <run>/final loaded with AutoModelForCausalLM, on the run's own validation set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automodel.config import load_config

    cfg = load_config(run_dir / "config.toml", world_size=1)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return module_eval_loss(model, cfg.data, cfg.train.micro_batch_size, AutoTokenizer.from_pretrained(run_dir / "final"))


RESUME = QUIET + ["train.log_every=1", "schedule.kind=constant", "schedule.warmup_steps=0",
                  "checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.save_final=false",
                  "distributed.backend=deepspeed", "optim.lr=1e-3"]


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, stage):
    common = RESUME + [f"distributed.zero_stage={stage}"]
    whole = tmp_path / "whole"
    proc = helpers.launch_run("deepspeed", common + ["train.max_steps=8", f"output_dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Kill -9 a long run at a random moment once its first checkpoint is complete: mid-step, mid-evaluation or in
    # the middle of writing, hashing or committing a checkpoint (docs/reliability.md: more trials, measured).
    cut = tmp_path / "cut"
    victim = helpers.launch_start("deepspeed", common + ["train.max_steps=8", f"output_dir={cut}"])
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step_000002" / "COMPLETE").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 2.5))
    try:
        os.killpg(victim.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished
        pass
    victim.wait()
    newest = max(int(p.name[5:]) for p in (cut / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert 2 <= newest <= 8
    # Debris a crash can leave: a half-written checkpoint and one never marked complete.
    shutil.copytree(cut / "checkpoints" / f"step_{newest:06d}", cut / "checkpoints" / ".tmp-step_000010")
    shutil.copytree(cut / "checkpoints" / f"step_{newest:06d}", cut / "checkpoints" / "step_000012")
    (cut / "checkpoints" / "step_000012" / "COMPLETE").unlink()

    proc = helpers.launch_run("deepspeed", common + ["train.max_steps=8", f"output_dir={cut}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints' / f'step_{newest:06d}'} at step {newest}" in proc.stdout
    whole_losses, cut_losses = helpers.train_losses(whole), helpers.train_losses(cut)
    assert list(cut_losses) == list(range(1, 9))  # every step once: a redone step is not logged twice
    assert [cut_losses[s] for s in range(1, 9)] == [whole_losses[s] for s in range(1, 9)]  # identical
    assert helpers.eval_losses(cut)[-1] == helpers.eval_losses(whole)[-1]
    kept = sorted(p.name for p in (cut / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert kept[-2:] == ["step_000006", "step_000008"] and len(kept) == 2
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_000008"


# Stage 1 runs DeepSpeed's stage-1-and-2 optimizer as stage 2 does (with unpartitioned gradients): 2 and 3 cover
# both code paths (the fp32 comparisons above run every stage).
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_on_stages_2_and_3_follows_the_float32_run_within_bfloat16_precision(reference, tmp_path, stage):
    """bf16 weights and activations with DeepSpeed's fp32 master weights: each step's loss is the float32 reference
    run's (the functional backend, one process, same batches) to bf16 precision (measured: within 2.4e-3, eval 6e-4),
    and eval agrees likewise. A step that lost its update or its scale would be off by a whole step's change (0.3-0.6
    here)."""
    out = tmp_path / f"bf16-{stage}"
    proc = helpers.launch_run("deepspeed", AGREE + ["model.dtype=bfloat16", "distributed.backend=deepspeed",
                                                    f"distributed.zero_stage={stage}", "checkpoint.save_final=false",
                                                    f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = helpers.train_losses(out), helpers.train_losses(reference)
    assert list(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(ref.values()), abs=1e-2)
    assert helpers.eval_losses(out) == pytest.approx(helpers.eval_losses(reference), abs=1e-2)


def test_shipped_cpu_twin_of_llm_toml_runs(tmp_path):
    from tests.helpers import shared_data

    shared_data("squad-v1.1/dev-v1.1.json")  # the config reads ../shared/data
    out = tmp_path / "llm_cpu"
    cmd = helpers.command("deepspeed") + ["launch/run.py", "--config", "configs_toml/llm_cpu.toml", "train.max_steps=3",
                                         "schedule.warmup_steps=1", "data.train.limit=64", "data.validation.limit=8",
                                         "eval.generate_samples=2", "logging.progress_bar=\"off\"", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed (ZeRO-3) backend" in proc.stdout and "exact match" in proc.stdout
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoints" / "step_000003").is_dir()
    # DeepSpeed's CPU shared-memory all-reduce was set up (66 MiB of /dev/shm per rank) and nothing of it is left.
    assert "deepspeed_shm_comm_op built successfully" in proc.stdout + proc.stderr
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_lora_under_zero3_matches_functional_lora_and_saves_the_whole_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["peft.rank=4", 'peft.target_modules=["*_proj"]', "optim.lr=1e-2"]
    functional, zero3 = tmp_path / "functional", tmp_path / "zero3"
    proc = helpers.launch_run("python", AGREE + lora + [f"output_dir={functional}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = helpers.launch_run("deepspeed", AGREE + lora + ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                                   f"output_dir={zero3}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Adapters only: r (in + out) summed over 4 layers x (q, k, v, o: 128 -> 128; gate, up: 128 -> 384; down).
    assert "(40,960 trainable)" in proc.stdout
    assert list(helpers.train_losses(zero3).values()) == pytest.approx(
        list(helpers.train_losses(functional).values()), rel=1e-5)

    # Gathered from 2 ranks, the adapter holds full-size tensors, equal to the single-process ones.
    got = load_file(zero3 / "final" / "adapter_model.safetensors")
    want = load_file(functional / "final" / "adapter_model.safetensors")
    assert set(got) == set(want) and len(got) == 4 * 7 * 2
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and 4 in tensor.shape, key
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-5)
    assert any(torch.count_nonzero(t) for k, t in got.items() if "lora_B" in k)  # trained, not placeholders

    # PeftModel.from_pretrained(base, adapter) reproduces the eval loss the trainer reported.
    base = AutoModelForCausalLM.from_pretrained(zero3 / "base")
    model = PeftModel.from_pretrained(base, zero3 / "final").eval()
    from transformers import AutoTokenizer

    from automodel.config import load_config

    cfg = load_config(zero3 / "config.toml", world_size=2)
    loss = module_eval_loss(model, cfg.data, cfg.train.micro_batch_size, AutoTokenizer.from_pretrained(zero3 / "final"))
    assert loss == pytest.approx(helpers.eval_losses(zero3)[-1], rel=1e-5)


def test_shipped_lora_twin_on_a_pretrained_base_under_zero3(tmp_path):
    """llm_lora_cpu.toml as shipped: a pretrained base loaded partitioned (ZeRO-3), LoRA, merged export."""
    from tests.helpers import shared_data, tiny_llama
    from transformers import AutoTokenizer

    gpt2 = shared_data("gpt2-tokenizer")
    base = tmp_path / "base"
    tiny_llama(vocab_size=50257, max_position_embeddings=384).save_pretrained(base)
    AutoTokenizer.from_pretrained(gpt2).save_pretrained(base)
    out = tmp_path / "lora"
    cmd = helpers.command("deepspeed") + ["launch/run.py", "--config", "configs_toml/llm_lora_cpu.toml",
                                         f"model.name_or_path={base}", "train.max_steps=3", "schedule.warmup_steps=1",
                                         "data.train.limit=32", "data.validation.limit=8", "eval.generate_samples=2",
                                         "logging.progress_bar=\"off\"", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PeftModelForCausalLM" in proc.stdout and "deepspeed (ZeRO-3) backend" in proc.stdout
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(8 in t.shape for t in adapter.values())  # rank 8, full size
    merged = load_file(out / "final_merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()
    changed = [k for k in original if not torch.equal(merged[k], original[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only adapted weights moved


def test_streamed_data_resumes_exactly_under_deepspeed(tmp_path):
    """The stream position rides through the engine's steps and its checkpoints as through the functional
    backend's: the run resumed from its step-2 checkpoint (a copy without the later one) has the uninterrupted
    run's losses."""
    common = RESUME + ["distributed.zero_stage=2", "data.train.streaming=true", "data.packing=true",
                       "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = helpers.launch_run("python", common + [f"output_dir={whole}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step_000004")  # as if stopped after step 2's checkpoint
    proc = helpers.launch_run("python", common + [f"output_dir={parts}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stream resumed after 32 training rows" in proc.stdout
    assert (parts / "checkpoints" / "step_000004" / "stream" / "rank_00000.json").is_file()
    assert helpers.train_losses(parts) == helpers.train_losses(whole) and len(helpers.train_losses(whole)) == 4


# QLoRA: LoRA on an nf4 base (built from config, saved in float32, loaded back quantised), on every backend.
QLORA = AGREE + ["model.quantization=nf4", "peft.rank=8", "peft.alpha=16.0", 'peft.target_modules=["all-linear"]',
                 "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def qlora_reference(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    runs = {}
    for optim in ("adamw", "adamw8bit"):
        out = tmp_path_factory.mktemp(f"qlora-{optim}")
        proc = helpers.launch_run("python", QLORA + [f"optim.name={optim}", f"output_dir={out}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[optim] = out
    return runs


@pytest.mark.parametrize("stage, optim, rel", [
    (2, "adamw", 1e-5), (3, "adamw", 1e-5),
    # 8-bit states per tensor, as the functional backend keeps them: ZeRO-0 hands bitsandbytes whole tensors.
    (0, "adamw8bit", 1e-5),
    # ZeRO-2 hands it flat partitions, so quantisation blocks span tensors: close, not equal.
    (2, "adamw8bit", 1e-3),
])
def test_qlora_under_deepspeed_matches_the_functional_backend(qlora_reference, tmp_path, stage, optim, rel):
    out = tmp_path / f"zero{stage}-{optim}"
    proc = helpers.launch_run("deepspeed", QLORA + [f"optim.name={optim}", "distributed.backend=deepspeed",
                                                    f"distributed.zero_stage={stage}", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "base: 28 linear layers quantised by bitsandbytes, nf4" in proc.stdout
    reference = qlora_reference[optim]
    got, ref = helpers.train_losses(out), helpers.train_losses(reference)
    assert list(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=rel)
    assert helpers.eval_losses(out) == pytest.approx(helpers.eval_losses(reference), rel=rel)
    exported = load_file(out / "final" / "adapter_model.safetensors")
    expected = load_file(reference / "final" / "adapter_model.safetensors")
    assert set(exported) == set(expected) and len(expected) == 2 * 4 * 7
    for key, tensor in expected.items():
        # As above: Adam turns last-bit differences of reduction order into visible ones where gradients are near 0
        # (and 8-bit states in other blocks round differently: 1-3% on some lora_B after 4 steps at lr 1e-2, varying
        # run to run): compared as a whole tensor.
        assert ((exported[key] - tensor).norm() / tensor.norm()).item() < (1e-4 if rel == 1e-5 else 0.1), key
