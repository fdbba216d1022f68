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


def random_audio(method: str, cfg, batch: int, frames: int) -> torch.Tensor:
    """Random audio input of a method's model: DeepAVFusion (batch, 1, mels, frames),
    STG-CMA (batch, T, Ft, M) fbank, DG-SCT (batch, T, samples) waveforms."""
    if method == "deepavfusion":
        return torch.randn(batch, 1, *cfg.audio_size)
    if method == "stgcma":
        return torch.randn(batch, frames, cfg.audio_frames, cfg.num_mel_bins)
    return torch.randn(batch, frames, cfg.sample_rate) * 0.1
