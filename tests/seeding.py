"""Seeds for tests that draw random data: fresh by default, fixed by ``AVFAST_TEST_SEED``.

Each call prints the seed (pytest shows it with a failure) so that
``AVFAST_TEST_SEED=<seed> pytest tests/...::test_x`` replays the failing draw."""

from __future__ import annotations

import os

import torch

SEED_ENV = "AVFAST_TEST_SEED"


def fresh_seed() -> int:
    """Seeds torch's global generator and returns the seed."""
    fixed = os.environ.get(SEED_ENV)
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"{SEED_ENV}={seed}")
    return seed


def module_seed() -> int:
    """A test module's ``SEED`` constant (< 2**31): ``AVFAST_TEST_SEED`` when set, else
    fresh. conftest prints it in every test of a module that has one, so a failure shows
    the value that replays it."""
    fixed = os.environ.get(SEED_ENV)
    return (int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")) % 2**31
