"""Audio-visual segmentation (AVSBench S4 / MS3): the data layout, the training loss and the
benchmark's two mask metrics.

Layout (``read_avsbench``), under the AVSBench root, 5 frames per 5-s clip:

- S4: ``Single-source/s4_meta_data.csv`` (first column the video id, columns ``category`` and
  ``split``); frames ``s4_data/visual_frames/<split>/<category>/<id>/<id>_<i>.png`` (i = 1..5);
  masks ``s4_data/gt_masks/<split>/<category>/<id>/<id>_<i>.png``, only i = 1 for train;
  audio ``s4_data/audio_wav/<split>/<category>/<id>.wav``.
- MS3: ``Multi-sources/ms3_meta_data.csv`` (first column the video id, column ``split``);
  frames ``ms3_data/visual_frames/<id>/<id>.mp4_<i>.png``; masks
  ``ms3_data/gt_masks/<split>/<id>/<id>_<i>.png`` for all 5 frames; audio
  ``ms3_data/audio_wav/<split>/<id>.wav``.

Loss: upstream's ``F1_IoU_BCELoss`` / ``F5_IoU_BCELoss`` are, despite the name, binary
cross-entropy of sigmoid(logits) against the masks, averaged over the pixels of the
supervised frames (S4: the first of each clip's 5 frames; MS3: all 5). ``mask_loss``
computes it from the logits (stable; upstream's BCELoss clamps log at -100, which only
matters past |logit| ~ 100) and can add a soft-IoU term (``iou_weight``, 0 = upstream).

AVSBench scores sigmoid probabilities ``prob`` (N, H, W) against binary masks ``target``
(N, H, W), frame by frame:

- IoU of ``prob > 0.5`` with the mask; a frame whose mask is empty scores the IoU of the
  background instead (pixels where both are 0, over all pixels). mIoU is the mean over frames.
- F-score with beta^2 = 0.3 at 255 thresholds ``linspace(0, 1 - 1e-10, 255)`` (a pixel is
  predicted when ``prob >= threshold``; 0/0 counts as 0). Frames with an empty mask are left
  out; the per-threshold scores are averaged over frames and the best threshold is reported.

``MaskMetrics`` accumulates over a whole split, so its result does not depend on how frames
are batched (AVSBench's script averages per-batch values, which equals this when every batch
has the same number of frames, and for F-score the same number of non-empty frames).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avfast.data import media
from avfast.data.manifest import BadRow, report_bad_row
from avfast.data.presets import Preset, get_preset
from avfast.data.synthetic import class_colour, class_frequency, tone
from avfast.data.transforms import audio_features, crop_resize_frames, gather_windows, normalize_frames
from avfast.models.base import freeze
from avfast.nn.decoders import DECODER_SIZES, GuidedDecoder

IOU_EPS = 1e-7  # AVSBench's eps in inter / (union + eps)
PR_EPS = 1e-20  # AVSBench's eps in the precision and recall denominators
BETA2 = 0.3
THRESHOLDS = 255
FRAMES = 5  # AVSBench samples 5 frames from each 5-s clip
SUBSETS = {"s4": ("Single-source", "s4_meta_data.csv", "s4_data"),
           "ms3": ("Multi-sources", "ms3_meta_data.csv", "ms3_data")}


@dataclasses.dataclass(frozen=True)
class AVSClip:
    """One AVSBench clip: ``frames`` (5 image paths), ``masks`` (5 entries, a path or None
    for an unannotated frame), ``audio`` (the wav), the video ``id``, ``category`` (S4;
    "" for MS3), ``split`` and ``origin`` (metadata file, row; not compared)."""

    id: str
    category: str
    split: str
    frames: tuple[str, ...]
    masks: tuple[str | None, ...]
    audio: str
    origin: tuple[str, int] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def path(self) -> str:
        """The clip's frame folder (what a bad row names)."""
        return os.path.dirname(self.frames[0])


