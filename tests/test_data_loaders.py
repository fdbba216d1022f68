"""Both loaders on synthetic VP9 + FLAC clips: shapes, labels, CPU == DALI (CPU decoder),
features against torchaudio, background pairs, shards, and clips that cannot be read."""

import collections
import logging

import numpy as np
import pytest
import torch
import torchaudio

from avfast.data import CPULoader, get_preset, read_folder
from avfast.data.manifest import Manifest
from avfast.data.prepare import prepare
from avfast.data.synthetic import make_bad_clips, make_dataset
from seeding import module_seed

SEED = module_seed()
CLASSES = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_dataset(root / "raw", num_classes=CLASSES, clips_per_class=2, suffix=".mkv", duration=2.0,
                 fps=10, size=64, seed=SEED % 1000)
    report = prepare(root / "raw", root / "prepared", workers=1, progress=False)
    assert not report.failed
    return Manifest.load(report.manifest_path)


def batches(loader):
    return list(loader)


def dali_loader(manifest, preset, **kw):
    pytest.importorskip("nvidia.dali")
    from avfast.data import DALILoader

    return DALILoader(manifest, preset, device_id=None, num_threads=1, **kw)


def test_cpu_loader_shapes_and_labels(prepared):
    loader = CPULoader(prepared, "deepavfusion", batch_size=4, train=True, seed=SEED)
    out = batches(loader)
    assert [b["index"].numel() for b in out] == [4, 2] and len(loader) == 2
    b = out[0]
    assert b["frames"].shape == (4, 1, 3, 224, 224) and b["frames"].dtype == torch.float32
    assert b["audio"].shape == (4, 1, 128, 192)
    for i, label in zip(b["index"].tolist(), b["label"].tolist()):
        assert label == prepared[i].labels[0]
    assert sorted(torch.cat([x["index"] for x in out]).tolist()) == list(range(6))
    assert loader.skipped == {} and loader.epoch == 1


@pytest.mark.parametrize("preset", ["deepavfusion", "stgcma", "mavt"])
def test_cpu_and_dali_paths_agree(prepared, preset):
    """Same plans on both paths: frames within +-2 (decoders' colour conversion + resize),
    audio windows equal, features within relative 1e-2 (here far closer)."""
    kw = dict(batch_size=3, train=True, seed=SEED, features=False)
    cpu = batches(CPULoader(prepared, preset, **kw))
    dali = batches(dali_loader(prepared, preset, **kw))
    assert len(cpu) == len(dali) == 2
    for c, d in zip(cpu, dali):
        torch.testing.assert_close(c["index"], d["index"])
        assert c["frames"].shape == d["frames"].shape and d["frames"].dtype == torch.uint8
        assert (c["frames"].int() - d["frames"].int()).abs().max() <= 2
        torch.testing.assert_close(c["audio"], d["audio"], rtol=0, atol=1e-6)
    spec = get_preset(preset)
    c, d = (batches(cls(prepared, preset, batch_size=3, train=False, seed=SEED))[0]
            for cls in (CPULoader, lambda *a, **k: dali_loader(*a, **k)))
    assert c["audio"].shape == d["audio"].shape
    scale = c["audio"].abs().max()
    assert (c["audio"] - d["audio"]).abs().max() <= 1e-2 * scale
    assert (c["frames"] - d["frames"]).abs().max() <= 2.5 / 255 / min(spec.video.std)


