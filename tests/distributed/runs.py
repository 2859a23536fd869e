"""What the DeepSpeed tests share (tests/distributed/test_deepspeed*.py): their marks and overrides."""

import importlib.util

import pytest

# Slow (every test starts processes); skipped without deepspeed, which is found, not imported: importing it (and the
# mlflow it imports) would cost the collection 5 s.
DEEPSPEED_TESTS = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                        reason="deepspeed is not installed")]

QUIET = ["logging.progress_bar=\"off\"", "eval.at_start=false", "eval.generate_samples=0", "data.validation.limit=16"]
# 1 rank x 4 accumulation x 8 (the reference) == 2 ranks x 2 accumulation x 8.
AGREE = QUIET + ["train.max_steps=4", "train.log_every=1", "schedule.warmup_steps=1", "train.global_batch_size=32",
                 "train.micro_batch_size=8"]