def _avs_paths(subset: str, data: str, vid: str, category: str, split: str) -> tuple:
    if subset == "s4":
        rel = os.path.join(split, category, vid)
        frames = [os.path.join(data, "visual_frames", rel, f"{vid}_{i}.png") for i in range(1, FRAMES + 1)]
        annotated = 1 if split == "train" else FRAMES
        masks = [os.path.join(data, "gt_masks", rel, f"{vid}_{i}.png") if i <= annotated else None
                 for i in range(1, FRAMES + 1)]
        audio = os.path.join(data, "audio_wav", split, category, f"{vid}.wav")
    else:
        frames = [os.path.join(data, "visual_frames", vid, f"{vid}.mp4_{i}.png") for i in range(1, FRAMES + 1)]
        masks = [os.path.join(data, "gt_masks", split, vid, f"{vid}_{i}.png") for i in range(1, FRAMES + 1)]
        audio = os.path.join(data, "audio_wav", split, f"{vid}.wav")
    return tuple(frames), tuple(masks), audio


def read_avsbench(root, subset: str, split: str, bad: list[BadRow] | None = None) -> list[AVSClip]:
    """The clips of ``split`` ("train", "val", "test") of AVSBench ``subset`` ("s4" or "ms3")
    under ``root``, in the metadata file's order. A row with a missing frame, mask or wav, or
    an id that leaves the data folder, raises naming the file and row, or goes to ``bad``
    ('missing file', 'escapes root') when it is a list."""
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {sorted(SUBSETS)}, got {subset!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    fn = "read_avsbench"
    folder, meta_name, data_name = SUBSETS[subset]
    base = os.path.join(os.fspath(root), folder)
    meta = os.path.join(base, meta_name)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"read_avsbench: root must hold {folder}/{meta_name}, got no such file {meta!r}")
    data = os.path.join(base, data_name)
    clips = []
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        need = ["split"] + (["category"] if subset == "s4" else [])
        if not header or any(n not in header for n in need):
            raise ValueError(f"read_avsbench: {meta} must have a header with the video id first and "
                             f"columns {need}, got {header}")
        col = {name: header.index(name) for name in need}
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(header):
                report_bad_row(fn, bad, BadRow(meta, line, row[0], "malformed",
                                               f"expected {len(header)} fields, got {len(row)}"))
                continue
            if row[col["split"]] != split:
                continue
            vid, category = row[0], row[col["category"]] if subset == "s4" else ""
            names = (vid, category) if subset == "s4" else (vid,)
            if any("/" in n or os.sep in n or n in ("", ".", "..") for n in names):
                report_bad_row(fn, bad, BadRow(meta, line, vid, "escapes root",
                                               f"id and category must be plain names, got {names}"))
                continue
            frames, masks, audio = _avs_paths(subset, data, vid, category, split)
            absent = [p for p in (*frames, *(m for m in masks if m), audio) if not os.path.isfile(p)]
            if absent:
                report_bad_row(fn, bad, BadRow(meta, line, vid, "missing file",
                                               f"{len(absent)} files, first {absent[0]!r}"))
                continue
            clips.append(AVSClip(vid, category, split, frames, masks, audio, origin=(meta, line)))
    return clips