def test_loader_features_match_torchaudio(prepared):
    """DeepAVFusion's log-mel and STG-CMA's fbank from the loader equal torchaudio's
    transforms of the same decoded window."""
    from avfast.data import media

    clip = prepared[0]
    wave = media.decode_audio(prepared.resolve(clip.audio_path), sample_rate=16000)
    ds = CPULoader(prepared, "deepavfusion", batch_size=1, train=False).dataset
    plan = ds.plan(0)
    (start,) = plan.audio_starts
    window = wave[start:start + 48000]
    window = torch.cat([window, window.flip(0)])[:48000] if window.numel() < 48000 else window
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=800, hop_length=250, n_mels=128)(window)
    want = torch.log10(mel + 1e-7)[:, :-1]
    got = ds[0]["audio"][0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())

    ds = CPULoader(prepared, "stgcma", batch_size=1, train=False).dataset
    plan = ds.plan(1)
    wave = media.decode_audio(prepared.resolve(prepared[1].audio_path), sample_rate=16000)
    got = ds[1]["audio"]  # (10, 102, 128)
    for k in (0, 9):
        seg = wave[plan.audio_starts[k]:plan.audio_starts[k] + 16000]
        seg = torch.nn.functional.pad(seg, (0, 16000 - seg.numel()))
        fb = torchaudio.compliance.kaldi.fbank(seg[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                               window_type="hanning", num_mel_bins=128, dither=0.0,
                                               frame_shift=10)
        want = torch.nn.functional.pad(fb, (0, 0, 0, 102 - fb.shape[0]))
        want = (want + 4.1426) / (2 * 3.2001)
        torch.testing.assert_close(got[k, :fb.shape[0]], want[:fb.shape[0]], rtol=0, atol=1e-3)


def test_background_pairs_take_audio_of_another_class(prepared):
    loader = CPULoader(prepared, "mavt", batch_size=6, train=True, seed=SEED, background_p=1.0, features=False)
    (b,) = batches(loader)
    assert b["background"].all()
    own = [prepared[i].labels[0] for i in b["index"].tolist()]
    other = [prepared[j].labels[0] for j in b["audio_index"].tolist()]
    assert all(x != y for x, y in zip(own, other))
    (plain,) = batches(CPULoader(prepared, "mavt", batch_size=6, train=True, seed=SEED, features=False))
    assert not plain["background"].any()
    torch.testing.assert_close(plain["audio_index"], plain["index"])
    with pytest.raises(ValueError, match=r"background_p: expected a probability in \[0, 1\], got 1.5"):
        CPULoader(prepared, "mavt", batch_size=1, train=True, background_p=1.5)


def test_dali_background_pairs_and_shards(prepared):
    seen = []
    for shard in range(2):
        loader = dali_loader(prepared, "deepavfusion", batch_size=2, train=True, seed=SEED, background_p=0.5,
                             shard_id=shard, num_shards=2, features=False)
        got = batches(loader)
        seen += torch.cat([b["index"] for b in got]).tolist()
        for b in got:
            for i, j, bg in zip(b["index"].tolist(), b["audio_index"].tolist(), b["background"].tolist()):
                assert (prepared[i].labels[0] != prepared[j].labels[0]) if bg else i == j
    assert sorted(seen) == list(range(6))


def test_epochs_draw_new_crops_and_set_epoch_replays(prepared):
    loader = CPULoader(prepared, "deepavfusion", batch_size=6, train=True, seed=SEED, features=False)
    first = batches(loader)[0]
    second = batches(loader)[0]
    assert not torch.equal(first["index"], second["index"]) or not torch.equal(first["frames"], second["frames"])
    loader.set_epoch(0)
    torch.testing.assert_close(batches(loader)[0]["frames"], first["frames"], rtol=0, atol=0)


def test_dali_loader_needs_prepared_audio(tmp_path):
    pytest.importorskip("nvidia.dali")
    from avfast.data import DALILoader

    make_dataset(tmp_path, num_classes=2, clips_per_class=1, suffix=".mkv", duration=1.0, fps=10, size=32)
    with pytest.raises(ValueError, match=r"manifest: the DALI path expects prepared audio .* got 2 clips"):
        DALILoader(read_folder(tmp_path), "deepavfusion", batch_size=1, train=False, device_id=None)


def test_bad_clips_are_skipped_counted_and_logged(tmp_path, caplog):
    make_dataset(tmp_path, num_classes=1, clips_per_class=2, suffix=".mkv", duration=2.0, fps=10, size=32,
                 seed=SEED % 1000)
    bad = make_bad_clips(tmp_path / "zz_bad", suffix=".mkv")
    manifest = read_folder(tmp_path)
    assert len(manifest) == 2 + len(bad)
    loader = CPULoader(manifest, "deepavfusion", batch_size=3, train=False, features=False)
    with caplog.at_level(logging.WARNING, logger="avfast.data"):
        got = batches(loader)
    kept = torch.cat([b["index"] for b in got]).tolist()
    names = {manifest[i].path.rsplit("/", 1)[-1].split(".")[0] for i in kept}
    assert {manifest[i].labels[0] for i in kept} == {0} | ({1} if "truncated" in names else set())
    assert sum(loader.skipped.values()) == len(manifest) - len(kept) >= 4
    assert "silent" in loader.skipped and "skipped" in caplog.text
    padded = CPULoader(manifest, "deepavfusion", batch_size=8, train=False, features=False, bad_audio="pad")
    kept_padded = torch.cat([b["index"] for b in batches(padded)]).tolist()
    assert len(kept_padded) > len(kept)
    assert collections.Counter(padded.skipped) != collections.Counter(loader.skipped)


@pytest.mark.parametrize("path", ["cpu", "dali"])
def test_batches_from_a_start_batch_resume_the_epoch(prepared, path):
    make = (lambda **k: CPULoader(prepared, "deepavfusion", **k)) if path == "cpu" else \
        (lambda **k: dali_loader(prepared, "deepavfusion", **k))
    loader = make(batch_size=2, train=True, seed=SEED, features=False)
    loader.set_epoch(4)
    full = batches(loader)
    loader.set_epoch(4)
    tail = list(loader.batches(start=1))
    assert len(full) == 3 and len(tail) == 2
    for a, b in zip(full[1:], tail):
        torch.testing.assert_close(a["index"], b["index"])
        torch.testing.assert_close(a["frames"], b["frames"], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["deepavfusion", "stgcma"])
def test_dali_gpu_path_matches_cpu_path_on_h264(tmp_path_factory, preset):
    """The GPU path (NVDEC ``mixed`` decoder, GPU resize, GPU front-ends) on H.264 + prepared
    FLAC against the CPU path: frames +-2 (uint8), features within relative 1e-2."""
    pytest.importorskip("nvidia.dali")
    from avfast.data import DALILoader

    root = tmp_path_factory.mktemp("h264")
    make_dataset(root / "raw", num_classes=2, clips_per_class=2, suffix=".mp4", duration=2.0, fps=10, size=64)
    report = prepare(root / "raw", root / "prepared", reencode="h264", gop=4, workers=1, progress=False)
    manifest = Manifest.load(report.manifest_path)
    kw = dict(batch_size=2, train=True, seed=SEED)
    for features in (False, True):
        cpu = batches(CPULoader(manifest, preset, features=features, **kw))
        gpu = batches(DALILoader(manifest, preset, device_id=0, features=features, **kw))
        assert len(cpu) == len(gpu) == 2
        for c, g in zip(cpu, gpu):
            assert g["frames"].is_cuda and g["audio"].is_cuda
            torch.testing.assert_close(c["index"], g["index"].cpu())
            if features:
                scale = c["audio"].abs().max()
                assert (c["audio"] - g["audio"].cpu()).abs().max() <= 1e-2 * scale
            else:
                assert (c["frames"].int() - g["frames"].cpu().int()).abs().max() <= 2


def _broken_copy(manifest, tmp_path):
    """The manifest with clip 0's video missing, clip 1's video corrupt and clip 2's audio
    silent (a prepared FLAC of zeros)."""
    import dataclasses

    from avfast.data import media

    corrupt = tmp_path / "corrupt.mkv"
    corrupt.write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 64)
    silent = tmp_path / "silent.flac"
    media.write_flac(silent, np.zeros((1, 32000), dtype=np.float32), 16000)
    clips = list(manifest.clips)
    clips[0] = dataclasses.replace(clips[0], path=str(tmp_path / "missing.mkv"))
    clips[1] = dataclasses.replace(clips[1], path=str(corrupt))
    clips[2] = dataclasses.replace(clips[2], audio_path=str(silent))
    return Manifest(clips, manifest.classes, manifest.root)


