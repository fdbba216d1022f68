"""avfast.data.audio against torchaudio (kaldi.fbank, MelSpectrogram), torch.stft, the upstream
recipes restated, and DALI's CPU spectrogram + mel filterbank.

Tolerances: the truth is the reference run in float64 on the same (float32-representable)
input. A float32 result must be within twice the float32 reference's own deviation from that
truth plus a small floor; a float64 result within a tight float64 floor (our tables are
built exactly like the references', so only summation order differs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio

from avfast.data import audio as A
from seeding import fresh_seed

FLOOR32 = 1e-5  # log-domain absolute floor for float32 results
FLOOR64 = 1e-9  # log-domain absolute floor for float64 results
LAYOUTS = [(1, "contiguous"), (3, "strided"), (3, "transposed")]



def odd_length(base: int, spread: int = 800) -> int:
    return base + 2 * int(torch.randint(0, spread, ())) + 1


def make_waves(batch: int, num_samples: int, layout: str) -> torch.Tensor:
    """float64 (batch, num_samples) holding float32-representable values (noise + a tone, and a
    silent stretch in the last row), as a contiguous tensor or a non-contiguous view."""
    t = torch.arange(num_samples, dtype=torch.float64) / 16000
    freq = 200 + 3000 * torch.rand(batch, 1, dtype=torch.float64)
    wave = 0.1 * torch.randn(batch, num_samples, dtype=torch.float64) + 0.3 * torch.sin(2 * math.pi * freq * t)
    wave[-1, num_samples // 3 : num_samples // 3 + 1200] = 0.0
    wave = wave.float().double()
    if layout == "strided":
        buf = torch.zeros(batch, 2 * num_samples, dtype=torch.float64)
        buf[:, ::2] = wave
        return buf[:, ::2]
    if layout == "transposed":
        return wave.T.contiguous().T
    return wave


def assert_matches(ours: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str) -> float:
    """Check ours (float32 or float64) against the float64 reference; returns the max error."""
    err = (ours.double() - ref64).abs().max().item()
    if ours.dtype == torch.float64:
        tol = FLOOR64
    else:
        tol = 2 * (ref32.double() - ref64).abs().max().item() + FLOOR32
    assert err <= tol, f"{what}: max |ours - ref64| = {err:.3g} > tolerance {tol:.3g}"
    return err


# ------------------------------------------------------------------ kaldi_fbank


KALDI_CONFIGS = {
    "stgcma-clip-hanning": dict(num_mel_bins=128, frame_shift_ms=10.0, window="hanning"),
    "povey": dict(num_mel_bins=128, frame_shift_ms=10.0, window="povey"),
    "hamming": dict(num_mel_bins=80, frame_shift_ms=10.0, window="hamming"),
    "stgcma-swin": dict(num_mel_bins=224, frame_shift_ms=4.4, window="hanning"),
    "energy-first-no-snip": dict(
        num_mel_bins=40, frame_length_ms=20.0, frame_shift_ms=7.0, window="povey", preemphasis=0.5,
        remove_dc_offset=False, low_freq=60.0, high_freq=-400.0, snip_edges=False, round_to_power_of_two=False,
        htk_compat=False, use_energy=True, raw_energy=False, energy_floor=0.0,
    ),
    "energy-last-8k": dict(
        sample_rate=8000, num_mel_bins=23, frame_shift_ms=12.5, window="hamming", preemphasis=0.0,
        snip_edges=False, use_energy=True, raw_energy=True, energy_floor=1.0,
    ),
}
TORCHAUDIO_KALDI_NAMES = {
    "sample_rate": "sample_frequency", "frame_length_ms": "frame_length", "frame_shift_ms": "frame_shift",
    "window": "window_type", "preemphasis": "preemphasis_coefficient",
}


def torchaudio_fbank(row: torch.Tensor, config: dict) -> torch.Tensor:
    kwargs = dict(htk_compat=True, sample_frequency=16000, num_mel_bins=128, window_type="hanning", dither=0.0)
    kwargs.update({TORCHAUDIO_KALDI_NAMES.get(k, k): v for k, v in config.items()})
    return torchaudio.compliance.kaldi.fbank(row.unsqueeze(0), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,layout", LAYOUTS)
@pytest.mark.parametrize("name", list(KALDI_CONFIGS))
def test_kaldi_fbank_matches_torchaudio_per_row(name, batch, layout, dtype):
    seed, config = fresh_seed(), KALDI_CONFIGS[name]
    num_samples = odd_length(int(0.8 * config.get("sample_rate", 16000)))
    wave = make_waves(batch, num_samples, layout)
    ours = A.kaldi_fbank(wave.to(dtype), **config)
    assert ours.dtype == dtype
    for b in range(batch):
        ref64 = torchaudio_fbank(wave[b].contiguous(), config)
        ref32 = torchaudio_fbank(wave[b].float(), config)
        assert ours.shape[1:] == ref64.shape
        assert_matches(ours[b], ref64, ref32, f"kaldi {name} row {b} {dtype} {layout} S={num_samples} seed={seed}")


# ------------------------------------------------------------------ log_mel


LOG_MEL_CONFIGS = {
    "deepavfusion": dict(sample_rate=16000, n_fft=800, hop_length=250, n_mels=128),
    "short-window-ln-magnitude": dict(
        sample_rate=32000, n_fft=1024, hop_length=320, n_mels=64, win_length=800, f_min=50.0, f_max=14000.0,
        power=1.0, pad_mode="constant", log="ln", eps=1e-6,
    ),
    "not-centred": dict(sample_rate=16000, n_fft=400, hop_length=160, n_mels=40, center=False),
}


def torchaudio_log_mel(row: torch.Tensor, config: dict) -> torch.Tensor:
    config = dict(config)
    log, eps = config.pop("log", "log10"), config.pop("eps", 1e-7)
    module = torchaudio.transforms.MelSpectrogram(**config, norm=None, mel_scale="htk").to(row.dtype)
    mel = module(row) + eps
    return torch.log10(mel) if log == "log10" else torch.log(mel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,layout", LAYOUTS)
@pytest.mark.parametrize("name", list(LOG_MEL_CONFIGS))
def test_log_mel_matches_torchaudio_per_row(name, batch, layout, dtype):
    seed, config = fresh_seed(), LOG_MEL_CONFIGS[name]
    wave = make_waves(batch, odd_length(config["sample_rate"]), layout)
    ours = A.log_mel(wave.to(dtype), **config)
    assert ours.dtype == dtype and ours.is_contiguous()
    for b in range(batch):
        ref64 = torchaudio_log_mel(wave[b].contiguous(), config)
        ref32 = torchaudio_log_mel(wave[b].float(), config)
        assert ours.shape[1:] == ref64.shape
        assert_matches(ours[b], ref64, ref32, f"log_mel {name} row {b} {dtype} {layout} seed={seed}")


# ------------------------------------------------------------------ log_spectrogram


LOG_SPEC_CONFIGS = {
    "ma-avt": dict(n_fft=446, hop_length=358),
    "power-constant-pad": dict(n_fft=512, hop_length=128, power=2.0, pad_mode="constant", eps=1e-9),
    "not-centred-odd-fft": dict(n_fft=401, hop_length=100, center=False),
}


def stft_log_spectrogram(row: torch.Tensor, config: dict) -> torch.Tensor:
    n_fft, hop = config["n_fft"], config["hop_length"]
    spec = torch.stft(
        row, n_fft, hop, window=torch.hann_window(n_fft, dtype=row.dtype), center=config.get("center", True),
        pad_mode=config.get("pad_mode", "reflect"), return_complex=True,
    )
    return torch.log(spec.abs() ** config.get("power", 1.0) + config.get("eps", 1e-7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,layout", LAYOUTS)
@pytest.mark.parametrize("name", list(LOG_SPEC_CONFIGS))
def test_log_spectrogram_matches_torch_stft_per_row(name, batch, layout, dtype):
    seed, config = fresh_seed(), LOG_SPEC_CONFIGS[name]
    wave = make_waves(batch, odd_length(12000), layout)
    ours = A.log_spectrogram(wave.to(dtype), **config)
    assert ours.dtype == dtype and ours.is_contiguous()
    for b in range(batch):
        ref64 = stft_log_spectrogram(wave[b].contiguous(), config)
        ref32 = stft_log_spectrogram(wave[b].float(), config)
        assert ours.shape[1:] == ref64.shape
        assert_matches(ours[b], ref64, ref32, f"log_spectrogram {name} row {b} {dtype} {layout} seed={seed}")


# ------------------------------------------------------------------ frontends


def test_deepavfusion_frontend_shape_and_values():
    fresh_seed()
    frontend = A.LogMelFrontend()
    wave = make_waves(2, 48000, "contiguous").float()
    out = frontend(wave)
    assert frontend.output_shape(48000) == (1, 128, 192)
    assert out.shape == (2, 1, 128, 192) and out.is_contiguous()
    full = A.log_mel(wave, sample_rate=16000, n_fft=800, hop_length=250, n_mels=128)
    assert full.shape[-1] == 193
    torch.testing.assert_close(out[:, 0], full[..., :192], rtol=0, atol=0)


def test_ma_avt_frontend_matches_librosa_recipe():
    """log(|stft| + 1e-7) with librosa >= 0.10's zero padding, then z-score with numpy's std."""
    seed = fresh_seed()
    frontend = A.LogSpectrogramFrontend()
    wave = make_waves(2, 80000, "strided")
    out = frontend(wave.float())
    assert frontend.output_shape(80000) == (1, 224, 224)
    assert out.shape == (2, 1, 224, 224)
    for b in range(2):
        spec64 = stft_log_spectrogram(wave[b].contiguous(), dict(n_fft=446, hop_length=358, pad_mode="constant"))
        spec32 = stft_log_spectrogram(wave[b].float(), dict(n_fft=446, hop_length=358, pad_mode="constant"))
        z64 = (spec64 - spec64.mean()) / (np.std(spec64.numpy()) + 1e-9)
        z32 = (spec32 - spec32.mean()) / (spec32.std(correction=0) + 1e-9)
        assert_matches(out[b, 0], z64, z32, f"MA-AVT row {b} seed={seed}")
    std, mean = torch.std_mean(frontend(wave), dim=(1, 2, 3), correction=0)  # float64: exact z-score
    assert mean.abs().max() < 1e-12 and (std - 1).abs().max() < 1e-8, (mean, std)
    reflect = A.LogSpectrogramFrontend(pad_mode="reflect")(wave.float())
    differs = (reflect - out).abs().amax(dim=(0, 1, 2)) > 1e-3  # per frame
    assert differs[0] and differs[-1], "the pad modes must differ in the edge frames"


@pytest.mark.parametrize("variant", ["clip", "swin"])
def test_stgcma_frontend_matches_upstream_recipe(variant):
    """fbank -> (x - mean) / (2 std) -> zero-pad time rows to the target (upstream's order)."""
    seed = fresh_seed()
    if variant == "clip":
        frontend, config, frames, target = A.KaldiFbankFrontend(), KALDI_CONFIGS["stgcma-clip-hanning"], 98, 102
    else:
        frontend = A.KaldiFbankFrontend(num_mel_bins=224, frame_shift_ms=4.4, target_frames=224)
        config, frames, target = KALDI_CONFIGS["stgcma-swin"], 223, 224
    wave = make_waves(3, 16000, "transposed")
    out = frontend(wave.float())
    mel = config["num_mel_bins"]
    assert frontend.num_frames(16000) == frames
    assert frontend.output_shape(16000) == (target, mel)
    assert out.shape == (3, target, mel)
    for b in range(3):
        ref64 = (torchaudio_fbank(wave[b].contiguous(), config) + 4.1426) / (2 * 3.2001)
        ref32 = (torchaudio_fbank(wave[b].float(), config) + 4.1426) / (2 * 3.2001)
        assert_matches(out[b, :frames], ref64, ref32, f"STG-CMA {variant} row {b} seed={seed}")
    assert torch.count_nonzero(out[:, frames:]) == 0


def test_kaldi_frontend_cuts_long_input_to_target():
    frontend = A.KaldiFbankFrontend()
    wave = torch.randn(2, 32000)
    out = frontend(wave)
    assert frontend.num_frames(32000) == 198
    assert out.shape == (2, 102, 128) and out.is_contiguous()
    torch.testing.assert_close(out, (A.kaldi_fbank(wave)[:, :102] + 4.1426) / (2 * 3.2001), rtol=0, atol=0)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "call",
    [
        lambda w: A.kaldi_fbank(w),
        lambda w: A.log_mel(w, sample_rate=16000, n_fft=800, hop_length=250, n_mels=128),
        lambda w: A.log_spectrogram(w, n_fft=446, hop_length=358),
        A.KaldiFbankFrontend(),
        A.LogMelFrontend(),
        A.LogSpectrogramFrontend(),
    ],
    ids=["kaldi_fbank", "log_mel", "log_spectrogram", "KaldiFbankFrontend", "LogMelFrontend", "LogSpectrogramFrontend"],
)
def test_bad_waves_raise_with_argument_expected_and_received(call):
    with pytest.raises(ValueError, match=r"wave: expected a 2-D \(B, S\).*received shape \(16000,\)"):
        call(torch.zeros(16000))
    with pytest.raises(ValueError, match=r"wave: expected a 2-D \(B, S\).*received shape \(1, 1, 16000\)"):
        call(torch.zeros(1, 1, 16000))
    with pytest.raises(TypeError, match=r"wave: expected dtype float32 or float64, received torch.float16"):
        call(torch.zeros(1, 16000, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"wave: expected dtype float32 or float64, received torch.int16"):
        call(torch.zeros(1, 16000, dtype=torch.int16))
    with pytest.raises(TypeError, match=r"wave: expected a torch.Tensor.*received ndarray"):
        call(np.zeros((1, 16000), np.float32))
    with pytest.raises(ValueError, match=r"wave: expected at least \d+ samples.*received 0 "):
        call(torch.zeros(2, 0))


def test_too_short_limits_are_exact():
    A.kaldi_fbank(torch.zeros(1, 400))  # one 25 ms frame
    with pytest.raises(ValueError, match=r"expected at least 400 samples per row.*received 399"):
        A.kaldi_fbank(torch.zeros(1, 399))
    frontend = A.LogMelFrontend()
    assert frontend(torch.zeros(1, 401)).shape == (1, 1, 128, 1) == (1, *frontend.output_shape(401))
    with pytest.raises(ValueError, match=r"expected at least 401 samples per row.*received 400"):
        frontend(torch.zeros(1, 400))
    with pytest.raises(ValueError, match=r"num_samples: expected at least 401.*received 400"):
        frontend.output_shape(400)
    with pytest.raises(ValueError, match=r"num_samples: expected at least 400.*received 10"):
        A.KaldiFbankFrontend().output_shape(10)
    reflect = A.LogSpectrogramFrontend(pad_mode="reflect")  # reflection needs S > n_fft // 2
    assert reflect(torch.randn(1, 224)).shape == (1, 1, 224, 1)
    with pytest.raises(ValueError, match=r"expected at least 224 samples per row.*received 223"):
        reflect(torch.zeros(1, 223))
    assert A.LogSpectrogramFrontend()(torch.randn(1, 1)).shape == (1, 1, 224, 1)  # zero padding: any S >= 1


def test_bad_parameters_raise():
    wave = torch.zeros(1, 16000)
    cases = [
        (lambda: A.kaldi_fbank(wave, window="blackman"), r"window: expected one of .*received 'blackman'"),
        (lambda: A.kaldi_fbank(wave, preemphasis=1.5), r"preemphasis: expected .*received 1.5"),
        (lambda: A.kaldi_fbank(wave, low_freq=9000.0), r"low_freq, high_freq: expected .*low_freq=9000.0"),
        (lambda: A.kaldi_fbank(wave, frame_shift_ms=0.01), r"frame_shift_ms: expected .*received 0.01 ms"),
        (lambda: A.kaldi_fbank(wave, frame_length_ms=25.0625, round_to_power_of_two=False),
         r"frame_length_ms: expected an even window \(401 samples\)"),
        (lambda: A.kaldi_fbank(wave, num_mel_bins=3), r"num_mel_bins: expected an int >= 4, received 3"),
        (lambda: A.log_mel(wave, sample_rate=16000, n_fft=400, hop_length=0, n_mels=8),
         r"hop_length: expected an int >= 1, received 0"),
        (lambda: A.log_mel(wave, sample_rate=16000, n_fft=400, hop_length=100, n_mels=8, log="log2"),
         r"log: expected one of .*received 'log2'"),
        (lambda: A.log_mel(wave, sample_rate=16000, n_fft=400, hop_length=100, n_mels=8, win_length=500),
         r"win_length: expected <= n_fft \(400\), received 500"),
        (lambda: A.log_spectrogram(wave, n_fft=400, hop_length=100, pad_mode="circular"),
         r"pad_mode: expected one of .*received 'circular'"),
        (lambda: A.LogMelFrontend(n_fft=0), r"n_fft: expected an int >= 2, received 0"),
        (lambda: A.KaldiFbankFrontend(std=0.0), r"std: expected > 0, received 0.0"),
        (lambda: A.KaldiFbankFrontend(target_frames=0), r"target_frames: expected an int >= 1, received 0"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


# ------------------------------------------------------------------ tables: cached, autograd-safe


def test_tables_are_built_once_per_configuration():
    wave = torch.randn(2, 4001)
    config = dict(sample_rate=16000, n_fft=320, hop_length=97, n_mels=41)
    before = A._htk_mel_fbanks.cache_info()
    first = A.log_mel(wave, **config)
    middle = A._htk_mel_fbanks.cache_info()
    second = A.log_mel(wave, **config)
    after = A._htk_mel_fbanks.cache_info()
    assert (middle.misses - before.misses, middle.hits - before.hits) == (1, 0)
    assert (after.misses - middle.misses, after.hits - middle.hits) == (0, 1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    A.log_mel(wave.double(), **config)  # a new dtype is a new table
    assert A._htk_mel_fbanks.cache_info().misses - after.misses == 1


def test_table_first_built_in_inference_mode_serves_autograd():
    config = dict(sample_rate=16000, n_fft=300, hop_length=75, n_mels=37)
    with torch.inference_mode():
        A.log_mel(torch.randn(1, 3001), **config)
        A.kaldi_fbank(torch.randn(1, 3001), num_mel_bins=37, frame_shift_ms=9.0)
    wave = torch.randn(2, 3001, requires_grad=True)
    (A.log_mel(wave, **config).sum() + A.kaldi_fbank(wave, num_mel_bins=37, frame_shift_ms=9.0).sum()).backward()
    assert torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0


# ------------------------------------------------------------------ fit_length / crop_window


def deepavfusion_pad(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Upstream's Pad, restated: append the reversed signal until long enough, then cut."""
    while wave.shape[-1] < length:
        wave = torch.cat((wave, torch.flip(wave, dims=(-1,))), dim=-1)
    return wave[..., :length]


def ma_avt_tile(wave: np.ndarray, length: int) -> np.ndarray:
    """Upstream's tiling, restated: double with np.tile until long enough, then cut."""
    while wave.shape[-1] < length:
        wave = np.tile(wave, 2) if wave.ndim == 1 else np.tile(wave, (1, 2))
    return wave[..., :length]


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 1), (2, 1001)])
def test_fit_length_modes(shape):
    fresh_seed()
    wave = torch.randn(shape)
    num_samples = shape[-1]
    for length in (1, num_samples, num_samples + 1, 3 * num_samples + 2, 16 * num_samples + 5):
        mirror, tile, zero = (A.fit_length(wave, length, mode) for mode in ("mirror", "tile", "zero"))
        assert mirror.shape == tile.shape == zero.shape == (*shape[:-1], length)
        torch.testing.assert_close(mirror, deepavfusion_pad(wave, length), rtol=0, atol=0)
        torch.testing.assert_close(tile, torch.from_numpy(ma_avt_tile(wave.numpy(), length)), rtol=0, atol=0)
        keep = min(length, num_samples)
        torch.testing.assert_close(zero[..., :keep], wave[..., :keep], rtol=0, atol=0)
        assert torch.count_nonzero(zero[..., keep:]) == 0
    assert A.fit_length(wave, num_samples) is wave
    period = A.fit_length(wave, 4 * num_samples, "mirror")  # x, reversed x, x, reversed x
    torch.testing.assert_close(period, torch.cat([wave, wave.flip(-1)] * 2, dim=-1), rtol=0, atol=0)


def test_fit_length_errors():
    with pytest.raises(ValueError, match=r"mode: expected one of \('zero', 'tile', 'mirror'\), received 'reflect'"):
        A.fit_length(torch.zeros(3), 5, "reflect")
    with pytest.raises(ValueError, match=r"length: expected an int >= 1, received 0"):
        A.fit_length(torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"wave: expected shape \(B, S\) or \(S,\), received shape \(1, 1, 3\)"):
        A.fit_length(torch.zeros(1, 1, 3), 5)
    with pytest.raises(ValueError, match=r"wave: expected at least 1 sample to tile-pad, received shape \(2, 0\)"):
        A.fit_length(torch.zeros(2, 0), 5, "tile")


def test_crop_window():
    fresh_seed()
    wave = torch.randn(3, 101)
    view = A.crop_window(wave, 17, 40)
    assert view.data_ptr() == wave[:, 17:].data_ptr()
    torch.testing.assert_close(view, wave[:, 17:57], rtol=0, atol=0)
    torch.testing.assert_close(A.crop_window(wave[0], np.int64(61), 40), wave[0, 61:], rtol=0, atol=0)
    starts = [0, 61, 23]
    expected = torch.stack([wave[b, s : s + 40] for b, s in enumerate(starts)])
    for given in (starts, torch.tensor(starts), torch.tensor(starts, dtype=torch.int32)):
        torch.testing.assert_close(A.crop_window(wave, given, 40), expected, rtol=0, atol=0)
    strided = wave[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(A.crop_window(strided, [1, 2, 3], 5),
                               torch.stack([strided[b, b + 1 : b + 6] for b in range(3)]), rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"start_sample: expected 0 <= start_sample <= 61.*received 62"):
        A.crop_window(wave, 62, 40)
    with pytest.raises(ValueError, match=r"start_sample: expected 0 <= start_sample <= 61.*received -1"):
        A.crop_window(wave, -1, 40)
    with pytest.raises(ValueError, match=r"expected starts in \[0, 61\].*received \[62, -2\] at rows \[1, 2\]"):
        A.crop_window(wave, [0, 62, -2], 40)
    with pytest.raises(ValueError, match=r"start_sample: expected an int or 3 integer starts.*shape \(2,\)"):
        A.crop_window(wave, [0, 1], 40)
    with pytest.raises(ValueError, match=r"start_sample: expected an int or 3 integer starts.*torch.float32"):
        A.crop_window(wave, torch.zeros(3), 40)


# ------------------------------------------------------------------ the DALI alternative


def _htk_bank_float64(n_freqs: int, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """The HTK triangles of log_mel (f_min = 0) built in float64: the truth its float32 bank
    and DALI's deviate from. (n_mels, n_freqs)."""
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mel_hi = 2595.0 * math.log10(1.0 + f_max / 700.0)
    edges = 700.0 * (10.0 ** (torch.linspace(0.0, mel_hi, n_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    offsets = edges[None, :] - freqs[:, None]
    return torch.min(-offsets[:, :-2] / widths[:-1], offsets[:, 2:] / widths[1:]).clamp_min(0.0).T


def _htk_weight_error_bound(n_mels: int, f_max: float) -> torch.Tensor:
    """Per filter, a bound on |W32 - W64| for a triangle bank built in float32: the mel grid
    holds eps32 * mel_hi absolute error, which maps to (700 + f) ln(10) / 2595 times as much
    in Hz at the filter's right edge f, and a weight divides it by the narrower side of its
    triangle; x2 for the further roundings of that first-order term. (n_mels, 1)."""
    eps = torch.finfo(torch.float32).eps
    mel_hi = 2595.0 * math.log10(1.0 + f_max / 700.0)
    edges = 700.0 * (10.0 ** (torch.linspace(0.0, mel_hi, n_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]
    hz_error = eps * mel_hi * (700.0 + edges[2:]) * math.log(10.0) / 2595.0
    return (2 * hz_error / torch.minimum(widths[:-1], widths[1:]))[:, None]


def test_htk_weight_error_bound_holds_for_both_float32_banks():
    """The bound used below covers log_mel's float32 bank and DALI's (fed an identity
    spectrogram, DALI's mel_filter_bank returns its weights)."""
    dali = pytest.importorskip("nvidia.dali", reason="nvidia.dali not importable")
    from nvidia.dali import fn

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def bank_pipeline():
        return fn.mel_filter_bank(fn.external_source(name="spec"), sample_rate=16000, nfilter=128, freq_low=0.0,
                                  freq_high=8000.0, mel_formula="htk", normalize=False)

    pipe = bank_pipeline()
    pipe.build()
    pipe.feed_input("spec", [np.eye(401, dtype=np.float32)])
    (out,) = pipe.run()
    truth = _htk_bank_float64(401, 8000.0, 128, 16000)
    bound = _htk_weight_error_bound(128, 8000.0)
    ours = A._htk_mel_fbanks(401, 0.0, 8000.0, 128, 16000, "cpu", torch.float64)
    theirs = torch.from_numpy(np.array(out[0])).double()
    for name, bank in (("log_mel", ours), ("DALI", theirs)):
        worst = ((bank - truth).abs() / bound).max().item()
        assert worst <= 1.0, f"{name}'s float32 mel weights deviate {worst:.3g} x the stated bound"


def test_dali_cpu_mel_spectrogram_agrees_with_log_mel():
    """DALI spectrogram + mel_filter_bank (htk, unnormalised) on the DeepAVFusion parameters
    equals log_mel's mel power within what float32 allows both: per frame t and filter m,
    twice (one FFT each) Higham's normwise float32 FFT bound |dX| <= 5 log2(n) eps |X| carried
    to the filter (|dP_f| <= 2 |X_f||dX_f|, Cauchy-Schwarz over the weights), plus the two
    banks' float32 weight errors (bounded above) on the filter's support, plus the filter
    sums' rounding. DALI's default window is a half-sample-shifted Hann, so the periodic
    Hann is passed."""
    dali = pytest.importorskip("nvidia.dali", reason="nvidia.dali not importable")
    from nvidia.dali import fn

    seed = fresh_seed()
    n_fft, n_mels = 800, 128
    wave = make_waves(3, odd_length(16000), "contiguous")

    @dali.pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def mel_pipeline():
        spec = fn.spectrogram(
            fn.external_source(name="audio"), nfft=n_fft, window_length=n_fft, window_step=250, center_windows=True,
            reflect_padding=True, power=2, window_fn=torch.hann_window(n_fft).tolist(),
        )
        return fn.mel_filter_bank(spec, sample_rate=16000, nfilter=n_mels, freq_low=0.0, freq_high=8000.0,
                                  mel_formula="htk", normalize=False)

    pipe = mel_pipeline()
    pipe.build()
    pipe.feed_input("audio", [row.float().numpy() for row in wave])
    (out,) = pipe.run()
    ours = A.log_mel(wave.float(), sample_rate=16000, n_fft=n_fft, hop_length=250, n_mels=n_mels)

    eps = torch.finfo(torch.float32).eps
    window = torch.hann_window(n_fft, dtype=torch.float64)
    power = torch.stft(wave, n_fft, 250, window=window, center=True, pad_mode="reflect",
                       return_complex=True).abs() ** 2  # (B, n_fft // 2 + 1, T), float64
    truth = _htk_bank_float64(n_fft // 2 + 1, 8000.0, n_mels, 16000)
    two_sided_energy = 2 * power.sum(1, keepdim=True)  # >= |X|^2 over all n_fft bins
    fft = 2 * (2 * 5 * math.log2(n_fft) * eps) * torch.sqrt((truth**2) @ power) * two_sided_energy.sqrt()
    weights = 2 * _htk_weight_error_bound(n_mels, 8000.0) * ((truth > 0).double() @ power)
    sums = 2 * (n_fft // 2 + 1) * eps * (truth @ power)
    bound = fft + weights + sums
    for b in range(3):
        theirs = torch.from_numpy(np.array(out[b])).double()
        mine = 10.0 ** ours[b].double() - 1e-7
        assert theirs.shape == mine.shape
        # log10 then 10** in float32 costs mine a relative ln(10) x |log10(mel)| eps <= 16 eps (mel >= 1e-7)
        excess = ((theirs - mine).abs() / (bound[b] + 16 * eps * mine.abs() + 1e-12)).max().item()
        assert excess <= 1.0, f"row {b}: DALI vs log_mel mel power at {excess:.3g} x its float32 bound, seed={seed}"


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
def test_cuda_frontends_match_cpu_without_host_syncs():
    fresh_seed()
    cpu = make_waves(3, 48000, "strided")
    frontends = [A.LogMelFrontend(), A.LogSpectrogramFrontend(), A.KaldiFbankFrontend(),
                 A.KaldiFbankFrontend(num_mel_bins=224, frame_shift_ms=4.4, target_frames=224)]
    gpu = cpu.float().cuda()
    for frontend in frontends:
        frontend(gpu)  # builds and caches this device's tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [frontend(gpu) for frontend in frontends]
        fitted = A.fit_length(gpu, 60001, "mirror")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for frontend, out in zip(frontends, outs):
        ref64, ref32 = frontend(cpu), frontend(cpu.float())
        assert_matches(out.cpu(), ref64, ref32, f"{frontend} on CUDA")
    torch.testing.assert_close(fitted.cpu(), A.fit_length(cpu.float(), 60001, "mirror"), rtol=0, atol=0)
