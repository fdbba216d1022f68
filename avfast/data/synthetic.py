"""Synthetic labelled clips for tests, demos and benchmarks.

Class k is visible and audible in ways that survive lossy codecs: a square half the frame wide
in a saturated colour (hue k / num_classes) moving over a grey noise background, and a tone
at ``class_frequency(k)`` (amplitude 0.3) over low noise (std 0.01).
"""

from __future__ import annotations

import colorsys
import fractions
import os
from pathlib import Path

import av
import numpy as np

from avfast.data.manifest import Clip, Manifest, atomic_output
from avfast.data.media import FORMATS

SUFFIXES = {".mp4": ("libx264", "aac"), ".mkv": ("libvpx-vp9", "flac"), ".webm": ("libvpx-vp9", "libopus")}
OPUS_RATE = 48000
ENCODER_OPTIONS = {"libx264": {"preset": "veryfast", "crf": "20"},
                   "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "24", "b": "0"}}
TONE_AMPLITUDE = 0.3
NOISE_STD = 0.01
MIN_FREQUENCY, MAX_FREQUENCY = 300.0, 3000.0


def _check_class(fn: str, k: int, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{fn}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes:
        raise ValueError(f"{fn}: class index must be an integer in [0, {num_classes}), got {k!r}")


def class_colour(k: int, num_classes: int) -> tuple[int, int, int]:
    """Saturated RGB colour (uint8 values) of class ``k``: hue k / num_classes."""
    _check_class("class_colour", k, num_classes)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(k / num_classes, 1.0, 1.0))


def class_frequency(k: int, num_classes: int) -> float:
    """Tone frequency in Hz of class ``k``: log-spaced over [300, 3000], distinct per class."""
    _check_class("class_frequency", k, num_classes)
    if num_classes == 1:
        return MIN_FREQUENCY
    return MIN_FREQUENCY * (MAX_FREQUENCY / MIN_FREQUENCY) ** (k / (num_classes - 1))


def _frames(rng: np.random.Generator, colour, num_frames: int, size: int) -> np.ndarray:
    """uint8 (T, size, size, 3): grey noise background and a bouncing square of ``colour``."""
    side = size // 2
    span = size - side
    pos = rng.uniform(0, span, 2)
    vel = rng.uniform(-0.4, 0.4, 2) * span
    grey = rng.integers(64, 192, (num_frames, size, size, 1))
    frames = (grey + rng.integers(-8, 9, (num_frames, size, size, 3))).clip(0, 255).astype(np.uint8)
    for t in range(num_frames):
        y, x = (np.abs((pos + vel * t) % (2 * span) - span) if span else (0, 0))
        y, x = int(round(y)), int(round(x))
        frames[t, y:y + side, x:x + side] = colour
    return frames


def tone(rng: np.random.Generator, frequency: float, num_samples: int, sample_rate: int) -> np.ndarray:
    """float32 (num_samples,): a sine of ``frequency`` Hz (random phase) plus a little noise."""
    t = np.arange(num_samples) / sample_rate
    wave = TONE_AMPLITUDE * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    return (wave + rng.normal(0, NOISE_STD, num_samples)).clip(-1, 1).astype(np.float32)


def _encode(path: Path, frames: np.ndarray, fps: int, wave: np.ndarray | None, sample_rate: int) -> None:
    """Write frames (T, H, W, 3) uint8 at ``fps`` and mono ``wave`` (S,) float to ``path``."""
    video_codec, audio_codec = SUFFIXES[path.suffix.lower()]
    with atomic_output(path) as tmp, av.open(tmp, "w", format=FORMATS[path.suffix.lower()]) as out:
        video = out.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = ENCODER_OPTIONS[video_codec]
        audio = None
        if wave is not None:
            audio = out.add_stream(audio_codec, rate=sample_rate)
            audio.layout = "mono"
        frame_tb = fractions.Fraction(1, fps)
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, frame_tb
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            fmt_name = audio.codec_context.format.name
            chunk = audio.codec_context.frame_size or 1024
            audio_tb = fractions.Fraction(1, sample_rate)
            for offset in range(0, len(wave), chunk):
                block = wave[None, offset:offset + chunk]
                if fmt_name.startswith("s16"):
                    block = np.clip(np.round(block * 32768), -32768, 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(block, format=fmt_name, layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, offset, audio_tb
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))


def _check_clip_args(suffix: str, duration: float, fps: int, size: int,
                     sample_rate: int | None) -> int:
    """Validate the clip arguments; returns the audio sample rate to use."""
    if suffix.lower() not in SUFFIXES:
        raise ValueError(f"write_clip: path must end with one of {tuple(SUFFIXES)}, got suffix {suffix!r}")
    if not duration > 0:
        raise ValueError(f"write_clip: duration must be > 0 s, got {duration!r}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"write_clip: fps must be a positive integer, got {fps!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 2:
        raise ValueError(f"write_clip: size must be an even integer >= 16, got {size!r}")
    opus = suffix.lower() == ".webm"
    if sample_rate is None:
        return OPUS_RATE if opus else 16000
    if opus and sample_rate != OPUS_RATE:
        raise ValueError(f"write_clip: sample_rate must be {OPUS_RATE} (or None) for .webm (Opus), "
                         f"got {sample_rate!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 8000:
        raise ValueError(f"write_clip: sample_rate must be an integer >= 8000, got {sample_rate!r}")
    return sample_rate


def write_clip(path, class_index: int, num_classes: int, *, duration: float = 3.0, fps: int = 10,
               size: int = 64, sample_rate: int | None = None, audio: bool = True, seed: int = 0) -> None:
    """Write one clip of class ``class_index`` to ``path``: round(duration * fps) frames of
    size x size px, and (``audio=True``) a mono track of round(duration * sample_rate) samples.
    The container follows the suffix: .mp4 = H.264 + AAC, .mkv = VP9 + FLAC, .webm = VP9 +
    Opus. ``sample_rate=None``: 16000, or 48000 for .webm (Opus needs 48 kHz)."""
    path = Path(path)
    _check_class("write_clip", class_index, num_classes)
    sample_rate = _check_clip_args(path.suffix, duration, fps, size, sample_rate)
    rng = np.random.default_rng([seed, class_index])
    frames = _frames(rng, class_colour(class_index, num_classes), max(1, round(duration * fps)), size)
    wave = None
    if audio:
        freq = class_frequency(class_index, num_classes)
        wave = tone(rng, freq, round(duration * sample_rate), sample_rate)
    _encode(path, frames, fps, wave, sample_rate)


def _width(count: int, minimum: int) -> int:
    return max(minimum, len(str(count - 1)))


def make_dataset(root, num_classes: int = 4, clips_per_class: int = 6, *, suffix: str = ".mkv",
                 duration: float = 3.0, fps: int = 10, size: int = 64, sample_rate: int | None = None,
                 seed: int = 0) -> Manifest:
    """A folder dataset root/class_XX/clip_YYY<suffix> of ``write_clip`` clips (each with its
    own seed); returns its Manifest (equal to ``read_folder(root)``)."""
    _check_class("make_dataset", 0, num_classes)
    if isinstance(clips_per_class, bool) or not isinstance(clips_per_class, int) or clips_per_class < 1:
        raise ValueError(f"make_dataset: clips_per_class must be a positive integer, got {clips_per_class!r}")
    cw, jw = _width(num_classes, 2), _width(clips_per_class, 3)
    classes = [f"class_{k:0{cw}d}" for k in range(num_classes)]
    clips = []
    for k, name in enumerate(classes):
        for j in range(clips_per_class):
            rel = f"{name}/clip_{j:0{jw}d}{suffix}"
            write_clip(Path(root) / rel, k, num_classes, duration=duration, fps=fps, size=size,
                       sample_rate=sample_rate, seed=seed * 1_000_003 + k * clips_per_class + j)
            clips.append(Clip(path=rel, labels=(k,)))
    return Manifest(clips=clips, classes=classes, root=os.fspath(root))


BAD_CLIPS = ("corrupt", "truncated", "no_audio", "silent", "too_short")


def make_bad_clips(folder, *, suffix: str = ".mkv", seed: int = 0) -> dict[str, str]:
    """Files in ``folder`` that ``prepare`` must reject, name -> path: "corrupt" (random bytes),
    "truncated" (the first 40% of a valid clip), "no_audio", "silent" (all-zero audio),
    "too_short" (0.3 s)."""
    folder = Path(folder)
    sample_rate = _check_clip_args(suffix, 1.0, 10, 64, None)
    rng = np.random.default_rng(seed)
    paths = {name: folder / f"{name}{suffix}" for name in BAD_CLIPS}
    folder.mkdir(parents=True, exist_ok=True)
    paths["corrupt"].write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    write_clip(paths["truncated"], 0, 1, duration=3.0, sample_rate=sample_rate, seed=seed)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: int(0.4 * len(data))])
    write_clip(paths["no_audio"], 0, 1, duration=2.0, audio=False, seed=seed)
    frames = _frames(rng, class_colour(0, 1), 20, 64)
    _encode(paths["silent"], frames, 10, np.zeros(2 * sample_rate, np.float32), sample_rate)
    write_clip(paths["too_short"], 0, 1, duration=0.3, sample_rate=sample_rate, seed=seed)
    return {name: os.fspath(p) for name, p in paths.items()}
