"""Batched audio front-ends in plain torch: Kaldi fbank, log-mel and log-spectrogram features,
the three recipe frontends, and the waveform helpers fit_length / crop_window.

Every function takes a (B, S) waveform batch and runs on the tensors' device, so on CUDA
tensors this is the GPU audio front-end of the DALI path: no Python loop over the batch, no
host sync, and the constant tables (windows, filterbanks) are built once per
(parameters, device, dtype) and cached. The tables are built the way the references build
them, so the features match the references to rounding in float32 and float64 alike:
- kaldi_fbank == torchaudio.compliance.kaldi.fbank (window in the input dtype, mel banks
  in float32 as Kaldi and torchaudio build them),
- log_mel == log(torchaudio.transforms.MelSpectrogram(mel_scale="htk", norm=None) + eps)
  (window and filterbank built in float32, then cast, as the module's buffers are),
- log_spectrogram == log(|torch.stft(..., window=hann_window(n_fft))|**power + eps).
Inputs are float32 or float64 (the FFT needs them); cast half-precision audio first.

Recipes (UPSTREAM.md): DeepAVFusion -> LogMelFrontend(), MA-AVT -> LogSpectrogramFrontend(),
STG-CMA -> KaldiFbankFrontend() (CLIP) / KaldiFbankFrontend(224, 4.4, 224) (Swin).
DG-SCT needs no frontend: HTS-AT takes raw 32 kHz windows (crop_window + fit_length "tile").
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as nnf

__all__ = [
    "kaldi_fbank",
    "log_mel",
    "log_spectrogram",
    "KaldiFbankFrontend",
    "LogMelFrontend",
    "LogSpectrogramFrontend",
    "fit_length",
    "crop_window",
]

WAVE_DTYPES = (torch.float32, torch.float64)
KALDI_WINDOWS = ("hanning", "povey", "hamming")
PAD_MODES = ("reflect", "constant")
FIT_MODES = ("zero", "tile", "mirror")
_KALDI_EPS = torch.finfo(torch.float32).eps  # Kaldi floors mel energies at float32 eps in any dtype
_ZSCORE_EPS = 1e-9  # MA-AVT divides by (std + 1e-9)


# ------------------------------------------------------------------ checks


def _check_wave(wave, min_samples: int, name: str = "wave") -> None:
    """Raise unless ``wave`` is a float32/float64 (B, S) tensor with S >= min_samples."""
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, S), received {type(wave).__name__}")
    if wave.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (B, S) waveform batch, received shape {tuple(wave.shape)}")
    if wave.dtype not in WAVE_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, received {wave.dtype}")
    if wave.shape[1] < min_samples:
        raise ValueError(
            f"{name}: expected at least {min_samples} samples per row for these parameters, "
            f"received {wave.shape[1]} (shape {tuple(wave.shape)})"
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, received {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, received {value!r}")


def _check_num_samples(num_samples, min_samples: int) -> None:
    _check_int("num_samples", num_samples, 0)
    if num_samples < min_samples:
        raise ValueError(
            f"num_samples: expected at least {min_samples} for these parameters, received {num_samples}"
        )


def _table(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Cache a constant-table builder per (arguments, device, dtype). Tables are built outside
    inference mode and autograd, so a table first built under torch.inference_mode() can
    still be used by a later differentiable call. Callers must not modify them in place."""

    @functools.lru_cache(maxsize=128)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return build(*args)

    return cached


# ------------------------------------------------------------------ framing and spectra


def _power_spectrum(frames: torch.Tensor, n_fft: int, power: float) -> torch.Tensor:
    """|rfft(frames, n_fft)|**power: (..., n_fft) -> (..., n_fft // 2 + 1)."""
    spec = torch.fft.rfft(frames, n=n_fft)
    if power == 2.0:
        return torch.view_as_real(spec).square().sum(-1)
    mag = spec.abs()
    return mag if power == 1.0 else mag.pow(power)


def _stft_min_samples(n_fft: int, center: bool, pad_mode: str) -> int:
    if not center:
        return n_fft
    return n_fft // 2 + 1 if pad_mode == "reflect" else 1


