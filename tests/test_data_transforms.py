"""Batched steps shared by both data paths: windows, frames, bad-audio rows, labels."""

import numpy as np
import pytest
import torch

from avfast.data.presets import get_preset
from avfast.data.transforms import (audio_features, bad_audio_rows, crop_resize_frames,
                                    gather_windows, normalize_frames)
from seeding import module_seed

SEED = module_seed()


def window_loop(wave, n, start, length, pad):
    """One window by plain indexing: the clip continued by zeros / repeats / mirrors."""
    clip = wave[:n].tolist()
    if pad == "tile":
        ext = (clip * (length // max(n, 1) + 2 + start))
    elif pad == "mirror":
        ext = (clip + clip[::-1]) * (length // max(n, 1) + 2 + start)
    else:
        ext = clip + [0.0] * (length + start)
    return torch.tensor(ext[start:start + length] if n else [0.0] * length)


@pytest.mark.parametrize("pad", ["zero", "tile", "mirror"])
def test_gather_windows_matches_indexing(pad):
    g = torch.Generator().manual_seed(SEED)
    wave = torch.randn(3, 41, generator=g)
    lengths = torch.tensor([41, 7, 0])
    starts = torch.tensor([[0, 30, 5], [0, 0, 2], [0, 0, 0]])
    out = gather_windows(wave, lengths, starts, 19, pad)
    assert out.shape == (3, 3, 19)
    for b in range(3):
        for k in range(3):
            torch.testing.assert_close(out[b, k], window_loop(wave[b], int(lengths[b]), int(starts[b, k]), 19, pad),
                                       rtol=0, atol=0)


def test_gather_windows_errors():
    with pytest.raises(ValueError, match=r"wave: expected \(B, N\), got \(4,\)"):
        gather_windows(torch.zeros(4), torch.tensor([4]), torch.tensor([[0]]), 2)
    with pytest.raises(ValueError, match="pad: expected 'zero', 'tile' or 'mirror', got 'wrap'"):
        gather_windows(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([[0]]), 2, "wrap")


def test_crop_resize_frames_box_flip_and_identity():
    g = torch.Generator().manual_seed(SEED)
    frames = torch.randint(0, 256, (2, 30, 40, 3), generator=g, dtype=torch.uint8)
    same = crop_resize_frames(frames, (5, 7, 16, 16), 16, flip=False)
    torch.testing.assert_close(same, frames[:, 5:21, 7:23], rtol=0, atol=0)
    flipped = crop_resize_frames(frames, (5, 7, 16, 16), 16, flip=True)
    torch.testing.assert_close(flipped, frames[:, 5:21, 7:23].flip(2), rtol=0, atol=0)
    flat = torch.full((1, 30, 40, 3), 77, dtype=torch.uint8)
    assert crop_resize_frames(flat, (0, 0, 30, 40), 13, flip=False).unique().tolist() == [77]
    with pytest.raises(ValueError, match=r"crop: expected a box inside \(30, 40\), got \(0, 30, 16, 16\)"):
        crop_resize_frames(frames, (0, 30, 16, 16), 16, flip=False)
    with pytest.raises(ValueError, match=r"frames: expected uint8 \(T, H, W, 3\), got torch.float32"):
        crop_resize_frames(frames.float(), (0, 0, 4, 4), 4, flip=False)


def test_crop_resize_frames_matches_dali_resize():
    """The CPU path's resize against DALI's (the GPU path's) on the same box: +-1 uint8
    (DALI reads pixels around the box; a resize of the cut-out box alone differs by ~10)."""
    dali = pytest.importorskip("nvidia.dali")
    fn, types = dali.fn, dali.types
    rng = np.random.default_rng(SEED)
    base = rng.integers(0, 256, (1, 12, 16, 3)).astype(np.float32)
    # a smooth picture (like decoded video) upsampled to 72 x 96, plus mild noise
    img = torch.nn.functional.interpolate(torch.from_numpy(base).permute(0, 3, 1, 2), size=(72, 96),
                                          mode="bicubic", align_corners=False)
    img = (img + torch.randn(img.shape, generator=torch.Generator().manual_seed(SEED)) * 40).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    boxes = [((3, 11, 50, 61), False), ((0, 0, 72, 96), True), ((20, 30, 17, 23), False),
             ((1, 2, 10, 10), True), ((0, 0, 64, 64), True)]

    @dali.pipeline_def(batch_size=len(boxes), num_threads=1, device_id=None)
    def pipe():
        frames = fn.external_source(source=lambda: [img.numpy()] * len(boxes), layout="FHWC")
        starts = fn.external_source(source=lambda: [np.array([t, l + w if f else l], np.float32) for (t, l, h, w), f in boxes])
        ends = fn.external_source(source=lambda: [np.array([t + h, l if f else l + w], np.float32) for (t, l, h, w), f in boxes])
        return fn.resize(frames, size=[32, 32], roi_start=starts, roi_end=ends,
                         interp_type=types.INTERP_LINEAR, antialias=True)

    p = pipe()
    p.build()
    (out,) = p.run()
    for i, (box, flip) in enumerate(boxes):
        ours = crop_resize_frames(img, box, 32, flip).int()
        theirs = torch.from_numpy(np.array(out[i])).int()
        assert (ours - theirs).abs().max() <= 1, (box, flip)


def test_normalize_frames_layout_and_values():
    frames = torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = normalize_frames(frames, (0.5, 0.0, 0.2), (0.5, 1.0, 0.1))
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_bad_audio_rows_reasons_and_pad_mode():
    wave = torch.zeros(4, 10)
    wave[0, :9] = 0.5
    wave[2, :3] = 0.5
    lengths = torch.tensor([10, 10, 3, 0])
    keep, reasons = bad_audio_rows(wave, lengths, 10, "skip")
    assert keep.tolist() == [True, False, False, False]
    assert reasons == {"silent": 1, "too short": 2}
    keep, reasons = bad_audio_rows(wave, lengths, 10, "pad")
    assert keep.all() and not reasons


@pytest.mark.parametrize("name,shape", [("deepavfusion", (2, 1, 128, 192)), ("mavt", (2, 1, 224, 224)),
                                        ("stgcma", (2, 10, 102, 128)), ("dgsct", (2, 10, 32000))])
def test_audio_features_shapes_per_preset(name, shape):
    preset = get_preset(name)
    k = preset.audio.segments
    windows = torch.randn(2, k, preset.audio.window_samples)
    out = audio_features(windows, preset)
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all()