class AVSDataset(torch.utils.data.Dataset):
    """AVSBench clips as a method's preset sees them, decoded on the CPU.

    Item i: ``frames`` float32 (5, 3, S, S), the whole frame resized to the preset's size S
    and normalised; ``masks`` float32 (5, S, S) in {0, 1} (nearest resize; zeros where not
    annotated); ``annotated`` bool (5,); ``audio``: the preset's features of one window per
    frame, centred on that frame's second and moved inside the clip when the window is
    longer than the room around it (5, *features); ``index``.
    """

    def __init__(self, clips: list[AVSClip], preset: str | Preset):
        if not clips:
            raise ValueError("clips: expected at least one AVSClip, got none")
        self.clips, self.preset = list(clips), get_preset(preset)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        return self.load(index)

    def load(self, index: int) -> dict:
        from torchvision.io import ImageReadMode, read_image

        clip, size = self.clips[index], self.preset.video.size
        images = torch.stack([read_image(p, ImageReadMode.RGB) for p in clip.frames]).permute(0, 2, 3, 1)
        h, w = images.shape[1:3]
        frames = normalize_frames(crop_resize_frames(images.contiguous(), (0, 0, h, w), size, False),
                                  self.preset.video.mean, self.preset.video.std)
        masks = torch.zeros(FRAMES, size, size)
        for i, path in enumerate(clip.masks):
            if path is not None:
                m = (read_image(path, ImageReadMode.GRAY)[None].float() > 0).float()
                masks[i] = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest-exact")[0, 0]
        spec = self.preset.audio
        wave = media.decode_audio(clip.audio, sample_rate=spec.sample_rate)
        n = torch.tensor([wave.numel()])
        windows = gather_windows(wave[None], n, frame_window_starts(n, spec), spec.window_samples, spec.pad)
        return {"frames": frames, "masks": masks, "annotated": torch.tensor([m is not None for m in clip.masks]),
                "audio": audio_features(windows, self.preset)[0], "index": torch.tensor(index)}


def frame_window_starts(lengths: Tensor, spec) -> Tensor:
    """(B,) clip lengths in samples -> (B, 5) start of each frame's audio window (``spec``:
    the preset's AudioSpec): centred on the frame's second, (i + 0.5) s, and moved inside
    the clip when the window is longer than the room around it."""
    window = spec.window_samples
    centres = torch.round((torch.arange(FRAMES, dtype=torch.float64) + 0.5) * spec.sample_rate).long()
    starts = (centres - window // 2).clamp_min(0).to(lengths.device)[None]
    return torch.minimum(starts, (lengths.long()[:, None] - window).clamp_min(0))


def avs_loader(clips: list[AVSClip], preset: str | Preset, **kwargs):
    """An ``avfast.data.cpu.IndexedLoader`` of ``AVSDataset(clips, preset)`` (AVSBench has no
    augmentation, so an item depends on its clip alone); ``kwargs`` go to the loader."""
    from avfast.data.cpu import IndexedLoader

    return IndexedLoader(AVSDataset(clips, preset), **kwargs)


class _AVSSource:
    """DALI external source over ``order``: per batch the clips' 5 frame PNGs, 5 mask PNGs (a
    1x1 black PNG where a frame is not annotated), wav bytes and (index, annotated flags);
    ``made`` records the clip indices of each batch handed to DALI."""

    def __init__(self, clips: list[AVSClip], order: list[int], batch_size: int, blank: np.ndarray):
        self.clips, self.order, self.batch_size, self.blank = clips, order, batch_size, blank
        self.position = 0
        self.made: list[list[int]] = []

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.order):
            raise StopIteration
        held = self.order[self.position:self.position + self.batch_size]
        self.position += len(held)
        self.made.append(held)
        read = lambda path: np.fromfile(path, dtype=np.uint8)  # noqa: E731
        columns = [[] for _ in range(2 * FRAMES + 2)]
        for i in held:
            clip = self.clips[i]
            for t in range(FRAMES):
                columns[t].append(read(clip.frames[t]))
                columns[FRAMES + t].append(self.blank if clip.masks[t] is None else read(clip.masks[t]))
            columns[2 * FRAMES].append(read(clip.audio))
            columns[2 * FRAMES + 1].append(np.array([i, *(m is not None for m in clip.masks)], dtype=np.int64))
        return columns


