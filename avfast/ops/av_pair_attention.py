"""Dense audio-visual pair attention, exact, without the pair tensor.

out[b, f, h] = sum_{i,j} softmax_{ij}(scale q.(k_a[i] + k_v[j])) (v_a[i] + v_v[j] + v_bias)
             = softmax(scale q k_a^T) v_a + softmax(scale q k_v^T) v_v + v_bias

Dims: B batch, F fusion queries, Na audio keys, Nv visual keys, H heads,
Dq query/key head width, Dv value head width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avfast import _backend
from avfast.reference import av_pair_attention as reference

OP = "av_pair_attention"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t, dims: str, expected: tuple, q: Tensor) -> None:
    """t must be a tensor of shape ``expected`` (None = any size) on q's device and dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{OP}: {name} must be a Tensor {dims}, got {type(t).__name__}")
    shown = ", ".join("*" if e is None else str(e) for e in expected)
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        raise ValueError(f"{OP}: {name} must be {dims} = ({shown}), got {_shape(t)}")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{OP}: {name} must be non-empty {dims}, got {_shape(t)}")
    if t.dtype != q.dtype:
        raise TypeError(f"{OP}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{OP}: {name} must be on q's device {q.device}, got {t.device}")


def _check_mask(name: str, mask, dims: str, expected: tuple, q: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{OP}: {name} must be a bool Tensor {dims}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{OP}: {name} must be a bool Tensor {dims} (True = padded key), got dtype {mask.dtype}")
    if _shape(mask) != expected:
        raise ValueError(f"{OP}: {name} must be {dims} = {expected}, got {_shape(mask)}")
    if mask.device != q.device:
        raise ValueError(f"{OP}: {name} must be on q's device {q.device}, got {mask.device}")


def _check_queries_keys(q, k_a, k_v, key_padding_mask_a, key_padding_mask_v, scale) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"{OP}: q must be a Tensor (B, F, H, Dq), got {type(q).__name__}")
    if q.dim() != 4 or q.numel() == 0:
        raise ValueError(f"{OP}: q must be a non-empty (B, F, H, Dq), got {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    B, _, H, Dq = q.shape
    _check_tensor("k_a", k_a, "(B, Na, H, Dq)", (B, None, H, Dq), q)
    _check_tensor("k_v", k_v, "(B, Nv, H, Dq)", (B, None, H, Dq), q)
    _check_mask("key_padding_mask_a", key_padding_mask_a, "(B, Na)", (B, k_a.shape[1]), q)
    _check_mask("key_padding_mask_v", key_padding_mask_v, "(B, Nv)", (B, k_v.shape[1]), q)
    if isinstance(scale, bool) or not isinstance(scale, (float, int)) or not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite float, got {scale!r}")


def _check_av_pair_attention(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale) -> None:
    _check_queries_keys(q, k_a, k_v, key_padding_mask_a, key_padding_mask_v, scale)
    B, _, H, _ = q.shape
    Na, Nv = k_a.shape[1], k_v.shape[1]
    v_dim = v_a.shape[-1] if isinstance(v_a, Tensor) and v_a.dim() == 4 else None
    _check_tensor("v_a", v_a, "(B, Na, H, Dv)", (B, Na, H, v_dim), q)
    Dv = v_a.shape[-1]
    _check_tensor("v_v", v_v, "(B, Nv, H, Dv)", (B, Nv, H, Dv), q)
    if v_bias is not None:
        _check_tensor("v_bias", v_bias, "(H, Dv)", (H, Dv), q)


def _kernels(backend: str):
    """(forward, backward) of the backend contract for ``backend``."""
    if backend == "cuda":
        return torch.ops.avfast_C.av_pair_attention_fwd, torch.ops.avfast_C.av_pair_attention_bwd
    if backend == "triton":
        from avfast.kernels.triton import av_pair_attention as triton_kernels

        return triton_kernels.av_pair_attention_fwd, triton_kernels.av_pair_attention_bwd
    return reference.av_pair_attention_fwd, reference.av_pair_attention_bwd


@torch.library.custom_op("avfast::av_pair_attention", mutates_args=())
def _av_pair_attention(
    q: Tensor,
    k_a: Tensor,
    v_a: Tensor,
    k_v: Tensor,
    v_v: Tensor,
    v_bias: Tensor | None,
    key_padding_mask_a: Tensor | None,
    key_padding_mask_v: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out (B, F, H, Dv), o_half (B, F, H, 2, Dv), lse (B, F, H, 2)); the last two
    are the residuals that the backward reads (see avfast.reference.av_pair_attention)."""
    _check_av_pair_attention(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale)
    backend = _backend.select(OP, q.device, q.dtype)
    forward, _ = _kernels(backend)
    with _backend.no_autocast(q.device):
        return forward(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale)


@_av_pair_attention.register_fake
def _(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale):
    _check_av_pair_attention(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale)
    B, F, H, _ = q.shape
    Dv = v_a.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        q.new_empty(B, F, H, Dv),
        q.new_empty(B, F, H, 2, Dv, dtype=acc),
        q.new_empty(B, F, H, 2, dtype=acc),
    )


@torch.library.custom_op("avfast::av_pair_attention_backward", mutates_args=())
def _av_pair_attention_backward(
    dout: Tensor,
    q: Tensor,
    k_a: Tensor,
    v_a: Tensor,
    k_v: Tensor,
    v_v: Tensor,
    key_padding_mask_a: Tensor | None,
    key_padding_mask_v: Tensor | None,
    o_half: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (q, k_a, v_a, k_v, v_v, v_bias); v_bias's is the sum of dout over
    the rows that have a valid pair, (H, Dv) in q's dtype."""
    backend = _backend.select(OP, q.device, q.dtype)
    _, backward = _kernels(backend)
    with _backend.no_autocast(q.device):
        grads = backward(
            dout, q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse, scale
        )
        has_pair = lse[..., :1] != torch.inf  # (B, F, H, 1); rows without a pair hold +inf
        dv_bias = (dout.to(o_half.dtype) * has_pair).sum(dim=(0, 1)).to(q.dtype)
    return (*grads, dv_bias)


@_av_pair_attention_backward.register_fake
def _(dout, q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse, scale):
    H, Dv = v_a.shape[2], v_a.shape[3]
    return (*(t.new_empty(t.shape) for t in (q, k_a, v_a, k_v, v_v)), q.new_empty(H, Dv))


def _setup_context(ctx, inputs, output):
    q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale = inputs
    _, o_half, lse = output
    ctx.save_for_backward(q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse)
    ctx.scale = scale
    ctx.has_bias = v_bias is not None
    ctx.mark_non_differentiable(o_half, lse)


def _backward(ctx, dout, _do_half, _dlse):
    q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse = ctx.saved_tensors
    dq, dk_a, dv_a, dk_v, dv_v, dv_bias = _av_pair_attention_backward(
        dout, q, k_a, v_a, k_v, v_v, key_padding_mask_a, key_padding_mask_v, o_half, lse, ctx.scale
    )
    return dq, dk_a, dv_a, dk_v, dv_v, (dv_bias if ctx.has_bias else None), None, None, None


_av_pair_attention.register_autograd(_backward, setup_context=_setup_context)


def av_pair_attention(
    q: Tensor,
    k_a: Tensor,
    v_a: Tensor,
    k_v: Tensor,
    v_v: Tensor,
    *,
    scale: float,
    v_bias: Tensor | None = None,
    key_padding_mask_a: Tensor | None = None,
    key_padding_mask_v: Tensor | None = None,
) -> Tensor:
    """Fusion queries attending over all Na x Nv audio-visual pair tokens, exactly.

    Pair keys and values are affine in the pair, K_ij = k_a[i] + k_v[j] and
    V_ij = v_a[i] + v_v[j] + v_bias (DeepAVFusion's concatenated pair token through one
    Linear), so the joint softmax factorizes and no (Na*Nv) tensor is ever built.

    Args:
        q: (B, F, H, Dq) fusion queries.
        k_a: (B, Na, H, Dq) audio keys; v_a: (B, Na, H, Dv) audio values.
        k_v: (B, Nv, H, Dq) visual keys; v_v: (B, Nv, H, Dv) visual values.
        scale: softmax scale applied to q.k.
        v_bias: (H, Dv) value bias of the pair projection (the key bias cancels).
        key_padding_mask_a: (B, Na) bool, True drops that audio key.
        key_padding_mask_v: (B, Nv) bool, True drops that visual key.

    Returns:
        (B, F, H, Dv) in q's dtype. A sample with no valid audio key or no valid visual
        key has no valid pair: its rows are zero (v_bias not added) and get no gradient.

    All tensors share one device and one dtype (float32, float16, bfloat16 or float64);
    any strides. Kernels accumulate in float32; float64 runs on the reference.
    Backend: cuda -> triton -> reference, or AVFAST_BACKEND.
    """
    _check_av_pair_attention(q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale)
    out, _, _ = _av_pair_attention(
        q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, float(scale)
    )
    return out


def pair_attention_map(
    q: Tensor,
    k_a: Tensor,
    k_v: Tensor,
    *,
    scale: float,
    key_padding_mask_a: Tensor | None = None,
    key_padding_mask_v: Tensor | None = None,
) -> Tensor:
    """The joint attention map of ``av_pair_attention``, built on request.

    q (B, F, H, Dq), k_a (B, Na, H, Dq), k_v (B, Nv, H, Dq), masks as in av_pair_attention.
    Returns (B, H, F, Na*Nv), audio-major (pair p = i*Nv + j, upstream's order), as the
    outer product of the audio and visual softmaxes; float32 (float64 for float64 input).
    Memory is B*H*F*Na*Nv elements: meant for visualization, not for training.
    """
    _check_queries_keys(q, k_a, k_v, key_padding_mask_a, key_padding_mask_v, scale)
    return reference.pair_attention_map(
        q, k_a, k_v, scale=float(scale),
        key_padding_mask_a=key_padding_mask_a, key_padding_mask_v=key_padding_mask_v,
    )
