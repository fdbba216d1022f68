"""Atomic checkpoints with everything an exact resume needs, safe to kill at any moment.

A checkpoint holds the model and optimizer/scheduler states, the position (epoch, batch in
the epoch, global step), every random generator's state and the run's settings, all as
tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.

Writing never leaves a broken ``path``: the payload goes to a temporary file in the same
folder, the current ``path`` is hard-linked to ``<path>.prev`` (the previous good one), and
the temporary file is renamed over ``path``. A process killed at any point leaves ``path``
and ``<path>.prev`` each either complete or absent (plus, at worst, a stale temporary file
that the next run removes).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "avfast-checkpoint-1"
PREVIOUS = ".prev"  # suffix of the previous good checkpoint kept beside each one


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, garbage, or not avfast's)."""


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (if present) the current CUDA device's
    generators, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value):
    """Python's generator state with its nested tuples (a loaded copy may hold lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of ``path`` left behind by a writer that was killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def save_checkpoint(path: str | os.PathLike, *, keep_previous: bool = True, **payload: Any) -> Path:
    """Write ``payload`` atomically to ``path`` (with this process's generator states under
    ``rng`` unless the payload brings its own); ``keep_previous``: keep the file it
    replaces as ``<path>.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "rng": rng_state(), **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            link = path.with_name(f".{path.name}.prev-tmp-{os.getpid()}")
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, path.with_name(path.name + PREVIOUS))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (loaded on the CPU, weights_only=True).
    Raises FileNotFoundError for a missing file and CheckpointError, naming the file, for
    one that cannot be read."""
    shown = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: expected a file written by avfast train, got {shown!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, garbage bytes, foreign pickles
        size = os.path.getsize(path)
        detail = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint: {shown!r} ({size} bytes) cannot be read: "
                              f"{type(err).__name__}: {detail}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint: expected format {FORMAT!r}, got {found!r} in {shown!r} "
                              "(upstream checkpoints load with --pretrained instead)")
    return ckpt


def load_newest_good(path: str | os.PathLike, *, keep_corrupt: bool = True
                     ) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """``--resume auto``: the checkpoint at ``path`` or, when that cannot be read, at
    ``<path>.prev``. Returns (checkpoint or None, the file it came from, what was wrong
    with each file passed over). With ``keep_corrupt`` (one process of a run) a file that
    cannot be read is renamed to ``<name>.corrupt``: kept, and never overwritten by the
    next save."""
    path = Path(path)
    problems = []
    for candidate in (path, path.with_name(path.name + PREVIOUS)):
        if not candidate.is_file():
            continue
        try:
            return load_checkpoint(candidate), candidate, problems
        except CheckpointError as err:
            if not keep_corrupt:
                problems.append(str(err))
                continue
            kept = candidate.with_name(candidate.name + ".corrupt")
            os.replace(candidate, kept)
            problems.append(f"{err} (moved to {kept.name})")
    return None, None, problems
