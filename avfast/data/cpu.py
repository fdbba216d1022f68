"""The CPU path: PyAV decoding and torch front-ends in DataLoader workers.

Samples follow ``avfast.data.sampling`` plans, so for the same (seed, epoch, index) they
equal the DALI path's up to the decoders' and resizers' rounding.
"""

from __future__ import annotations

import collections
from typing import Iterator, Literal

import numpy as np
import torch

from avfast.data import media
from avfast.data.manifest import Manifest
from avfast.data.presets import Preset, get_preset
from avfast.data.sampling import (BackgroundPartners, SamplePlan, check_sample_rates, epoch_indices,
                                   manifest_infos, plan_sample)
from avfast.data.transforms import (audio_features, bad_audio_rows, crop_resize_frames,
                                    gather_windows, label_fields, log_skipped, min_audio_samples,
                                    normalize_frames)

MAX_REPLACEMENTS = 16  # readable clips tried in place of an unreadable one when training


class ClipDataset(torch.utils.data.Dataset):
    """Samples of ``manifest`` as the preset describes, decoded with PyAV.

    Item i is a dict: ``frames`` float32 (T, 3, S, S) normalised (uint8 (T, S, S, 3) with
    ``features=False``), ``audio`` the preset's features (raw windows (K, samples) with
    ``features=False``), label fields, ``index``, ``audio_index``, ``background``,
    ``skipped``: the reasons of the clips that could not be read for it, and ``unreadable``:
    (clip index, reason, message) of each of them. A clip that cannot
    be read (``bad_audio='pad'`` keeps silent/short audio, zero-padded) is replaced when
    training by the next readable clip (i + 1, i + 2, ...; batches keep their size, which
    DDP ranks need), and left out when evaluating (no clip counts twice); an item with no
    ``frames`` holds only ``skipped``. Call ``set_epoch`` to draw new random crops/times.
    """

    def __init__(self, manifest: Manifest, preset: str | Preset, *, train: bool, seed: int = 0,
                 background_p: float = 0.0, bad_audio: Literal["skip", "pad"] = "skip",
                 features: bool = True):
        if not 0.0 <= background_p <= 1.0:
            raise ValueError(f"background_p: expected a probability in [0, 1], got {background_p}")
        if bad_audio not in ("skip", "pad"):
            raise ValueError(f"bad_audio: expected 'skip' or 'pad', got {bad_audio!r}")
        self.manifest = manifest
        self.preset = get_preset(preset)
        self.train, self.seed, self.epoch = train, seed, 0
        self.background_p, self.bad_audio, self.features = background_p, bad_audio, features
        check_sample_rates(manifest, self.preset.audio.sample_rate)
        self.infos = manifest_infos(manifest, self.preset.audio.sample_rate)
        self.partners = BackgroundPartners([c.labels for c in manifest.clips]) if background_p > 0 else None
        self._labels = label_fields(manifest)

    def __len__(self) -> int:
        return len(self.manifest)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, index: int) -> SamplePlan:
        return plan_sample(index, self.infos, self.preset, train=self.train, seed=self.seed,
                           epoch=self.epoch, background_p=self.background_p, partners=self.partners)

    def decode(self, plan: SamplePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (T, S, S, 3) and audio windows (K, samples) of a plan."""
        spec = self.preset.audio
        clip = self.manifest[plan.index]
        frames = media.decode_frames(self.manifest.resolve(clip.path), plan.frame_indices)
        frames = crop_resize_frames(frames, plan.crop, self.preset.video.size, plan.flip)
        partner = self.manifest[plan.audio_index]
        offset = round(partner.start * spec.sample_rate)
        duration = None if partner.end is None else partner.end - partner.start
        wave = media.decode_audio(self.manifest.resolve(partner.audio_path or partner.path),
                                  sample_rate=spec.sample_rate, start=partner.start, duration=duration)
        length = torch.tensor([wave.numel()])
        keep, reasons = bad_audio_rows(wave.unsqueeze(0), length, min_audio_samples(self.preset), self.bad_audio)
        if not bool(keep[0]):
            raise media.MediaError(partner.audio_path or partner.path, next(iter(reasons)))
        starts = torch.tensor([[s - offset for s in plan.audio_starts]])
        windows = gather_windows(wave.unsqueeze(0), length, starts, spec.window_samples, spec.pad)
        return frames, windows[0]

    def load(self, index: int) -> tuple[SamplePlan, torch.Tensor, torch.Tensor]:
        """Plan and decode clip ``index``; MediaError (with the reason) when it cannot be used."""
        clip = self.manifest[index]
        try:
            plan = self.plan(index)
            return (plan, *self.decode(plan))
        except OSError as err:
            raise media.MediaError(clip.path, "unreadable", str(err)) from err
        except ValueError as err:  # e.g. frames of another size than the manifest says
            raise media.MediaError(clip.path, "inconsistent with the manifest", str(err)) from err

    def __getitem__(self, index: int) -> dict:
        skipped, unreadable = [], []
        for attempt in range(min(len(self), MAX_REPLACEMENTS + 1) if self.train else 1):
            try:
                plan, frames, windows = self.load((index + attempt) % len(self))
                break
            except media.MediaError as err:
                skipped.append(err.reason)
                unreadable.append(((index + attempt) % len(self), err.reason, str(err)))
        else:
            return {"skipped": skipped, "unreadable": unreadable}
        index = plan.index
        if self.features:
            frames = normalize_frames(frames, self.preset.video.mean, self.preset.video.std)
            windows = audio_features(windows.unsqueeze(0), self.preset)[0]
        return {"frames": frames, "audio": windows, "index": torch.tensor(index),
                "audio_index": torch.tensor(plan.audio_index),
                "background": torch.tensor(plan.background), **self._labels(index), "skipped": skipped,
                "unreadable": unreadable}


def collate(samples: list[dict]) -> dict:
    """Stack the samples that have data; ``skipped`` maps reason -> count of unreadable clips,
    ``unreadable`` lists (clip index, reason, message) of each."""
    skipped = collections.Counter(r for s in samples for r in s["skipped"])
    good = [s for s in samples if "frames" in s]
    lists = ("skipped", "unreadable")
    batch = {k: torch.stack([s[k] for s in good]) for k in (good[0] if good else {}) if k not in lists}
    batch["skipped"] = dict(skipped)
    batch["unreadable"] = [u for s in samples for u in s["unreadable"]]
    return batch


class CPULoader:
    """Batches from ``ClipDataset`` through a DataLoader with ``num_workers`` workers.

    Iterating yields dicts of tensors (on ``device`` if given) with a ``skipped`` dict; after
    each epoch ``skipped`` holds the epoch's counts by reason, which are also logged, and the
    epoch advances (``set_epoch`` sets it, e.g. when resuming). ``unreadable`` maps the index
    of every clip found unreadable so far to (reason, message).
    """

    def __init__(self, manifest: Manifest, preset: str | Preset, *, batch_size: int, train: bool,
                 num_workers: int = 0, seed: int = 0, background_p: float = 0.0,
                 bad_audio: Literal["skip", "pad"] = "skip", features: bool = True,
                 shard_id: int = 0, num_shards: int = 1, device: str | torch.device | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.dataset = ClipDataset(manifest, preset, train=train, seed=seed,
                                   background_p=background_p, bad_audio=bad_audio, features=features)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device = None if device is None else torch.device(device)
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self.unreadable: dict[int, tuple[str, str]] = {}

    def __len__(self) -> int:
        return -(-len(self._indices()) // self.batch_size)

    def _indices(self) -> np.ndarray:
        return epoch_indices(len(self.dataset), train=self.dataset.train, seed=self.dataset.seed,
                             epoch=self.epoch, shard_id=self.shard_id, num_shards=self.num_shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[dict]:
        """This epoch's batches from batch ``start`` on (a resumed run skips the ones it saw)."""
        self.dataset.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size,
            sampler=self._indices()[start * self.batch_size:].tolist(),
            num_workers=self.num_workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(self.dataset.seed + self.epoch),  # not the global RNG
            pin_memory=self.device is not None and self.device.type == "cuda")
        counts: collections.Counter = collections.Counter()
        for batch in loader:
            counts.update(batch["skipped"])
            self.unreadable.update({i: (reason, message) for i, reason, message in batch.pop("unreadable")})
            if "index" not in batch:
                continue
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
            yield batch
        self.skipped = dict(counts)
        log_skipped(self.epoch, counts)
        self.epoch += 1


