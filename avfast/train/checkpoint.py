"""Atomic checkpoints with everything an exact resume needs.

A checkpoint holds the model and optimizer/scheduler states, the position (epoch, batch in
the epoch, global step), every random generator's state and the run's settings. It is
written to a temporary file in the same folder and renamed over the old one, so a crash
while saving never loses the previous checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "avfast-checkpoint-1"


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (if present) the current CUDA device's
    generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | os.PathLike, **payload: Any) -> Path:
    """Write ``payload`` atomically to ``path`` (with this process's generator states under
    ``rng`` unless the payload brings its own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": FORMAT, "rng": rng_state(), **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (loaded on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: expected a file written by avfast train, got {os.fspath(path)!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint: expected format {FORMAT!r}, got {found!r} in {os.fspath(path)!r} "
                         "(upstream checkpoints load with --pretrained instead)")
    return ckpt
