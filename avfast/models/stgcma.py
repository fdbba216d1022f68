"""STG-CMA (Wang et al.): a frozen CLIP ViT shared by frames and audio, with per-block
T-, S- and MLP-Adapters whose bottlenecks attend across modalities; per-second AVE head.

    model = build("base", backbone_weights="clip_vit_b16.pt")
    out = model(frames, audio)            # frames (B, T, 3, S, S), audio (B, T, Ft, M) Kaldi fbank
    loss, metrics = model.loss(out, batch)  # CE over the B*T seconds
    model.predict(out)                    # (B, T, C)

Dims: B clips, T = 10 one-second segments (frame t pairs with audio second t), N = B*T
frames, S frame side, Ft = 102 fbank frames per second, M = 128 mel bins, D width,
Lv = 1 + (S/p)^2 visual and La = 1 + (Ft//p)(M//p) audio tokens, C classes.
Token layout inside the blocks: (N, L, D), frame n = b*T + t (upstream works on (L, N, D);
the math is the same, see ``avfast.nn.STGCMABlockAdapters``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from avfast.models.base import (AVModel, check_frames, freeze, read_checkpoint, sized_config, spread_layers,
                                strip_prefixes, with_pretrained)
from avfast.nn import STGCMABlockAdapters

# Upstream (CLIP visual tower) name -> ours, outside the blocks.
_STEM_KEYS = {
    "conv1.weight": "backbone.patch_embed.proj.weight",
    "class_embedding": "backbone.cls_token",
    "positional_embedding": "backbone.pos_embed",
    "ln_pre.weight": "backbone.norm_pre.weight",
    "ln_pre.bias": "backbone.norm_pre.bias",
    "ln_post.weight": "backbone.norm.weight",
    "ln_post.bias": "backbone.norm.bias",
    "conv1_audio.weight": "patch_embed_audio.weight",
    "positional_embedding_audio": "pos_embed_audio",
    "temporal_embedding": "temporal_embedding",
    "temporal_embedding_audio": "temporal_embedding_audio",
    "mlp_head.0.weight": "mlp_head.0.weight",
    "mlp_head.0.bias": "mlp_head.0.bias",
    "mlp_head.2.weight": "mlp_head.2.weight",
    "mlp_head.2.bias": "mlp_head.2.bias",
}
# Inside ``transformer.resblocks.{i}``: the frozen CLIP block -> timm Block.
_BLOCK_KEYS = {
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_ADAPTER_KEY = re.compile(r"(?:[TS]_Adapter|MLP_Adapter)(?:_Audio)?\.D_fc[12]\.(?:weight|bias)|gate_[va]")
# Upstream stores these without the leading singleton axes that ours have.
_SQUEEZED_KEYS = ("class_embedding", "positional_embedding", "positional_embedding_audio")


@dataclass
class STGCMAConfig:
    """STG-CMA on a CLIP ViT (defaults: ViT-B/16 "Base", upstream's AVE setup).

    Backbone: timm ``VisionTransformer`` with CLIP's layout (``norm_pre`` = CLIP ``ln_pre``,
    QuickGELU MLP, LayerNorm eps 1e-5, no patch-embed bias), i.e. the architecture of timm's
    ``vit_base_patch16_clip_quickgelu_224`` (base) / ``vit_large_patch14_clip_quickgelu_224``
    (large). Frozen and shared by both modalities, except ``norm`` (CLIP ``ln_post``), which
    upstream trains. Weights only from a local file (``backbone_weights``); nothing is downloaded.

    Fields:
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: the backbone.
        upstream_heads: attention heads actually used, None = num_heads. Upstream builds its
            ViT-B/16 model with 8 heads instead of CLIP's 12 (the weights load regardless; the
            attention is then 8 x 96 instead of 12 x 64); set 8 to reproduce that model.
        adapter_ratio: adapter bottleneck r = int(embed_dim * adapter_ratio). The paper's
            "Base" adapters: 0.125 on ViT-B/16 (11.5M trainable), 0.0625 on ViT-L/14 (20.1M);
            "Tiny": 0.03125. (Upstream's code default is 0.0625 for both.)
        num_frames: T one-second segments per clip (visual frame t <-> audio second t).
        audio_frames, num_mel_bins: the per-second Kaldi fbank (time x mel) = (102, 128).
        head_hidden, head_dropout: per-second head Linear(2D, 512) -> Dropout(0.5) -> Linear.
        drop_path_rate: DropPath on the T-Adapter branch, linear from 0 over the blocks.
        num_classes: per-second classes including background (AVE: 28 events + background).
        upstream_quirks: reproduce upstream's code where it departs from the paper:
            1. the audio patch embedding is the SUM of the image patch-embed kernel over RGB
               (paper: the average; False uses the mean);
            2. the audio positional embedding (CLS + centre crop of the image grid to f x t,
               freq rows x time columns) is flattened freq-major while the audio patches come
               time-major from the (time, mel) input, so patch (t, f) gets entry t*F + f of
               the freq-major crop (the counts coincide, so it runs). False gives each patch
               the crop entry at its own (freq, time);
            3. DropPath of the T-Adapter branch masks token positions shared by all frames
               (upstream applies it to (L, N, D) tensors); False drops per frame.
            Not reproduced: ``get_shape_a``'s hard-coded 16x16 kernel (for patches 14 and 16
            it yields the conv's own grid; where it would not, upstream fails), the fp32
            LayerNorm cast (autocast does that).
        backbone_weights: local CLIP ViT weights: a timm VisionTransformer state dict, or
            OpenAI CLIP's (``visual.*`` or the visual tower's own keys, plain or TorchScript
            archive, ``.safetensors`` too). The audio embedding is derived from them.
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    upstream_heads: int | None = None
    adapter_ratio: float = 0.125
    num_frames: int = 10
    audio_frames: int = 102
    num_mel_bins: int = 128
    head_hidden: int = 512
    head_dropout: float = 0.5
    drop_path_rate: float = 0.2
    num_classes: int = 29
    upstream_quirks: bool = True
    backbone_weights: str | None = None

    def __post_init__(self):
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_frames",
                     "audio_frames", "num_mel_bins", "head_hidden", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"STGCMAConfig: {name} must be a positive int, got {value!r}")
        heads = self.heads
        if not isinstance(heads, int) or heads < 1 or self.embed_dim % heads:
            raise ValueError(f"STGCMAConfig: {'num_heads' if self.upstream_heads is None else 'upstream_heads'} must "
                             f"divide embed_dim = {self.embed_dim}, got {heads!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"STGCMAConfig: img_size must be a multiple of patch_size = {self.patch_size}, "
                             f"got {self.img_size}")
        if min(self.audio_frames, self.num_mel_bins) < self.patch_size:
            raise ValueError(f"STGCMAConfig: audio_frames and num_mel_bins must be >= patch_size = "
                             f"{self.patch_size}, got ({self.audio_frames}, {self.num_mel_bins})")
        if int(self.embed_dim * self.adapter_ratio) < 1:
            raise ValueError(f"STGCMAConfig: adapter_ratio must give int(embed_dim * adapter_ratio) >= 1, "
                             f"got {self.adapter_ratio!r} with embed_dim = {self.embed_dim}")
        for name in ("head_dropout", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"STGCMAConfig: {name} must be in [0, 1), got {value!r}")

    @property
    def heads(self) -> int:
        """The attention heads the backbone computes with."""
        return self.num_heads if self.upstream_heads is None else self.upstream_heads

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, freq) audio patches per second."""
        return self.audio_frames // self.patch_size, self.num_mel_bins // self.patch_size

    @classmethod
    def base(cls, **overrides) -> STGCMAConfig:
        """CLIP ViT-B/16 with "Base" adapters (r = 96)."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides) -> STGCMAConfig:
        """CLIP ViT-L/14 with "Base" adapters (r = 64), upstream's shell default."""
        return cls(**{**dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, adapter_ratio=0.0625),
                      **overrides})

    @classmethod
    def tiny(cls, **overrides) -> STGCMAConfig:
        """Test/demo size: D 64, 2 blocks, 2 heads, 32 px frames, the same audio (6 x 8 patches)."""
        return cls(**{**dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                             adapter_ratio=0.0625), **overrides})


