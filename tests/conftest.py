"""Test-wide setup: offline hub, deterministic CPU, shared fixtures.

Every test runs offline (HF_HUB_OFFLINE=1) on the `tiny` model: no network, no GPU.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # notebook kernels too: tiny's ops are microseconds

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the tiny model is fastest single-threaded, and pixels match notebook kernels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