class AVSDALILoader:
    """``avs_loader``'s batches decoded by NVIDIA DALI: the PNG frames and masks by
    ``fn.decoders.image`` (``mixed`` on the GPU, ``cpu`` when ``device_id`` is None), resized
    by ``fn.resize`` (frames linearly with antialiasing, as the CPU path's
    ``crop_resize_frames``; masks nearest), the wav by ``fn.decoders.audio``; the windows and
    features in torch on the device. A batch DALI cannot decode is read by the CPU path
    instead (its unreadable clips left out and kept in ``unreadable``). The interface of
    ``avfast.data.cpu.IndexedLoader``.
    """

    def __init__(self, clips: list[AVSClip], preset: str | Preset, *, batch_size: int, train: bool,
                 device_id: int | None = 0, num_threads: int = 4, seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1, prefetch: int = 2):
        from avfast.data.cpu import IndexedLoader
        from avfast.data.dali import _dali

        self._dali = _dali()
        self.clips, self.preset = list(clips), get_preset(preset)
        self._cpu = IndexedLoader(AVSDataset(self.clips, self.preset), batch_size=batch_size, train=train,
                                  seed=seed, shard_id=shard_id, num_shards=num_shards)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.device_id, self.num_threads, self.prefetch = device_id, num_threads, prefetch
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.unreadable = self._cpu.unreadable
        self.skipped: dict[str, int] = {}
        from torchvision.io import encode_png

        self._blank = encode_png(torch.zeros(1, 1, 1, dtype=torch.uint8)).numpy()

    @property
    def epoch(self) -> int:
        return self._cpu.epoch

    def set_epoch(self, epoch: int) -> None:
        self._cpu.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._cpu)

    def __iter__(self):
        return self.batches()

    def _build(self, source: _AVSSource):
        dali, size, gpu = self._dali, self.preset.video.size, self.device_id is not None
        fn, types = dali.fn, dali.types

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipeline():
            *encoded, wav, meta = fn.external_source(source=source, num_outputs=2 * FRAMES + 2, batch=True,
                                                     cycle="raise", dtype=[types.UINT8] * (2 * FRAMES + 1) + [types.INT64])
            device = "mixed" if gpu else "cpu"
            frames = [fn.resize(fn.decoders.image(e, device=device, output_type=types.RGB), size=[size, size],
                                interp_type=types.INTERP_LINEAR, antialias=True) for e in encoded[:FRAMES]]
            masks = [fn.resize(fn.decoders.image(e, device=device, output_type=types.GRAY), size=[size, size],
                               interp_type=types.INTERP_NN) for e in encoded[FRAMES:]]
            wave, _ = fn.decoders.audio(wav, sample_rate=self.preset.audio.sample_rate, downmix=True,
                                        dtype=types.FLOAT)
            length = wave.shape(dtype=types.INT64)
            wave = fn.pad(wave.gpu() if gpu else wave, axes=[0])
            return (fn.stack(*frames), fn.stack(*masks), wave, length, meta)

        pipe = pipeline()
        pipe.build()
        return pipe

    def _batch(self, outputs) -> dict:
        frames, masks, wave, length, meta = (torch.from_dlpack(t.as_tensor()).to(self.device) for t in outputs)
        spec = self.preset.audio
        lengths = length[:, 0]
        windows = gather_windows(wave, lengths, frame_window_starts(lengths, spec), spec.window_samples, spec.pad)
        annotated = meta[:, 1:].bool()
        masks = (masks[..., 0] > 0).float() * annotated[:, :, None, None]
        return {"frames": normalize_frames(frames, self.preset.video.mean, self.preset.video.std),
                "masks": masks, "annotated": annotated, "audio": audio_features(windows, self.preset),
                "index": meta[:, 0]}

    def batches(self, start: int = 0):
        """This epoch's batches from batch ``start`` on."""
        order = self._cpu.indices()[start * self.batch_size:].tolist()
        skipped = 0
        while order:
            source = _AVSSource(self.clips, order, self.batch_size, self._blank)
            pipe = self._build(source)
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    order = []
                    break
                except RuntimeError:  # a clip DALI cannot decode: this batch on the CPU, then go on
                    held = source.made[0]
                    before = len(self.unreadable)
                    rows = self._cpu_batch(held)
                    skipped += len(self.unreadable) - before
                    order = order[sum(len(m) for m in source.made[:1]):]
                    if rows is not None:
                        yield rows
                    break
                source.made.pop(0)
                order = order[self.batch_size:]
                yield self._batch(outputs)
        self.skipped = {"unreadable": skipped} if skipped else {}
        self._cpu.epoch += 1

    def _cpu_batch(self, indices: list[int]) -> dict | None:
        """The CPU path's batch of ``indices`` (unreadable clips left out), on the device."""
        from avfast.data.cpu import _collate_guarded, _Guarded

        batch = _collate_guarded([_Guarded(self._cpu.dataset)[i] for i in indices])
        for index, message in batch.pop("unreadable"):
            self.unreadable[index] = ("unreadable", message)
        return {k: v.to(self.device) for k, v in batch.items()} if "index" in batch else None


