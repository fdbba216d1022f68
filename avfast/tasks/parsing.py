"""Audio-visual video parsing (AVVP) on LLP: the annotation format, a synthetic set, the
HAN-style weakly-supervised parser on a method's per-second features, the MIL loss and
LLP's segment- and event-level F1.

Format (``read_llp``), as the LLP release lays it out under one folder:

- ``AVVP_train.csv``, ``AVVP_val_pd.csv``, ``AVVP_test_pd.csv``: tab-separated, header
  ``filename<TAB>event_labels``; one video per row, ``filename`` = ``<YouTube id>_<start>_<end>``,
  ``event_labels`` its weak (video-level) labels, comma-separated category names.
- ``AVVP_eval_audio.csv``, ``AVVP_eval_visual.csv``: tab-separated, header
  ``filename<TAB>onset<TAB>offset<TAB>event_labels``; one event per row: a category audible
  (or visible) over the whole seconds ``onset`` .. ``offset - 1``. They annotate the val and
  test videos.
- videos ``video/<filename>.<mp4|mkv|webm>``, 10 s each.

Parser (HAN, Tian et al. ECCV 2020): each modality's per-second features are projected to
``width``; ``layers`` hybrid attention layers, shared by both modalities, add self-attention
and cross-modal attention to the other modality's sequence, then a feed-forward block (each
step residual + LayerNorm); per (second t, modality m) a sigmoid class probability p_tm,
a temporal attention softmax over t and a modality attention softmax over m (per class).
Attentive MIL pooling: the audio and visual video-level probabilities sum the temporally
attended p over t; the video probability also weights the modalities (its weights need not
sum to 1, so it can pass 1; the loss clamps it, as upstream).

Loss (``mil_loss``): binary cross-entropy of the video probability against the weak labels
y, plus the audio and visual probabilities against smoothed labels y (1 - e) + e / 2
(HAN's label smoothing, e = 0.1), each on probabilities clamped to [1e-7, 1 - 1e-7].

Prediction (``parse``), as LLP's evaluation: a class is heard at second t when its audio
p_t,audio >= 0.5 and the video-level audio probability >= 0.5; seen likewise; audio-visual
where both hold.

Metrics (``video_scores``), exactly as LLP's ``eval_metrics.py`` computes them, per video on
(classes, seconds) 0/1 arrays; audio-visual events are the product of the audio and visual
arrays, for predictions and ground truth alike:

- segment level: per class, TP / FP / FN count seconds; F1 = 2 TP / (2 TP + FP + FN) over the
  classes with any predicted or true second, averaged; a video with none scores 1 (all true
  negatives).
- event level: an event is a maximal run of seconds of one class; a predicted event is a TP
  when its IoU with some true event of its class is >= 0.5 (each predicted event counts, so
  two predictions overlapping one true event are two TPs), else an FP; a true event that no
  prediction overlaps with IoU >= 0.5 is an FN. F1 as above, per class then averaged.
- type@AV: the mean of the audio, visual and audio-visual F1; event@AV: F1 of the audio and
  visual counts added per class (TP_a + TP_v, ...).

The dataset's score is the mean over videos (``ParsingMetrics``; LLP prints it x100).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avfast.data.manifest import BadRow, Clip, Manifest, report_bad_row
from avfast.data.presets import Preset, check_per_second, get_preset
from avfast.models.base import freeze

LLP_CATEGORIES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce", "Fire_alarm", "Chainsaw",
    "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle", "Vacuum_cleaner", "Baby_laughter",
    "Accordion", "Lawn_mower", "Motorcycle", "Helicopter", "Acoustic_guitar", "Telephone_bell_ringing",
    "Baby_cry_infant_crying", "Blender", "Clapping")
SECONDS = 10  # LLP's videos are 10 s, parsed per second
SPLIT_FILES = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
EVENT_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
PROB_CLAMP = 1e-7  # HAN clamps the probabilities before its BCE
SMOOTHING = 0.1  # HAN's label smoothing of the modality-level targets
IOU_THRESHOLD = 0.5  # LLP's event match
PARSING_METHODS = ("dgsct", "stgcma")  # per-second methods (10 frames, 10 one-second windows)
SCORES = ("segment_audio", "segment_visual", "segment_av", "segment_event",
          "event_audio", "event_visual", "event_av", "event_event")  # the per-video F1 of video_scores


# ---------------------------------------------------------------------- format


@dataclasses.dataclass(frozen=True)
class LLPVideo:
    """One LLP video: ``filename`` (its id), the video file ``path``, weak ``labels`` (class
    indices) and, for annotated splits, ``audio`` and ``visual`` events: (class, onset,
    offset) triples in whole seconds (None for the training split). ``origin``: (file, row)."""

    filename: str
    path: str
    labels: tuple[int, ...]
    audio: tuple[tuple[int, int, int], ...] | None = None
    visual: tuple[tuple[int, int, int], ...] | None = None
    origin: tuple[str, int] | None = dataclasses.field(default=None, compare=False, repr=False)

    def event_arrays(self, num_classes: int, seconds: int = SECONDS) -> tuple[np.ndarray, np.ndarray]:
        """(audio, visual) uint8 arrays (num_classes, seconds): 1 where the class is heard / seen."""
        if self.audio is None or self.visual is None:
            raise ValueError(f"event_arrays: {self.filename} has no per-second annotation (a training video)")
        arrays = []
        for events in (self.audio, self.visual):
            a = np.zeros((num_classes, seconds), dtype=np.uint8)
            for k, onset, offset in events:
                a[k, onset:offset] = 1
            arrays.append(a)
        return arrays[0], arrays[1]


def _read_tsv(path: str, header: list[str]):
    """(line number, fields) of each non-empty row of a tab-separated file whose header is
    ``header`` (raises naming the file otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_llp: expected the LLP file {path!r}, got no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        got = next(reader, None)
        if got != header:
            raise ValueError(f"read_llp: {path} must start with the tab-separated header {header}, got {got}")
        for row in reader:
            if row:
                yield reader.line_num, row


def _class_indices(names: str, index: dict[str, int]) -> tuple[list[int], list[str]]:
    parts = [n.strip() for n in names.split(",") if n.strip()]
    return [index[n] for n in parts if n in index], [n for n in parts if n not in index]


def _read_events(root: str, modality: str, wanted: dict[str, int], index: dict[str, int],
                 seconds: int, bad: list[BadRow] | None) -> dict[str, list[tuple[int, int, int]]]:
    """filename -> events of ``modality`` for the videos of ``wanted`` (filename -> row)."""
    fn, path = "read_llp", os.path.join(root, EVENT_FILES[modality])
    events: dict[str, list[tuple[int, int, int]]] = {name: [] for name in wanted}
    for line, row in _read_tsv(path, ["filename", "onset", "offset", "event_labels"]):
        if len(row) != 4:
            report_bad_row(fn, bad, BadRow(path, line, row[0], "malformed", f"expected 4 fields, got {len(row)}"))
            continue
        name, onset, offset, label = row
        if name not in wanted:
            continue
        try:
            onset, offset = int(onset), int(offset)
        except ValueError:
            onset = offset = -1
        if not 0 <= onset < offset <= seconds:
            report_bad_row(fn, bad, BadRow(path, line, name, "malformed",
                                           f"expected integer seconds 0 <= onset < offset <= {seconds}, "
                                           f"got onset {row[1]!r}, offset {row[2]!r}"))
            continue
        if label not in index:
            report_bad_row(fn, bad, BadRow(path, line, name, "unknown label",
                                           f"expected one of the {len(index)} categories, got {label!r}"))
            continue
        events[name].append((index[label], onset, offset))
    return events


def read_llp(root, split: str, *, categories=LLP_CATEGORIES, seconds: int = SECONDS,
             bad: list[BadRow] | None = None) -> list[LLPVideo]:
    """The videos of ``split`` ("train", "val" or "test") of the LLP folder ``root``, in file
    order; val and test carry their audio and visual events. A row with too few fields, a
    category not in ``categories``, a duplicate filename, a filename that leaves the folder
    or a missing video raises naming the file and row, or goes to ``bad`` when it is a list
    (a bad event row leaves its video without that event)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    categories = list(categories)
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories: expected distinct category names, got {categories[:5]}...")
    fn, root = "read_llp", os.fspath(root)
    index = {name: k for k, name in enumerate(categories)}
    path = os.path.join(root, SPLIT_FILES[split])
    rows, seen = {}, {}
    for line, row in _read_tsv(path, ["filename", "event_labels"]):
        name = row[0]
        if len(row) != 2:
            report_bad_row(fn, bad, BadRow(path, line, name, "malformed", f"expected 2 fields, got {len(row)}"))
            continue
        if "/" in name or os.sep in name or name in ("", ".", ".."):
            report_bad_row(fn, bad, BadRow(path, line, name, "escapes root",
                                           f"filename must be a plain name, got {name!r}"))
            continue
        if name in seen:
            report_bad_row(fn, bad, BadRow(path, line, name, "duplicate id", f"first at row {seen[name]}"))
            continue
        seen[name] = line
        labels, unknown = _class_indices(row[1], index)
        if unknown or not labels:
            report_bad_row(fn, bad, BadRow(path, line, name, "unknown label",
                                           f"expected comma-separated names of the {len(categories)} "
                                           f"categories, got {unknown or row[1]!r}"))
            continue
        video = next((os.path.join(root, "video", name + s) for s in VIDEO_SUFFIXES
                      if os.path.isfile(os.path.join(root, "video", name + s))), None)
        if video is None:
            report_bad_row(fn, bad, BadRow(path, line, name, "missing file",
                                           f"no video/{name}{{{','.join(VIDEO_SUFFIXES)}}} under {root}"))
            continue
        rows[name] = (line, video, tuple(sorted(set(labels))))
    if split == "train":
        return [LLPVideo(name, video, labels, origin=(path, line)) for name, (line, video, labels) in rows.items()]
    wanted = {name: line for name, (line, _, _) in rows.items()}
    audio = _read_events(root, "audio", wanted, index, seconds, bad)
    visual = _read_events(root, "visual", wanted, index, seconds, bad)
    return [LLPVideo(name, video, labels, tuple(audio[name]), tuple(visual[name]), origin=(path, line))
            for name, (line, video, labels) in rows.items()]


def llp_manifest(videos: list[LLPVideo], categories=LLP_CATEGORIES) -> Manifest:
    """The videos as a Manifest (their weak labels; clip i is videos[i])."""
    clips = [Clip(path=v.path, labels=v.labels, origin=v.origin) for v in videos]
    return Manifest(clips, list(categories))


# ---------------------------------------------------------------------- data


class LLPDataset(torch.utils.data.Dataset):
    """LLP videos as a per-second method's preset sees them (CPU decoding through
    ``avfast.data.cpu.ClipDataset``): item i has ``frames`` (10, 3, S, S), ``audio`` (10,
    *features), ``targets`` float32 (C,) multi-hot weak labels and, for annotated videos,
    ``audio_events`` / ``visual_events`` float32 (C, 10); ``evaluated`` says which."""

    def __init__(self, videos: list[LLPVideo], preset: str | Preset, *, train: bool, seed: int = 0,
                 categories=LLP_CATEGORIES):
        from avfast.data.cpu import ClipDataset

        if not videos:
            raise ValueError("videos: expected at least one LLPVideo, got none")
        self.preset = get_preset(preset)
        check_per_second(self.preset, SECONDS)
        self.videos, self.categories = list(videos), list(categories)
        self.clips = ClipDataset(llp_manifest(self.videos, self.categories), self.preset, train=train, seed=seed)

    def __len__(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    def load(self, index: int) -> dict:
        from avfast.data.transforms import audio_features, normalize_frames

        _, frames, windows = self.clips.load(index)
        video, C = self.videos[index], len(self.categories)
        targets = torch.zeros(C)
        targets[list(video.labels)] = 1.0
        annotated = video.audio is not None
        a, v = video.event_arrays(C) if annotated else (np.zeros((C, SECONDS)),) * 2
        return {"frames": normalize_frames(frames, self.preset.video.mean, self.preset.video.std),
                "audio": audio_features(windows[None], self.preset)[0], "targets": targets,
                "audio_events": torch.as_tensor(a, dtype=torch.float32),
                "visual_events": torch.as_tensor(v, dtype=torch.float32), "evaluated": torch.tensor(annotated)}


def llp_loader(videos: list[LLPVideo], preset: str | Preset, *, train: bool, seed: int = 0,
               categories=LLP_CATEGORIES, **kwargs):
    """An ``avfast.data.cpu.IndexedLoader`` of ``LLPDataset``; ``kwargs`` go to the loader."""
    from avfast.data.cpu import IndexedLoader

    return IndexedLoader(LLPDataset(videos, preset, train=train, seed=seed, categories=categories),
                         train=train, seed=seed, **kwargs)


def _write_events(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("filename", "onset", "offset", "event_labels"))
        writer.writerows(rows)


def make_llp(root, *, categories: int = 4, videos: dict[str, int] | None = None, size: int = 32, fps: int = 4,
             sample_rate: int = 16000, seed: int = 0) -> None:
    """A synthetic LLP folder under ``root`` that ``read_llp`` reads (H.264 + AAC, 10 s): each
    video holds one or two of the first ``categories`` LLP categories, each an audio-only (1 in
    4), visual-only (1 in 4) or audio-visual event over a random stretch of 2-7 whole seconds
    (audio and visual stretches drawn apart). Seen: a square of the class colour; heard: its tone.
    ``videos``: videos per split (default train 32, val 8, test 8)."""
    from avfast.data.synthetic import _encode, class_colour, class_frequency, tone

    if isinstance(categories, bool) or not isinstance(categories, int) or not 1 <= categories <= len(LLP_CATEGORIES):
        raise ValueError(f"categories: expected an integer in [1, {len(LLP_CATEGORIES)}], got {categories!r}")
    videos = {"train": 32, "val": 8, "test": 8} if videos is None else dict(videos)
    if set(videos) - set(SPLIT_FILES) or any(not isinstance(n, int) or n < 0 for n in videos.values()):
        raise ValueError(f"videos: expected counts >= 0 for {sorted(SPLIT_FILES)}, got {videos!r}")
    root = Path(root)
    (root / "video").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = LLP_CATEGORIES[:categories]
    per_second = fps
    events = {"audio": [], "visual": []}
    for split, count in videos.items():
        rows = []
        for j in range(count):
            filename = f"syn{split}{j:04d}_{10 * j}_{10 * j + SECONDS}"
            classes = rng.choice(categories, size=min(categories, 1 + int(rng.integers(2))), replace=False)
            frames = (rng.integers(96, 160, (SECONDS * per_second, size, size, 1))
                      + rng.integers(-8, 9, (SECONDS * per_second, size, size, 3))).clip(0, 255).astype(np.uint8)
            wave = rng.normal(0, 0.01, SECONDS * sample_rate).astype(np.float32)
            side = size // 2
            for k in classes:
                kind = rng.choice(("audio", "visual", "both"), p=(0.25, 0.25, 0.5))
                for modality in ("audio", "visual"):
                    if kind not in (modality, "both"):
                        continue
                    length = int(rng.integers(2, 8))
                    onset = int(rng.integers(0, SECONDS - length + 1))
                    events[modality].append((filename, onset, onset + length, names[k]))
                    if modality == "audio":
                        span = slice(onset * sample_rate, (onset + length) * sample_rate)
                        wave[span] += tone(rng, class_frequency(int(k), categories), length * sample_rate,
                                           sample_rate) / len(classes)
                    else:
                        y, x = rng.integers(0, size - side + 1, 2)
                        frames[onset * per_second:(onset + length) * per_second, y:y + side, x:x + side] = \
                            class_colour(int(k), categories)
            _encode(root / "video" / f"{filename}.mp4", frames, fps, wave.clip(-1, 1), sample_rate)
            rows.append((filename, ",".join(names[k] for k in sorted(classes))))
        with open(root / SPLIT_FILES[split], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(("filename", "event_labels"))
            writer.writerows(rows)
    for modality, rows in events.items():
        _write_events(root / EVENT_FILES[modality], [r for r in rows if not r[0].startswith("syntrain")])


# ---------------------------------------------------------------------- parser head


class HybridAttentionLayer(nn.Module):
    """HAN's layer: x + self-attention(x) + cross-attention(x -> other), LayerNorm, then a
    ReLU feed-forward block, residual, LayerNorm. x, other (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, heads: int = 1, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.drop_self, self.drop_cross, self.drop_ff = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        attended = self.drop_cross(self.cross_attn(x, other, other, need_weights=False)[0])
        x = self.norm1(x + attended + self.drop_self(self.self_attn(x, x, x, need_weights=False)[0]))
        return self.norm2(x + self.drop_ff(self.ff(x)))


class AVParser(nn.Module):
    """HAN's parser with attentive MIL pooling. forward(audio (B, T, Da), visual (B, T, Dv))
    -> {"frame_prob" (B, T, 2, C) (modality 0 audio, 1 visual), "audio_prob", "visual_prob",
    "video_prob" (B, C)}."""

    def __init__(self, audio_dim: int, visual_dim: int, num_classes: int, *, width: int = 512, layers: int = 1,
                 heads: int = 1, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        for name, value in (("audio_dim", audio_dim), ("visual_dim", visual_dim), ("num_classes", num_classes),
                            ("width", width), ("layers", layers), ("heads", heads), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if width % heads:
            raise ValueError(f"heads: expected a divisor of width {width}, got {heads}")
        self.audio_proj, self.visual_proj = nn.Linear(audio_dim, width), nn.Linear(visual_dim, width)
        self.layers = nn.ModuleList(HybridAttentionLayer(width, heads, hidden, dropout) for _ in range(layers))
        self.prob, self.temporal_att, self.modality_att = (nn.Linear(width, num_classes) for _ in range(3))

    def forward(self, audio: Tensor, visual: Tensor) -> dict[str, Tensor]:
        if audio.dim() != 3 or visual.dim() != 3 or audio.shape[:2] != visual.shape[:2]:
            raise ValueError(f"audio, visual: expected (B, T, D) sequences of equal B and T, got "
                             f"{tuple(audio.shape)} and {tuple(visual.shape)}")
        a, v = self.audio_proj(audio), self.visual_proj(visual)
        for layer in self.layers:
            a, v = layer(a, v), layer(v, a)
        x = torch.stack([a, v], dim=2)  # (B, T, 2, D)
        frame_prob = torch.sigmoid(self.prob(x))
        temporal = torch.softmax(self.temporal_att(x), dim=1) * frame_prob
        modality = torch.softmax(self.modality_att(x), dim=2)
        return {"frame_prob": frame_prob, "audio_prob": temporal[:, :, 0].sum(1),
                "visual_prob": temporal[:, :, 1].sum(1), "video_prob": (temporal * modality).sum((1, 2))}


def _bce(prob: Tensor, target: Tensor) -> Tensor:
    p = prob.float().clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).mean()


def mil_loss(out: dict[str, Tensor], targets: Tensor, smoothing: float = SMOOTHING) -> Tensor:
    """HAN's loss: BCE(video_prob, y) + BCE(audio_prob, y_s) + BCE(visual_prob, y_s), y_s =
    y (1 - smoothing) + smoothing / 2; ``targets`` y (B, C) in {0, 1}. Returns a scalar."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    if targets.shape != out["video_prob"].shape:
        raise ValueError(f"targets: expected the shape of video_prob {tuple(out['video_prob'].shape)}, "
                         f"got {tuple(targets.shape)}")
    y = targets.float()
    smoothed = y * (1 - smoothing) + smoothing / 2
    return _bce(out["video_prob"], y) + _bce(out["audio_prob"], smoothed) + _bce(out["visual_prob"], smoothed)


def parse(out: dict[str, Tensor], threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """(audio, visual) bool (B, C, T): LLP's per-second predictions of the parser's output."""
    frame = out["frame_prob"] >= threshold  # (B, T, 2, C)
    audio = frame[:, :, 0] & (out["audio_prob"] >= threshold)[:, None]
    visual = frame[:, :, 1] & (out["visual_prob"] >= threshold)[:, None]
    return audio.transpose(1, 2), visual.transpose(1, 2)


# ---------------------------------------------------------------------- metrics


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Mean over the classes with any predicted or true item of 2 TP / (2 TP + FP + FN); 1 if none."""
    present = (tp + fp > 0) | (tp + fn > 0)
    if not present.any():
        return 1.0
    tp, fp, fn = tp[present], fp[present], fn[present]
    return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def event_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs of 1s of a 0/1 sequence as (start, end) with end exclusive."""
    padded = np.concatenate([[0], np.asarray(row, dtype=np.int8) != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _matches(x: tuple[int, int], ys: list[tuple[int, int]]) -> bool:
    """Whether run ``x`` has IoU >= 0.5 with one of ``ys`` (intersection >= 0.5 x union)."""
    for y in ys:
        inter = max(0, min(x[1], y[1]) - max(x[0], y[0]))
        if inter and inter >= IOU_THRESHOLD * ((x[1] - x[0]) + (y[1] - y[0]) - inter):
            return True
    return False


def _event_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class (TP, FP, FN) of LLP's event-level matching of (C, T) 0/1 arrays."""
    counts = np.zeros((3, pred.shape[0]))
    for k in range(pred.shape[0]):
        p, g = event_runs(pred[k]), event_runs(gt[k])
        matched = sum(_matches(x, g) for x in p)
        counts[:, k] = matched, len(p) - matched, sum(not _matches(y, p) for y in g)
    return counts[0], counts[1], counts[2]


def video_scores(pred_audio, pred_visual, gt_audio, gt_visual) -> dict[str, float]:
    """LLP's eight per-video F1 (``SCORES``) of (C, T) 0/1 predictions and ground truth."""
    arrays = [np.asarray(x.cpu() if isinstance(x, Tensor) else x).astype(np.int64)
              for x in (pred_audio, pred_visual, gt_audio, gt_visual)]
    pa, pv, ga, gv = arrays
    if pa.ndim != 2 or any(x.shape != pa.shape for x in arrays):
        raise ValueError(f"pred_audio, pred_visual, gt_audio, gt_visual: expected (C, T) arrays of one shape, "
                         f"got {[x.shape for x in arrays]}")
    if any(((x != 0) & (x != 1)).any() for x in arrays):
        raise ValueError("pred_audio, pred_visual, gt_audio, gt_visual: expected 0/1 values")
    pairs = {"audio": (pa, ga), "visual": (pv, gv), "av": (pa * pv, ga * gv)}
    scores = {}
    segment = {m: ((p * g).sum(1), (p * (1 - g)).sum(1), ((1 - p) * g).sum(1)) for m, (p, g) in pairs.items()}
    event = {m: _event_counts(p, g) for m, (p, g) in pairs.items()}
    for level, counts in (("segment", segment), ("event", event)):
        for m in ("audio", "visual", "av"):
            scores[f"{level}_{m}"] = _f1(*counts[m])
        scores[f"{level}_event"] = _f1(*(a + v for a, v in zip(counts["audio"], counts["visual"])))
    return {name: scores[name] for name in SCORES}


class ParsingMetrics:
    """LLP's dataset scores: ``update`` per batch of (B, C, T) predictions and ground truth,
    ``compute()`` -> the mean over videos of each of ``SCORES`` plus ``segment_type`` and
    ``event_type`` (type@AV) and ``videos``."""

    def __init__(self):
        self.sums, self.videos = np.zeros(len(SCORES)), 0

    def update(self, pred_audio, pred_visual, gt_audio, gt_visual) -> None:
        for row in zip(pred_audio, pred_visual, gt_audio, gt_visual):
            scores = video_scores(*row)
            self.sums += [scores[name] for name in SCORES]
            self.videos += 1

    def to_tensor(self) -> Tensor:
        """(len(SCORES) + 1,) float64: the score sums, then the video count."""
        return torch.tensor([*self.sums, self.videos], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, sums: Tensor) -> ParsingMetrics:
        metrics = cls()
        metrics.sums, metrics.videos = sums[:-1].double().cpu().numpy().copy(), int(sums[-1])
        return metrics

    def compute(self) -> dict[str, float]:
        if not self.videos:
            raise ValueError("ParsingMetrics.compute: expected at least one update, got none")
        mean = dict(zip(SCORES, (self.sums / self.videos).tolist()))
        for level in ("segment", "event"):
            mean[f"{level}_type"] = (mean[f"{level}_audio"] + mean[f"{level}_visual"] + mean[f"{level}_av"]) / 3
        return {**mean, "videos": self.videos}


def constant_baseline(train: list[LLPVideo], videos: list[LLPVideo], num_classes: int = len(LLP_CATEGORIES),
                      score: str = "segment_type") -> tuple[tuple[int, ...], dict[str, float]]:
    """The best constant prediction on ``videos`` (annotated) by ``score``: one class of the
    training labels, or all of them, heard and seen in every second of every video. Returns
    (its classes, its ``ParsingMetrics`` result); picked on ``videos`` themselves, so it is
    an upper bound for any constant of those classes."""
    seen = sorted({k for v in train for k in v.labels})
    if not seen or not videos:
        raise ValueError(f"train, videos: expected labelled training videos and annotated videos, got "
                         f"{len(train)} and {len(videos)}")
    truth = [v.event_arrays(num_classes) for v in videos]
    best = None
    for classes in [(k,) for k in seen] + [tuple(seen)]:
        constant = np.zeros((num_classes, SECONDS), dtype=np.uint8)
        constant[list(classes)] = 1
        metrics = ParsingMetrics()
        metrics.update([constant] * len(truth), [constant] * len(truth), *zip(*truth))
        result = metrics.compute()
        if best is None or result[score] > best[1][score]:
            best = (classes, result)
    return best


# ---------------------------------------------------------------------- model


class AVVPModel(nn.Module):
    """A per-second method's backbone (``dense_features``: per second, its visual maps each
    averaged over space and concatenated, and its audio vector) and an ``AVParser``.

    forward(frames (B, 10, 3, S, S), audio (B, 10, *features)) -> the parser's dict. The
    backbone's classification heads, unused here, are frozen. ``loss`` is ``mil_loss`` on the
    batch's ``targets`` (weak labels)."""

    def __init__(self, method: str, backbone: nn.Module, num_classes: int = len(LLP_CATEGORIES),
                 smoothing: float = SMOOTHING, **parser_kwargs):
        super().__init__()
        if method not in PARSING_METHODS:
            raise ValueError(f"method: expected one of {PARSING_METHODS} (per-second methods), got {method!r}")
        if backbone.config.num_frames != SECONDS:
            raise ValueError(f"backbone: expected num_frames {SECONDS} (LLP's seconds), got {backbone.config.num_frames}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
        self.method, self.backbone, self.smoothing = method, backbone, float(smoothing)
        self.preset, self.config = backbone.preset, backbone.config
        for name in backbone.dense_unused:
            freeze(backbone.get_submodule(name))
        levels, audio_dim = backbone.dense_shapes()
        self.parser = AVParser(audio_dim, sum(c for c, _ in levels), num_classes, **parser_kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def second_features(self, frames: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(audio (B, T, Da), visual (B, T, Dv)) per-second features."""
        maps, a = self.backbone.dense_features(frames, audio)
        B = frames.shape[0]
        visual = torch.cat([m.mean((2, 3)) for m in maps], dim=1)
        return a.unflatten(0, (B, -1)), visual.unflatten(0, (B, -1))

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        a, v = self.second_features(frames, audio)
        return self.parser(a.float(), v.float())

    def loss(self, out: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, float]]:
        loss = mil_loss(out, batch["targets"], self.smoothing)
        return loss, {"loss": loss.item()}


PARSER_SIZES = {"tiny": dict(width=64, hidden=128)}  # HAN's 512 / 512 otherwise


def build_avvp_model(method: str, size: str = "base", pretrained: str | None = None, parser: dict | None = None,
                     num_classes: int = len(LLP_CATEGORIES), smoothing: float = SMOOTHING,
                     **overrides) -> AVVPModel:
    """An ``AVVPModel``: ``method``'s backbone at ``size`` (``overrides``; ``pretrained``: a
    local upstream checkpoint) and a parser of ``PARSER_SIZES[size]`` (or HAN's sizes)
    updated by ``parser``."""
    from avfast.models import build_model

    if method not in PARSING_METHODS:
        raise ValueError(f"method: expected one of {PARSING_METHODS} (per-second methods), got {method!r}")
    backbone = build_model(method, size, num_classes=2, pretrained=pretrained, **overrides)
    return AVVPModel(method, backbone, num_classes, smoothing, **{**PARSER_SIZES.get(size, {}), **(parser or {})})
