"""avfast.data.prepare: failures reported by reason, outputs and metadata, resuming."""

import csv
import json
import os
import shutil

import pytest
import torch

from avfast.data import media, synthetic
from avfast.data.manifest import Clip, Manifest
from avfast.data.prepare import prepare

SR = 16000
REASONS = {"corrupt": "corrupt", "truncated": "truncated", "no_audio": "no audio track",
           "silent": "silent audio", "too_short": "too short"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """2 classes x 3 good clips (2 s, VP9 + FLAC) and the five bad clips in class_00."""
    root = tmp_path_factory.mktemp("src")
    good = synthetic.make_dataset(root, num_classes=2, clips_per_class=3, duration=2.0)
    bad = synthetic.make_bad_clips(root / "class_00")
    return root, good, bad


def read_failed(dst) -> dict[str, str]:
    with open(dst / "failed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {os.path.basename(r["path"]): r["reason"] for r in rows}


def test_prepare_reports_every_failure_and_prepares_the_good_clips(source, tmp_path):
    root, good, bad = source
    dst = tmp_path / "out"
    report = prepare(root, dst, workers=2, progress=False)
    assert report.prepared == 6 and report.skipped_done == 0
    assert sorted(reason for _, reason in report.failed) == sorted(REASONS.values())
    assert read_failed(dst) == {f"{name}.mkv": reason for name, reason in REASONS.items()}
    assert report.failures_by_reason() == {reason: 1 for reason in REASONS.values()}

    out = Manifest.load(report.manifest_path)
    assert out.root == str(dst) and out.classes == good.classes
    assert [c.labels for c in out.clips] == [c.labels for c in good.clips]
    for clip, src_clip in zip(out.clips, good.clips):
        assert clip.path == str(root / src_clip.path)  # no re-encoding: the source video
        assert clip.audio_path == f"audio/{src_clip.path}.flac"
        assert (clip.fps, clip.num_frames, clip.width, clip.height, clip.sample_rate) == (10.0, 20, 64, 64, SR)
        assert clip.duration == 2.0
        written = media.decode_audio(out.resolve(clip.audio_path), SR)
        expected = media.decode_audio(out.resolve(clip.path), SR)
        assert written.numel() == round(clip.duration * SR)
        assert (written - expected).abs().max() <= 0.5 / 32768 + 1e-7
    flacs = sorted(p.relative_to(dst / "audio").as_posix() for p in (dst / "audio").rglob("*") if p.is_file())
    assert flacs == sorted(f"{c.path}.flac" for c in good.clips)  # nothing for the failed files


def test_rerun_skips_finished_files_and_interrupted_runs_complete(source, tmp_path):
    root, _, _ = source
    dst = tmp_path / "out"
    full = prepare(root, dst, workers=1, progress=False)
    manifest = (dst / "manifest.csv").read_text()
    total = full.prepared + len(full.failed)
    again = prepare(root, dst, workers=1, progress=False)
    assert (again.prepared, again.skipped_done, again.failed) == (0, total, full.failed)
    assert (dst / "manifest.csv").read_text() == manifest

    # interrupt: keep half of progress.jsonl plus a line cut mid-write; drop the outputs
    lines = (dst / "progress.jsonl").read_text().splitlines()
    half = lines[: total // 2]
    (dst / "progress.jsonl").write_text("\n".join(half) + "\n" + lines[-1][:15])
    (dst / "manifest.csv").unlink()
    (dst / "failed.csv").unlink()
    with pytest.warns(UserWarning, match="1 unreadable lines .*prepared again"):
        resumed = prepare(root, dst, workers=2, progress=False)
    assert resumed.skipped_done == len(half)
    assert resumed.prepared == sum(1 for r in map(json.loads, lines[len(half):]) if r["ok"])
    assert (dst / "manifest.csv").read_text() == manifest
    assert sorted(resumed.failed) == sorted(full.failed)
    records = [json.loads(x) for x in (dst / "progress.jsonl").read_text().splitlines()[len(half) + 1:]]
    assert len(records) == total - len(half)  # appended after the cut line, one per file


def test_retry_failed_and_settings_must_not_change(source, tmp_path):
    root, _, _ = source
    src = tmp_path / "src"
    shutil.copytree(root, src)
    dst = tmp_path / "out"
    first = prepare(src, dst, workers=1, progress=False)
    synthetic.write_clip(src / "class_00" / "corrupt.mkv", 0, 2, duration=1.0)  # repaired
    assert prepare(src, dst, workers=1, progress=False).prepared == 0
    retried = prepare(src, dst, workers=1, progress=False, retry_failed=True)
    assert retried.prepared == 1 and len(retried.failed) == len(first.failed) - 1
    assert "corrupt.mkv" not in read_failed(dst)
    with pytest.raises(ValueError, match="sample_rate must be 16000 as in the run that started .*got 22050"):
        prepare(src, dst, sample_rate=22050, workers=1, progress=False)


def test_reencode_writes_short_gop_video_and_its_metadata(source, tmp_path):
    root, good, _ = source
    clips = Manifest(clips=good.clips[:2], classes=good.classes, root=good.root)
    report = prepare(clips, tmp_path / "out", reencode="vp9", gop=4, max_height=32, workers=1, progress=False)
    out = Manifest.load(report.manifest_path)
    assert report.prepared == 2 and not report.failed
    for clip, src_clip in zip(out.clips, clips.clips):
        assert clip.path == f"video/{src_clip.path}.mkv"
        info = media.probe(out.resolve(clip.path))
        assert (info.video_codec, info.audio_codec, info.height, info.width) == ("vp9", None, 32, 32)
        assert (clip.width, clip.height, clip.num_frames) == (32, 32, 20)
        frames = media.decode_frames(out.resolve(clip.path), [0, 19]).float()
        source_frames = media.decode_frames(clips.resolve(src_clip.path), [0, 19]).permute(0, 3, 1, 2).float()
        small = torch.nn.functional.interpolate(source_frames, size=(32, 32), mode="area").permute(0, 2, 3, 1)
        assert (frames - small).abs().mean() < 12


def test_clips_sharing_a_file_and_missing_files(source, tmp_path):
    root, good, _ = source
    path = good.clips[0].path
    shared = Manifest(clips=[Clip(path, (0,), 0.0, 1.0), Clip(path, (1,), 1.0, 2.0), Clip("class_01/gone.mkv", (1,))],
                      classes=good.classes, root=good.root)
    report = prepare(shared, tmp_path / "out", workers=1, progress=False)
    assert report.prepared == 1 and report.failed == [(str(root / "class_01/gone.mkv"), "missing file")]
    out = Manifest.load(report.manifest_path)
    assert [(c.start, c.end, c.labels) for c in out.clips] == [(0.0, 1.0, (0,)), (1.0, 2.0, (1,))]
    assert out.clips[0].audio_path == out.clips[1].audio_path


def test_prepare_reads_dataset_files_and_reports_their_missing_clips(source, tmp_path):
    root, good, _ = source
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(root / good.clips[0].path, clips / "abc_000010.mkv")
    (clips / "vggsound.csv").write_text("abc,10,dog,train\nxyz,20,cat,test\n")
    report = prepare(clips / "vggsound.csv", tmp_path / "out", workers=1, progress=False)
    assert report.prepared == 1 and report.failed == [(str(clips / "xyz_000020.mp4"), "missing file")]
    out = Manifest.load(report.manifest_path)
    assert out.classes == ["cat", "dog"] and [c.labels for c in out.clips] == [(1,)]


def test_prepare_argument_errors(source, tmp_path):
    root, _, _ = source
    with pytest.raises(ValueError, match="reencode must be one of \\(None, 'h264', 'vp9'\\), got 'av1'"):
        prepare(root, tmp_path / "o", reencode="av1")
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        prepare(root, tmp_path / "o", workers=0)
    with pytest.raises(ValueError, match="min_duration must be a number >= 0 s, got -1"):
        prepare(root, tmp_path / "o", min_duration=-1)
    with pytest.raises(FileNotFoundError, match="src must be an existing folder or manifest file, got .*nope"):
        prepare(tmp_path / "nope", tmp_path / "o")
    assert not (tmp_path / "o").exists()