class IndexedLoader:
    """Batches of ``dataset.load(index)`` dicts (tensors of equal shapes) through a DataLoader
    with ``num_workers`` workers, in ``epoch_indices`` order: a seeded permutation per epoch
    when training, every item once in order when evaluating; sharded for DDP. Items whose
    ``load`` raises (RuntimeError, OSError, ValueError, EOFError: a file that cannot be
    decoded) are left out of their batch (a batch left empty is skipped) and kept in
    ``unreadable`` {index: (reason, message)}; ``skipped``: the last epoch's counts by
    reason. ``dataset.set_epoch(epoch)``, where it exists, is called before each epoch. The
    interface of ``CPULoader`` (the downstream tasks' datasets use it).
    """

    def __init__(self, dataset, *, batch_size: int, train: bool, num_workers: int = 0, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1, device: str | torch.device | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size, self.train, self.num_workers, self.seed = batch_size, train, num_workers, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device = None if device is None else torch.device(device)
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self.unreadable: dict[int, tuple[str, str]] = {}

    def indices(self) -> np.ndarray:
        """This shard's item indices for the current epoch."""
        return epoch_indices(len(self.dataset), train=self.train, seed=self.seed, epoch=self.epoch,
                             shard_id=self.shard_id, num_shards=self.num_shards)

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[dict]:
        """This epoch's batches from batch ``start`` on."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            _Guarded(self.dataset), batch_size=self.batch_size,
            sampler=self.indices()[start * self.batch_size:].tolist(), num_workers=self.num_workers,
            collate_fn=_collate_guarded, pin_memory=self.device is not None and self.device.type == "cuda")
        skipped = 0
        for batch in loader:
            for index, message in batch.pop("unreadable"):
                self.unreadable[index] = ("unreadable", message)
                skipped += 1
            if "index" not in batch:
                continue
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield batch
        self.skipped = {"unreadable": skipped} if skipped else {}
        self.epoch += 1


class _Guarded(torch.utils.data.Dataset):
    """A dataset whose items that fail to load become {"unreadable": [(index, message)]}."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return {**self.dataset.load(index), "index": torch.tensor(index), "unreadable": []}
        except (RuntimeError, OSError, ValueError, EOFError) as err:
            return {"unreadable": [(index, f"{type(err).__name__}: {err}")]}


def _collate_guarded(items: list[dict]) -> dict:
    good = [item for item in items if "index" in item]
    batch = {k: torch.stack([item[k] for item in good]) for k in (good[0] if good else {}) if k != "unreadable"}
    batch["unreadable"] = [u for item in items for u in item["unreadable"]]
    return batch