def _stft_num_frames(num_samples: int, n_fft: int, hop_length: int, center: bool) -> int:
    padded = num_samples + 2 * (n_fft // 2) if center else num_samples
    return 1 + (padded - n_fft) // hop_length


def _check_stft_args(n_fft, hop_length, win_length, center, pad_mode, power) -> int:
    """Validate the STFT arguments shared by log_mel / log_spectrogram; returns win_length."""
    _check_int("n_fft", n_fft, 2)
    _check_int("hop_length", hop_length)
    win_length = n_fft if win_length is None else win_length
    _check_int("win_length", win_length)
    if win_length > n_fft:
        raise ValueError(f"win_length: expected <= n_fft ({n_fft}), received {win_length}")
    if center:
        _check_choice("pad_mode", pad_mode, PAD_MODES)
    if not power > 0:
        raise ValueError(f"power: expected > 0, received {power!r}")
    return win_length


@_table
def _hann_stft_window(n_fft: int, win_length: int, build_dtype: torch.dtype, device, dtype) -> torch.Tensor:
    """Periodic Hann of win_length, zero-padded centrally to n_fft (torch.stft's convention),
    built in build_dtype, then cast: (n_fft,)."""
    window = torch.hann_window(win_length, periodic=True, dtype=build_dtype)
    left = (n_fft - win_length) // 2
    window = nnf.pad(window, (left, n_fft - win_length - left))
    return window.to(device=device, dtype=dtype)


def _stft_power(wave, n_fft, hop_length, win_length, center, pad_mode, power, window_dtype):
    """Framed, Hann-windowed power spectrum: (B, S) -> (B, frames, n_fft // 2 + 1)."""
    wave = wave.contiguous()  # results must not depend on the input's strides
    if center:
        half = n_fft // 2
        wave = nnf.pad(wave.unsqueeze(1), (half, half), mode=pad_mode).squeeze(1)
    frames = wave.unfold(-1, n_fft, hop_length)  # view (B, frames, n_fft)
    window = _hann_stft_window(n_fft, win_length, window_dtype or wave.dtype, wave.device, wave.dtype)
    return _power_spectrum(frames * window, n_fft, power)


# ------------------------------------------------------------------ log-spectrogram / log-mel


def log_spectrogram(
    wave: torch.Tensor,
    *,
    n_fft: int,
    hop_length: int,
    center: bool = True,
    pad_mode: str = "reflect",
    power: float = 1.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """ln(|STFT|**power + eps) with a periodic Hann window of n_fft:
    (B, S) -> (B, n_fft // 2 + 1, frames), frames = 1 + S // hop_length when centred.
    pad_mode applies when centred: "reflect" (torch.stft) or "constant" (librosa >= 0.10)."""
    _check_stft_args(n_fft, hop_length, None, center, pad_mode, power)
    _check_wave(wave, _stft_min_samples(n_fft, center, pad_mode))
    spec = _stft_power(wave, n_fft, hop_length, n_fft, center, pad_mode, power, None)
    return torch.log(spec + eps).mT.contiguous()


@_table
def _htk_mel_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int, device, dtype):
    """Triangular HTK-mel filterbank without area normalisation, built in float32 on the
    grid linspace(0, sample_rate // 2, n_freqs) like torchaudio.functional.melscale_fbanks:
    (n_mels, n_freqs)."""
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_lo = 2595.0 * math.log10(1.0 + f_min / 700.0)
    mel_hi = 2595.0 * math.log10(1.0 + f_max / 700.0)
    edges = 700.0 * (10.0 ** (torch.linspace(mel_lo, mel_hi, n_mels + 2) / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    offsets = edges.unsqueeze(0) - freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    rising = (-1.0 * offsets[:, :-2]) / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    bank = torch.min(rising, falling).clamp_min(0.0)
    return bank.T.contiguous().to(device=device, dtype=dtype)


def log_mel(
    wave: torch.Tensor,
    *,
    sample_rate: int,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    power: float = 2.0,
    center: bool = True,
    pad_mode: str = "reflect",
    log: str = "log10",
    eps: float = 1e-7,
) -> torch.Tensor:
    """log(HTK-mel(|STFT|**power) + eps), periodic Hann window of win_length (default n_fft):
    (B, S) -> (B, n_mels, frames), frames = 1 + S // hop_length when centred.
    log: "log10" or "ln". f_max defaults to sample_rate // 2."""
    win_length = _check_stft_args(n_fft, hop_length, win_length, center, pad_mode, power)
    _check_int("sample_rate", sample_rate)
    _check_int("n_mels", n_mels)
    _check_choice("log", log, ("log10", "ln"))
    f_max = float(sample_rate // 2) if f_max is None else float(f_max)
    if not 0.0 <= f_min <= f_max:
        raise ValueError(f"f_min, f_max: expected 0 <= f_min <= f_max, received f_min={f_min}, f_max={f_max}")
    _check_wave(wave, _stft_min_samples(n_fft, center, pad_mode))
    spec = _stft_power(wave, n_fft, hop_length, win_length, center, pad_mode, power, torch.float32)
    bank = _htk_mel_fbanks(n_fft // 2 + 1, float(f_min), f_max, n_mels, sample_rate, wave.device, wave.dtype)
    mel = torch.matmul(bank, spec.mT)  # (B, n_mels, frames)
    return torch.log10(mel + eps) if log == "log10" else torch.log(mel + eps)


# ------------------------------------------------------------------ Kaldi fbank


def _kaldi_sizes(sample_rate, frame_length_ms, frame_shift_ms, round_to_power_of_two) -> tuple[int, int, int]:
    """(window length, shift, FFT size) in samples, truncated like Kaldi."""
    if not sample_rate > 0:
        raise ValueError(f"sample_rate: expected > 0, received {sample_rate!r}")
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if length < 2:
        raise ValueError(
            f"frame_length_ms: expected a window of >= 2 samples at {sample_rate} Hz, "
            f"received {frame_length_ms} ms ({length} samples)"
        )
    if shift < 1:
        raise ValueError(
            f"frame_shift_ms: expected a shift of >= 1 sample at {sample_rate} Hz, "
            f"received {frame_shift_ms} ms ({shift} samples)"
        )
    n_fft = 1 << (length - 1).bit_length() if round_to_power_of_two else length
    if n_fft % 2:
        raise ValueError(
            f"frame_length_ms: expected an even window ({length} samples) when round_to_power_of_two=False, "
            f"received {frame_length_ms} ms"
        )
    return length, shift, n_fft


def _kaldi_num_frames(num_samples: int, length: int, shift: int, snip_edges: bool) -> int:
    if snip_edges:
        return 1 + (num_samples - length) // shift
    return (num_samples + shift // 2) // shift


def _kaldi_frames(wave: torch.Tensor, length: int, shift: int, snip_edges: bool) -> torch.Tensor:
    """(B, S) -> (B, frames, length). snip_edges=False mirrors the ends like Kaldi
    (left: the first samples reversed, right: the whole signal reversed)."""
    if snip_edges:
        return wave.unfold(-1, length, shift)
    num_samples = wave.shape[1]
    pad = length // 2 - shift // 2
    flipped = wave.flip(-1)
    if pad > 0:
        wave = torch.cat((flipped[:, num_samples - pad:], wave, flipped), dim=-1)
    else:
        wave = torch.cat((wave[:, -pad:], flipped), dim=-1)
    return wave.unfold(-1, length, shift)[:, : _kaldi_num_frames(num_samples, length, shift, False)]


@_table
def _kaldi_window(kind: str, length: int, device, dtype) -> torch.Tensor:
    """Symmetric Kaldi window built in the compute dtype: (length,)."""
    if kind == "hamming":
        return torch.hamming_window(length, periodic=False, alpha=0.54, beta=0.46, dtype=dtype, device=device)
    window = torch.hann_window(length, periodic=False, dtype=dtype, device=device)
    return window.pow(0.85) if kind == "povey" else window


def _kaldi_freq_range(num_mel_bins, sample_rate, low_freq, high_freq) -> tuple[float, float]:
    _check_int("num_mel_bins", num_mel_bins, 4)
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0.0 else high_freq + nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high <= nyquist and low_freq < high):
        raise ValueError(
            f"low_freq, high_freq: expected 0 <= low_freq < high_freq <= nyquist ({nyquist} Hz; "
            f"high_freq <= 0 is an offset from nyquist), received low_freq={low_freq}, high_freq={high_freq}"
        )
    return float(low_freq), float(high)


@_table
def _kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float, low: float, high: float, device, dtype):
    """Kaldi's triangular mel banks (mel = 1127 ln(1 + f/700)), float32 like Kaldi, with a zero
    row for the Nyquist bin: (n_fft // 2 + 1, num_bins)."""
    mel_lo = 1127.0 * math.log(1.0 + low / 700.0)
    mel_hi = 1127.0 * math.log(1.0 + high / 700.0)
    step = (mel_hi - mel_lo) / (num_bins + 1)
    k = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = mel_lo + k * step, mel_lo + (k + 1.0) * step, mel_lo + (k + 2.0) * step
    fft_mel = 1127.0 * (1.0 + (sample_rate / n_fft) * torch.arange(n_fft / 2) / 700.0).log()
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    bank = torch.min(rising, falling).clamp_min(0.0)  # (num_bins, n_fft // 2)
    return nnf.pad(bank, (0, 1)).T.contiguous().to(device=device, dtype=dtype)


def _log_energy(frames: torch.Tensor, energy_floor: float) -> torch.Tensor:
    energy = frames.square().sum(-1).clamp_min(_KALDI_EPS).log()
    return energy if energy_floor == 0.0 else energy.clamp_min(math.log(energy_floor))


def kaldi_fbank(
    wave: torch.Tensor,
    *,
    sample_rate: float = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window: str = "hanning",
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    snip_edges: bool = True,
    round_to_power_of_two: bool = True,
    htk_compat: bool = True,
    use_energy: bool = False,
    raw_energy: bool = True,
    energy_floor: float = 1.0,
) -> torch.Tensor:
    """Kaldi log-mel filterbank features without dither, per row of the batch:
    (B, S) -> (B, frames, num_mel_bins + use_energy), frames = 1 + (S - L) // shift for
    snip_edges (L = window length). Equals torchaudio.compliance.kaldi.fbank(row, dither=0,
    window_type=window, ...) on every row. With use_energy the log energy is the last column
    (htk_compat) or the first; energy_floor 0 disables its floor."""
    _check_choice("window", window, KALDI_WINDOWS)
    if not 0.0 <= preemphasis <= 1.0:
        raise ValueError(f"preemphasis: expected a coefficient in [0, 1], received {preemphasis!r}")
    if energy_floor < 0.0:
        raise ValueError(f"energy_floor: expected >= 0, received {energy_floor!r}")
    length, shift, n_fft = _kaldi_sizes(sample_rate, frame_length_ms, frame_shift_ms, round_to_power_of_two)
    low, high = _kaldi_freq_range(num_mel_bins, sample_rate, low_freq, high_freq)
    _check_wave(wave, length)

    # contiguous input: the per-frame mean's rounding (which leaks into the lowest bins) must
    # not depend on the input's strides
    frames = _kaldi_frames(wave.contiguous(), length, shift, snip_edges)
    if remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    if use_energy and raw_energy:
        energy = _log_energy(frames, energy_floor)
    if preemphasis != 0.0:
        previous = torch.cat((frames[..., :1], frames[..., :-1]), dim=-1)
        frames = frames - preemphasis * previous
    frames = frames * _kaldi_window(window, length, wave.device, wave.dtype)
    if use_energy and not raw_energy:
        energy = _log_energy(frames, energy_floor)

    bank = _kaldi_mel_banks(num_mel_bins, n_fft, float(sample_rate), low, high, wave.device, wave.dtype)
    feats = torch.matmul(_power_spectrum(frames, n_fft, 2.0), bank).clamp_min(_KALDI_EPS).log()
    if use_energy:
        energy = energy.unsqueeze(-1)
        feats = torch.cat((feats, energy) if htk_compat else (energy, feats), dim=-1)
    return feats


# ------------------------------------------------------------------ recipe frontends


@dataclass(frozen=True)
class KaldiFbankFrontend:
    """STG-CMA audio: Kaldi fbank (Hann, dither 0), normalised (x - mean) / std, then zero-padded
    (or cut) in time to target_frames: (B, S) -> (B, target_frames, num_mel_bins), time x mel.
    As upstream, padding comes after normalisation, so padded rows are exactly 0.
    Defaults: CLIP variant, 1 s @ 16 kHz -> 98 frames -> 102. Swin variant:
    KaldiFbankFrontend(num_mel_bins=224, frame_shift_ms=4.4, target_frames=224) (223 -> 224)."""

    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    target_frames: int = 102
    mean: float = -4.1426
    std: float = 2 * 3.2001
    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    window: str = "hanning"

    def __post_init__(self):
        _check_choice("window", self.window, KALDI_WINDOWS)
        _check_int("target_frames", self.target_frames)
        if not self.std > 0:
            raise ValueError(f"std: expected > 0, received {self.std!r}")
        _kaldi_freq_range(self.num_mel_bins, self.sample_rate, 20.0, 0.0)
        _kaldi_sizes(self.sample_rate, self.frame_length_ms, self.frame_shift_ms, True)

    @property
    def min_samples(self) -> int:
        return _kaldi_sizes(self.sample_rate, self.frame_length_ms, self.frame_shift_ms, True)[0]

    def num_frames(self, num_samples: int) -> int:
        """Fbank frames before padding/cutting to target_frames."""
        _check_num_samples(num_samples, self.min_samples)
        length, shift, _ = _kaldi_sizes(self.sample_rate, self.frame_length_ms, self.frame_shift_ms, True)
        return _kaldi_num_frames(num_samples, length, shift, True)

    def output_shape(self, num_samples: int) -> tuple[int, int]:
        """Per-sample output shape (target_frames, num_mel_bins)."""
        _check_num_samples(num_samples, self.min_samples)
        return (self.target_frames, self.num_mel_bins)

    def validate(self, wave: torch.Tensor) -> None:
        _check_wave(wave, self.min_samples)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        self.validate(wave)
        feats = kaldi_fbank(
            wave,
            sample_rate=self.sample_rate,
            num_mel_bins=self.num_mel_bins,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
            window=self.window,
        )
        feats = (feats - self.mean) / self.std
        missing = self.target_frames - feats.shape[1]
        return nnf.pad(feats, (0, 0, 0, missing)) if missing > 0 else feats[:, : self.target_frames].contiguous()


@dataclass(frozen=True)
class LogMelFrontend:
    """DeepAVFusion audio: log10(HTK-mel power + 1e-7), no dataset normalisation, last frame
    dropped: (B, S) -> (B, 1, n_mels, 1 + S // hop_length - drop_last), mel x time.
    Defaults: 3 s @ 16 kHz, n_fft 800 (50 ms), hop 250 (16000 / 64) -> (B, 1, 128, 192)."""

    sample_rate: int = 16000
    n_fft: int = 800
    hop_length: int = 250
    n_mels: int = 128
    drop_last: bool = True
    win_length: int | None = None
    f_min: float = 0.0
    f_max: float | None = None
    log: str = "log10"
    eps: float = 1e-7
    pad_mode: str = "reflect"

    def __post_init__(self):
        _check_stft_args(self.n_fft, self.hop_length, self.win_length, True, self.pad_mode, 2.0)
        _check_int("sample_rate", self.sample_rate)
        _check_int("n_mels", self.n_mels)
        _check_choice("log", self.log, ("log10", "ln"))

    @property
    def min_samples(self) -> int:
        # one frame must remain after drop_last
        return max(_stft_min_samples(self.n_fft, True, self.pad_mode), self.hop_length if self.drop_last else 1)

    def output_shape(self, num_samples: int) -> tuple[int, int, int]:
        """Per-sample output shape (1, n_mels, frames)."""
        _check_num_samples(num_samples, self.min_samples)
        frames = _stft_num_frames(num_samples, self.n_fft, self.hop_length, True) - int(self.drop_last)
        return (1, self.n_mels, frames)

    def validate(self, wave: torch.Tensor) -> None:
        _check_wave(wave, self.min_samples)

    def filterbank(self) -> torch.Tensor:
        """The HTK-mel filterbank the features use: float32 (n_mels, n_fft // 2 + 1)."""
        f_max = float(self.sample_rate // 2) if self.f_max is None else float(self.f_max)
        return _htk_mel_fbanks(self.n_fft // 2 + 1, float(self.f_min), f_max, self.n_mels, self.sample_rate,
                               "cpu", torch.float32)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        self.validate(wave)
        feats = log_mel(
            wave,
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
            win_length=self.win_length,
            f_min=self.f_min,
            f_max=self.f_max,
            pad_mode=self.pad_mode,
            log=self.log,
            eps=self.eps,
        )
        if self.drop_last:
            feats = feats[..., :-1].contiguous()
        return feats.unsqueeze(1)


@dataclass(frozen=True)
class LogSpectrogramFrontend:
    """MA-AVT audio: ln(|STFT| + 1e-7) (Hann, centred), then a per-sample z-score over the whole
    spectrogram, (x - mean) / (std + 1e-9) with the population std:
    (B, S) -> (B, 1, n_fft // 2 + 1, 1 + S // hop_length), freq x time.
    Defaults: 5 s @ 16 kHz, n_fft 446, hop 358 -> (B, 1, 224, 224). pad_mode "constant" is
    librosa >= 0.10's default (upstream calls librosa.stft with defaults); "reflect" is older
    librosa's. The two differ only in the first and last frames."""

    n_fft: int = 446
    hop_length: int = 358
    zscore: bool = True
    eps: float = 1e-7
    pad_mode: str = "constant"

    def __post_init__(self):
        _check_stft_args(self.n_fft, self.hop_length, None, True, self.pad_mode, 1.0)

    @property
    def min_samples(self) -> int:
        return _stft_min_samples(self.n_fft, True, self.pad_mode)

    def output_shape(self, num_samples: int) -> tuple[int, int, int]:
        """Per-sample output shape (1, n_fft // 2 + 1, frames)."""
        _check_num_samples(num_samples, self.min_samples)
        return (1, self.n_fft // 2 + 1, _stft_num_frames(num_samples, self.n_fft, self.hop_length, True))

    def validate(self, wave: torch.Tensor) -> None:
        _check_wave(wave, self.min_samples)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        self.validate(wave)
        feats = log_spectrogram(
            wave, n_fft=self.n_fft, hop_length=self.hop_length, pad_mode=self.pad_mode, eps=self.eps
        )
        if self.zscore:
            std, mean = torch.std_mean(feats, dim=(1, 2), correction=0, keepdim=True)
            feats = (feats - mean) / (std + _ZSCORE_EPS)
        return feats.unsqueeze(1)


# ------------------------------------------------------------------ waveform helpers


def _check_wave_any(wave, name: str = "wave") -> None:
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, S) or (S,), received {type(wave).__name__}")
    if wave.dim() not in (1, 2):
        raise ValueError(f"{name}: expected shape (B, S) or (S,), received shape {tuple(wave.shape)}")


def fit_length(wave: torch.Tensor, length: int, mode: str = "zero") -> torch.Tensor:
    """Pad or cut the last dim to exactly ``length`` samples: (B, S) or (S,) -> (B, length) or (length,).
    Longer input keeps its first ``length`` samples (use crop_window for another part). Padding:
    "zero" appends zeros; "tile" repeats x, x, x, ... (MA-AVT's np.tile doubling); "mirror"
    repeats x, reversed x, x, ... (DeepAVFusion's Pad). Returns ``wave`` itself when S == length."""
    _check_wave_any(wave)
    _check_int("length", length)
    _check_choice("mode", mode, FIT_MODES)
    num_samples = wave.shape[-1]
    if num_samples >= length:
        return wave if num_samples == length else wave[..., :length]
    if mode == "zero":
        return nnf.pad(wave, (0, length - num_samples))
    if num_samples == 0:
        raise ValueError(f"wave: expected at least 1 sample to {mode}-pad, received shape {tuple(wave.shape)}")
    period = wave if mode == "tile" else torch.cat((wave, wave.flip(-1)), dim=-1)
    reps = -(-length // period.shape[-1])
    return period.repeat(*([1] * (wave.dim() - 1)), reps)[..., :length]


def crop_window(wave: torch.Tensor, start_sample, length: int) -> torch.Tensor:
    """Samples [start, start + length) of each row: (B, S) or (S,) -> (B, length) or (length,).
    ``start_sample``: an int (a view is returned), or for (B, S) a length-B sequence or 1-D integer
    tensor of per-row starts (gathered on the wave's device). Windows must lie inside the signal;
    checking a CUDA start tensor costs one host sync, so pass CPU starts on the hot path."""
    _check_wave_any(wave)
    _check_int("length", length)
    num_samples = wave.shape[-1]
    if _is_int(start_sample):
        if not 0 <= start_sample <= num_samples - length:
            raise ValueError(
                f"start_sample: expected 0 <= start_sample <= {num_samples - length} "
                f"(window of {length} in {num_samples} samples), received {start_sample}"
            )
        return wave[..., int(start_sample) : int(start_sample) + length]
    if wave.dim() != 2:
        raise ValueError(f"start_sample: per-row starts need wave of shape (B, S), received shape {tuple(wave.shape)}")
    starts = torch.as_tensor(start_sample)
    if starts.dtype.is_floating_point or starts.dtype == torch.bool or starts.shape != (wave.shape[0],):
        raise ValueError(
            f"start_sample: expected an int or {wave.shape[0]} integer starts (one per row), "
            f"received {starts.dtype} of shape {tuple(starts.shape)}"
        )
    bad = (starts < 0) | (starts > num_samples - length)
    if bool(bad.any()):
        raise ValueError(
            f"start_sample: expected starts in [0, {num_samples - length}] "
            f"(window of {length} in {num_samples} samples), received {starts[bad].tolist()} "
            f"at rows {bad.nonzero().flatten().tolist()}"
        )
    index = starts.to(wave.device, torch.long).unsqueeze(1) + torch.arange(length, device=wave.device)
    return torch.gather(wave, 1, index)
