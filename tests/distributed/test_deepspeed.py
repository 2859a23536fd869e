"""The DeepSpeed backend on 2 CPU processes: agreement with the functional backend (ZeRO 0-3, offload, LoRA,
bf16), export, the shipped configs. Resume: test_deepspeed_resume.py; QLoRA: test_deepspeed_qlora.py."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import module_eval_loss
from tests import helpers
from tests.distributed.runs import AGREE, DEEPSPEED_TESTS

pytestmark = DEEPSPEED_TESTS



@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = helpers.launch_run("python", AGREE + [f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# The deepspeed launcher starts two interpreters of its own before the ranks (~9 s of CPU more than torchrun): it runs
# the functional and the ZeRO-3 case here and the shipped configs below; the others, and the tests of the engine
# elsewhere, start their ranks with torchrun, which sets the same rank variables.
@pytest.mark.parametrize("name, launcher, overrides", [
    ("functional", "deepspeed", []),  # the functional backend under the deepspeed launcher (torchrun: test_functional_ranks)
    ("zero0", "torchrun", ["distributed.backend=deepspeed", "distributed.zero_stage=0"]),
    # Activation checkpointing on the engine's module changes nothing either.
    ("zero2", "torchrun", ["distributed.backend=deepspeed", "distributed.zero_stage=2",
                           "train.activation_checkpointing=true"]),
    # ZeRO-3 with the loss in chunks of 16 tokens: the ranks' batches need different numbers of chunks, and the
    # head's weight is still gathered once per forward and backward on every rank (one call of the head module).
    ("zero3", "deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                            "train.activation_checkpointing=true", "train.loss_chunk_tokens=16"]),
    ("zero3-offload", "torchrun", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                   "distributed.offload_optimizer=cpu", "distributed.offload_params=cpu"]),
    # (Every case above takes the fused loss, the default: the head's gradient comes from the loss's forward and is
    # returned to the gathered weight in the backward.) The recomputing loss, under ZeRO-3 too.
    ("zero3-recompute", "torchrun", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                     "train.loss_chunk_tokens=16", "train.fused_loss=false"]),
])
def test_two_ranks_match_the_single_process_functional_run(reference, tmp_path, name, launcher, overrides):
    out = tmp_path / name
    proc = helpers.launch_run(launcher, AGREE + overrides + [f"output_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "(2 accumulation x 8 per rank)" in proc.stdout
    assert ("gradients in the forward (train.fused_loss)" in proc.stdout) != name.endswith("recompute")
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


# Stage 1 runs DeepSpeed's stage-1-and-2 optimizer as stage 2 does (with unpartitioned gradients): 2 and 3 cover
# both code paths (the fp32 comparisons above run every stage).
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_on_stages_2_and_3_follows_the_float32_run_within_bfloat16_precision(reference, tmp_path, stage):
    """bf16 weights and activations with DeepSpeed's fp32 master weights: each step's loss is the float32 reference
    run's (the functional backend, one process, same batches) to bf16 precision (measured: within 2.4e-3, eval 6e-4),
    and eval agrees likewise. A step that lost its update or its scale would be off by a whole step's change (0.3-0.6
    here)."""
    out = tmp_path / f"bf16-{stage}"
    proc = helpers.launch_run("torchrun", AGREE + ["model.dtype=bfloat16", "distributed.backend=deepspeed",
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
    proc = helpers.launch_run("torchrun", AGREE + lora + ["distributed.backend=deepspeed", "distributed.zero_stage=3",
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
