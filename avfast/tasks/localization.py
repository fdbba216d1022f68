"""Sounding-region maps: where in each frame the sound comes from, written as PNG overlays
with a colour bar (``avfast localize``).

The map comes from what the model has:

- an ``AVSModel`` (a checkpoint of ``avfast train --task avs``): the head's per-pixel
  probability sigmoid(logits), the same map the AVS metrics score;
- a classification model of DeepAVFusion, STG-CMA or DG-SCT: Grad-CAM of the predicted
  class (per frame for the per-second methods) on the last spatial visual tokens that reach
  the logits (DeepAVFusion: the normalised image tokens; STG-CMA: the visual tokens entering
  the last block, whose CLS is the visual feature; DG-SCT: the last Swin stage after its
  norm), ReLU'd, upsampled bilinearly to the frame and scaled to [0, 1] per frame.

The PNG has one row per frame: the frame, the map alone (``hot`` colour map: black, red,
yellow, white), the frame with the map blended in (opacity grows with the value), and a
colour bar from 0 to 1 on the right. ``map_from_png`` reads a row's map back (the colour
map is inverted exactly up to 8-bit rounding), which is how the tests score a PNG.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

CAM_LAYERS = {  # method: (module, "output" or "input", layout of the tokens)
    "deepavfusion": ("encoder.image.norm", "output", "tokens"),
    "stgcma": ("adapters.-1", "input", "cls+tokens"),
    "dgsct": ("visual.norm", "output", "nhwc"),
}
BAR_WIDTH = 24  # colour bar strip, px
LABEL_WIDTH = 40  # room for the bar's tick labels, px


def hot_colours(values: Tensor) -> Tensor:
    """``values`` in [0, 1] (any shape) -> uint8 RGB (..., 3) of the ``hot`` colour map:
    r = 3v, g = 3v - 1, b = 3v - 2, each clipped to [0, 1]."""
    v = values.float().clamp(0, 1)[..., None] * 3
    return ((v - torch.tensor([0.0, 1.0, 2.0])).clamp(0, 1) * 255).round().to(torch.uint8)


def hot_values(rgb: Tensor) -> Tensor:
    """The inverse of ``hot_colours``: uint8 RGB (..., 3) -> values in [0, 1] (..., )."""
    return rgb.float().sum(-1) / (3 * 255)


def _tokens_to_grid(x: Tensor, layout: str) -> Tensor:
    """Activations (N, L, C) / (N, 1 + L, C) / (N, H, W, C) -> (N, C, h, w)."""
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "cls+tokens":
        x = x[:, 1:]
    g = int(round(x.shape[1] ** 0.5))
    if g * g != x.shape[1]:
        raise ValueError(f"tokens: expected a square grid of patch tokens, got {x.shape[1]}")
    return x.transpose(1, 2).unflatten(2, (g, g))


def gradcam_maps(model, method: str, frames: Tensor, audio: Tensor) -> Tensor:
    """Grad-CAM of the predicted class: frames (1, T, 3, S, S), audio (1, ...) -> (T, S, S) in [0, 1]."""
    if method not in CAM_LAYERS:
        raise ValueError(f"method: expected one of {sorted(CAM_LAYERS)} for Grad-CAM, got {method!r}")
    name, where, layout = CAM_LAYERS[method]
    path, _, last = name.rpartition(".")
    module = model.get_submodule(path)[int(last)] if last.lstrip("-").isdigit() else model.get_submodule(name)
    captured = []
    if where == "output":
        handle = module.register_forward_hook(lambda _m, _args, out: captured.append(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.enable_grad():
            logits = model.predict(model(frames, audio)).float()
            per_frame = logits.reshape(-1, logits.shape[-1])  # (T, C), or (1, C)
            score = per_frame.gather(1, per_frame.argmax(-1, keepdim=True)).sum()
            act = captured[-1]
            (grad,) = torch.autograd.grad(score, act)  # the parameters' .grad stay untouched
    finally:
        handle.remove()
    grid, grad = _tokens_to_grid(act.detach(), layout), _tokens_to_grid(grad, layout)
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * grid).sum(1, keepdim=True))
    size = frames.shape[-1]
    cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


@torch.no_grad()
def avs_maps(model, frames: Tensor, audio: Tensor) -> Tensor:
    """An AVSModel's sounding probability: frames (1, 5, 3, S, S), audio (1, 5, ...) -> (5, S, S)."""
    return torch.sigmoid(model(frames, audio)["logits"][0].float())


def _labelled_bar(height: int) -> np.ndarray:
    """The colour bar (1 at the top) with tick labels 0, 0.5, 1: (height, BAR + LABEL, 3) uint8."""
    from PIL import Image, ImageDraw

    values = torch.linspace(1, 0, height)[:, None].expand(height, BAR_WIDTH)
    canvas = Image.new("RGB", (BAR_WIDTH + LABEL_WIDTH, height), (255, 255, 255))
    canvas.paste(Image.fromarray(hot_colours(values).numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for value, y in ((1.0, 0), (0.5, height // 2 - 5), (0.0, height - 11)):
        draw.text((BAR_WIDTH + 4, max(0, y)), f"{value:g}", fill=(0, 0, 0))
    return np.asarray(canvas)


def write_overlay_png(path: str | os.PathLike, frames: Tensor, maps: Tensor, scale: int = 4) -> str:
    """frames uint8 (T, S, S, 3), maps (T, S, S) in [0, 1] -> ``path``: a PNG of T rows
    [frame | map | blend], each panel S*scale px, and a colour bar. Returns the path."""
    from PIL import Image

    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8 (T, S, S, 3), got {frames.dtype} {tuple(frames.shape)}")
    if maps.shape != frames.shape[:3]:
        raise ValueError(f"maps: expected (T, S, S) = {tuple(frames.shape[:3])}, got {tuple(maps.shape)}")
    if maps.numel() and not bool(((maps >= 0) & (maps <= 1)).all()):
        raise ValueError("maps: expected values in [0, 1], got values outside")
    big = lambda x: x.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # noqa: E731
    rows = []
    for frame, value in zip(frames, maps):
        heat = hot_colours(value)
        alpha = (0.25 + 0.6 * value)[..., None]
        blend = (frame.float() * (1 - alpha) + heat.float() * alpha).round().to(torch.uint8)
        rows.append(torch.cat([big(frame), big(heat), big(blend)], dim=1))
    image = torch.cat(rows, dim=0).numpy()
    image = np.concatenate([image, _labelled_bar(image.shape[0])], axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return os.fspath(path)


def map_from_png(path: str | os.PathLike, row: int, frames: int, scale: int = 4) -> Tensor:
    """Frame ``row``'s map (S, S) read back from a PNG of ``frames`` rows written by
    ``write_overlay_png`` (the middle panel, sampled at each pixel's centre)."""
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
    panel = image.shape[0] // frames
    heat = image[row * panel:(row + 1) * panel, panel:2 * panel]
    return hot_values(heat[scale // 2::scale, scale // 2::scale])


def display_frames(frames: Tensor, mean, std) -> Tensor:
    """Normalised frames (T, 3, S, S) -> uint8 (T, S, S, 3) for display."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (frames.float() * s + m).mul(255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