def _write_png(path: str, image: np.ndarray) -> None:
    from torchvision.io import write_png

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_png(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), path)


def _write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def make_avsbench(root, subset: str = "s4", *, categories: int = 3, clips: dict[str, int] | None = None,
                  size: int = 64, sample_rate: int = 16000, seed: int = 0) -> None:
    """A synthetic AVSBench tree under ``root`` that ``read_avsbench`` reads: in each clip a
    disc of its category's colour sounds (the category's tone, 5 s) and moves over grey noise
    across the 5 frames; its masks are exact (1 on the disc). MS3 clips hold two sounding
    discs (two categories, both tones) and a silent square of a third colour, unmasked.
    ``clips``: clips per split (default train 8, val 2, test 2)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {sorted(SUBSETS)}, got {subset!r}")
    if isinstance(categories, bool) or not isinstance(categories, int) or categories < (3 if subset == "ms3" else 1):
        raise ValueError(f"categories: expected an integer >= {3 if subset == 'ms3' else 1}, got {categories!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: expected an integer >= 16, got {size!r}")
    clips = {"train": 8, "val": 2, "test": 2} if clips is None else dict(clips)
    if set(clips) - {"train", "val", "test"} or any(not isinstance(n, int) or n < 0 for n in clips.values()):
        raise ValueError(f"clips: expected counts >= 0 for 'train', 'val', 'test', got {clips!r}")
    folder, meta_name, data_name = SUBSETS[subset]
    base = Path(root) / folder
    data = str(base / data_name)
    rng = np.random.default_rng(seed)
    names = [f"class_{k}" for k in range(categories)]
    rows = []
    for split, count in clips.items():
        for j in range(count):
            vid = f"{split}_{j:03d}"
            first = int(rng.integers(categories))
            second = (first + 1 + int(rng.integers(max(1, categories - 1)))) % categories
            sounding = [first] if subset == "s4" else [first, second]
            silent = next(k for k in range(categories) if k not in sounding) if subset == "ms3" else None
            category = names[first] if subset == "s4" else ""
            frames, masks, audio = _avs_paths(subset, data, vid, category, split)
            _write_avs_clip(rng, frames, masks, sounding, silent, categories, size)
            waves = [tone(rng, class_frequency(k, categories), FRAMES * sample_rate, sample_rate) for k in sounding]
            _write_wav(audio, sum(waves) / len(waves), sample_rate)
            rows.append((vid, category, split) if subset == "s4" else (vid, split))
    base.mkdir(parents=True, exist_ok=True)
    with open(base / meta_name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("name", "category", "split") if subset == "s4" else ("name", "split"))
        writer.writerows(rows)


def _write_avs_clip(rng, frames, masks, sounding, silent, categories: int, size: int) -> None:
    """Frames with a moving disc per sounding category (and a still square for ``silent``)
    over grey noise; the annotated frames' masks are the union of the discs."""
    radius = size / 6
    yy, xx = np.mgrid[0:size, 0:size]
    starts = [rng.uniform(radius, size - radius, 2) for _ in sounding]
    steps = [rng.uniform(-0.08, 0.08, 2) * size for _ in sounding]
    square = rng.integers(0, size - size // 4, 2) if silent is not None else None
    for t, (frame_path, mask_path) in enumerate(zip(frames, masks)):
        image = (rng.integers(96, 160, (size, size, 1)) + rng.integers(-8, 9, (size, size, 3))).clip(0, 255)
        image = image.astype(np.uint8)
        if square is not None:
            y, x = square
            image[y:y + size // 4, x:x + size // 4] = class_colour(silent, categories)
        mask = np.zeros((size, size), dtype=bool)
        for k, start, step in zip(sounding, starts, steps):
            cy, cx = np.clip(start + step * t, radius, size - radius)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
            image[disc] = class_colour(k, categories)
            mask |= disc
        _write_png(frame_path, image)
        if mask_path is not None:
            _write_png(mask_path, mask[..., None].astype(np.uint8) * 255)


def _check(prob: torch.Tensor, target: torch.Tensor) -> None:
    for name, t in (("prob", prob), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected (N, H, W), got shape {tuple(t.shape)}")
    if prob.shape != target.shape:
        raise ValueError(f"target: expected the shape of prob {tuple(prob.shape)}, got {tuple(target.shape)}")
    if not prob.is_floating_point():
        raise TypeError(f"prob: expected a floating-point tensor of probabilities, got {prob.dtype}")
    if prob.numel() and not bool(((prob >= 0) & (prob <= 1)).all()):
        bad = prob[~((prob >= 0) & (prob <= 1))][0].item()
        raise ValueError(f"prob: expected probabilities in [0, 1] (apply sigmoid to logits), got {bad}")
    if target.numel() and not bool(((target == 0) | (target == 1)).all()):
        bad = target[~((target == 0) | (target == 1))][0].item()
        raise ValueError(f"target: expected a binary mask (0 or 1), got {bad}")


def mask_loss(logits: torch.Tensor, target: torch.Tensor, supervised: torch.Tensor | None = None,
              iou_weight: float = 0.0) -> torch.Tensor:
    """Mean BCE over the pixels of the supervised frames, plus ``iou_weight`` times the mean
    soft-IoU loss 1 - sum(p t) / sum(p + t - p t) over those frames. ``logits``, ``target``
    (N, H, W); ``supervised``: (N,) bool, None = every frame. Returns a scalar."""
    for name, t in (("logits", logits), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected an (N, H, W) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if target.shape != logits.shape:
        raise ValueError(f"target: expected the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if supervised is not None:
        if supervised.dtype != torch.bool or supervised.shape != logits.shape[:1]:
            raise ValueError(f"supervised: expected a bool tensor of shape ({logits.shape[0]},), got "
                             f"{supervised.dtype} {tuple(supervised.shape)}")
        if not bool(supervised.any()):
            raise ValueError("supervised: expected at least one supervised frame, got none")
        logits, target = logits[supervised], target[supervised]
    if not iou_weight >= 0:
        raise ValueError(f"iou_weight: expected a number >= 0, got {iou_weight!r}")
    target = target.to(logits.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    if iou_weight:
        p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
        inter = (p * t).sum(1)
        loss = loss + iou_weight * (1 - inter / (p.sum(1) + t.sum(1) - inter).clamp_min(IOU_EPS)).mean()
    return loss


def frame_iou(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) AVSBench IoU of each frame: ``prob > 0.5`` against ``target``, or the background
    IoU for a frame whose mask is empty."""
    _check(prob, target)
    pred, mask = (prob > 0.5).flatten(1).double(), target.flatten(1).double()
    inter, union = (pred * mask).sum(1), torch.maximum(pred, mask).sum(1)
    empty = mask.sum(1) == 0
    inter = torch.where(empty, ((1 - pred) * (1 - mask)).sum(1), inter)
    union = torch.where(empty, torch.full_like(union, mask.shape[1]), union)
    return inter / (union + IOU_EPS)


def frame_fscores(prob: torch.Tensor, target: torch.Tensor, beta2: float = BETA2,
                  thresholds: int = THRESHOLDS) -> torch.Tensor:
    """(N, thresholds) F-score of each frame at each AVSBench threshold (0/0 = 0). Counts
    come from one histogram per frame (exact: a pixel counts at threshold t when prob >= t)."""
    _check(prob, target)
    if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 1:
        raise ValueError(f"thresholds: expected an integer >= 1, got {thresholds!r}")
    if not beta2 > 0:
        raise ValueError(f"beta2: expected a number > 0, got {beta2!r}")
    p, mask = prob.flatten(1).double(), target.flatten(1).double()
    n, pixels = p.shape
    edges = torch.linspace(0, 1 - 1e-10, thresholds, dtype=torch.float32).double()
    # bin b = how many thresholds are <= p: the pixel is predicted at thresholds 0..b-1
    bins = torch.searchsorted(edges, p.contiguous(), right=True)
    counts = torch.zeros(n, thresholds + 1, dtype=torch.float64).scatter_add_(1, bins, torch.ones_like(p))
    hits = torch.zeros(n, thresholds + 1, dtype=torch.float64).scatter_add_(1, bins, mask)
    predicted = counts.flip(1).cumsum(1).flip(1)[:, 1:]  # predicted[t] = #(bin > t)
    tp = hits.flip(1).cumsum(1).flip(1)[:, 1:]
    precision = tp / (predicted + PR_EPS)
    recall = tp / (mask.sum(1, keepdim=True) + PR_EPS)
    f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    return torch.nan_to_num(f, nan=0.0)


class MaskMetrics:
    """AVSBench mIoU and F-score accumulated over frames: ``update(prob, target)`` per batch
    of (N, H, W) probabilities and binary masks, then ``compute()`` ->
    {"miou", "fscore", "frames", "fscore_frames"}. fscore is NaN when no frame had a
    non-empty mask (it is undefined there)."""

    def __init__(self, beta2: float = BETA2, thresholds: int = THRESHOLDS):
        self.beta2, self.thresholds = beta2, thresholds
        self.iou_sum, self.frames = 0.0, 0
        self.f_sum = torch.zeros(thresholds, dtype=torch.float64)
        self.f_frames = 0

    @torch.no_grad()
    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        prob, target = prob.detach().float().cpu(), target.detach().cpu()
        self.iou_sum += float(frame_iou(prob, target).sum())
        self.frames += prob.shape[0]
        present = target.flatten(1).sum(1) > 0
        if bool(present.any()):
            self.f_sum += frame_fscores(prob[present], target[present], self.beta2, self.thresholds).sum(0)
            self.f_frames += int(present.sum())

    def to_tensor(self) -> torch.Tensor:
        """(3 + thresholds,) float64: IoU sum, frames, F-score frames, per-threshold F sums
        (add them up over batches or ranks, then ``from_tensor``)."""
        head = torch.tensor([self.iou_sum, self.frames, self.f_frames], dtype=torch.float64)
        return torch.cat([head, self.f_sum])

    @classmethod
    def from_tensor(cls, sums: torch.Tensor, beta2: float = BETA2) -> MaskMetrics:
        metrics = cls(beta2, sums.numel() - 3)
        metrics.iou_sum, metrics.frames, metrics.f_frames = float(sums[0]), int(sums[1]), int(sums[2])
        metrics.f_sum = sums[3:].double().cpu().clone()
        return metrics

    def compute(self) -> dict[str, float]:
        if not self.frames:
            raise ValueError("MaskMetrics.compute: expected at least one update, got none")
        fscore = float((self.f_sum / self.f_frames).max()) if self.f_frames else float("nan")
        return {"miou": self.iou_sum / self.frames, "fscore": fscore, "frames": self.frames,
                "fscore_frames": self.f_frames}


AVS_METHODS = ("stgcma", "dgsct", "deepavfusion")  # the methods the papers evaluate on AVSBench


class AVSModel(nn.Module):
    """A method's backbone (``dense_features``) and a ``GuidedDecoder`` of its visual maps,
    guided by the audio vector (DeepAVFusion's ``AVSegmSimple`` structure).

    forward(frames (B, 5, 3, S, S), audio (B, 5, *the preset's features of one window)) ->
    {"logits": (B, 5, S, S)}. Per-second methods (STG-CMA, DG-SCT) see the 5 frames as their
    T = 5 seconds; DeepAVFusion sees each frame with its window alone. The backbone's
    classification heads, unused here, are frozen. ``loss`` is ``mask_loss`` with
    ``iou_weight`` (0: upstream's BCE alone).
    """

    def __init__(self, method: str, backbone: nn.Module, iou_weight: float = 0.0, **decoder_kwargs):
        super().__init__()
        if not (isinstance(iou_weight, (int, float)) and iou_weight >= 0):
            raise ValueError(f"iou_weight: expected a number >= 0, got {iou_weight!r}")
        self.iou_weight = float(iou_weight)
        if method not in AVS_METHODS:
            raise ValueError(f"method: expected one of {AVS_METHODS} (the methods evaluated on AVSBench), got {method!r}")
        frames = getattr(backbone.config, "num_frames", 1)
        if frames not in (1, FRAMES):
            raise ValueError(f"backbone: expected num_frames 1 or {FRAMES} (AVSBench's frames per clip), got {frames}")
        self.method, self.backbone, self.per_frame = method, backbone, frames == 1
        self.preset = backbone.preset
        self.config = backbone.config
        for name in backbone.dense_unused:
            freeze(backbone.get_submodule(name))
        levels, audio_dim = backbone.dense_shapes()
        self.decoder = GuidedDecoder(levels, audio_dim, backbone.config.img_size, **decoder_kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[1] != FRAMES:
            got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"frames: expected (B, {FRAMES}, 3, S, S), got {got}")
        B = frames.shape[0]
        if self.per_frame:
            frames, audio = frames.flatten(0, 1)[:, None], audio.flatten(0, 1)  # one frame per window
        maps, a = self.backbone.dense_features(frames, audio)
        return {"logits": self.decoder(maps, a).unflatten(0, (B, FRAMES))}

    def loss(self, out: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, float]]:
        """``mask_loss`` (with ``iou_weight``) over the annotated frames of ``batch`` ("masks"
        (B, 5, S, S), "annotated" (B, 5))."""
        logits = out["logits"].float()
        loss = mask_loss(logits.flatten(0, 1), batch["masks"].flatten(0, 1), batch["annotated"].flatten(),
                         self.iou_weight)
        return loss, {"loss": loss.item()}


def build_avs_model(method: str, size: str = "base", pretrained: str | None = None,
                    decoder: dict | None = None, iou_weight: float = 0.0, **overrides) -> AVSModel:
    """An ``AVSModel``: ``method``'s backbone at ``size`` (with ``overrides``; the per-second
    methods get num_frames 5; ``pretrained``: a local upstream checkpoint) and a decoder of
    ``DECODER_SIZES[size]`` (or GuidedDecoder's defaults) updated by ``decoder``; the loss's
    ``iou_weight``."""
    from avfast.models import build_model

    if method not in AVS_METHODS:
        raise ValueError(f"method: expected one of {AVS_METHODS} (the methods evaluated on AVSBench), got {method!r}")
    if method != "deepavfusion":
        overrides.setdefault("num_frames", FRAMES)
    backbone = build_model(method, size, num_classes=2, pretrained=pretrained, **overrides)
    return AVSModel(method, backbone, iou_weight, **{**DECODER_SIZES.get(size, {}), **(decoder or {})})
