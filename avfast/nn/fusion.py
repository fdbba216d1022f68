"""DeepAVFusion's fusion blocks on ``avfast.ops.av_pair_attention``.

Drop-in for upstream's dense-interaction and factorized-interaction fusion blocks: same
constructor, same call ``block(x_fusion, x_image, x_audio)``, same parameter names, so an
upstream state_dict loads strictly. Upstream's quirks are reproduced by default:
softmax scale (dim/num_heads)^-1/2 even when q/k are projected to dim*attn_ratio, pair
token order [audio ; image] (dense) and [image ; audio] (factorized), LayerNorm eps 1e-5,
and the fusion residual added to the *normalized* fusion tokens:
F1 = LN1(F) + Attn, F2 = F1 + MLP(LN2(F1)).

Dims: B batch, F fusion tokens, Nv image tokens, Na audio tokens, D = dim.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as nnf
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from avfast.ops import av_pair_attention

AttnScale = Literal["upstream", "head"]


def _attn_scale(mode: AttnScale, dim: int, qk_dim: int, num_heads: int) -> float:
    if mode == "upstream":
        return (dim / num_heads) ** -0.5
    if mode == "head":
        return (qk_dim / num_heads) ** -0.5
    raise ValueError(f"attn_scale must be 'upstream' or 'head', got {mode!r}")


def _check_heads(name: str, width: int, num_heads: int) -> None:
    if width % num_heads:
        raise ValueError(f"{name}: projected width {width} must be divisible by num_heads={num_heads}")


class DenseAVInteractionAttention(nn.Module):
    """Fusion queries over all audio-visual pair tokens [LN(a_i) ; LN(v_j)], exactly.

    Parameters: ``q`` Linear(D, D*attn_ratio), ``kv`` Linear(2D, 2*D*attn_ratio) whose
    input columns [:D] multiply audio and [D:] image, ``proj`` Linear(D*attn_ratio, D).
    """

    def __init__(self, dim: int, num_heads: int, attn_ratio: float, qkv_bias: bool, attn_scale: AttnScale):
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = int(dim * attn_ratio)
        _check_heads("DenseAVFusionBlock", self.qk_dim, num_heads)
        self.scale = _attn_scale(attn_scale, dim, self.qk_dim, num_heads)
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.kv = nn.Linear(2 * dim, 2 * self.qk_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.qk_dim, dim)

    def forward(
        self,
        x_fusion: Tensor,
        x_image: Tensor,
        x_audio: Tensor,
        image_padding_mask: Tensor | None = None,
        audio_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Normalized tokens (B, F, D), (B, Nv, D), (B, Na, D) -> update (B, F, D)."""
        B, F, D = x_fusion.shape
        H, d = self.num_heads, self.qk_dim // self.num_heads
        q = self.q(x_fusion).view(B, F, H, d)
        # K_ij, V_ij are affine in the pair: split kv's input columns into audio | image
        kv_a = nnf.linear(x_audio, self.kv.weight[:, :D])  # (B, Na, 2 qk_dim)
        kv_v = nnf.linear(x_image, self.kv.weight[:, D:])  # (B, Nv, 2 qk_dim)
        Na, Nv = kv_a.shape[1], kv_v.shape[1]
        k_a, v_a = kv_a.view(B, Na, 2, H, d).unbind(2)
        k_v, v_v = kv_v.view(B, Nv, 2, H, d).unbind(2)
        # .to(q.dtype): under autocast q is bf16 while the parameter stays fp32
        v_bias = self.kv.bias[self.qk_dim:].view(H, d).to(q.dtype) if self.kv.bias is not None else None
        o = av_pair_attention(
            q, k_a, v_a, k_v, v_v, scale=self.scale, v_bias=v_bias,
            key_padding_mask_a=audio_padding_mask, key_padding_mask_v=image_padding_mask,
        )
        return self.proj(o.reshape(B, F, self.qk_dim))


class CrossAttention(nn.Module):
    """Full-width multi-head cross-attention: ``q`` Linear(D, D), ``kv`` Linear(D, 2D),
    ``proj`` Linear(D, D); scale (D/num_heads)^-1/2."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        _check_heads("CrossAttention", dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_query: Tensor, x_key: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x_query (B, M, D), x_key (B, N, D), key_padding_mask (B, N) bool -> (B, M, D)."""
        B, M, D = x_query.shape
        H = self.num_heads
        q = self.q(x_query).view(B, M, H, D // H).transpose(1, 2)
        k, v = self.kv(x_key).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        o = nnf.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(B, M, D))


