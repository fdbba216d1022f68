"""The GPU path: NVIDIA DALI decodes, samples and resizes; torch makes the features on the GPU.

Per batch: a Python source plans every sample (``avfast.data.sampling``, identical to the CPU
path) and hands DALI the encoded bytes; DALI decodes the planned frames (``mixed`` = NVDEC
on the GPU, ``cpu`` without a GPU: VP8/VP9/MJPEG only), crops+resizes+mirrors them in one
resize (a ROI whose x runs backwards mirrors), and decodes the prepared FLAC audio; the
waveforms go to the GPU, where ``transforms.gather_windows`` and the preset's front-end
turn them into features. The audio must be prepared (``avfast prepare``): DALI's audio
decoder reads wav/flac/ogg, not AAC inside mp4.
"""

from __future__ import annotations

import collections
from typing import Iterator, Literal

import numpy as np
import torch

from avfast.data import media
from avfast.data.manifest import Manifest
from avfast.data.presets import Preset, get_preset
from avfast.data.cpu import MAX_REPLACEMENTS, ClipDataset, collate
from avfast.data.sampling import (BackgroundPartners, check_sample_rates, epoch_indices, manifest_infos,
                                  plan_sample)
from avfast.data.transforms import (audio_features, bad_audio_rows, gather_windows, label_fields,
                                    log, log_skipped, min_audio_samples, normalize_frames)


def _dali():
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise ImportError("the DALI path needs NVIDIA DALI: pip install nvidia-dali-cuda130==2.4.0 "
                          "(or use avfast.data.CPULoader)") from err
    return dali


class _PlanSource:
    """DALI external source: this shard's samples from ``order`` (fixed when the pipeline is
    built), planned and read as bytes; ``made`` records, per batch handed to DALI, how many
    entries of ``order`` it used and the clips it holds (the loader pops one per batch)."""

    def __init__(self, loader: "DALILoader", order: list[int], epoch: int):
        self.loader, self.order, self.epoch = loader, order, epoch
        self.position = 0
        self.made: collections.deque[tuple[int, list[int]]] = collections.deque()

    def __iter__(self):
        return self

    def _read(self, index: int):
        """(plan, video bytes, audio bytes) of clip ``index``, or of the next readable clip
        when training (counted in ``pending_skips``); None when evaluating and unreadable."""
        ld = self.loader
        tries = min(len(ld.manifest), MAX_REPLACEMENTS + 1) if ld.train else 1
        for attempt in range(tries):
            i = (index + attempt) % len(ld.manifest)
            try:
                plan = plan_sample(i, ld.infos, ld.preset, train=ld.train, seed=ld.seed,
                                   epoch=self.epoch, background_p=ld.background_p, partners=ld.partners)
                clip, partner = ld.manifest[i], ld.manifest[plan.audio_index]
                video = np.fromfile(ld.manifest.resolve(clip.path), dtype=np.uint8)
                audio = np.fromfile(ld.manifest.resolve(partner.audio_path), dtype=np.uint8)
                return plan, video, audio
            except media.MediaError as err:
                ld.pending_skips[err.reason] += 1
                ld.unreadable[i] = (err.reason, str(err))
            except OSError as err:
                ld.pending_skips["unreadable"] += 1
                ld.unreadable[i] = ("unreadable", str(err))
        return None

    def __next__(self):
        ld = self.loader
        rate = ld.preset.audio.sample_rate
        columns = tuple([] for _ in range(8))
        first = self.position
        while self.position < len(self.order) and len(columns[0]) < ld.batch_size:
            read = self._read(self.order[self.position])
            self.position += 1
            if read is None:
                continue
            plan, video, audio = read
            top, left, h, w = plan.crop
            x0, x1 = (left + w, left) if plan.flip else (left, left + w)
            partner = ld.manifest[plan.audio_index]
            bounds = (round(partner.start * rate), -1 if partner.end is None else round(partner.end * rate))
            columns[0].append(video)
            columns[1].append(audio)
            columns[2].append(np.asarray(plan.frame_indices, dtype=np.int32))
            columns[3].append(np.array([top, x0], dtype=np.float32))
            columns[4].append(np.array([top + h, x1], dtype=np.float32))
            columns[5].append(np.array([plan.index, plan.audio_index, plan.background], dtype=np.int64))
            columns[6].append(np.asarray(plan.audio_starts, dtype=np.int64))
            columns[7].append(np.array(bounds, dtype=np.int64))
        if not columns[0]:
            raise StopIteration
        self.made.append((self.position - first, [int(m[0]) for m in columns[5]]))
        return columns


