"""Shared test setup: keep Hugging Face libraries offline, and give tests the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model or dataset hub; without these, `datasets` tries the network first.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist every core already runs a worker: intra-op threads on top of that only make
# the processes (the workers and the trainings they start, which inherit this) wait for each
# other. Torch reads this when it is first imported, which no test module has done yet.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """The longest tests first, so that no worker starts one near the end while the others sit
    idle: those with a longer timeout than the suite's (the quickstart), then the other slow
    tests, then the rest, each group in its collected order."""
    default_timeout = float(config.getini("timeout") or 0)

    def rank(item) -> int:
        marker = item.get_closest_marker("timeout")
        if marker and marker.args and float(marker.args[0]) > default_timeout:
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the directory holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="module")
def runtime():
    """megatron parallel state for one process (TP=PP=DP=1), torn down after the module."""
    from distributed import free_port
    from megatron_vlm.runtime import initialize, shutdown

    os.environ["MASTER_PORT"] = str(free_port())
    info = initialize(1, 1, seed=7)
    yield info
    shutdown()


@pytest.fixture(scope="module")
def cuda_runtime():
    """megatron parallel state for one process on the current GPU (tests/gpu, marker ``gpu``):
    fails, not skips, without a GPU, since the GPU check exists to prove that path."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a visible CUDA device")
    from distributed import free_port
    from megatron_vlm.runtime import initialize, shutdown

    os.environ["MASTER_PORT"] = str(free_port())
    info = initialize(1, 1, seed=3, device="cuda")
    assert info.device.type == "cuda" and not info.cpu_mode
    yield info
    shutdown()


@pytest.fixture(scope="module")
def transformer_engine(cuda_runtime):
    """Transformer Engine on the GPU machine (its absence fails the TE tests)."""
    from megatron_vlm.runtime import has_transformer_engine

    assert has_transformer_engine(), "Transformer Engine must import on the GPU machine"
    return True
