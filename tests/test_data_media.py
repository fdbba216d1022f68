"""avfast.data.media: probe, frame and audio decoding (and their agreement with DALI's CPU
decoders), FLAC extraction, re-encoding, errors."""

import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avfast.data import media, synthetic
from avfast.data.media import MediaError

SR = 16000


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One synthetic clip per container (class 1 of 4, 3 s, 10 fps, 64 px)."""
    root = tmp_path_factory.mktemp("media")
    paths = {}
    for suffix in (".mkv", ".mp4", ".webm"):
        paths[suffix] = root / f"clip{suffix}"
        synthetic.write_clip(paths[suffix], 1, 4, duration=3.0, fps=10, size=64)
    return paths


def tone_file(path: Path, wave: np.ndarray, rate: int, frames: int = 10) -> Path:
    """A VP9 + FLAC (lossless audio) .mkv with the given mono ``wave``."""
    synthetic._encode(path, np.zeros((frames, 64, 64, 3), np.uint8), 10, wave.astype(np.float32), rate)
    return path


def sequential_frames(path) -> list[torch.Tensor]:
    with av.open(str(path)) as container:
        return [media.frame_to_rgb(f) for f in container.decode(video=0)]


@pytest.mark.parametrize("suffix,codecs,rate", [(".mkv", ("vp9", "flac"), SR), (".mp4", ("h264", "aac"), SR),
                                                (".webm", ("vp9", "opus"), 48000)])
def test_probe_reports_streams_and_exact_frame_count(clips, suffix, codecs, rate):
    info = media.probe(clips[suffix])
    assert (info.video_codec, info.audio_codec) == codecs
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 64, 30, 10.0)
    assert info.sample_rate == rate and info.channels == 1
    assert info.duration == pytest.approx(3.0, abs=0.02)
    assert info.num_frames == len(sequential_frames(clips[suffix]))


def test_probe_audio_only_file(tmp_path):
    media.write_flac(str(tmp_path / "a.flac"), np.zeros((2, 8000), np.float32) + 0.1, SR)
    info = media.probe(tmp_path / "a.flac")
    assert (info.video_codec, info.fps, info.num_frames, info.width) == (None, None, None, None)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("flac", SR, 2)
    assert info.duration == pytest.approx(0.5)


@pytest.mark.parametrize("suffix", [".mkv", ".mp4", ".webm"])
def test_decode_frames_any_order_and_repeats_match_presentation_order(clips, suffix):
    reference = sequential_frames(clips[suffix])
    indices = [29, 0, 5, 5, 17, 3]
    frames = media.decode_frames(clips[suffix], indices)
    assert frames.dtype == torch.uint8 and frames.shape == (6, 64, 64, 3)
    for frame, i in zip(frames, indices):
        assert torch.equal(frame, reference[i]), i


def test_decode_frames_seeking_equals_counting_on_short_gops(clips, tmp_path, monkeypatch):
    # H.264 with B-frames and a key frame every 4 frames: the seek path must land on the same
    # frames as decoding from the start and counting
    dst = tmp_path / "gop4.mp4"
    media.reencode_video(clips[".mkv"], dst, codec="h264", gop=4)
    indices = [25, 2, 13, 14, 29, 0]
    seeking = media.decode_frames(dst, indices)
    monkeypatch.setattr(media, "_video_index", lambda container, stream: None)
    counting = media.decode_frames(dst, indices)
    assert torch.equal(seeking, counting)
    assert not torch.equal(seeking[0], seeking[1])


def test_frame_colour_conversion_agrees_with_swscale(clips):
    # our BT.601 / bilinear-chroma conversion against swscale's (nearest chroma): same colours
    with av.open(str(clips[".mkv"])) as container:
        frame = next(container.decode(video=0))
        ours = media.frame_to_rgb(frame).int()
        theirs = torch.from_numpy(frame.to_ndarray(format="rgb24")).int()
    assert (ours - theirs).abs().float().mean() < 4.0
    assert (ours - theirs).abs().float().median() <= 2.0


def test_decode_frames_errors(clips, tmp_path):
    with pytest.raises(MediaError, match="frame index out of range.*num_frames=30, got 30") as err:
        media.decode_frames(clips[".mkv"], [0, 30])
    assert err.value.reason == "frame index out of range"
    with pytest.raises(ValueError, match="indices must be .*>= 0, got \\[-1\\]"):
        media.decode_frames(clips[".mkv"], [-1])
    with pytest.raises(ValueError, match="indices"):
        media.decode_frames(clips[".mkv"], [])
    with pytest.raises(FileNotFoundError, match="path must be an existing file, got .*nope.mkv"):
        media.decode_frames(tmp_path / "nope.mkv", [0])
    media.write_flac(str(tmp_path / "a.flac"), np.zeros((1, 100), np.float32), SR)
    with pytest.raises(MediaError, match="no video track"):
        media.decode_frames(tmp_path / "a.flac", [0])


def test_decode_audio_lossless_round_trip_and_window(tmp_path):
    rng = np.random.default_rng(0)
    wave = (0.5 * rng.uniform(-1, 1, 3 * SR)).astype(np.float32)
    path = tone_file(tmp_path / "n.mkv", wave, SR, frames=30)
    full = media.decode_audio(path, SR)
    assert full.dtype == torch.float32 and full.shape == (3 * SR,)
    assert np.abs(full.numpy() - wave).max() <= 0.5 / 32768 + 1e-7  # FLAC s16 quantisation
    window = media.decode_audio(path, SR, start=1.25, duration=0.5)
    assert torch.equal(window, full[20000:28000])
    tail = media.decode_audio(path, SR, start=2.75, duration=1.0)  # the file ends first
    assert torch.equal(tail, full[44000:])
    assert media.decode_audio(path, SR, start=5.0).numel() == 0


def test_decode_audio_resamples_in_time_and_downmixes(tmp_path):
    rate = 48000
    t = np.arange(2 * rate) / rate
    path = tone_file(tmp_path / "t.mkv", 0.3 * np.sin(2 * np.pi * 440 * t), rate, frames=20)
    out = media.decode_audio(path, SR).numpy()
    assert out.shape == (2 * SR,)
    expected = 0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)
    assert np.abs(out - expected)[200:-200].max() < 2e-3  # no delay from the resampler
    window = media.decode_audio(path, SR, start=0.5, duration=0.25).numpy()
    np.testing.assert_allclose(window, out[8000:12000], atol=1e-6)
    stereo = np.stack([np.full(SR, 0.5), np.full(SR, -0.25)]).astype(np.float32)
    media.write_flac(str(tmp_path / "s.flac"), stereo, SR)
    mono = media.decode_audio(tmp_path / "s.flac", SR)
    np.testing.assert_allclose(mono.numpy(), 0.125, atol=1e-4)


def test_decode_audio_errors(clips, tmp_path):
    silent_video = tmp_path / "v.mkv"
    synthetic.write_clip(silent_video, 0, 1, duration=1.0, audio=False)
    with pytest.raises(MediaError, match="no audio track") as err:
        media.decode_audio(silent_video)
    assert err.value.reason == "no audio track" and err.value.path == str(silent_video)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer, got 0"):
        media.decode_audio(clips[".mkv"], 0)
    with pytest.raises(ValueError, match="start must be >= 0 s, got -1"):
        media.decode_audio(clips[".mkv"], SR, start=-1)
    with pytest.raises(ValueError, match="duration must be None or >= 0 s, got -0.5"):
        media.decode_audio(clips[".mkv"], SR, duration=-0.5)


def test_extract_audio_writes_16bit_flac_of_the_resampled_mono_track(clips, tmp_path):
    dst = tmp_path / "sub" / "a.flac"
    count = media.extract_audio(clips[".webm"], dst, sample_rate=SR)
    info = media.probe(dst)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("flac", SR, 1)
    source = media.decode_audio(clips[".webm"], SR)
    written = media.decode_audio(dst, SR)
    assert count == written.numel() == source.numel()
    assert (written - source).abs().max() <= 0.5 / 32768 + 1e-7
    with av.open(str(dst)) as container:
        assert container.streams.audio[0].codec_context.format.name.startswith("s16")
    assert [p.name for p in dst.parent.iterdir()] == ["a.flac"]


def test_extract_audio_keeps_channels_without_mono(tmp_path):
    stereo = np.stack([np.full(SR, 0.5), np.full(SR, -0.25)]).astype(np.float32)
    media.write_flac(str(tmp_path / "s.flac"), stereo, SR)
    media.extract_audio(tmp_path / "s.flac", tmp_path / "out.flac", sample_rate=8000, mono=False)
    assert media.probe(tmp_path / "out.flac").channels == 2
    assert media.probe(tmp_path / "out.flac").sample_rate == 8000


def test_failed_writes_leave_no_file(tmp_path):
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError) as err:
        media.extract_audio(bad, tmp_path / "out" / "a.flac")
    assert err.value.reason == "corrupt"
    with pytest.raises(MediaError):
        media.reencode_video(bad, tmp_path / "out" / "v.mp4")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="dst must end with one of \\('.flac',\\), got .*a.wav"):
        media.extract_audio(bad, tmp_path / "a.wav")


def test_probe_rejects_corrupt_and_truncated_files(tmp_path, clips):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="corrupt"):
        media.probe(bad)
    cut = tmp_path / "cut.mkv"
    data = clips[".mkv"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated.*ends at .* declares 3.00 s") as err:
        media.probe(cut)
    assert err.value.reason == "truncated"
    with pytest.raises(FileNotFoundError, match="probe: path must be an existing file"):
        media.probe(tmp_path / "missing.mkv")


def test_media_error_survives_pickling():
    err = pickle.loads(pickle.dumps(MediaError("/a/b.mp4", "truncated", "video ends at 1 s")))
    assert (err.path, err.reason, err.detail) == ("/a/b.mp4", "truncated", "video ends at 1 s")
    assert str(err) == "/a/b.mp4: truncated (video ends at 1 s)"


def key_frames(path) -> list[int]:
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        order = sorted(packets, key=lambda p: p.pts)
        return [i for i, p in enumerate(order) if p.is_keyframe]


@pytest.mark.parametrize("codec,suffix", [("h264", ".mp4"), ("vp9", ".mkv")])
def test_reencode_video_short_gops_every_frame_kept(clips, tmp_path, codec, suffix):
    dst = tmp_path / f"v{suffix}"
    assert media.reencode_video(clips[".mp4"], dst, codec=codec, gop=8, max_height=32) == 30
    info = media.probe(dst)
    assert (info.video_codec, info.audio_codec) == (codec, None)
    assert (info.width, info.height, info.num_frames, info.fps) == (32, 32, 30, 10.0)
    keys = key_frames(dst)
    assert keys[0] == 0 and max(np.diff(keys + [30])) <= 8
    # same frames, same order: each re-encoded frame is closest to the source frame it came from
    source = media.decode_frames(clips[".mp4"], range(30)).permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(source, size=(32, 32), mode="area")
    out = media.decode_frames(dst, range(30)).permute(0, 3, 1, 2).float()
    distance = torch.cdist(out.flatten(1), small.flatten(1))
    assert torch.equal(distance.argmin(1), torch.arange(30))


def test_reencode_video_argument_errors(clips, tmp_path):
    with pytest.raises(ValueError, match="codec must be one of \\('h264', 'vp9'\\), got 'av1'"):
        media.reencode_video(clips[".mkv"], tmp_path / "v.mp4", codec="av1")
    with pytest.raises(ValueError, match="dst must end with one of \\('.mkv', '.webm'\\), got .*v.mp4"):
        media.reencode_video(clips[".mkv"], tmp_path / "v.mp4", codec="vp9")
    with pytest.raises(ValueError, match="gop must be a positive integer, got 0"):
        media.reencode_video(clips[".mkv"], tmp_path / "v.mp4", gop=0)


# ------------------------------------------------------------------ DALI agreement

def batch_of(array):
    return lambda: [array]


def dali_run(outputs_fn, *inputs):
    dali = pytest.importorskip("nvidia.dali")

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        feeds = [dali.fn.external_source(source=batch_of(x), batch=True) for x in inputs]
        return tuple(outputs_fn(dali.fn, dali.types, *feeds))

    p = pipe()
    p.build()
    return [np.array(out[0]) for out in p.run()]


def test_decode_frames_equals_dali_cpu_video_decoder(tmp_path):
    path = tmp_path / "d.mkv"
    synthetic.write_clip(path, 2, 4, duration=3.0, fps=10, size=64, seed=3)
    indices = [0, 7, 29, 3, 3, 16]
    data = np.fromfile(path, dtype=np.uint8)
    (theirs,) = dali_run(lambda fn, types, b: [fn.decoders.video(b, device="cpu", frames=indices)], data)
    ours = media.decode_frames(path, indices).numpy()
    assert theirs.shape == ours.shape == (6, 64, 64, 3)
    assert np.abs(theirs.astype(int) - ours).max() <= 3


def test_dali_audio_decoder_reads_extracted_flac_as_decode_audio(clips, tmp_path):
    dst = tmp_path / "a.flac"
    media.extract_audio(clips[".mp4"], dst, sample_rate=SR)
    data = np.fromfile(dst, dtype=np.uint8)
    wave, rate = dali_run(lambda fn, types, b: fn.decoders.audio(b, dtype=types.FLOAT, downmix=True,
                                                                   sample_rate=SR), data)
    ours = media.decode_audio(dst, SR).numpy()
    assert float(rate) == SR and wave.shape == ours.shape
    assert np.abs(wave - ours).max() <= 1.0 / 32768
    source = media.decode_audio(clips[".mp4"], SR).numpy()
    assert np.abs(wave - source).max() <= 1.0 / 32768  # only the int16 quantisation
