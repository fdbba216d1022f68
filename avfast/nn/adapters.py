"""STG-CMA's adapters on ``avfast.ops.av_adapter_attention``.

Upstream's final ViT block (CLIP_AVE.py, ``mode == 'fusion_adapt'``), per frame n of the
B*T frames, with the frozen ``Attn = MHSA∘LN1`` and ``MLP = FFN∘LN2`` of the block:

    v = v + DropPath(T_Adapter(Attn(v over the T frames of each token)))      (a: T_Adapter_Audio)
    s_v = Attn(v);  h_v = GELU(S_Adapter.D_fc1(s_v))                            (a: S_Adapter_Audio)
    h_v' = h_v + gate_v softmax(h_v h_a^T) h_a;  h_a' = h_a + gate_a softmax(h_a h_v^T) h_v
    v = v + s_v + S_Adapter.D_fc2(h_v');  a = a + s_a + S_Adapter_Audio.D_fc2(h_a')
    m_v = MLP(v); the same with MLP_Adapter(_Audio) and the SAME gates;  v = v + m_v + MLP_Adapter.D_fc2(h_v')

The two-way attention (no 1/sqrt(r) scaling upstream) is one ``av_adapter_attention`` call
for both directions. Upstream initialization: D_fc1 truncated normal (std 0.02, bias 0),
D_fc2 weight and bias zero, gates zero, so every adapter starts as zero (the block as the
frozen ViT block).

Layout. ``batch_first=True`` (default): tokens (N, L, D); ``batch_first=False``:
upstream's sequence-first (L, N, D). N = B*T frames ordered b-major (frame n = b*T + t,
upstream's ``(b t)``); visual frame n is paired with audio segment n.
Dims: N frames, Lv visual / La audio tokens per frame, D width, r = int(D * mlp_ratio)
bottleneck width, T frames per clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from avfast.ops import av_adapter_attention

Attention = Callable[[Tensor], Tensor] | nn.MultiheadAttention


def _layout(batch_first: bool, tokens: str) -> str:
    return f"(N, {tokens}, D)" if batch_first else f"({tokens}, N, D)"


def _check_tokens(where: str, name: str, x, tokens: str, dim: int, frames: int | None, batch_first: bool) -> None:
    """x must be a 3-D tensor in the layout with width ``dim`` and ``frames`` frames (None = any)."""
    dims = _layout(batch_first, tokens)
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a Tensor {dims}, got {type(x).__name__}")
    n_axis = 0 if batch_first else 1
    want = ["*", "*", str(dim)]
    want[n_axis] = "*" if frames is None else str(frames)
    if x.dim() != 3 or x.shape[-1] != dim or (frames is not None and x.shape[n_axis] != frames) or x.numel() == 0:
        raise ValueError(f"{where}: {name} must be a non-empty {dims} = ({', '.join(want)}), got {tuple(x.shape)}")


def _attend(attn: Attention, x: Tensor, batch_first: bool) -> Tensor:
    """attn(x) in the caller's layout; an nn.MultiheadAttention is called as self-attention
    (need_weights=False) and its own batch_first honoured."""
    if not isinstance(attn, nn.MultiheadAttention):
        return attn(x)
    flip = attn.batch_first != batch_first
    x = x.transpose(0, 1) if flip else x
    out = attn(x, x, x, need_weights=False)[0]
    return out.transpose(0, 1) if flip else out


def frozen_attention(mha: nn.MultiheadAttention, norm: nn.Module | None = None, *,
                     batch_first: bool = True, attn_mask: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """Upstream's ``attention(ln_1(x))`` as a callable ``x -> mha(norm(x))`` in the given
    layout ((batch, seq, D) with batch_first, else (seq, batch, D)), for the ``attn``
    argument of ``TemporalAdapter`` and ``STGCMABlockAdapters``. Holds no parameters of its
    own: the frozen modules stay where they are registered. attn_mask is used in every call,
    temporal stage included (CLIP's visual tower has none)."""
    flip = mha.batch_first != batch_first

    def call(x: Tensor) -> Tensor:
        x = norm(x) if norm is not None else x
        x = x.transpose(0, 1) if flip else x
        mask = attn_mask.to(dtype=x.dtype, device=x.device) if attn_mask is not None else None
        out = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        return out.transpose(0, 1) if flip else out

    return call


class Adapter(nn.Module):
    """Upstream's bottleneck adapter: ``D_fc2(GELU(D_fc1(x)))``, plus x when ``skip``.

    Args:
        dim: token width D.
        hidden: bottleneck width r (upstream int(D * mlp_ratio)).
        skip: add the input (upstream's ``skip_connect``, default True as upstream;
            STG-CMA builds T_Adapter and MLP_Adapter with False).

    Parameters: ``D_fc1`` Linear(D, r) (truncated normal, std 0.02, bias 0),
    ``D_fc2`` Linear(r, D) (zero weight and bias); ``act`` = nn.GELU() (erf).
    """

    def __init__(self, dim: int, hidden: int, skip: bool = True):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"Adapter: dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        self.dim, self.hidden, self.skip = dim, hidden, skip
        self.act = nn.GELU()
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, skip={self.skip}"

    def down(self, x: Tensor) -> Tensor:
        """GELU(D_fc1(x)): (..., D) -> (..., r)."""
        return self.act(self.D_fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        out = self.D_fc2(self.down(x))
        return x + out if self.skip else out


class TemporalAdapter(Adapter):
    """STG-CMA's T-Adapter: the frozen attention run over the T frames of each token
    position, then the bottleneck (no skip). Returns the update; upstream adds it with
    DropPath: ``x = x + drop_path(t_adapter(x, attn, T))``.

    Args: dim, hidden as ``Adapter``; batch_first: layout of x and of ``attn``'s input.
    Parameters: ``D_fc1``, ``D_fc2`` (upstream's ``T_Adapter`` keys).
    """

    def __init__(self, dim: int, hidden: int, batch_first: bool = True):
        super().__init__(dim, hidden, skip=False)
        self.batch_first = batch_first

    def forward(self, x: Tensor, attn: Attention, num_frames: int) -> Tensor:  # type: ignore[override]
        """x: (B*T, L, D) (batch_first) or (L, B*T, D), frames b-major.
        attn: the frozen attention (with its LayerNorm), a callable on (B*L, T, D)
        (batch_first) or (T, B*L, D) tokens, or an nn.MultiheadAttention.
        num_frames: T. Returns the update, x's shape."""
        where = type(self).__name__
        _check_tokens(where, "x", x, "L", self.dim, None, self.batch_first)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"{where}: num_frames must be a positive int, got {num_frames!r}")
        if self.batch_first:
            N, L, D = x.shape
        else:
            L, N, D = x.shape
        if N % num_frames:
            raise ValueError(f"{where}: x must hold B*T frames with T = num_frames = {num_frames}, "
                             f"got {N} frames in {tuple(x.shape)}")
        B, T = N // num_frames, num_frames
        if self.batch_first:  # '(b t) n d -> (b n) t d'
            xt = x.reshape(B, T, L, D).transpose(1, 2).reshape(B * L, T, D)
            out = super().forward(_attend(attn, xt, True))
            return out.reshape(B, L, T, D).transpose(1, 2).reshape(N, L, D)
        # upstream: 'n (b t) d -> t (b n) d'
        xt = x.reshape(L, B, T, D).permute(2, 1, 0, 3).reshape(T, B * L, D)
        out = super().forward(_attend(attn, xt, False))
        return out.reshape(T, B, L, D).permute(2, 1, 0, 3).reshape(L, N, D)


def _av_adapter(where: str, adapter_v: Adapter, adapter_a: Adapter, s_v: Tensor, s_a: Tensor,
                gate_v: Tensor, gate_a: Tensor, scale: float | None, batch_first: bool) -> tuple[Tensor, Tensor]:
    """(D_fc2_v(h_v'), D_fc2_a(h_a')) of one placement; see AVAdapter.forward."""
    D = adapter_v.dim
    _check_tokens(where, "s_v", s_v, "Lv", D, None, batch_first)
    _check_tokens(where, "s_a", s_a, "La", D, s_v.shape[0 if batch_first else 1], batch_first)
    h_v, h_a = adapter_v.down(s_v), adapter_a.down(s_a)  # (N, L, r) or (L, N, r)
    if not batch_first:
        h_v, h_a = h_v.transpose(0, 1), h_a.transpose(0, 1)  # the op takes any strides
    h_a, h_v = av_adapter_attention(h_a, h_v, gate_a, gate_v, scale=scale)
    if not batch_first:
        h_v, h_a = h_v.transpose(0, 1), h_a.transpose(0, 1)
    return adapter_v.D_fc2(h_v), adapter_a.D_fc2(h_a)


class AVAdapter(nn.Module):
    """One placement of the AV-Adapter (paper Eq. 1-5 without the residual): the visual
    and audio bottlenecks with the parameter-free two-way attention between them.

    Args:
        dim: token width D.
        hidden: bottleneck width r.
        scale: softmax scale of the attention; None = upstream's unscaled softmax.
        batch_first: (N, L, D) tokens (default) or upstream's (L, N, D).

    Parameters: ``visual``, ``audio`` (``Adapter``s, D_fc2 zero). The gates are arguments:
    STG-CMA's block owns one (gate_v, gate_a) pair for both of its placements (see
    ``STGCMABlockAdapters``, which holds upstream's key names).
    """

    def __init__(self, dim: int, hidden: int, scale: float | None = None, batch_first: bool = True):
        super().__init__()
        self.scale, self.batch_first = scale, batch_first
        self.visual = Adapter(dim, hidden, skip=False)
        self.audio = Adapter(dim, hidden, skip=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, batch_first={self.batch_first}"

    def forward(self, s_v: Tensor, s_a: Tensor, gate_v: Tensor, gate_a: Tensor) -> tuple[Tensor, Tensor]:
        """s_v: (N, Lv, D) visual and s_a: (N, La, D) audio outputs of the frozen sublayer
        for the same frames ((Lv, N, D), (La, N, D) with batch_first=False).
        gate_v, gate_a: (), (1,) or (N,), e.g. the block's nn.Parameter(zeros(1)).
        Returns (visual_fc2(h_v'), audio_fc2(h_a')), shaped like s_v and s_a; the caller
        adds the residuals (upstream: v = v + s_v + out_v)."""
        return _av_adapter(type(self).__name__, self.visual, self.audio, s_v, s_a, gate_v, gate_a,
                           self.scale, self.batch_first)


class STGCMABlockAdapters(nn.Module):
    """The trainable part of one STG-CMA ViT block, with upstream's key names, so that the
    ``transformer.resblocks.{i}.*`` adapter keys of an STG-CMA checkpoint (``T_Adapter``,
    ``T_Adapter_Audio``, ``S_Adapter``, ``S_Adapter_Audio``, ``MLP_Adapter``,
    ``MLP_Adapter_Audio`` each with ``D_fc1``/``D_fc2``, ``gate_v``, ``gate_a``) load
    strictly into an ``nn.ModuleList`` of these. The frozen attention and MLP stay in the
    caller's model and are passed in as callables.

    Args:
        dim: token width D (768 ViT-B/16, 1024 ViT-L/14).
        mlp_ratio: bottleneck ratio, r = int(D * mlp_ratio) (0.0625 "Base": 48 / 64;
            0.03125 "Tiny").
        scale: softmax scale of the two-way attention; None = upstream (unscaled).
        batch_first: (N, L, D) tokens (default) or upstream's (L, N, D), N = B*T frames.

    Stages (each returns updates; the caller adds residuals as upstream, see ``forward``):
    ``temporal_adapt`` (T-Adapters), ``spatial_fusion`` (after the frozen attention) and
    ``mlp_fusion`` (after the frozen MLP), both with the shared gates.
    """

    def __init__(self, dim: int, mlp_ratio: float = 0.0625, scale: float | None = None, batch_first: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"STGCMABlockAdapters: int(dim * mlp_ratio) must be >= 1, got dim={dim}, "
                             f"mlp_ratio={mlp_ratio}")
        self.dim, self.hidden, self.scale, self.batch_first = dim, hidden, scale, batch_first
        self.T_Adapter = TemporalAdapter(dim, hidden, batch_first)
        self.T_Adapter_Audio = TemporalAdapter(dim, hidden, batch_first)
        self.S_Adapter = Adapter(dim, hidden)  # skip as upstream; the fusion uses D_fc1 / D_fc2 only
        self.S_Adapter_Audio = Adapter(dim, hidden)
        self.MLP_Adapter = Adapter(dim, hidden, skip=False)
        self.MLP_Adapter_Audio = Adapter(dim, hidden, skip=False)
        self.gate_v = nn.Parameter(torch.zeros(1))
        self.gate_a = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, scale={self.scale}, batch_first={self.batch_first}"

    def temporal_adapt(self, x_v: Tensor, x_a: Tensor, attn: Attention, num_frames: int) -> tuple[Tensor, Tensor]:
        """T-Adapter updates (t_v, t_a) of the tokens x_v (N, Lv, D), x_a (N, La, D);
        attn: the frozen Attn∘LN1 (see ``TemporalAdapter``). Upstream: x = x + drop_path(t)."""
        return self.T_Adapter(x_v, attn, num_frames), self.T_Adapter_Audio(x_a, attn, num_frames)

    def spatial_fusion(self, s_v: Tensor, s_a: Tensor) -> tuple[Tensor, Tensor]:
        """s_v = Attn(LN1(v)) (N, Lv, D), s_a = Attn(LN1(a)) (N, La, D) -> (S_Adapter.D_fc2(h_v'),
        S_Adapter_Audio.D_fc2(h_a')). Upstream: v = v + s_v + out_v, a = a + s_a + out_a."""
        return _av_adapter(f"{type(self).__name__}.spatial_fusion", self.S_Adapter, self.S_Adapter_Audio,
                           s_v, s_a, self.gate_v, self.gate_a, self.scale, self.batch_first)

    def mlp_fusion(self, m_v: Tensor, m_a: Tensor) -> tuple[Tensor, Tensor]:
        """m_v = MLP(LN2(v)), m_a = MLP(LN2(a)) -> (MLP_Adapter.D_fc2(h_v'), MLP_Adapter_Audio.D_fc2(h_a')),
        with the same gates as ``spatial_fusion``. Upstream: v = v + m_v + out_v."""
        return _av_adapter(f"{type(self).__name__}.mlp_fusion", self.MLP_Adapter, self.MLP_Adapter_Audio,
                           m_v, m_a, self.gate_v, self.gate_a, self.scale, self.batch_first)

    def forward(self, v: Tensor, a: Tensor, attn: Attention, mlp: Callable[[Tensor], Tensor], num_frames: int,
                drop_path: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Upstream's whole block: v (N, Lv, D), a (N, La, D) -> new (v, a).

        attn: the frozen Attn∘LN1 (a callable in this layout, e.g. ``frozen_attention(blk.attn,
        blk.ln_1)``), used by the temporal and the spatial stage. mlp: the frozen MLP∘LN2.
        num_frames: T. drop_path: upstream's DropPath of the temporal branch (None = identity),
        applied to the update in this layout. Note: upstream applies timm's DropPath to
        (L, N, D) tensors, so its mask runs over token positions, not frames; pass
        batch_first=False to reproduce that in training.
        """
        where = type(self).__name__
        _check_tokens(where, "v", v, "Lv", self.dim, None, self.batch_first)
        _check_tokens(where, "a", a, "La", self.dim, v.shape[0 if self.batch_first else 1], self.batch_first)
        t_v, t_a = self.temporal_adapt(v, a, attn, num_frames)
        if drop_path is not None:
            t_v, t_a = drop_path(t_v), drop_path(t_a)
        v, a = v + t_v, a + t_a
        s_v, s_a = _attend(attn, v, self.batch_first), _attend(attn, a, self.batch_first)
        f_v, f_a = self.spatial_fusion(s_v, s_a)
        v, a = v + s_v + f_v, a + s_a + f_a
        m_v, m_a = mlp(v), mlp(a)
        f_v, f_a = self.mlp_fusion(m_v, m_a)
        return v + m_v + f_v, a + m_a + f_a


__all__ = ["AVAdapter", "Adapter", "STGCMABlockAdapters", "TemporalAdapter", "frozen_attention"]
