"""Dense decoders for the downstream heads (AVS masks, separation masks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map, at each pixel."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU (the U-Net block both DeepAVFusion heads use)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

DECODER_SIZES = {"tiny": dict(width=64, min_width=16, predictor_width=16)}  # GuidedDecoder kwargs per model size


class GuidedDecoder(nn.Module):
    """Top-down decoder of one modality's feature maps, guided at every level by a vector of
    the other (DeepAVFusion's ``AVSegmSimple`` and ``AVSrcSepUNet`` structure): AVS decodes
    visual maps guided by audio, separation audio maps guided by the image.

    ``levels``: (channels, (h, w)) of each map, top first; level i is decoded at the top's
    grid times 2**i: a map on a coarser grid (a ViT's single grid) is brought there by a
    transposed conv, a map already there (a Swin pyramid) by a 1x1 conv. Each level's map is
    normalised over channels, concatenated with the guide vector projected to the level's
    width (``max(min_width, width // 2**i)``), normalised and tiled, and merged with the
    upsampled level above by a conv block. A 3x3 conv, 2x bilinear upsampling and a 3x3 conv
    then give one logit per pixel, resized bilinearly to ``out_size`` (an int: square).

    forward(maps [(N, C_i, h_i, w_i)], guide (N, Dg)) -> logits (N, H_out, W_out).
    """

    def __init__(self, levels: list[tuple[int, tuple[int, int]]], guide_dim: int, out_size: int | tuple[int, int], *,
                 width: int = 256, min_width: int = 128, predictor_width: int = 128):
        super().__init__()
        if not levels:
            raise ValueError("levels: expected at least one (channels, (h, w)), got none")
        top = tuple(levels[0][1])
        self.out_size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        widths = [max(min_width, width // 2 ** i) for i in range(len(levels))]
        self.visual_norm = nn.ModuleList(_ChannelNorm(c) for c, _ in levels)
        self.guide_proj = nn.ModuleList(nn.Linear(guide_dim, w) for w in widths)
        self.guide_norm = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        self.lateral = nn.ModuleList()
        for i, (c, grid) in enumerate(levels):
            target = (top[0] * 2 ** i, top[1] * 2 ** i)
            factor = target[0] // grid[0]
            if factor < 1 or target != (grid[0] * factor, grid[1] * factor):
                raise ValueError(f"levels: expected level {i}'s grid to divide {target} (the top grid {top} "
                                 f"times 2**{i}), got {tuple(grid)}")
            self.lateral.append(nn.Conv2d(c, widths[i], 1) if factor == 1 else
                                nn.ConvTranspose2d(c, widths[i], factor, stride=factor))
        self.top = _conv_block(2 * widths[0], widths[0])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i - 1], widths[i], 2, stride=2) for i in range(1, len(levels)))
        self.merge = nn.ModuleList(_conv_block(3 * widths[i], widths[i]) for i in range(1, len(levels)))
        self.predict_hidden = nn.Conv2d(widths[-1], predictor_width, 3, padding=1)
        self.predict_out = nn.Conv2d(predictor_width, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, maps: list[Tensor], guide: Tensor) -> Tensor:
        if len(maps) != len(self.lateral):
            raise ValueError(f"maps: expected {len(self.lateral)} levels, got {len(maps)}")
        x = None
        for i, v in enumerate(maps):
            v = self.lateral[i](self.visual_norm[i](v))
            a = self.guide_norm[i](self.guide_proj[i](guide))[:, :, None, None].expand(-1, -1, *v.shape[2:])
            if x is None:
                x = self.top(torch.cat([v, a], 1))
            else:
                x = self.merge[i - 1](torch.cat([self.up[i - 1](x), v, a], 1))
        x = torch.nn.functional.relu(self.predict_hidden(x))
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.predict_out(x)
        if tuple(x.shape[-2:]) != self.out_size:
            x = torch.nn.functional.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return x[:, 0]
