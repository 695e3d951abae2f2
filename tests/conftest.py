"""Shared fixtures: where CIFAR-10 is, and a quiet, deterministic torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _cifar_root() -> Path | None:
    for cand in (os.environ.get("HAWQ_DATA"), SHARED):
        if cand and ((Path(cand) / "cifar10" / "train").is_dir() or (Path(cand) / "cifar-10-batches-py").is_dir()):
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The CIFAR-10 root the tests read (HAWQ_DATA, else ../shared/datasets); skips when there is none."""
    root = _cifar_root()
    if root is None:
        pytest.skip("CIFAR-10 not available: set HAWQ_DATA to a folder holding cifar10/ or cifar-10-batches-py/")
    return root


@pytest.fixture(autouse=True)
def _seeded(monkeypatch):
    torch.manual_seed(0)
    # no test leaks the profile it declared (hawqlib.repro.paths.use_profile, which Study calls) into the next
    from hawqlib.repro import paths

    monkeypatch.setattr(paths, "_PROFILE_IN_USE", None)
    monkeypatch.delenv("HAWQ_PROFILE", raising=False)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: threads only cost on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


#: The devices device-sensitive tests run on: the CPU, and CUDA where torch sees a GPU (a skipped case
#: otherwise, never a failure for the lack of one). ``pytest.mark.parametrize("device", DEVICES)``.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device visible to torch"))]
