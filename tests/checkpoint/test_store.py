"""checkpoint/store.py's layout rules, on directories alone (no model): pruning that a kill cannot leave half-done."""

import json

from automodel.checkpoint import store


def committed(out, step, keep_last=2):
    tmp = store.prepare(out, step)
    (tmp / "train_state.json").write_text(json.dumps({"step": step}))
    (tmp / "weights.bin").write_bytes(b"x" * 100)
    return store.commit(out, step, keep_last)


def test_pruning_renames_before_deleting_and_clears_what_a_killed_prune_left(tmp_path):
    out = tmp_path / "run"
    for step in (1, 2):
        committed(out, step)
    # A run killed half-way through deleting step 0 left this behind: never listed, and gone at the next prune.
    leftover = store.checkpoints_dir(out) / f"step_000000{store.PRUNING}"
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"x")
    assert [p.name for p in store.complete_checkpoints(out)] == ["step_000001", "step_000002"]
    committed(out, 3)
    assert [p.name for p in store.complete_checkpoints(out)] == ["step_000002", "step_000003"]
    assert sorted(p.name for p in store.checkpoints_dir(out).iterdir()) == ["latest", "step_000002", "step_000003"]
