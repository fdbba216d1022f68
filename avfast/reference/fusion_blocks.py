"""Literal references for DeepAVFusion's fusion blocks, shaped like upstream's classes.

These compute what the public implementation computes, the slow way: the dense block
builds every pair token [LN(a_i) ; LN(v_j)] (audio first, audio-major), projects it with
one Linear to keys and values and runs one softmax over all Na*Nv pairs; the factorized
block does the same over the pairs [dV_i ; dA_j] of its cross-attention outputs (image
first). Parameter names and attributes (``num_heads``, ``num_fusion_tkns``) follow
upstream, so these stand in for upstream instances in tests and in ``from_upstream``.
Written from the description in shared/UPSTREAM.md §1.3-1.4, not from upstream code.

Dims: B batch, F fusion tokens, Nv image tokens, Na audio tokens, D width.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import Tensor, nn


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None) -> Tensor:
    """q (B, H, M, d), k (B, H, N, d), v (B, H, N, e), key_mask (B, N) True = drop.
    Rows with no valid key are zero."""
    s = (q @ k.transpose(-1, -2)) * scale
    if key_mask is None:
        return torch.softmax(s, dim=-1) @ v
    s = s.masked_fill(key_mask[:, None, None, :], float("-inf"))
    has_key = ~key_mask.all(dim=-1)[:, None, None, None]
    p = torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), dim=-1) * has_key
    return p @ v


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class UpstreamDenseAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = int(dim * attn_ratio)
        self.scale = (dim // num_heads) ** -0.5  # upstream: head width of D, not of qk_dim
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.kv = nn.Linear(2 * dim, 2 * self.qk_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.qk_dim, dim)

    def forward(self, x_fusion, x_audio, x_image, audio_mask=None, image_mask=None):
        B, Na, D = x_audio.shape
        Nv = x_image.shape[1]
        pairs = torch.cat(
            [x_audio[:, :, None].expand(B, Na, Nv, D), x_image[:, None].expand(B, Na, Nv, D)], dim=-1
        ).reshape(B, Na * Nv, 2 * D)  # pair p = i*Nv + j: [audio_i ; image_j]
        k, v = self.kv(pairs).split(self.qk_dim, dim=-1)
        pair_mask = None
        if audio_mask is not None or image_mask is not None:
            am = audio_mask if audio_mask is not None else x_audio.new_zeros(B, Na, dtype=torch.bool)
            im = image_mask if image_mask is not None else x_image.new_zeros(B, Nv, dtype=torch.bool)
            pair_mask = (am[:, :, None] | im[:, None, :]).reshape(B, Na * Nv)
        H = self.num_heads
        o = _attend(_heads(self.q(x_fusion), H), _heads(k, H), _heads(v, H), self.scale, pair_mask)
        return self.proj(_merge(o))


class UpstreamCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_query, x_key, key_mask=None):
        k, v = self.kv(x_key).chunk(2, dim=-1)
        H = self.num_heads
        return self.proj(_merge(_attend(_heads(self.q(x_query), H), _heads(k, H), _heads(v, H), self.scale, key_mask)))


class UpstreamFactorizedAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_ratio: float, qkv_bias: bool, num_fusion_tkns):
        super().__init__()
        self.num_heads = num_heads
        self.num_fusion_tkns = tuple(num_fusion_tkns)
        self.qk_dim = int(dim * attn_ratio)
        self.scale = (dim // num_heads) ** -0.5
        self.attn_v = UpstreamCrossAttention(dim, num_heads, qkv_bias)
        self.attn_a = UpstreamCrossAttention(dim, num_heads, qkv_bias)
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(2 * dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(2 * dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_fusion, x_image, x_audio, image_mask=None, audio_mask=None):
        x_mm, g_v, g_a = x_fusion.split(self.num_fusion_tkns, dim=1)
        d_v = self.attn_v(g_v, x_image, image_mask)
        d_a = self.attn_a(g_a, x_audio, audio_mask)
        B, nv, D = d_v.shape
        na = d_a.shape[1]
        pairs = torch.cat(
            [d_v[:, :, None].expand(B, nv, na, D), d_a[:, None].expand(B, nv, na, D)], dim=-1
        ).reshape(B, nv * na, 2 * D)  # pair p = i*na + j: [image_i ; audio_j]
        H = self.num_heads
        o = _attend(_heads(self.q(x_mm), H), _heads(self.k(pairs), H), _heads(self.v(pairs), H), self.scale, None)
        return torch.cat([self.proj(_merge(o)), d_v, d_a], dim=1)


class _UpstreamBlock(nn.Module):
    def _init_common(self, dim: int, mlp_ratio: float) -> None:
        self.norm1_mm = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_aud = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_img = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _residuals(self, x_fusion_normed: Tensor, delta: Tensor) -> Tensor:
        x = x_fusion_normed + delta  # upstream: the residual stream is the normalized tokens
        return x + self.mlp(self.norm2(x))


class UpstreamDenseFusionBlock(_UpstreamBlock):
    """Upstream's dense block, literally: (x_fusion (B, F, D), x_image, x_audio) -> (B, F, D)."""

    def __init__(self, dim, num_heads, attn_ratio=0.25, mlp_ratio=1.0, qkv_bias=True):
        super().__init__()
        self._init_common(dim, mlp_ratio)
        self.attn = UpstreamDenseAttention(dim, num_heads, attn_ratio, qkv_bias)

    def forward(self, x_fusion, x_image, x_audio, image_padding_mask=None, audio_padding_mask=None):
        xf = self.norm1_mm(x_fusion)
        delta = self.attn(xf, self.norm1_aud(x_audio), self.norm1_img(x_image), audio_padding_mask, image_padding_mask)
        return self._residuals(xf, delta)


class UpstreamFactorizedFusionBlock(_UpstreamBlock):
    """Upstream's factorized block, literally; x_fusion holds sum(num_fusion_tkns) tokens."""

    def __init__(self, dim, num_heads, attn_ratio=0.25, mlp_ratio=1.0, qkv_bias=True, num_fusion_tkns=(16, 8, 8)):
        super().__init__()
        self.num_fusion_tkns = tuple(num_fusion_tkns)
        self._init_common(dim, mlp_ratio)
        self.attn = UpstreamFactorizedAttention(dim, num_heads, attn_ratio, qkv_bias, num_fusion_tkns)

    def forward(self, x_fusion, x_image, x_audio, image_padding_mask=None, audio_padding_mask=None):
        xf = self.norm1_mm(x_fusion)
        delta = self.attn(xf, self.norm1_img(x_image), self.norm1_aud(x_audio), image_padding_mask, audio_padding_mask)
        return self._residuals(xf, delta)
