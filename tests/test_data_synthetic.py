"""avfast.data.synthetic: class colours and tones survive each codec, datasets and bad clips."""

import colorsys

import numpy as np
import pytest
import torch

from avfast.data import media, synthetic
from avfast.data.manifest import read_folder

SR = 16000


def test_class_colours_and_frequencies_are_distinct():
    for n in (1, 4, 28):
        colours = [synthetic.class_colour(k, n) for k in range(n)]
        freqs = [synthetic.class_frequency(k, n) for k in range(n)]
        assert len(set(colours)) == n and len(set(freqs)) == n
        assert all(300 <= f <= 3000 for f in freqs) and freqs == sorted(freqs)
        for rgb in colours:
            assert max(rgb) == 255 and min(rgb) == 0  # fully saturated
    with pytest.raises(ValueError, match="class index must be an integer in \\[0, 4\\), got 4"):
        synthetic.class_colour(4, 4)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        synthetic.class_frequency(0, 0)


def predicted_class(frames: torch.Tensor, wave: torch.Tensor, rate: int, n: int) -> tuple[int, int]:
    """(class by the hue of the most saturated pixels, class by the strongest frequency)."""
    rgb = frames.float().reshape(-1, 3) / 255
    saturation = rgb.max(1).values - rgb.min(1).values
    r, g, b = rgb[saturation > 0.6].mean(0).tolist()
    hue = colorsys.rgb_to_hsv(r, g, b)[0]
    by_colour = min(range(n), key=lambda k: min(abs(hue - k / n), 1 - abs(hue - k / n)))
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    peak = np.argmax(spectrum) * rate / len(wave)
    by_tone = min(range(n), key=lambda k: abs(synthetic.class_frequency(k, n) - peak))
    return by_colour, by_tone


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_every_class_is_recoverable_after_the_codec(tmp_path, suffix):
    n = 6
    for k in range(n):
        path = tmp_path / f"c{k}{suffix}"
        synthetic.write_clip(path, k, n, duration=2.0, fps=10, size=64, seed=k)
        info = media.probe(path)
        assert (info.num_frames, info.width, info.height) == (20, 64, 64)
        rate = info.sample_rate
        assert rate == (48000 if suffix == ".webm" else SR)
        frames = media.decode_frames(path, [0, 10, 19])
        wave = media.decode_audio(path, rate)
        assert wave.numel() == pytest.approx(2 * rate, abs=1024)  # AAC pads to its 1024-sample frames
        rms = wave[: 2 * rate].square().mean().sqrt()
        assert 0.3 / 2**0.5 - 0.02 < rms < 0.3 / 2**0.5 + 0.02  # the 0.3 tone over low noise
        assert predicted_class(frames, wave, rate, n) == (k, k)


def test_square_moves_and_background_is_noisy(tmp_path):
    path = tmp_path / "c.mkv"
    synthetic.write_clip(path, 0, 4, duration=3.0, seed=5)
    frames = media.decode_frames(path, range(30)).float()
    red = (frames[..., 0] > 200) & (frames[..., 1] < 80) & (frames[..., 2] < 80)
    area = red.float().mean((1, 2))
    assert (area > 0.2).all()  # a 32x32 square in 64x64 covers a quarter of the frame
    centres = torch.stack([torch.nonzero(m).float().mean(0) for m in red])
    assert (centres[1:] - centres[:-1]).norm(dim=1).max() > 1  # it moves
    grey = frames[~red]
    assert grey.std() > 10


def test_make_dataset_is_read_folder_and_reproducible(tmp_path):
    m = synthetic.make_dataset(tmp_path / "a", num_classes=3, clips_per_class=2, suffix=".mkv", duration=1.0)
    assert m == read_folder(tmp_path / "a")
    assert m.classes == ["class_00", "class_01", "class_02"]
    assert [c.path for c in m.clips][:2] == ["class_00/clip_000.mkv", "class_00/clip_001.mkv"]
    assert [c.labels for c in m.clips] == [(0,), (0,), (1,), (1,), (2,), (2,)]
    again = synthetic.make_dataset(tmp_path / "b", num_classes=3, clips_per_class=2, duration=1.0)
    first = media.decode_frames(tmp_path / "a" / m.clips[0].path, [0, 5])
    assert torch.equal(first, media.decode_frames(tmp_path / "b" / again.clips[0].path, [0, 5]))
    other = media.decode_frames(tmp_path / "a" / m.clips[1].path, [0, 5])
    assert not torch.equal(first, other)  # every clip has its own seed


def test_make_dataset_names_sort_like_class_indices(tmp_path):
    m = synthetic.make_dataset(tmp_path, num_classes=101, clips_per_class=1, duration=0.2, size=16)
    assert m.classes[100] == "class_100" and m.classes == sorted(m.classes)
    assert m == read_folder(tmp_path)


def test_make_bad_clips_fail_the_way_their_names_say(tmp_path):
    bad = synthetic.make_bad_clips(tmp_path)
    assert set(bad) == {"corrupt", "truncated", "no_audio", "silent", "too_short"}
    for name in ("corrupt", "truncated"):
        with pytest.raises(media.MediaError) as err:
            media.probe(bad[name])
        assert err.value.reason == name
    assert media.probe(bad["no_audio"]).audio_codec is None
    assert media.decode_audio(bad["silent"]).abs().max() == 0
    assert media.decode_audio(bad["silent"]).numel() == 2 * SR
    assert media.probe(bad["too_short"]).duration == pytest.approx(0.3)


def test_write_clip_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="path must end with one of \\('.mp4', '.mkv', '.webm'\\), got suffix '.avi'"):
        synthetic.write_clip(tmp_path / "x.avi", 0, 2)
    with pytest.raises(ValueError, match="sample_rate must be 48000 \\(or None\\) for .webm \\(Opus\\), got 16000"):
        synthetic.write_clip(tmp_path / "x.webm", 0, 2, sample_rate=16000)
    with pytest.raises(ValueError, match="size must be an even integer >= 16, got 15"):
        synthetic.write_clip(tmp_path / "x.mkv", 0, 2, size=15)
    with pytest.raises(ValueError, match="duration must be > 0 s, got 0"):
        synthetic.write_clip(tmp_path / "x.mkv", 0, 2, duration=0)
    with pytest.raises(ValueError, match="clips_per_class must be a positive integer, got 0"):
        synthetic.make_dataset(tmp_path, clips_per_class=0)
    assert not list(tmp_path.iterdir())
