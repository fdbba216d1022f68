"""What each sample takes from its clip: frame indices, crop, flip, audio windows, partner.

A plan depends only on (seed, epoch, index), the preset and the clips' metadata, never on the
path that decodes it, so the CPU path and the DALI path draw identical samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from avfast.data.presets import Preset, VideoSpec

RESIZED_CROP_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class ClipInfo:
    """Decodable extent of one clip: video geometry and rate, audio length at the preset rate."""

    width: int
    height: int
    fps: float
    num_frames: int
    audio_samples: int
    start_s: float = 0.0
    end_s: float | None = None


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """One sample: T frame indices, crop (top, left, height, width) in source pixels, flip,
    the clip whose audio is used (``audio_index``; another class's clip for a background
    pair) and its window starts in samples (one per audio segment)."""

    index: int
    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]
    flip: bool
    audio_index: int
    audio_starts: tuple[int, ...]
    background: bool = False


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch``: the same on every path and worker."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop(height: int, width: int, spec: VideoSpec,
                        rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area in ``spec.train_scale``, log-uniform
    aspect ratio in ``spec.train_ratio``, ten attempts, then a centred box of clamped ratio."""
    area = height * width
    log_lo, log_hi = math.log(spec.train_ratio[0]), math.log(spec.train_ratio[1])
    draws = rng.random((RESIZED_CROP_ATTEMPTS, 4))
    for scale_u, ratio_u, top_u, left_u in draws:
        target = area * (spec.train_scale[0] + scale_u * (spec.train_scale[1] - spec.train_scale[0]))
        ratio = math.exp(log_lo + ratio_u * (log_hi - log_lo))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(top_u * (height - h + 1)), int(left_u * (width - w + 1)), h, w
    ratio = width / height
    if ratio < spec.train_ratio[0]:
        w, h = width, round(width / spec.train_ratio[0])
    elif ratio > spec.train_ratio[1]:
        h, w = height, round(height * spec.train_ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def eval_crop(height: int, width: int, spec: VideoSpec) -> tuple[int, int, int, int]:
    """The evaluation box: a centred square of ``eval_crop_fraction`` of the shorter side,
    or the whole frame."""
    if spec.eval_crop_fraction is None:
        return 0, 0, height, width
    side = max(1, min(round(min(height, width) * spec.eval_crop_fraction), height, width))
    return (height - side) // 2, (width - side) // 2, side, side


def audio_window_starts(info: ClipInfo, preset: Preset, train: bool,
                        rng: np.random.Generator) -> tuple[int, ...]:
    """Window starts in samples: one random (train) or centred window, or ``segments`` starts
    spread uniformly from the clip start to ``end - window - margin``."""
    spec = preset.audio
    rate = spec.sample_rate
    first = round(info.start_s * rate)
    last = info.audio_samples if info.end_s is None else min(info.audio_samples, round(info.end_s * rate))
    length = spec.window_samples
    if spec.segments > 1:
        stop = max(first, last - length - round(spec.segment_margin_s * rate))
        return tuple(int(s) for s in np.linspace(first, stop, spec.segments).round())
    slack = max(0, last - first - length)
    offset = int(rng.integers(0, slack + 1)) if train else slack // 2
    return (first + offset,)


def frame_indices(info: ClipInfo, preset: Preset, audio_start: int, train: bool,
                  rng: np.random.Generator) -> tuple[int, ...]:
    """Frame indices: T uniformly over the clip, or one inside the audio window (random time
    when training, the window centre otherwise)."""
    spec, rate = preset.video, preset.audio.sample_rate
    first = max(0, math.ceil(info.start_s * info.fps - 1e-6))
    last = info.num_frames - 1
    if info.end_s is not None:
        last = min(last, math.ceil(info.end_s * info.fps - 1e-6) - 1)
    last = max(first, last)
    if spec.sampling == "uniform":
        return tuple(int(i) for i in np.linspace(first, last, spec.frames).round())
    span = min(preset.audio.window_s, max(0.0, (info.audio_samples - audio_start) / rate))
    offsets = rng.random(spec.frames) * span if train else np.full(spec.frames, span / 2)
    times = audio_start / rate + offsets
    return tuple(int(min(max(math.floor(t * info.fps), first), last)) for t in times)


class BackgroundPartners:
    """Indices of clips sharing no label with a given clip (background pairs for MA-AVT)."""

    def __init__(self, labels: Sequence[Sequence[int]]):
        self._labels = [frozenset(ls) for ls in labels]
        self._by_label: dict[int, np.ndarray] = {}
        for label in sorted({lab for ls in self._labels for lab in ls}):
            self._by_label[label] = np.array([i for i, ls in enumerate(self._labels) if label in ls])

    def draw(self, index: int, rng: np.random.Generator) -> int:
        """A uniformly drawn clip sharing no label with clip ``index``."""
        own = self._labels[index]
        excluded = np.zeros(len(self._labels), dtype=bool)
        for label in own:
            excluded[self._by_label[label]] = True
        candidates = np.flatnonzero(~excluded)
        if candidates.size == 0:
            raise ValueError(f"background_p: needs a clip of another class than clip {index} "
                             f"(labels {sorted(own)}), found none")
        return int(candidates[rng.integers(candidates.size)])


def plan_sample(index: int, infos: Sequence[ClipInfo], preset: Preset, *, train: bool,
                seed: int, epoch: int, background_p: float = 0.0,
                partners: BackgroundPartners | None = None) -> SamplePlan:
    """The plan of sample ``index`` in ``epoch`` (``infos[i]`` gives clip i's ClipInfo)."""
    rng = sample_rng(seed, epoch, index)
    background = bool(train and background_p > 0 and rng.random() < background_p)
    audio_index = index
    if background:
        if partners is None:
            raise ValueError("partners: expected BackgroundPartners when background_p > 0, got None")
        audio_index = partners.draw(index, rng)
    info = infos[index]
    audio_info = infos[audio_index]
    starts = audio_window_starts(audio_info, preset, train, rng)
    if background:  # the frame time follows the clip's own (unused) audio window
        own_start = audio_window_starts(info, preset, train, rng)[0]
    else:
        own_start = starts[0]
    frames = frame_indices(info, preset, own_start, train, rng)
    spec = preset.video
    if train and spec.train_random_crop:
        crop = random_resized_crop(info.height, info.width, spec, rng)
    else:
        crop = eval_crop(info.height, info.width, spec)
    flip = bool(train and spec.train_flip and rng.random() < 0.5)
    return SamplePlan(index, frames, crop, flip, audio_index, starts, background)


class InfoLookup:
    """Sequence-like ``ClipInfo`` per manifest clip, computed on first use and cached."""

    def __init__(self, count: int, compute):
        self._count = count
        self._compute = compute
        self._cache: dict[int, ClipInfo] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> ClipInfo:
        info = self._cache.get(index)
        if info is None:
            info = self._cache[index] = self._compute(index)
        return info


def check_sample_rates(manifest, sample_rate: int) -> None:
    """Raise when prepared audio has a lower rate than the preset reads (upsampling would
    give features with an empty top band, silently)."""
    low = sorted({c.sample_rate for c in manifest.clips if c.sample_rate and c.sample_rate < sample_rate})
    if low:
        raise ValueError(f"manifest: the preset reads audio at {sample_rate} Hz, got clips prepared at "
                         f"{low} Hz; prepare them again with `avfast prepare --sample-rate {sample_rate}`")


def manifest_infos(manifest, sample_rate: int) -> InfoLookup:
    """ClipInfo of every clip of ``manifest``: its metadata when complete (a prepared
    manifest), else probed from the files (raises ``media.MediaError`` for unreadable ones)."""
    from avfast.data import media

    def compute(index: int) -> ClipInfo:
        clip = manifest[index]
        fields = (clip.width, clip.height, clip.fps, clip.num_frames, clip.duration)
        if any(f is None for f in fields):
            video = media.probe(manifest.resolve(clip.path))
            if video.fps is None or video.num_frames is None:
                raise media.MediaError(manifest.resolve(clip.path), "no video track")
            audio = video if clip.audio_path is None else media.probe(manifest.resolve(clip.audio_path))
            fields = (video.width, video.height, video.fps, video.num_frames, audio.duration)
        width, height, fps, num_frames, duration = fields
        return ClipInfo(int(width), int(height), float(fps), int(num_frames),
                        round(duration * sample_rate), clip.start, clip.end)

    return InfoLookup(len(manifest), compute)


def epoch_indices(count: int, *, train: bool, seed: int, epoch: int, shard_id: int,
                  num_shards: int) -> np.ndarray:
    """This shard's indices for ``epoch``. Training: a seeded permutation, padded by
    wrapping around so every shard gets ceil(count / num_shards) (like DistributedSampler:
    ranks must step together). Evaluation: every clip once, in order, shards of unequal
    length (no clip is scored twice)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id: expected 0 <= shard_id < num_shards={num_shards}, got {shard_id}")
    if not train:
        return np.arange(count)[shard_id::num_shards]
    order = np.random.default_rng([seed, epoch]).permutation(count)
    per_shard = -(-count // num_shards)
    order = np.resize(order, per_shard * num_shards)
    return order[shard_id::num_shards]
