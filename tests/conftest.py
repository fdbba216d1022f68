"""Test setup: Triton runs through its interpreter on CPU (set before triton is imported;
export TRITON_INTERPRET=0 on a GPU machine to compile the kernels). Tests marked ``cuda``
need a GPU and are skipped without one."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from seeding import SEED_ENV  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_env(monkeypatch):
    """Each test starts with the automatic backend choice."""
    monkeypatch.delenv("AVFAST_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _print_module_seed(request):
    """A test of a module with a drawn ``SEED`` prints it (pytest shows it with a failure)."""
    seed = getattr(request.module, "SEED", None)
    if isinstance(seed, int):
        print(f"{SEED_ENV}={seed} (the module's SEED)")
