"""HTS-AT on timm Swin parts: front end against the literal upstream computation, stage layout,
upstream checkpoint keys, SpecAugment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avfast.models.htsat import HTSAT, _drop_stripes, slaney_mel_filterbank

TINY = dict(n_mels=8, spec_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4)


def tiny_htsat(**overrides) -> HTSAT:
    torch.manual_seed(0)
    return HTSAT(**{**TINY, **overrides}).double().eval()


def literal_log_mel(model: HTSAT, wave: torch.Tensor) -> torch.Tensor:
    """torchlibrosa's Spectrogram + LogmelFilterBank: a strided conv1d with the windowed DFT
    basis on the reflect-padded signal, power, mel matmul, 10 log10 (ref 1, amin 1e-10)."""
    n = model.n_fft
    k = torch.arange(n // 2 + 1, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * k * t / n
    window = model.window.double()
    real = (torch.cos(angle) * window)[:, None, :]
    imag = (-torch.sin(angle) * window)[:, None, :]
    padded = F.pad(wave[:, None, :], (n // 2, n // 2), mode="reflect")
    re = F.conv1d(padded, real, stride=model.hop_length)
    im = F.conv1d(padded, imag, stride=model.hop_length)
    power = (re ** 2 + im ** 2).transpose(1, 2)  # (B, T, F)
    mel = power @ model.melW
    return 10 * torch.log10(torch.clamp(mel, min=1e-10))[:, None]


def literal_wav2img(x: torch.Tensor, spec_size: int, ratio: int) -> torch.Tensor:
    """Upstream reshape_wav2img step by step: stretch time, (B,1,F,T) -> (B,1,F,R,T/R) ->
    (B,1,R,F,T/R) -> (B,1,R*F,T/R)."""
    target_t = spec_size * ratio
    if x.shape[2] < target_t:
        x = F.interpolate(x, (target_t, x.shape[3]), mode="bicubic", align_corners=True)
    x = x.permute(0, 1, 3, 2).contiguous()
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2], ratio, x.shape[3] // ratio)
    x = x.permute(0, 1, 3, 2, 4).contiguous()
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.shape[4])


def test_log_mel_matches_the_dft_convolution_float64():
    model = tiny_htsat()
    wave = torch.randn(3, 32000, dtype=torch.float64) * 0.1
    ours = model.log_mel(wave)
    assert ours.shape == (3, 1, 32000 // 320 + 1, 8)
    assert (ours - literal_log_mel(model, wave)).abs().max() <= 1e-9


def test_wav2img_matches_upstream_reshape():
    model = tiny_htsat()
    for frames in (101, 128):
        x = torch.randn(2, 1, frames, 8, dtype=torch.float64)
        assert torch.equal(model.wav2img(x), literal_wav2img(x, 32, 4))
    with pytest.raises(ValueError, match="T <= 128"):
        model.wav2img(torch.randn(1, 1, 129, 8, dtype=torch.float64))


def test_slaney_filterbank_shape_and_scale():
    bank = slaney_mel_filterbank(32000, 1024, 64, 50.0, 14000.0)
    assert bank.shape == (513, 64) and bank.dtype == torch.float64 and (bank >= 0).all()
    hz = torch.arange(513, dtype=torch.float64) * 32000 / 1024
    # Slaney scale: linear below 1 kHz (200/3 Hz per mel), log above; centres are equally spaced in mel
    mel = torch.where(hz >= 1000, 15 + torch.log(hz / 1000) / (math.log(6.4) / 27), hz * 3 / 200)
    lo, hi = 50 * 3 / 200, 15 + math.log(14.0) / (math.log(6.4) / 27)
    centres = torch.linspace(lo, hi, 66, dtype=torch.float64)[1:-1]
    peaks = mel[bank.argmax(0)]
    step = (hi - lo) / 65
    assert ((peaks - centres).abs() <= step).all()  # each filter peaks at the FFT bin next to its centre
    # area normalisation: every triangle integrates to 1 over Hz (checked where it spans many bins)
    wide = bank[:, 40:]
    assert torch.allclose(wide.sum(0) * 32000 / 1024, torch.ones(24, dtype=torch.float64), rtol=0.02)


def test_stages_downsample_at_the_end_and_shift_odd_blocks():
    model = HTSAT()  # the AudioSet geometry: 64^2, 32^2, 16^2, 8^2 tokens
    assert [layer.downsample is not None for layer in model.layers] == [True, True, True, False]
    shifts = [[blk.shift_size for blk in layer.blocks] for layer in model.layers]
    assert shifts == [[(0, 0), (4, 4)], [(0, 0), (4, 4)], [(0, 0), (4, 4)] * 3, [(0, 0), (0, 0)]]
    assert model.freq_ratio == 4 and model.max_frames == 1024
    x = torch.zeros(1, 64, 64, 96)
    for layer, out in zip(model.layers, [(32, 32, 192), (16, 16, 384), (8, 8, 768), (8, 8, 768)]):
        x = layer(x)
        assert x.shape[1:] == out


def test_forward_features_shape_and_eval_determinism():
    model = tiny_htsat()
    wave = torch.randn(2, 32000, dtype=torch.float64)
    out = model(wave)
    assert out.shape == (2, 4, 4, 32)
    assert torch.equal(out, model(wave))


def test_spec_augment_and_bn0_only_in_train_mode():
    model = tiny_htsat()
    wave = torch.randn(4, 32000, dtype=torch.float64)
    stats = model.bn0.running_mean.clone()
    model.eval()
    assert torch.equal(model.front_end(wave), model.front_end(wave))
    assert torch.equal(model.bn0.running_mean, stats)
    model.train()
    torch.manual_seed(1)
    x = model.log_mel(wave)
    dropped = _drop_stripes(x, 2, 64, 2)
    zero_rows = (dropped == 0).all(-1).squeeze(1)  # (B, T)
    assert zero_rows.sum(1).max() <= 2 * 63 and zero_rows.any()
    a, b = model.front_end(wave), model.front_end(wave)
    assert not torch.equal(a, b)  # random stripes
    assert not torch.equal(model.bn0.running_mean, stats)  # batch statistics update the running ones
    model.spec_augment = None
    model.train()
    assert torch.equal(model.front_end(wave), model.front_end(wave))


def upstream_htsat_state(model: HTSAT) -> dict[str, torch.Tensor]:
    """An HTS-AT Lightning checkpoint's state dict for ``model``'s geometry (random values)."""
    state = {}
    for key, value in model.state_dict().items():
        state["logmel_extractor.melW" if key == "melW" else key] = torch.randn_like(value.double())
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            area = blk.window_size[0] * blk.window_size[1]
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(area, area, dtype=torch.long)
            if any(blk.shift_size):
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, area, area)
    n = model.n_fft // 2 + 1
    state["spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(n, 1, model.n_fft)
    state["spectrogram_extractor.stft.conv_imag.weight"] = torch.zeros(n, 1, model.n_fft)
    state["tscam_conv.weight"] = torch.zeros(527, model.num_features, 2, 3)
    state["tscam_conv.bias"] = torch.zeros(527)
    state["head.weight"], state["head.bias"] = torch.zeros(527, 527), torch.zeros(527)
    return {"sed_model." + k: v for k, v in state.items()}


def test_upstream_checkpoint_loads_strictly():
    model = tiny_htsat()
    state = upstream_htsat_state(model)
    model.load_upstream_state_dict(state)
    assert torch.equal(model.melW, state["sed_model.logmel_extractor.melW"])
    assert torch.equal(model.layers[1].blocks[0].attn.qkv.weight, state["sed_model.layers.1.blocks.0.attn.qkv.weight"])
    assert torch.equal(model.layers[0].downsample.reduction.weight,
                       state["sed_model.layers.0.downsample.reduction.weight"])
    bad = dict(state)
    bad["sed_model.layers.0.blocks.0.attn.qkv.weights"] = bad.pop("sed_model.layers.0.blocks.0.attn.qkv.weight")
    with pytest.raises(KeyError, match="qkv.weights"):
        model.load_upstream_state_dict(bad)
    missing = dict(state)
    missing.pop("sed_model.norm.weight")
    with pytest.raises(RuntimeError, match="norm.weight"):
        model.load_upstream_state_dict(missing)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spec_size must be a multiple of n_mels"):
        HTSAT(n_mels=60)
    with pytest.raises(ValueError, match="depths and num_heads"):
        HTSAT(depths=(2, 2), num_heads=(4,))
    model = tiny_htsat()
    with pytest.raises(ValueError, match=r"wave must be a float \(B, L\)"):
        model.log_mel(torch.zeros(2, 3, 100))