@pytest.mark.parametrize("path", ["cpu", "dali"])
def test_bad_clips_are_replaced_when_training_and_dropped_when_evaluating(prepared, tmp_path, path):
    broken = _broken_copy(prepared, tmp_path)
    make = CPULoader if path == "cpu" else (lambda *a, **k: dali_loader(*a, **k))
    train = make(broken, "deepavfusion", batch_size=3, train=True, seed=SEED, features=False)
    got = batches(train)
    assert [b["index"].numel() for b in got] == [3, 3]  # full batches: DDP ranks stay in step
    used = torch.cat([b["index"] for b in got]).tolist()
    assert not {0, 1, 2} & set(used)
    assert sum(train.skipped.values()) >= 3 and "silent" in train.skipped
    assert sorted(train.unreadable) == [0, 1, 2]  # each bad clip by index, with its reason
    evaluate = make(broken, "deepavfusion", batch_size=3, train=False, features=False)
    kept = torch.cat([b["index"] for b in batches(evaluate)]).tolist()
    assert kept == [3, 4, 5] and sum(evaluate.skipped.values()) == 3
    assert sorted(evaluate.unreadable) == [0, 1, 2]
    assert "corrupt" in evaluate.unreadable[1][1] and str(tmp_path / "corrupt.mkv") in evaluate.unreadable[1][1]


def test_dali_cuts_audio_to_the_clip_bounds_like_the_cpu_path(prepared):
    import dataclasses

    clips = [dataclasses.replace(c, start=0.5, end=1.5) for c in prepared.clips]
    bounded = Manifest(clips, prepared.classes, prepared.root)
    kw = dict(batch_size=3, train=True, seed=SEED, features=False)
    for c, d in zip(batches(CPULoader(bounded, "mavt", **kw)), batches(dali_loader(bounded, "mavt", **kw))):
        torch.testing.assert_close(c["audio"], d["audio"], rtol=0, atol=1e-6)


def test_prepared_audio_below_the_preset_rate_is_refused(prepared):
    with pytest.raises(ValueError, match=r"manifest: the preset reads audio at 32000 Hz, got clips prepared at \[16000\] Hz"):
        CPULoader(prepared, "dgsct", batch_size=1, train=False)
