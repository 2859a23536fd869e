"""Muon, Adafactor and SOAP under DeepSpeed: at ZeRO-0 in float32 the engine steps the model's own weights, whole, with
the functional backend's optimizer (optim/as_torch.py); ZeRO 1-3 and low precision are refused in one line
(tests/optim/test_muon.py). Two ranks of the engine agree with the functional backend in one process, and the engine's
checkpoint of the optimizer's state resumes exactly."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests import helpers
from tests.distributed.runs import AGREE, DEEPSPEED_TESTS

pytestmark = DEEPSPEED_TESTS

ZERO0 = ["distributed.backend=deepspeed", "distributed.zero_stage=0"]
OPTIMIZERS = {
    "muon": ["optim.name=muon"],
    "adafactor": ["optim.name=adafactor", "optim.lr=0.1"],
    # Bases refreshed every 2 steps, so that the 4 steps (and the resumed half) refresh them from the statistics.
    "soap": ["optim.name=soap", "optim.soap_precondition_frequency=2"],
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero0_ranks_match_the_functional_ranks_and_resume_from_the_engines_checkpoint_exactly(tmp_path, name):
    """Weight decay at 0.5, so that an update that skipped it would be off by 1% of the weights a step."""
    common = AGREE + OPTIMIZERS[name] + ["optim.weight_decay=0.5", "checkpoint.every=2", "checkpoint.keep_last=2"]
    reference, engine, resumed = tmp_path / "functional", tmp_path / "zero0", tmp_path / "resumed"
    proc = helpers.launch_run("torchrun", common + [f"output_dir={reference}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = helpers.launch_run("torchrun", common + ZERO0 + [f"output_dir={engine}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s), deepspeed (ZeRO-0) backend" in proc.stdout

    # Against the functional backend on 2 ranks (the same split of the batch): steps 2-4 see updates 1-3, equal to
    # float32 rounding (measured: <= 1.1e-7 with the recomputing loss, <= 2.8e-6 with the fused one, whose chunk
    # gradients take the step's 1/N after their products, and the two backends' 1/N differ in the last bit, which
    # Muon amplifies, below); a wrong rate, schedule, decay or clipping is off by far more (a step changes the loss by
    # 0.1-0.5 here).
    ref, got = helpers.train_losses(reference), helpers.train_losses(engine)
    assert list(got) == [1, 2, 3, 4]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-5)
    # Not compared to that precision: the weights after the 4th update. Muon and SOAP amplify a last-bit difference
    # of the gradient (the two backends sum the ranks' gradients in another order): Muon's Newton-Schulz iteration
    # lifts the gradient's near-zero singular directions to full size, SOAP's first Adam step in the eigenbasis is a
    # step of +-lr on components at rounding level. Measured: eval loss after the 4th update within 1.6e-4, final
    # weights 1.3% (SOAP) and 0.15% (Muon) apart in Frobenius norm; one process against two ranks of the functional
    # backend differ as much.
    assert helpers.eval_losses(engine) == pytest.approx(helpers.eval_losses(reference), rel=1e-3)

    # Resumed from the engine's step-2 checkpoint (a copy without the later one): the optimizer's state (momentum,
    # factored moments, SOAP's statistics and bases) and its count come back, so steps 3-4 are the same bits.
    shutil.copytree(engine, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    proc = helpers.launch_run("torchrun", common + ZERO0 + [f"output_dir={resumed}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step_000002'} at step 2" in proc.stdout
    assert helpers.train_losses(resumed) == got
    exported, again = (load_file(d / "final" / "model.safetensors") for d in (engine, resumed))
    assert set(again) == set(exported) and all(torch.equal(again[k], exported[k]) for k in exported)
