"""Each optimizer through a whole run from its config: the quickstart (2 layers, 40 steps) learns, the start-up says
which optimizer updates what, and a checkpoint holds its state's tables."""

import pytest
from safetensors.torch import load_file

import automodel
from tests.helpers import quickstart

# The optimizer's overrides -> a table of its checkpointed state, and what the start-up line says.
CASES = {
    "muon": (["optim.name=muon"], "momentum", "Muon on the hidden matrices (lr 0.02), AdamW on the rest (lr 0.003)"),
    "adafactor": (["optim.name=adafactor", "optim.lr=1e-1"], "row_var", "Adafactor, factored second moment"),
    "soap": (["optim.name=soap", "optim.betas=[0.95,0.95]"], "bases", "SOAP, eigenbases refreshed every 10 steps"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_quickstart_learns_with_each_optimizer_and_checkpoints_its_state(tmp_path, capsys, name):
    """Measured (eval loss from 5.51 after 40 steps): AdamW 2.92, Muon 2.45, Adafactor 2.20, SOAP 3.80 (its first
    step only gathers statistics). bench/bench_optim.py compares them over longer runs."""
    overrides, table, line = CASES[name]
    result = automodel.train(quickstart(tmp_path, *overrides, "model.config.num_hidden_layers=2",
                                        "train.max_steps=40", "schedule.warmup_steps=5", "train.eval_every=0",
                                        "eval.generate_samples=0", "checkpoint.every=40"))
    assert result.metrics["eval_loss"] < 0.8 * result.metrics["eval_loss_at_start"]
    assert f"optimizer: {line}" in capsys.readouterr().out
    state = load_file(result.output_dir / "checkpoints" / "step_000040" / f"{table}.safetensors")
    assert state and all(t.abs().sum() > 0 for t in state.values())  # every tensor's state was updated
    if name == "muon":  # the hidden matrices, and only they, have Muon momentum
        assert set(state) == {k for k in state if ".layers." in k and k.endswith("proj.weight")} and len(state) == 14
