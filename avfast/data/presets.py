"""Per-method data recipes: which frames, which audio windows, which front-end.

Each preset reproduces the front-end of a method's public code (UPSTREAM.md §1.5, §2.3,
§3.3, §4.3). The CPU path (``avfast.data.cpu``) and the DALI path (``avfast.data.dali``)
both read a preset, so one preset gives the same samples on either path.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

from avfast.data.audio import KaldiFbankFrontend, LogMelFrontend, LogSpectrogramFrontend

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """Frames per sample and their geometry.

    ``frames`` frames are taken per clip: one frame (at a random time inside the audio window
    when training, its centre otherwise), or ``frames`` frames spread uniformly over the clip.
    Training crops follow RandomResizedCrop(``size``, ``train_scale``, ``train_ratio``) with a
    horizontal flip (``train_random_crop=False``: the evaluation geometry); evaluation crops a centred box covering ``eval_crop_fraction`` of the
    shorter side (Resize(s / f) + CenterCrop(s) in one step), or the whole frame when
    ``eval_crop_fraction`` is None (a plain Resize((s, s))).
    """

    frames: int = 1
    sampling: Literal["window", "uniform"] = "window"
    size: int = 224
    train_scale: tuple[float, float] = (0.08, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_flip: bool = True
    train_random_crop: bool = True
    eval_crop_fraction: float | None = 224 / 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """Audio windows per sample and the front-end that turns them into features.

    ``segments`` windows of ``window_s`` seconds: one window (random start when training,
    centred otherwise) or, for per-second methods, ``segments`` windows with starts spread
    uniformly over the clip (``linspace(0, duration - window_s - segment_margin_s, segments)``).
    Clips shorter than a window are padded by ``pad``. ``frontend`` maps (B, samples) to
    features; None returns the waveform windows themselves (B, segments, samples).
    """

    sample_rate: int = 16000
    window_s: float = 3.0
    segments: int = 1
    segment_margin_s: float = 0.0
    pad: Literal["zero", "tile", "mirror"] = "zero"
    frontend: Callable | None = None

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.sample_rate)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A method's data recipe: ``video`` + ``audio`` (see their docstrings)."""

    name: str
    video: VideoSpec
    audio: AudioSpec


PRESETS: dict[str, Preset] = {
    # DeepAVFusion: 1 frame at a random time in a 3 s window, RandomResizedCrop(224, 0.5-1);
    # 16 kHz log10 mel (800/250, 128 mels, last frame dropped) -> (1, 128, 192), mirror padding.
    "deepavfusion": Preset(
        "deepavfusion",
        VideoSpec(frames=1, sampling="window", size=224, train_scale=(0.5, 1.0)),
        AudioSpec(sample_rate=16000, window_s=3.0, pad="mirror",
                  frontend=LogMelFrontend(n_fft=800, hop_length=250, n_mels=128)),
    ),
    # MA-AVT: the window-centre frame, RandomResizedCrop(224) / Resize((224, 224));
    # 5 s tiled, STFT 446/358, ln(|X| + 1e-7), per-sample z-score -> (1, 224, 224).
    "mavt": Preset(
        "mavt",
        VideoSpec(frames=1, sampling="window", size=224, eval_crop_fraction=None),
        AudioSpec(sample_rate=16000, window_s=5.0, pad="tile",
                  frontend=LogSpectrogramFrontend(n_fft=446, hop_length=358)),
    ),
    # STG-CMA (CLIP): 10 frames uniformly, 10 one-second windows at linspace(0, len - 1.1 s),
    # Kaldi fbank 128 mels 25/10 ms padded to 102 frames, (x + 4.1426) / (2 * 3.2001).
    "stgcma": Preset(
        "stgcma",
        VideoSpec(frames=10, sampling="uniform", size=224, eval_crop_fraction=1.0),
        AudioSpec(sample_rate=16000, window_s=1.0, segments=10, segment_margin_s=0.1,
                  frontend=KaldiFbankFrontend(num_mel_bins=128, frame_shift_ms=10.0,
                                              target_frames=102, mean=-4.1426, std=2 * 3.2001)),
    ),
    # DG-SCT: 10 frames uniformly resized to 192 x 192; 10 one-second 32 kHz waveforms
    # (HTS-AT computes its own spectrogram inside the model).
    "dgsct": Preset(
        "dgsct",
        VideoSpec(frames=10, sampling="uniform", size=192, train_random_crop=False,
                  train_flip=False, eval_crop_fraction=None),
        AudioSpec(sample_rate=32000, window_s=1.0, segments=10),
    ),
}


def get_preset(name: str | Preset) -> Preset:
    """The preset called ``name`` (a Preset passes through)."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def check_per_second(preset: Preset, seconds: int) -> None:
    """Raise unless ``preset`` reads ``seconds`` frames and ``seconds`` one-per-second windows."""
    if preset.video.frames != seconds or preset.audio.segments != seconds:
        raise ValueError(f"preset: expected a per-second preset ({seconds} frames, {seconds} windows), got "
                         f"{preset.name!r} ({preset.video.frames} frames, {preset.audio.segments} windows)")
