"""Shared fixtures. Data under ../shared/data is for tests only: read in place, never copied; tests that
need it skip (saying why) where the folder is absent, as in a user's fresh clone."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it exists only beside the developers' checkout)")
    return SHARED_DATA


@pytest.fixture
def etth1_csv(shared_data) -> Path:
    path = shared_data / "ETT-small" / "ETTh1.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The session gets its own MAMBAKIT_HOME so that no test reads or writes the user's cache (compiled
    kernels are shared by the session's tests). Tests of the cache itself set their own with monkeypatch."""
    old = os.environ.get("MAMBAKIT_HOME")
    os.environ["MAMBAKIT_HOME"] = str(tmp_path_factory.mktemp("mambakit_home"))
    yield
    if old is None:
        os.environ.pop("MAMBAKIT_HOME", None)
    else:
        os.environ["MAMBAKIT_HOME"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _gpus_seen_by_this_process() -> bool:
    """The CUDA driver reads CUDA_VISIBLE_DEVICES once per process, at its first query: ask here, before any test
    hides the GPUs from the processes it starts (below), so that this process keeps them for the GPU tests."""
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cpu_only_unless_marked_gpu(request, monkeypatch, _gpus_seen_by_this_process):
    """The suite asserts CPU behaviour (bitwise-repeatable kernels, runs with `train.device: auto`), as CI and a
    laptop see it; on a machine with a GPU those runs would move to it. So every test not marked `gpu` sees no
    GPU: torch.cuda.is_available() is False in this process and CUDA_VISIBLE_DEVICES is empty for the processes
    it starts. The GPU's own behaviour is tested by the `gpu` tests (tests/*/test_*_cuda.py, the compiled
    Triton kernels), against float64 on the CPU."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


# Tests compare runs with each other: the thread count must not follow what else the machine runs
# (mambakit.runtime.configure_threads; its own tests set the variable themselves).
os.environ.setdefault("MAMBAKIT_THREADS", "keep")
