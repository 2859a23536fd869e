"""Test-session set-up: nothing reaches the hub, tokenised-data caches stay in a temporary directory. Shared
helpers live in tests/helpers.py."""

import os
import tempfile

# Nothing here may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised-data caches of this test session stay in a temporary directory (subprocesses inherit it).
os.environ["AUTOMODEL_CACHE"] = tempfile.mkdtemp(prefix="automodel-test-cache-")
