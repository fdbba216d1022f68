"""avfast.tasks.separation: the MUSIC-style format, the mask targets and weights by hand, the
mel-to-linear mask and inverse STFT, BSS Eval (fast_bss_eval) on constructed cases, and the
DeepAVFusion separation head's forward/backward."""

import json
import math

import pytest
import torch

from avfast.data.presets import get_preset
from avfast.tasks.separation import (SOURCES, SeparationMetrics, bss_eval, build_separation_model, linear_mask,
                                     make_music, mask_targets, mask_weights, read_music, separate)
from seeding import fresh_seed

FRONTEND = get_preset("deepavfusion").audio.frontend


def test_read_music_reads_the_json_layout_and_reports_bad_entries(tmp_path):
    path = make_music(tmp_path, instruments=2, clips_per_instrument=2, duration=1.0)
    manifest = read_music(path)
    assert manifest.classes == ["instrument_0", "instrument_1"] and len(manifest) == 4
    assert [c.labels for c in manifest.clips] == [(0,), (0,), (1,), (1,)]
    assert manifest.resolve(manifest.clips[3].path) == str(tmp_path / "instrument_1" / "solo_001.mkv")
    data = json.loads(open(path).read())
    data["videos"]["instrument_0"] += ["gone", "../../etc/passwd"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    bad = []
    kept = read_music(tmp_path / "bad.json", bad=bad)
    assert len(kept) == 4
    assert [(b.row, b.reason) for b in bad] == [(3, "missing file"), (4, "escapes root")]
    assert all(b.file == str(tmp_path / "bad.json") for b in bad)
    with pytest.raises(ValueError, match=r"bad.json:3: missing file"):
        read_music(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('{"clips": []}')
    with pytest.raises(ValueError, match=r"must hold \{\"videos\": \{instrument: \[id, ...\]\}\}, got KeyError"):
        read_music(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="expected a MUSIC json file, got no such file"):
        read_music(tmp_path / "none.json")
    with pytest.raises(ValueError, match="instruments: expected an integer >= 2, got 1"):
        make_music(tmp_path / "x", instruments=1)


def test_mask_targets_and_weights_by_hand():
    p = torch.tensor([[1.0, 4.0], [9.0, 0.5]])  # two sources' mel power at 2 cells
    mix = torch.tensor([2.0, 1.0])
    source_mels, mix_mel = torch.log10(p)[None, :, None, :], torch.log10(mix)[None, None, :]
    binary = mask_targets(source_mels, mix_mel)[0, :, 0]
    assert binary.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # P_k > P_mix, as upstream
    ratio = mask_targets(source_mels, mix_mel, binary=False)[0, :, 0]
    torch.testing.assert_close(ratio, torch.tensor([[0.1, 4 / 4.5], [0.9, 0.5 / 4.5]]), rtol=1e-6, atol=1e-6)
    w = mask_weights(torch.log10(torch.tensor([[[1e-6, 1.0, 1e6]]])))[0, 0, 0]
    torch.testing.assert_close(w, torch.tensor([1e-3, math.log(2.0), 10.0]), rtol=1e-5, atol=1e-6)


def test_linear_mask_averages_the_covering_bands_and_pads_time():
    bank = FRONTEND.filterbank()
    M, F = bank.shape
    ones = linear_mask(torch.ones(1, M, 3), bank, 4)
    assert ones.shape == (1, F, 4)
    torch.testing.assert_close(ones, torch.ones(1, F, 4))  # covered or not, every bin gets 1
    band = torch.zeros(1, M, 1)
    band[0, 40] = 1.0
    lin = linear_mask(band, bank, 1)[0, :, 0]
    covered = bank.sum(0) > 0
    expected = torch.where(covered, bank[40] / bank.sum(0).clamp_min(1e-12), lin)  # uncovered bins: nearest band
    torch.testing.assert_close(lin, expected)
    assert bool((lin[bank[40] == 0] == 0).all()) and float(lin.max()) <= 1.0


def test_separate_with_ones_gives_back_the_mixture_and_the_ideal_mask_separates_two_tones():
    fresh_seed()
    t = torch.arange(48000) / 16000
    sources = torch.stack([0.3 * torch.sin(2 * math.pi * 440 * t + 0.3), 0.3 * torch.sin(2 * math.pi * 1800 * t)]) / 2
    mixture = sources.sum(0)
    mels = FRONTEND(sources * SOURCES)[:, 0]
    mix_mel = FRONTEND(mixture[None])[:, 0]
    back = separate(torch.ones(1, *mix_mel.shape[1:]), mixture[None], FRONTEND)[0]
    torch.testing.assert_close(back, mixture, rtol=0, atol=1e-5)  # the STFT inverts exactly
    ideal = mask_targets(mels[None], mix_mel)[0]
    estimates = separate(ideal, mixture[None].expand(2, -1), FRONTEND)
    metrics = SeparationMetrics()
    metrics.update(estimates, sources, mixture)
    result = metrics.compute()
    assert result["sdr"] > 15 and result["sdri"] > 15 and abs(result["sdr_mixture"]) < 1.0


def test_bss_eval_on_constructed_interference_and_artifacts():
    """Long independent white-noise references: the projections are near exact, so SIR and
    SAR are the power ratios the estimates are built with (to a few hundredths of a dB)."""
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(2, 64000, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 64000, generator=g, dtype=torch.float64)
    interference = torch.stack([refs[0] + 0.1 * refs[1], refs[1] + 0.1 * refs[0]])
    sdr, sir, sar = bss_eval(interference, refs)
    torch.testing.assert_close(sir, torch.full((2,), 20.0, dtype=torch.float64), rtol=0, atol=0.1)
    torch.testing.assert_close(sdr, torch.full((2,), 20.0, dtype=torch.float64), rtol=0, atol=0.1)
    assert bool((sar > 40).all())  # no artifacts
    artifacts = refs + 0.1 * noise
    sdr, sir, sar = bss_eval(artifacts, refs)
    torch.testing.assert_close(sar, torch.full((2,), 20.0, dtype=torch.float64), rtol=0, atol=0.15)
    assert bool((sir > 30).all())
    sdr_scaled, _, _ = bss_eval(3 * refs, refs)
    assert bool((sdr_scaled > 100).all())  # a scaled reference is a perfect estimate
    with pytest.raises(ValueError, match=r"estimates: expected the \(S, L\) shape of references \(2, 64000\)"):
        bss_eval(refs[:, :10], refs)


def test_separation_metrics_add_up_and_refuse_nothing():
    fresh_seed()
    refs = torch.randn(2, 8000, dtype=torch.float64)
    parts = []
    for k in range(2):
        m = SeparationMetrics()
        m.update(refs + 0.3 * torch.randn_like(refs), refs, refs.sum(0))
        parts.append(m)
    both = SeparationMetrics.from_tensor(parts[0].to_tensor() + parts[1].to_tensor()).compute()
    a, b = parts[0].compute(), parts[1].compute()
    assert both["sources"] == 4 and both["sdr"] == pytest.approx((a["sdr"] + b["sdr"]) / 2, rel=1e-12)
    assert both["sdri"] == pytest.approx(both["sdr"] - both["sdr_mixture"], rel=1e-12)
    with pytest.raises(ValueError, match="expected at least one update, got none"):
        SeparationMetrics().compute()


def test_deepavfusion_audio_dense_features_are_its_layers_deepest_first():
    from avfast.models import build_model

    fresh_seed()
    model = build_model("deepavfusion", "tiny", num_classes=2).eval()
    cfg = model.config
    frames, audio = torch.randn(3, 1, 3, cfg.img_size, cfg.img_size), torch.randn(3, 1, *cfg.audio_size)
    with torch.no_grad():
        maps, image = model.audio_dense_features(frames, audio)
        x_image, _, _, layers = model.encoder(frames[:, 0], audio, return_layers=True)
    (levels, guide_dim) = model.audio_dense_shapes()
    assert [tuple(m.shape) for m in maps] == [(3, c, *grid) for c, grid in levels] and guide_dim == cfg.embed_dim
    torch.testing.assert_close(maps[0], layers[-1][1].transpose(1, 2).unflatten(2, levels[0][1]), rtol=0, atol=0)
    torch.testing.assert_close(image, x_image.mean(1), rtol=0, atol=0)


def test_separation_model_forward_backward_and_what_it_refuses():
    fresh_seed()
    model = build_separation_model("deepavfusion", "tiny", binary=False)
    cfg = model.config
    frames, audio = torch.randn(2, SOURCES, 3, cfg.img_size, cfg.img_size), torch.randn(2, 1, *cfg.audio_size)
    out = model(frames, audio)
    assert out["logits"].shape == (2, SOURCES, *cfg.audio_size)
    batch = {"audio": audio, "source_mels": torch.randn(2, SOURCES, *cfg.audio_size)}
    loss, metrics = model.loss(out, batch)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None and not n.endswith("attn.k.bias")]
    assert not missing, missing
    assert all(not p.requires_grad for p in model.backbone.get_submodule("encoder.audio.norm").parameters())
    masks = model.masks(out)
    assert masks.shape == out["logits"].shape and 0 < float(masks.mean()) < 1  # ratio masks: probabilities
    with pytest.raises(ValueError, match="method: expected 'deepavfusion'.*got 'stgcma'"):
        build_separation_model("stgcma", "tiny")
    with pytest.raises(ValueError, match=r"frames: expected \(B, 2, 3, S, S\), one frame per source"):
        model(frames[:, :1], audio)
