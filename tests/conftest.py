"""Test-session set-up: nothing reaches the hub, tokenised-data caches stay in a temporary directory. Shared
helpers live in tests/helpers.py."""

import os
import tempfile

import pytest

# Nothing here may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised-data caches of this test session stay in a temporary directory (subprocesses inherit it).
os.environ["AUTOMODEL_CACHE"] = tempfile.mkdtemp(prefix="automodel-test-cache-")


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory):
    """configs_toml/quickstart.toml's model as it ships (~100% exact match on reversing strings, ~65 s): a
    distillation teacher, the base of configs_toml/qlora_cpu.toml."""
    import automodel
    from tests import helpers

    out = tmp_path_factory.mktemp("trained_quickstart")
    result = automodel.train(helpers.quickstart(out, "schedule.warmup_steps=50", "eval.generate_samples=100",
                                                "eval.at_start=false",
                                                "train.eval_every=0", "checkpoint.every=0"))
    assert result.metrics["exact_match"] >= 0.95
    return result.final_dir