class FactorizedAVInteractionAttention(nn.Module):
    """Upstream's factorized interactions: aggregation tokens cross-attend to image and to
    audio (``attn_v``, ``attn_a``); the remaining fusion tokens attend over the pairs
    [dV_i ; dA_j] of those outputs (image first), exactly, through the pair op.

    Parameters: ``attn_v.*``, ``attn_a.*`` (CrossAttention), ``q`` Linear(D, D*attn_ratio),
    ``k`` Linear(2D, D*attn_ratio), ``v`` Linear(2D, D), ``proj`` Linear(D, D).
    """

    def __init__(
        self, dim: int, num_heads: int, attn_ratio: float, qkv_bias: bool,
        num_fusion_tkns: tuple[int, int, int], attn_scale: AttnScale,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_fusion_tkns = tuple(num_fusion_tkns)
        self.qk_dim = int(dim * attn_ratio)
        _check_heads("FactorizedAVFusionBlock", self.qk_dim, num_heads)
        self.scale = _attn_scale(attn_scale, dim, self.qk_dim, num_heads)
        self.attn_v = CrossAttention(dim, num_heads, qkv_bias)
        self.attn_a = CrossAttention(dim, num_heads, qkv_bias)
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(2 * dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(2 * dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x_fusion: Tensor,
        x_image: Tensor,
        x_audio: Tensor,
        image_padding_mask: Tensor | None = None,
        audio_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Normalized tokens (B, F, D), (B, Nv, D), (B, Na, D) -> update (B, F, D),
        rows ordered [fusion ; image aggregation ; audio aggregation]."""
        B, _, D = x_fusion.shape
        H = self.num_heads
        x_mm, g_v, g_a = x_fusion.split(self.num_fusion_tkns, dim=1)
        d_v = self.attn_v(g_v, x_image, image_padding_mask)  # (B, nAggV, D)
        d_a = self.attn_a(g_a, x_audio, audio_padding_mask)  # (B, nAggA, D)
        M, nv, na = x_mm.shape[1], d_v.shape[1], d_a.shape[1]
        q = self.q(x_mm).view(B, M, H, self.qk_dim // H)
        # the pair token is [dV_i ; dA_j]: input columns [:D] take image, [D:] audio
        k_v = nnf.linear(d_v, self.k.weight[:, :D]).view(B, nv, H, self.qk_dim // H)
        k_a = nnf.linear(d_a, self.k.weight[:, D:]).view(B, na, H, self.qk_dim // H)
        v_v = nnf.linear(d_v, self.v.weight[:, :D]).view(B, nv, H, D // H)
        v_a = nnf.linear(d_a, self.v.weight[:, D:]).view(B, na, H, D // H)
        v_bias = self.v.bias.view(H, D // H).to(q.dtype) if self.v.bias is not None else None
        o = av_pair_attention(q, k_a, v_a, k_v, v_v, scale=self.scale, v_bias=v_bias)
        d_mm = self.proj(o.reshape(B, M, D))
        return torch.cat([d_mm, d_v, d_a], dim=1)


class _FusionBlock(nn.Module):
    """LN1 on each stream, attention, residual on the normalized fusion tokens, LN2 + MLP."""

    attn: nn.Module

    def _init_norms_mlp(self, dim: int, mlp_ratio: float, drop_path: float, norm_eps: float) -> None:
        self.norm1_mm = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_aud = nn.LayerNorm(dim, eps=norm_eps)
        self.norm1_img = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1 -> GELU (erf) -> fc2
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x_fusion: Tensor,
        x_image: Tensor,
        x_audio: Tensor,
        *,
        image_padding_mask: Tensor | None = None,
        audio_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """x_fusion (B, F, D), x_image (B, Nv, D), x_audio (B, Na, D) -> new x_fusion (B, F, D).

        image_padding_mask (B, Nv) / audio_padding_mask (B, Na): bool, True drops a token.
        """
        if x_fusion.dim() != 3 or x_image.dim() != 3 or x_audio.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: x_fusion, x_image, x_audio must be (B, F, D), (B, Nv, D), (B, Na, D), "
                f"got {tuple(x_fusion.shape)}, {tuple(x_image.shape)}, {tuple(x_audio.shape)}"
            )
        x_fusion = self.norm1_mm(x_fusion)
        delta = self.attn(
            x_fusion, self.norm1_img(x_image), self.norm1_aud(x_audio), image_padding_mask, audio_padding_mask
        )
        x_fusion = x_fusion + self.drop_path(delta)
        return x_fusion + self.drop_path(self.mlp(self.norm2(x_fusion)))


class DenseAVFusionBlock(_FusionBlock):
    """DeepAVFusion's dense-interaction fusion block, exact and without the pair tensor.

    Args:
        dim: token width D.
        num_heads: attention heads; D*attn_ratio must be divisible by it.
        attn_ratio: q/k/v projected width D*attn_ratio (0.25 in the VGGSound checkpoint).
        mlp_ratio: MLP hidden width D*mlp_ratio.
        qkv_bias: bias in q and kv.
        drop_path: stochastic depth on both residual branches.
        attn_scale: "upstream" (default): (D/num_heads)^-1/2, as the released code and
            checkpoints; "head": (D*attn_ratio/num_heads)^-1/2, the paper's intent.
        norm_eps: LayerNorm eps (upstream 1e-5).
    """

    def __init__(
        self, dim: int, num_heads: int, attn_ratio: float = 0.25, mlp_ratio: float = 1.0,
        qkv_bias: bool = True, drop_path: float = 0.0, attn_scale: AttnScale = "upstream",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self._init_norms_mlp(dim, mlp_ratio, drop_path, norm_eps)
        self.attn = DenseAVInteractionAttention(dim, num_heads, attn_ratio, qkv_bias, attn_scale)

    @classmethod
    def from_upstream(cls, module: nn.Module, num_heads: int | None = None, **kwargs) -> DenseAVFusionBlock:
        """Builds ours from an instance of upstream's dense block class (same weights,
        device and dtype). num_heads defaults to ``module.attn.num_heads``."""
        _require_upstream_shape(module)
        dim = module.norm1_mm.weight.shape[0]
        block = cls(
            dim, _upstream_heads(module, num_heads),
            attn_ratio=module.attn.q.weight.shape[0] / dim,
            mlp_ratio=module.mlp.fc1.weight.shape[0] / dim,
            qkv_bias=module.attn.q.bias is not None, norm_eps=module.norm1_mm.eps, **kwargs,
        )
        return _load_like(block, module)


class FactorizedAVFusionBlock(_FusionBlock):
    """DeepAVFusion's factorized-interaction fusion block (the released checkpoints').

    Args: as DenseAVFusionBlock, plus
        num_fusion_tkns: (fusion, image aggregation, audio aggregation) token counts;
            x_fusion holds them in that order, F = their sum.
    A sample must keep at least one unpadded image and audio token here.
    """

    def __init__(
        self, dim: int, num_heads: int, attn_ratio: float = 0.25, mlp_ratio: float = 1.0,
        qkv_bias: bool = True, num_fusion_tkns: tuple[int, int, int] = (16, 8, 8),
        drop_path: float = 0.0, attn_scale: AttnScale = "upstream", norm_eps: float = 1e-5,
    ):
        super().__init__()
        if len(num_fusion_tkns) != 3 or min(num_fusion_tkns) < 1:
            raise ValueError(f"num_fusion_tkns must be 3 positive counts, got {num_fusion_tkns}")
        self._init_norms_mlp(dim, mlp_ratio, drop_path, norm_eps)
        self.attn = FactorizedAVInteractionAttention(
            dim, num_heads, attn_ratio, qkv_bias, num_fusion_tkns, attn_scale
        )

    def forward(self, x_fusion: Tensor, x_image: Tensor, x_audio: Tensor, **masks) -> Tensor:
        expected = sum(self.attn.num_fusion_tkns)
        if x_fusion.dim() == 3 and x_fusion.shape[1] != expected:
            raise ValueError(
                f"FactorizedAVFusionBlock: x_fusion must hold sum(num_fusion_tkns) = {expected} tokens "
                f"{self.attn.num_fusion_tkns}, got shape {tuple(x_fusion.shape)}"
            )
        return super().forward(x_fusion, x_image, x_audio, **masks)

    @classmethod
    def from_upstream(
        cls, module: nn.Module, num_heads: int | None = None,
        num_fusion_tkns: tuple[int, int, int] | None = None, **kwargs,
    ) -> FactorizedAVFusionBlock:
        """Builds ours from an instance of upstream's factorized block class. num_heads
        and num_fusion_tkns default to the module's attributes of those names."""
        _require_upstream_shape(module)
        dim = module.norm1_mm.weight.shape[0]
        tkns = num_fusion_tkns or getattr(module, "num_fusion_tkns", None) or getattr(
            module.attn, "num_fusion_tkns", None
        )
        if tkns is None:
            raise ValueError("from_upstream: pass num_fusion_tkns; the module does not record it")
        block = cls(
            dim, _upstream_heads(module, num_heads),
            attn_ratio=module.attn.q.weight.shape[0] / dim,
            mlp_ratio=module.mlp.fc1.weight.shape[0] / dim,
            qkv_bias=module.attn.q.bias is not None, num_fusion_tkns=tuple(tkns),
            norm_eps=module.norm1_mm.eps, **kwargs,
        )
        return _load_like(block, module)


def _require_upstream_shape(module: nn.Module) -> None:
    for name in ("norm1_mm", "attn.q", "mlp.fc1"):
        try:
            module.get_submodule(name)
        except AttributeError:
            raise TypeError(
                f"from_upstream: module has no '{name}'; expected an instance of upstream's fusion block "
                f"class, got {type(module).__name__}"
            ) from None


def _upstream_heads(module: nn.Module, num_heads: int | None) -> int:
    heads = num_heads or getattr(module.attn, "num_heads", None) or getattr(module, "num_heads", None)
    if heads is None:
        raise ValueError("from_upstream: pass num_heads; the module does not record it")
    return int(heads)


def _load_like(block: nn.Module, module: nn.Module) -> nn.Module:
    ref = next(module.parameters())
    block.to(device=ref.device, dtype=ref.dtype)
    block.load_state_dict(module.state_dict(), strict=True)
    return block.train(module.training)


__all__ = [
    "CrossAttention",
    "DenseAVFusionBlock",
    "DenseAVInteractionAttention",
    "FactorizedAVFusionBlock",
    "FactorizedAVInteractionAttention",
]
