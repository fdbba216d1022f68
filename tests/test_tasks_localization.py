"""avfast.tasks.localization: the colour map and its inverse, the PNG layout read back,
Grad-CAM on each method's classification model, and the localize glue's errors."""

import pytest
import torch

from avfast.models import build_model
from avfast.tasks.localization import (display_frames, gradcam_maps, hot_colours, hot_values, map_from_png,
                                       write_overlay_png)
from seeding import fresh_seed, random_audio


def test_hot_colour_map_inverts_to_8_bit_rounding():
    v = torch.linspace(0, 1, 10001)
    rgb = hot_colours(v)
    assert rgb.dtype == torch.uint8 and rgb[0].tolist() == [0, 0, 0] and rgb[-1].tolist() == [255, 255, 255]
    assert rgb[5000].tolist() == [255, 128, 0]  # 0.5: red, half green
    # each channel rounds by <= 0.5/255 of its third of the range
    assert (hot_values(rgb) - v).abs().max() <= 0.5 / 255 + 1e-7


def test_overlay_png_rows_read_back_and_bad_inputs_are_named(tmp_path):
    fresh_seed()
    frames = torch.randint(0, 256, (3, 12, 12, 3), dtype=torch.uint8)
    maps = torch.rand(3, 12, 12)
    path = write_overlay_png(tmp_path / "x.png", frames, maps, scale=2)
    from PIL import Image

    width, height = Image.open(path).size
    assert height == 3 * 24 and width > 3 * 24  # 3 panels of 24 px and the colour bar
    for t in range(3):
        assert (map_from_png(path, t, 3, scale=2) - maps[t]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match=r"frames: expected uint8 \(T, S, S, 3\), got torch.float32"):
        write_overlay_png(tmp_path / "y.png", frames.float(), maps)
    with pytest.raises(ValueError, match=r"maps: expected \(T, S, S\) = \(3, 12, 12\), got \(3, 12, 11\)"):
        write_overlay_png(tmp_path / "y.png", frames, maps[..., :11])
    with pytest.raises(ValueError, match=r"maps: expected values in \[0, 1\]"):
        write_overlay_png(tmp_path / "y.png", frames, maps + 1)


def test_display_frames_undoes_the_normalisation():
    from avfast.data.transforms import normalize_frames

    fresh_seed()
    raw = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    torch.testing.assert_close(display_frames(normalize_frames(raw, mean, std), mean, std), raw, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["deepavfusion", "stgcma", "dgsct"])
def test_gradcam_gives_a_map_per_frame_in_0_1_peaking_at_1(method):
    fresh_seed()
    model = build_model(method, "tiny", num_classes=3).eval()
    cfg = model.config
    T = getattr(cfg, "num_frames", 1)
    frames = torch.randn(1, T, 3, cfg.img_size, cfg.img_size)
    audio = random_audio(method, cfg, 1, T)
    maps = gradcam_maps(model, method, frames, audio)
    assert maps.shape == (T, cfg.img_size, cfg.img_size)
    assert bool((maps >= 0).all()) and bool((maps <= 1 + 1e-6).all())
    peaks = maps.flatten(1).amax(1)
    # scaled per frame; a frame whose class evidence is all negative (an untrained tiny model's
    # may be) is 0 after the ReLU, as Grad-CAM defines it
    assert bool((((peaks - 1).abs() < 1e-5) | (peaks == 0)).all())
    assert all(p.grad is None for p in model.parameters())  # the model's gradients are left alone
    with pytest.raises(ValueError, match="method: expected one of .* for Grad-CAM, got 'mavt'"):
        gradcam_maps(model, "mavt", frames, audio)
