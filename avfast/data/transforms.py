"""Batched steps shared by the CPU and DALI paths: frame crop/resize/normalise, audio
windows, features. Device-agnostic torch: on CUDA tensors they run on the GPU."""

from __future__ import annotations

import collections
import logging
import math
from typing import Sequence

import torch

from avfast.data.presets import Preset

log = logging.getLogger("avfast.data")

MIN_AUDIO_FRACTION = 0.5


def resize_weights(n_in: int, start: float, end: float, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of a linear resize of the source span [start, end)
    (end < start mirrors) to n_out pixels: a triangle filter widened to the scale when
    shrinking (antialiasing), reading past the span's ends, replicating the image's edge
    pixels. This is DALI's ``fn.resize`` (INTERP_LINEAR, antialias) with a ROI."""
    scale = (end - start) / n_out
    radius = max(1.0, abs(scale))
    centres = start + (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = math.floor(min(start, end) - radius - 1)
    hi = math.ceil(max(start, end) + radius + 1)
    taps = torch.arange(lo, hi)
    w = (1 - (centres[:, None] - (taps + 0.5)[None, :]).abs() / radius).clamp_min(0)
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    out.index_add_(1, taps.clamp(0, n_in - 1), w / w.sum(1, keepdim=True))
    return out


def crop_resize_frames(frames: torch.Tensor, crop: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, size, size, 3): the box (top, left, h, w) resized
    linearly with antialiasing and mirrored when ``flip``, as DALI's resize does it with the
    same ROI (see ``resize_weights``), so the two paths agree to +-1."""
    top, left, h, w = crop
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise ValueError(f"crop: expected a box inside {(height, width)}, got {tuple(crop)}")
    rows = resize_weights(height, top, top + h, size)
    cols = resize_weights(width, left + w, left, size) if flip else resize_weights(width, left, left + w, size)
    out = torch.einsum("oh,thwc,pw->topc", rows.float(), frames.float(), cols.float())
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize_frames(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): x / 255, minus ``mean``, over ``std``."""
    x = frames.float().div_(255.0).movedim(-1, -3)
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    return x.sub_(m).div_(s)


def gather_windows(wave: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, length: int,
                   pad: str = "zero", offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Audio windows: wave (B, N) float holding each clip's ``lengths`` (B,) samples from
    ``offsets`` (B,) on (default 0), window ``starts`` (B, K) relative to the clip ->
    (B, K, length). Positions past a clip's end continue by ``pad``: zeros, the clip
    repeated (``tile``), or the clip and its mirror alternating (``mirror``)."""
    if wave.dim() != 2:
        raise ValueError(f"wave: expected (B, N), got {tuple(wave.shape)}")
    if pad not in ("zero", "tile", "mirror"):
        raise ValueError(f"pad: expected 'zero', 'tile' or 'mirror', got {pad!r}")
    n = lengths.to(wave.device, torch.long).clamp_min(1).view(-1, 1, 1)
    pos = starts.to(wave.device, torch.long).unsqueeze(-1) + torch.arange(length, device=wave.device)
    inside = pos < n
    if pad == "tile":
        pos = pos % n
    elif pad == "mirror":
        phase = pos % (2 * n)
        pos = torch.where(phase < n, phase, 2 * n - 1 - phase)
    if offsets is not None:
        pos = pos + offsets.to(wave.device, torch.long).view(-1, 1, 1)
    pos = pos.clamp(0, wave.shape[1] - 1)
    out = torch.gather(wave.unsqueeze(1).expand(-1, pos.shape[1], -1), 2, pos)
    if pad == "zero":
        out = out * inside
    return out * (lengths.to(wave.device).view(-1, 1, 1) > 0)


def audio_features(windows: torch.Tensor, preset: Preset) -> torch.Tensor:
    """(B, K, samples) windows -> the preset's features: (B, *frontend shape) for one window,
    (B, K, *frontend shape) for K segments; the windows themselves without a front-end."""
    frontend = preset.audio.frontend
    if frontend is None:
        return windows if windows.shape[1] > 1 else windows[:, 0]
    b, k, n = windows.shape
    feats = frontend(windows.reshape(b * k, n))
    feats = feats.reshape(b, k, *feats.shape[1:])
    return feats if k > 1 else feats[:, 0]


def bad_audio_rows(wave: torch.Tensor, lengths: torch.Tensor, needed: int,
                   bad_audio: str) -> tuple[torch.Tensor, collections.Counter]:
    """Rows of wave (B, N) to keep and the reasons for the others: fewer than half of
    ``needed`` samples ("too short"; callers pass min(window, 1 s), since presets pad
    shorter clips by design) or all zeros ("silent"); ``bad_audio='pad'`` keeps every row."""
    keep = torch.ones(wave.shape[0], dtype=torch.bool, device=wave.device)
    if bad_audio == "pad":
        return keep, collections.Counter()
    short = lengths.to(wave.device) < MIN_AUDIO_FRACTION * needed
    silent = wave.abs().amax(dim=1) == 0 if wave.shape[1] else keep
    reasons = collections.Counter({"too short": int(short.sum()), "silent": int((silent & ~short).sum())})
    return ~(short | silent), +reasons


def label_fields(manifest):
    """index -> label tensors of a clip: ``label`` (int64), ``targets`` (multi-hot float32,
    for multi-label manifests), ``segment_labels`` (int64 (S,), when every clip has them)."""
    multi = any(len(c.labels) > 1 for c in manifest.clips)
    segments = bool(manifest.clips) and all(c.segment_labels is not None for c in manifest.clips)

    def fields(index: int) -> dict:
        clip = manifest[index]
        out = {"label": torch.tensor(clip.labels[0] if clip.labels else -1, dtype=torch.long)}
        if multi:
            targets = torch.zeros(len(manifest.classes))
            targets[list(clip.labels)] = 1.0
            out["targets"] = targets
        if segments:
            out["segment_labels"] = torch.tensor(clip.segment_labels, dtype=torch.long)
        return out

    return fields


def log_skipped(epoch: int, counts: collections.Counter) -> None:
    """Log an epoch's skipped clips by reason (nothing when none were skipped)."""
    if counts:
        log.warning("epoch %d: skipped %d clips (%s)", epoch, sum(counts.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def min_audio_samples(preset: Preset) -> int:
    """The ``needed`` of ``bad_audio_rows``: one window or one second, the shorter."""
    return min(preset.audio.window_samples, preset.audio.sample_rate)