class DALILoader:
    """Batches of ``manifest`` (prepared: every clip has ``audio_path``) decoded by DALI.

    Yields the same dicts as ``CPULoader`` (``frames`` float32 (B, T, 3, S, S) normalised,
    ``audio`` features, label fields, ``index``, ``audio_index``, ``background``,
    ``skipped``), on ``cuda:device_id`` (on the CPU when ``device_id`` is None, for tests).
    With ``features=False`` ``frames`` stays uint8 (B, T, S, S, 3) and ``audio`` holds the
    windows (B, K, samples). Shards for torchrun with ``shard_id``/``num_shards``.
    ``unreadable`` maps the index of every clip found unreadable so far to (reason, message).
    """

    def __init__(self, manifest: Manifest, preset: str | Preset, *, batch_size: int, train: bool,
                 device_id: int | None = 0, num_threads: int = 4, seed: int = 0,
                 background_p: float = 0.0, bad_audio: Literal["skip", "pad"] = "skip",
                 features: bool = True, shard_id: int = 0, num_shards: int = 1, prefetch: int = 2):
        dali = _dali()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0.0 <= background_p <= 1.0:
            raise ValueError(f"background_p: expected a probability in [0, 1], got {background_p}")
        if bad_audio not in ("skip", "pad"):
            raise ValueError(f"bad_audio: expected 'skip' or 'pad', got {bad_audio!r}")
        unprepared = [c.path for c in manifest.clips if c.audio_path is None]
        if unprepared:
            raise ValueError(f"manifest: the DALI path expects prepared audio (audio_path) for every "
                             f"clip, got {len(unprepared)} clips without it (first: {unprepared[0]}); "
                             f"run `avfast prepare SRC DST` and load DST/manifest.csv")
        self.manifest, self.preset = manifest, get_preset(preset)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.background_p, self.bad_audio, self.features = background_p, bad_audio, features
        self.shard_id, self.num_shards = shard_id, num_shards
        epoch_indices(len(manifest), train=train, seed=seed, epoch=0, shard_id=shard_id,
                      num_shards=num_shards)  # validates the shard arguments
        check_sample_rates(manifest, self.preset.audio.sample_rate)
        self.infos = manifest_infos(manifest, self.preset.audio.sample_rate)
        self.partners = BackgroundPartners([c.labels for c in manifest.clips]) if background_p > 0 else None
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.pending_skips: collections.Counter = collections.Counter()
        self.skipped: dict[str, int] = {}
        self.unreadable: dict[int, tuple[str, str]] = {}
        self._labels = label_fields(manifest)
        self._fallback = ClipDataset(manifest, self.preset, train=train, seed=seed, background_p=background_p,
                                     bad_audio=bad_audio, features=False)
        self._dali, self._device_id, self._num_threads, self._prefetch = dali, device_id, num_threads, prefetch

    def _build(self, source: _PlanSource):
        """A pipeline for one epoch: built per epoch, so that DALI's prefetching never runs
        ahead into samples of an epoch whose number is not yet set."""
        dali, device_id = self._dali, self._device_id
        fn, types = dali.fn, dali.types
        size = self.preset.video.size
        gpu = device_id is not None

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self._num_threads, device_id=device_id,
                           prefetch_queue_depth=self._prefetch, exec_dynamic=True)
        def pipeline():
            video, audio, frames, roi_start, roi_end, meta, starts, bounds = fn.external_source(
                source=source, num_outputs=8, batch=True, cycle="raise",
                dtype=[types.UINT8, types.UINT8, types.INT32, types.FLOAT, types.FLOAT,
                       types.INT64, types.INT64, types.INT64])
            # indices past the decoded stream repeat its last frame (not black frames)
            clips = fn.decoders.video(video, device="mixed" if gpu else "cpu", frames=frames, pad_mode="edge")
            clips = fn.resize(clips, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                              interp_type=types.INTERP_LINEAR, antialias=True)
            wave, _ = fn.decoders.audio(audio, sample_rate=self.preset.audio.sample_rate,
                                        downmix=True, dtype=types.FLOAT)
            length = wave.shape(dtype=types.INT64)
            wave = fn.pad(wave.gpu() if gpu else wave, axes=[0])
            return clips, wave, length, meta, starts, bounds

        pipe = pipeline()
        pipe.build()
        return pipe

    def indices(self) -> np.ndarray:
        """This shard's sample indices for the current epoch."""
        return epoch_indices(len(self.manifest), train=self.train, seed=self.seed, epoch=self.epoch,
                             shard_id=self.shard_id, num_shards=self.num_shards)

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _torch(self, tensor_list) -> torch.Tensor:
        return torch.from_dlpack(tensor_list.as_tensor()).to(self.device)

    def _cpu_rows(self, indices: list[int]) -> tuple[dict, collections.Counter]:
        """The CPU path's uint8 frames and windows for ``indices`` (its replacement rules
        included): the fallback for a batch DALI could not decode and for bad rows."""
        self._fallback.set_epoch(self.epoch)
        items = [self._fallback[i] for i in indices]
        batch = collate(items)
        self.unreadable.update({i: (reason, message) for i, reason, message in batch.pop("unreadable")})
        return batch, collections.Counter(batch.pop("skipped"))

    def _finish(self, frames, windows, index, audio_index, background, reasons) -> dict:
        """Features, normalisation and label fields of a batch on the loader's device."""
        if self.features:
            frames = normalize_frames(frames, self.preset.video.mean, self.preset.video.std)
            windows = audio_features(windows, self.preset)
        labels = [self._labels(int(i)) for i in index.cpu()]
        return {"frames": frames, "audio": windows, "index": index, "audio_index": audio_index,
                "background": background.bool(),
                **{k: torch.stack([lab[k] for lab in labels]).to(self.device) for k in labels[0]},
                "skipped": dict(reasons)}

    def _decoded(self, outputs) -> tuple[torch.Tensor, ...]:
        """DALI outputs -> frames, windows (B, K, samples), index, audio_index, background,
        with each clip's audio cut to its [start, end)."""
        frames, wave, length, meta, starts, bounds = (self._torch(t) for t in outputs)
        first, last = bounds[:, 0], bounds[:, 1]
        end = torch.where(last >= 0, torch.minimum(last, length[:, 0]), length[:, 0])
        lengths = (end - first).clamp_min(0)
        spec = self.preset.audio
        windows = gather_windows(wave, lengths, starts - first[:, None], spec.window_samples, spec.pad,
                                 offsets=first)
        samples = torch.arange(wave.shape[1], device=wave.device)
        in_clip = (samples >= first[:, None]) & (samples < end[:, None])
        keep, reasons = bad_audio_rows(wave * in_clip, lengths, min_audio_samples(self.preset), self.bad_audio)
        return frames, windows, meta[:, 0], meta[:, 1], meta[:, 2], keep, reasons

    def _repair(self, frames, windows, index, audio_index, background, keep, reasons):
        """Bad rows (silent/short audio): replaced by the CPU path's replacement when
        training (batches keep their size), dropped when evaluating."""
        if bool(keep.all()):
            return frames, windows, index, audio_index, background, reasons
        if not self.train:
            for i in index[~keep].tolist():
                self.unreadable[int(i)] = ("bad audio", f"clip {int(i)}: silent or too short audio")
            return (*(t[keep] for t in (frames, windows, index, audio_index, background)), reasons)
        bad = (~keep).nonzero()[:, 0].tolist()
        rows, reasons = self._cpu_rows([int(index[k]) for k in bad])
        frames, windows = frames.clone(), windows.clone()
        index, audio_index, background = index.clone(), audio_index.clone(), background.clone()
        for j, k in enumerate(bad):
            frames[k] = rows["frames"][j].to(self.device)
            windows[k] = rows["audio"][j].to(self.device)
            index[k], audio_index[k] = rows["index"][j], rows["audio_index"][j]
            background[k] = rows["background"][j]
        return frames, windows, index, audio_index, background, reasons

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[dict]:
        """This epoch's batches from batch ``start`` on (a resumed run skips the ones it saw).
        A batch DALI fails to decode is decoded by the CPU path instead, and DALI goes on
        with the next one."""
        order = self.indices()[start * self.batch_size:].tolist()
        self.pending_skips.clear()
        counts: collections.Counter = collections.Counter()
        position, finished = 0, False
        while not finished:
            source = _PlanSource(self, order[position:], self.epoch)
            pipe = self._build(source)
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    finished = True
                    break
                except RuntimeError as err:  # a clip DALI cannot decode: this batch on the CPU
                    used, held = source.made.popleft()
                    log.warning("DALI could not decode a batch (%s); decoding it on the CPU", str(err)[:200])
                    rows, reasons = self._cpu_rows(held)
                    position += used
                    reasons.update(self.pending_skips)
                    self.pending_skips.clear()
                    counts.update(reasons)
                    if "index" in rows:
                        yield self._finish(rows["frames"].to(self.device), rows["audio"].to(self.device),
                                           rows["index"].to(self.device), rows["audio_index"].to(self.device),
                                           rows["background"].to(self.device), reasons)
                    break
                position += source.made.popleft()[0]
                *decoded, keep, reasons = self._decoded(outputs)
                frames, windows, index, audio_index, background, reasons = self._repair(*decoded, keep, reasons)
                reasons.update(self.pending_skips)
                self.pending_skips.clear()
                counts.update(reasons)
                if index.numel():
                    yield self._finish(frames, windows, index, audio_index, background, reasons)
        counts.update(self.pending_skips)
        self.skipped = dict(counts)
        log_skipped(self.epoch, counts)
        self.epoch += 1
