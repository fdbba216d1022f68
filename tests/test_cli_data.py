"""The ``avfast synth`` and ``avfast prepare`` commands."""

import pytest

from avfast import cli
from avfast.data import media, synthetic
from avfast.data.manifest import Manifest, read_folder


def test_synth_then_prepare_with_a_failure(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert cli.main(["synth", str(src), "--classes", "2", "--clips-per-class", "2", "--suffix", ".mp4",
                     "--duration", "1.5", "--size", "32"]) == 0
    made = read_folder(src)
    assert made.classes == ["class_00", "class_01"] and len(made) == 4
    info = media.probe(src / made.clips[0].path)
    assert (info.video_codec, info.audio_codec, info.width, info.num_frames) == ("h264", "aac", 32, 15)
    (src / "class_01" / "broken.mp4").write_bytes(b"\x00" * 1000)

    assert cli.main(["prepare", str(src), str(dst), "--workers", "1", "--quiet", "--reencode", "vp9",
                     "--gop", "4", "--sample-rate", "8000"]) == 0  # failed clips do not fail the command
    out = capsys.readouterr().out
    assert "prepared 4 files, 0 done before, 1 failed" in out
    assert "failures by reason" in out and "corrupt" in out and "failed.csv" in out
    manifest = Manifest.load(dst / "manifest.csv")
    assert len(manifest) == 4 and {c.sample_rate for c in manifest.clips} == {8000}
    assert all(c.path.endswith(".mp4.mkv") for c in manifest.clips)

    assert cli.main(["prepare", str(src), str(dst), "--workers", "1", "--quiet", "--reencode", "vp9",
                     "--gop", "4", "--sample-rate", "8000"]) == 0
    assert "prepared 0 files, 5 done before, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["prepare", "{tmp}/nope", "{tmp}/dst"], "src must be an existing folder or manifest file"),
    (["prepare", "{tmp}/src", "{tmp}/dst", "--workers", "0"], "workers must be a positive integer, got 0"),
    (["prepare", "{tmp}/src", "{tmp}/dst", "--reencode", "av1"], "invalid choice: 'av1'"),
    (["prepare", "{tmp}/src", "{tmp}/dst", "--gop", "x"], "invalid int value: 'x'"),
    (["synth", "{tmp}/s", "--suffix", ".avi"], "invalid choice: '.avi'"),
    (["synth", "{tmp}/s", "--classes", "0"], "num_classes must be a positive integer, got 0"),
    (["synth", "{tmp}/s", "--verbose"], "unrecognized arguments: --verbose"),
])
def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys, argv, message):
    synthetic.write_clip(tmp_path / "src" / "a" / "x.mkv", 0, 1, duration=1.0)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
