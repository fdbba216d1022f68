"""STG-CMA's parameter-free two-way adapter attention, both directions in one launch.

h_v' = h_v + gate_v softmax(h_v h_a^T scale) h_a,   h_a' = h_a + gate_a softmax(h_a h_v^T scale) h_v
per frame. Dims: N frames (batch x time), La audio / Lv visual tokens, r bottleneck width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avfast import _backend
from avfast.reference import av_adapter_attention as reference

OP = "av_adapter_attention"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tokens(name: str, h, dims: str, expected: tuple, ref: Tensor | None) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"{OP}: {name} must be a Tensor {dims}, got {type(h).__name__}")
    shown = ", ".join("*" if e is None else str(e) for e in expected)
    if h.dim() != 3 or any(e is not None and s != e for s, e in zip(h.shape, expected)) or h.numel() == 0:
        raise ValueError(f"{OP}: {name} must be a non-empty {dims} = ({shown}), got {tuple(h.shape)}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: {name} must be float32, float16, bfloat16 or float64, got {h.dtype}")
    if ref is not None and h.dtype != ref.dtype:
        raise TypeError(f"{OP}: {name} must have h_a's dtype {ref.dtype}, got {h.dtype}")
    if ref is not None and h.device != ref.device:
        raise ValueError(f"{OP}: {name} must be on h_a's device {ref.device}, got {h.device}")


def _check_gate(name: str, gate, N: int, h_a: Tensor) -> None:
    if not isinstance(gate, Tensor):
        raise TypeError(f"{OP}: {name} must be a Tensor of shape (), (1,) or (N,) = ({N},), got {type(gate).__name__}")
    if gate.numel() not in (1, N) or gate.dim() > 1:
        raise ValueError(f"{OP}: {name} must have shape (), (1,) or (N,) = ({N},), got {tuple(gate.shape)}")
    if not gate.is_floating_point():
        raise TypeError(f"{OP}: {name} must be a float tensor, got {gate.dtype}")
    if gate.device != h_a.device:
        raise ValueError(f"{OP}: {name} must be on h_a's device {h_a.device}, got {gate.device}")


def _check_av_adapter_attention(h_a, h_v, gate_a, gate_v, scale) -> None:
    _check_tokens("h_a", h_a, "(N, La, r)", (None, None, None), None)
    N, _, r = h_a.shape
    _check_tokens("h_v", h_v, "(N, Lv, r)", (N, None, r), h_a)
    _check_gate("gate_a", gate_a, N, h_a)
    _check_gate("gate_v", gate_v, N, h_a)
    if isinstance(scale, bool) or not isinstance(scale, (float, int)) or not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")


def _kernels(backend: str):
    """(forward, backward) of the backend contract for ``backend``."""
    if backend == "cuda":
        return torch.ops.avfast_C.av_adapter_attention_fwd, torch.ops.avfast_C.av_adapter_attention_bwd
    if backend == "triton":
        from avfast.kernels.triton import av_adapter_attention as triton_kernels

        return triton_kernels.av_adapter_attention_fwd, triton_kernels.av_adapter_attention_bwd
    return reference.av_adapter_attention_fwd, reference.av_adapter_attention_bwd


@torch.library.custom_op("avfast::av_adapter_attention", mutates_args=())
def _av_adapter_attention(
    h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out_a, out_v, o_a, o_v, lse_a, lse_v); gates (N,) float32 (float64 for float64)."""
    _check_av_adapter_attention(h_a, h_v, gate_a, gate_v, scale)
    forward, _ = _kernels(_backend.select(OP, h_a.device, h_a.dtype, r=h_a.shape[-1]))
    with _backend.no_autocast(h_a.device):
        return forward(h_a, h_v, gate_a, gate_v, scale)


@_av_adapter_attention.register_fake
def _(h_a, h_v, gate_a, gate_v, scale):
    _check_av_adapter_attention(h_a, h_v, gate_a, gate_v, scale)
    N, La, r = h_a.shape
    Lv = h_v.shape[1]
    acc = torch.float64 if h_a.dtype == torch.float64 else torch.float32
    return (h_a.new_empty(N, La, r), h_v.new_empty(N, Lv, r), h_a.new_empty(N, La, r, dtype=acc),
            h_a.new_empty(N, Lv, r, dtype=acc), h_a.new_empty(N, La, dtype=acc), h_a.new_empty(N, Lv, dtype=acc))


@torch.library.custom_op("avfast::av_adapter_attention_backward", mutates_args=())
def _av_adapter_attention_backward(
    dout_a: Tensor, dout_v: Tensor, h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor,
    o_a: Tensor, o_v: Tensor, lse_a: Tensor, lse_v: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh_a, dh_v, dgate_a (N,), dgate_v (N,))."""
    _, backward = _kernels(_backend.select(OP, h_a.device, h_a.dtype, r=h_a.shape[-1]))
    with _backend.no_autocast(h_a.device):
        return backward(dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v, scale)


@_av_adapter_attention_backward.register_fake
def _(dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v, scale):
    N = h_a.shape[0]
    return h_a.new_empty(h_a.shape), h_v.new_empty(h_v.shape), o_a.new_empty(N), o_a.new_empty(N)


def _setup_context(ctx, inputs, output):
    h_a, h_v, gate_a, gate_v, scale = inputs
    _, _, o_a, o_v, lse_a, lse_v = output
    ctx.save_for_backward(h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v)
    ctx.scale = scale
    ctx.mark_non_differentiable(o_a, o_v, lse_a, lse_v)


def _backward(ctx, dout_a, dout_v, *_residual_grads):
    h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v = ctx.saved_tensors
    dh_a, dh_v, dgate_a, dgate_v = _av_adapter_attention_backward(
        dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v, ctx.scale
    )
    return dh_a, dh_v, dgate_a, dgate_v, None


_av_adapter_attention.register_autograd(_backward, setup_context=_setup_context)


def av_adapter_attention(
    h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Two-way cross-attention of STG-CMA's AV-Adapter in the bottleneck space.

    Args:
        h_a: (N, La, r) audio tokens of each frame; h_v: (N, Lv, r) visual tokens; one
            dtype (float32, float16, bfloat16, float64) and device, any strides.
        gate_a, gate_v: gates of shape () or (1,) (one per block, upstream) or (N,) (per
            frame); any float dtype; they receive gradients.
        scale: softmax scale of h_v.h_a; None (default) is upstream's unscaled softmax,
            r**-0.5 the usual choice.

    Returns:
        (h_a', h_v') with h_v' = h_v + gate_v softmax(h_v h_a^T scale) h_a and
        h_a' = h_a + gate_a softmax(h_a h_v^T scale) h_v, per frame, in the inputs' dtype.
    Kernels accumulate in float32; float64 runs on the reference.
    Backend: cuda -> triton -> reference, or AVFAST_BACKEND.
    """
    _check_av_adapter_attention(h_a, h_v, gate_a, gate_v, 1.0 if scale is None else scale)
    N = h_a.shape[0]
    acc = torch.float64 if h_a.dtype == torch.float64 else torch.float32
    g_a = gate_a.to(acc).reshape(-1).expand(N)
    g_v = gate_v.to(acc).reshape(-1).expand(N)
    out_a, out_v, *_ = _av_adapter_attention(h_a, h_v, g_a, g_v, 1.0 if scale is None else float(scale))
    return out_a, out_v