def audio_pos_embed(pos_embed: Tensor, audio_grid: tuple[int, int], freq_major: bool = True) -> Tensor:
    """Upstream's audio positional embedding from the image one.

    pos_embed: (1, 1 + g*g, D) = [CLS; g x g grid, row-major]. audio_grid: (t, f) time x freq
    patches. The grid (rows = freq, columns = time) is centre-cropped to t columns and f rows,
    or bilinearly resized where t or f exceeds g (columns first, as upstream). Returns
    (1, 1 + t*f, D) for time-major patches: freq_major=True lays the crop out freq-major
    (upstream), False puts crop[f_i, t_i] at patch (t_i, f_i).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"audio_pos_embed: pos_embed must be (1, 1 + g*g, D), got {tuple(pos_embed.shape)}")
    g = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if g * g != pos_embed.shape[1] - 1:
        raise ValueError(f"audio_pos_embed: pos_embed must hold CLS + a square grid, got {pos_embed.shape[1]} tokens")
    t, f = audio_grid
    D = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, freq rows, time columns)
    if t <= g:
        grid = grid[..., g // 2 - t // 2: g // 2 - t // 2 + t]
    else:
        grid = F.interpolate(grid, size=(g, t), mode="bilinear")
    if f <= g:
        grid = grid[:, :, g // 2 - f // 2: g // 2 - f // 2 + f]
    else:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear")
    patches = grid if freq_major else grid.transpose(2, 3)  # flattened freq-major / time-major
    return torch.cat([pos_embed[:, :1], patches.reshape(1, D, t * f).transpose(1, 2)], dim=1)


def _drop_path(x: Tensor, p: float, dim: int) -> Tensor:
    """Stochastic depth: zero whole slices of x along ``dim`` with probability p, scale the rest."""
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    keep = x.new_empty(shape).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def _block_attn(block: nn.Module, x: Tensor) -> Tensor:
    return block.attn(block.norm1(x))


def _block_mlp(block: nn.Module, x: Tensor) -> Tensor:
    return block.mlp(block.norm2(x))


def _read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a local file: safetensors, a torch checkpoint, or a TorchScript archive."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights: expected a local weights file, got {os.fspath(path)!r} "
                                "(nothing is downloaded; fetch the file first)")
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(os.fspath(path))
    try:
        return read_checkpoint(path)
    except Exception:  # OpenAI's CLIP .pt files are TorchScript archives
        try:
            return torch.jit.load(os.fspath(path), map_location="cpu").state_dict()
        except Exception as err:
            raise ValueError(f"backbone_weights: {os.fspath(path)!r} is neither a state dict nor a "
                             f"TorchScript archive ({err})") from None


class STGCMA(AVModel):
    """STG-CMA for per-second audio-visual classification (AVE).

    Modules: ``backbone`` (timm CLIP ViT, frozen but ``norm`` = ln_post), ``patch_embed_audio``
    (Conv2d(1, D, p, p), frozen), ``pos_embed_audio`` (1, La, D) frozen, ``temporal_embedding``
    and ``temporal_embedding_audio`` (1, T, D) zero-init, ``adapters`` (one
    ``STGCMABlockAdapters`` per block), ``mlp_head``. Trainable = upstream's filter (adapters,
    gates, temporal embeddings, ln_post, mlp_head).

    forward(frames (B, T, 3, S, S), audio (B, T, Ft, M)) -> {"logits": (B, T, C),
    "features": (B, T, 2D) = [audio CLS; visual CLS] after ln_post}.
    """

    preset = "stgcma"

    def __init__(self, config: STGCMAConfig | None = None):
        super().__init__()
        cfg = STGCMAConfig() if config is None else config
        if not isinstance(cfg, STGCMAConfig):
            raise TypeError(f"STGCMA: config must be an STGCMAConfig, got {type(cfg).__name__}")
        self.config = cfg
        D, p = cfg.embed_dim, cfg.patch_size
        self.backbone = VisionTransformer(
            img_size=cfg.img_size, patch_size=p, embed_dim=D, depth=cfg.depth, num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio, qkv_bias=True, pre_norm=True, num_classes=0, global_pool="token",
            norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer="quick_gelu")
        self.patch_embed_audio = nn.Conv2d(1, D, kernel_size=p, stride=p, bias=False)
        t, f = cfg.audio_grid
        self.pos_embed_audio = nn.Parameter(torch.zeros(1, 1 + t * f, D))
        self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, D))
        self.temporal_embedding_audio = nn.Parameter(torch.zeros(1, cfg.num_frames, D))
        self.adapters = nn.ModuleList(STGCMABlockAdapters(D, cfg.adapter_ratio) for _ in range(cfg.depth))
        self.mlp_head = nn.Sequential(nn.Linear(2 * D, cfg.head_hidden), nn.Dropout(cfg.head_dropout),
                                      nn.Linear(cfg.head_hidden, cfg.num_classes))
        for layer in (self.mlp_head[0], self.mlp_head[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.drop_path_rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]

        freeze(self.backbone)
        self.backbone.norm.requires_grad_(True)
        freeze(self.patch_embed_audio)
        self.pos_embed_audio.requires_grad_(False)
        if cfg.backbone_weights is not None:
            self.load_backbone_weights(cfg.backbone_weights)
        else:
            self.reset_audio_embedding()

    # ------------------------------------------------------------------ weights

    def reset_audio_embedding(self) -> None:
        """Derive the frozen audio patch embedding (sum, or mean without upstream_quirks, of the
        image kernel over RGB) and ``pos_embed_audio`` (``audio_pos_embed``) from the backbone."""
        quirks = self.config.upstream_quirks
        with torch.no_grad():
            w = self.backbone.patch_embed.proj.weight  # (D, 3, p, p)
            self.patch_embed_audio.weight.copy_(w.sum(1, keepdim=True) if quirks else w.mean(1, keepdim=True))
            self.pos_embed_audio.copy_(audio_pos_embed(self.backbone.pos_embed, self.config.audio_grid, quirks))

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Load CLIP ViT weights from a local file into ``backbone`` (timm keys, or OpenAI CLIP's
        visual-tower keys, optionally under ``visual.``; the projection ``proj``/``head`` is
        dropped), then ``reset_audio_embedding``."""
        state = _read_weights(path)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP model: keep the image tower
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        state = strip_prefixes(state)
        if "conv1.weight" in state:  # OpenAI CLIP layout
            state.pop("proj", None)
            names = {k: self._upstream_name(k) for k in state}
            state = {n[len("backbone."):]: v for k, v in self._fit_shapes(state).items()
                     if (n := names[k]) is not None and n.startswith("backbone.")}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"backbone_weights: {os.fspath(path)!r} does not fit the configured ViT "
                             f"(embed_dim={self.config.embed_dim}, depth={self.config.depth}, "
                             f"img_size={self.config.img_size}, patch_size={self.config.patch_size}): {err}") from None
        self.reset_audio_embedding()

    def _upstream_name(self, key: str) -> str | None:
        if key in _STEM_KEYS:
            return _STEM_KEYS[key]
        m = _BLOCK_KEY.fullmatch(key)
        if m is None or int(m.group(1)) >= self.config.depth:
            return None
        i, rest = m.groups()
        if rest in _BLOCK_KEYS:
            return f"backbone.blocks.{i}.{_BLOCK_KEYS[rest]}"
        return f"adapters.{i}.{rest}" if _ADAPTER_KEY.fullmatch(rest) else None

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream STG-CMA (CLIP_AVE ``MM_CLIP_AVE``) keys -> ours: conv1, class_embedding,
        positional_embedding, ln_pre, ln_post -> backbone.{patch_embed.proj, cls_token,
        pos_embed, norm_pre, norm}; transformer.resblocks.i.{attn.in_proj_*, attn.out_proj,
        ln_1, ln_2, mlp.c_fc, mlp.c_proj} -> backbone.blocks.i.{attn.qkv, attn.proj, norm1,
        norm2, mlp.fc1, mlp.fc2}; the blocks' adapters and gates -> adapters.i.*;
        conv1_audio, positional_embedding_audio -> patch_embed_audio, pos_embed_audio;
        temporal_embedding(_audio), mlp_head.0/2 unchanged."""
        ours = self.state_dict().keys()
        return {k: n for k in keys if (n := self._upstream_name(k)) is not None and n in ours}

    def _fit_shapes(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Upstream's (D,) class embedding and (L, D) positional embeddings as our (1, ..., D)."""
        ours = self.state_dict()
        out = dict(state)
        for key in _SQUEEZED_KEYS:
            name = _STEM_KEYS[key]
            if key in out and out[key].shape != ours[name].shape and out[key].numel() == ours[name].numel():
                out[key] = out[key].reshape(ours[name].shape)
        return out

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """As ``AVModel.load_upstream_state_dict``, with upstream's squeezed embeddings reshaped."""
        return super().load_upstream_state_dict(self._fit_shapes(strip_prefixes(state_dict)), strict=strict)

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, frames, audio) -> None:
        cfg = self.config
        check_frames("STGCMA", frames, cfg.num_frames, cfg.img_size)
        if not isinstance(audio, Tensor) or not audio.is_floating_point():
            raise TypeError(f"STGCMA: audio must be a float Tensor (B, T, Ft, M), got "
                            f"{audio.dtype if isinstance(audio, Tensor) else type(audio).__name__}")
        want_a = (frames.shape[0], cfg.num_frames, cfg.audio_frames, cfg.num_mel_bins)
        if tuple(audio.shape) != want_a:
            raise ValueError(f"STGCMA: audio must be (B, T, Ft, M) = {want_a} (Kaldi fbank per second, "
                             f"time x mel), got {tuple(audio.shape)}")

    def _add_temporal(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x (N, L, D) + embedding[t] on every token of frame n = b*T + t."""
        N, L, D = x.shape
        T = embedding.shape[1]
        return (x.reshape(N // T, T, L, D) + embedding.reshape(1, T, 1, D)).reshape(N, L, D)

    def embed_frames(self, frames: Tensor) -> Tensor:
        """frames (B, T, 3, S, S) -> tokens (N, Lv, D) after ln_pre."""
        bb = self.backbone
        x = bb.patch_embed(frames.flatten(0, 1))  # (N, Lv - 1, D)
        x = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + bb.pos_embed.to(x.dtype)
        return bb.norm_pre(self._add_temporal(x, self.temporal_embedding))

    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio (B, T, Ft, M) -> tokens (N, La, D) after ln_pre; patches time-major."""
        x = self.patch_embed_audio(audio.flatten(0, 1).unsqueeze(1)).flatten(2).transpose(1, 2)  # (N, La - 1, D)
        cls = self.backbone.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_audio.to(x.dtype)
        return self.backbone.norm_pre(self._add_temporal(x, self.temporal_embedding_audio))

    def forward_features(self, frames: Tensor, audio: Tensor, keep: tuple[int, ...] = ()) -> tuple:
        """frames (B, T, 3, S, S), audio (B, T, Ft, M) -> tokens after the last block
        (before ln_post): visual (N, Lv, D), audio (N, La, D); with block indices ``keep``
        also the list of the visual tokens after each of those blocks."""
        self._check_inputs(frames, audio)
        v, a = self.embed_frames(frames), self.embed_audio(audio)
        T, dim = self.config.num_frames, 1 if self.config.upstream_quirks else 0
        kept = {}
        for i, (block, adapters, rate) in enumerate(zip(self.backbone.blocks, self.adapters, self.drop_path_rates)):
            drop = partial(_drop_path, p=rate, dim=dim) if self.training and rate > 0 else None
            v, a = adapters(v, a, partial(_block_attn, block), partial(_block_mlp, block), T, drop_path=drop)
            if i in keep:
                kept[i] = v
        return (v, a, [kept[i] for i in keep]) if keep else (v, a)

    dense_unused = ("mlp_head",)  # modules dense_features does not use

    def dense_shapes(self, levels: int = 4) -> tuple[list[tuple[int, tuple[int, int]]], int]:
        """What ``dense_features`` returns: (channels, grid) of each level, the audio width."""
        g, D = self.config.img_size // self.config.patch_size, self.config.embed_dim
        return [(D, (g, g))] * levels, D

    def dense_features(self, frames: Tensor, audio: Tensor, levels: int = 4) -> tuple[list[Tensor], Tensor]:
        """frames (B, T, 3, S, S), audio (B, T, Ft, M) -> (maps, audio): the visual patch tokens
        (CLS left out) after ``levels`` blocks spread from the first to the last, each
        (N, D, g, g), shallowest first, and the audio CLS after ln_post (N, D)."""
        g = self.config.img_size // self.config.patch_size
        _, a, kept = self.forward_features(frames, audio, keep=tuple(spread_layers(self.config.depth, levels)))
        maps = [v[:, 1:].transpose(1, 2).unflatten(2, (g, g)) for v in kept]
        return maps, self.backbone.norm(a[:, 0])

    def forward_head(self, v: Tensor, a: Tensor) -> dict[str, Tensor]:
        """Final tokens v (N, Lv, D), a (N, La, D) -> {"logits": (B, T, C), "features": (B, T, 2D)}."""
        norm, T = self.backbone.norm, self.config.num_frames
        features = torch.cat([norm(a[:, 0]), norm(v[:, 0])], dim=-1)  # (N, 2D), audio first
        logits = self.mlp_head(features)
        return {"logits": logits.unflatten(0, (-1, T)), "features": features.unflatten(0, (-1, T))}

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """frames (B, T, 3, S, S) normalised, audio (B, T, Ft, M) -> {"logits": (B, T, C), "features"}."""
        return self.forward_head(*self.forward_features(frames, audio))

    # ------------------------------------------------------------------ training

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy over the B*T seconds: targets batch["segment_labels"] (B, T) when present,
        else batch["label"] (B,) for every second. Metrics: loss, acc (per-second accuracy)."""
        logits = out["logits"]
        B, T, C = logits.shape
        if "segment_labels" in batch:
            name, target = "segment_labels", batch["segment_labels"]
            want = (B, T)
        elif "label" in batch:
            name, target = "label", batch["label"]
            want = (B,)
        else:
            raise KeyError(f"STGCMA.loss: batch must hold 'segment_labels' (B, T) or 'label' (B,), got {sorted(batch)}")
        if not isinstance(target, Tensor) or tuple(target.shape) != want or target.is_floating_point():
            raise ValueError(f"STGCMA.loss: batch[{name!r}] must be an integer tensor {want}, got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
        target = target.to(logits.device, torch.long)
        if target.dim() == 1:
            target = target[:, None].expand(B, T)
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"STGCMA.loss: batch[{name!r}] must be class ids in [0, {C}) (background "
                             f"= {C - 1}), got values in [{lo}, {hi}]")
        loss = F.cross_entropy(logits.reshape(B * T, C), target.reshape(B * T))
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return loss, {"loss": float(loss.detach()), "acc": float(acc)}


_SIZES: dict[str, Callable[..., STGCMAConfig]] = {
    "tiny": STGCMAConfig.tiny, "base": STGCMAConfig.base, "large": STGCMAConfig.large}


def build(size: str = "base", num_classes: int | None = None, pretrained: str | None = None,
          **overrides) -> STGCMA:
    """STG-CMA at ``size`` ("tiny", "base" = CLIP ViT-B/16, "large" = CLIP ViT-L/14) with
    config ``overrides``; ``pretrained``: a local upstream STG-CMA checkpoint, loaded strictly."""
    return with_pretrained(STGCMA(sized_config(STGCMAConfig, _SIZES, size, overrides, num_classes)), pretrained)


__all__ = ["STGCMA", "STGCMAConfig", "audio_pos_embed", "build"]
