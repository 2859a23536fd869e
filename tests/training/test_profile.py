"""logging.profile_steps: a trace of the chosen steps that Perfetto and TensorBoard's profiler plugin read."""

import json

import pytest

import automodel
from tests.helpers import quickstart

pytestmark = pytest.mark.slow  # trains a (short) run


def test_profile_steps_write_one_chrome_trace_of_those_steps(tmp_path, capsys):
    result = automodel.train(quickstart(tmp_path, "train.max_steps=4", "eval.at_start=false",
                                        "data.validation.limit=4", "logging.profile_steps=[2, 3]"))
    [trace] = (result.output_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names)  # operators of the step (forward, backward, optimizer)
    assert any("backward" in n.lower() for n in names)
    spans = [e for e in events if e.get("ph") == "X"]
    assert spans and all("ts" in e and "dur" in e for e in spans)
    # The asked steps, and only those, each a span; the step's work (its backward, its optimizer) inside them.
    steps = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in spans if e["name"].startswith("step ")}
    assert sorted(steps) == ["step 2", "step 3"]
    assert steps["step 2"][1] <= steps["step 3"][0]
    work = [e for e in spans if e["name"].startswith("aten::") and e["dur"] > 0]
    for name, (start, end) in steps.items():
        inside = [e for e in work if start <= e["ts"] and e["ts"] + e["dur"] <= end]
        assert len(inside) > 100, name  # hundreds of operators per step of even the quickstart model
    assert any("backward" in e["name"].lower() and steps["step 3"][0] <= e["ts"] <= steps["step 3"][1]
               for e in spans)
    assert f"profile: steps 2-3 traced to {trace}" in capsys.readouterr().out
