"""Plain-PyTorch reference for STG-CMA's parameter-free two-way adapter attention.

Per frame n, in the adapter's bottleneck space (width r), with S = h_v h_a^T * scale:

    h_v' = h_v + gate_v[n] softmax_rows(S) h_a          (each visual token over the audio)
    h_a' = h_a + gate_a[n] softmax_rows(S^T) h_v        (each audio token over the visual)

Dims: N frames (batch x time), Lv visual tokens, La audio tokens, r bottleneck width.
Upstream uses no scaling (scale = 1).

- ``av_adapter_attention_literal``: the two attentions written out (the oracle).
- ``av_adapter_attention_fwd`` / ``_bwd``: the backend contract that the Triton and CUDA
  kernels implement, with residuals (o_a, o_v, lse_a, lse_v) and an explicit backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def av_adapter_attention_literal(
    h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """h_a (N, La, r), h_v (N, Lv, r), gates () or (N,) -> (h_a', h_v') in the inputs' dtype."""
    s = 1.0 if scale is None else scale
    N = h_a.shape[0]
    g_a = gate_a.reshape(-1).expand(N)[:, None, None]
    g_v = gate_v.reshape(-1).expand(N)[:, None, None]
    out_v = h_v + g_v * (torch.softmax(h_v @ h_a.transpose(1, 2) * s, dim=-1) @ h_a)
    out_a = h_a + g_a * (torch.softmax(h_a @ h_v.transpose(1, 2) * s, dim=-1) @ h_v)
    return out_a, out_v


def av_adapter_attention_fwd(
    h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the backend contract; gates are (N,) (any strides).

    Returns out_a (N, La, r), out_v (N, Lv, r) in the inputs' dtype, and the residuals
    o_a (N, La, r), o_v (N, Lv, r) (the attention outputs before the gate) and
    lse_a (N, La), lse_v (N, Lv) (log-sum-exps of the scaled scores over the other
    modality), float32 (float64 for float64 inputs), all contiguous.
    """
    acc = _acc_dtype(h_a)
    a, v = h_a.to(acc), h_v.to(acc)
    s = v @ a.transpose(1, 2) * scale  # (N, Lv, La)
    lse_v = torch.logsumexp(s, dim=-1)
    lse_a = torch.logsumexp(s, dim=-2)
    o_v = torch.softmax(s, dim=-1) @ a
    o_a = torch.softmax(s, dim=-2).transpose(1, 2) @ v
    out_a = (a + gate_a.to(acc)[:, None, None] * o_a).to(h_a.dtype)
    out_v = (v + gate_v.to(acc)[:, None, None] * o_v).to(h_v.dtype)
    return tuple(t.contiguous() for t in (out_a, out_v, o_a, o_v, lse_a, lse_v))


def av_adapter_attention_bwd(
    dout_a: Tensor, dout_v: Tensor, h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor,
    o_a: Tensor, o_v: Tensor, lse_a: Tensor, lse_v: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the backend contract: (dh_a, dh_v) contiguous in the inputs' dtype and
    (dgate_a, dgate_v) (N,) float32 (float64 for float64 inputs), per frame.

    With S = scale h_v h_a^T, P_v = exp(S - lse_v), P_a^T = exp(S - lse_a), G = gate * dout:
      delta_v = rowsum(G_v o_v), dS_v = P_v (G_v h_a^T - delta_v)
      delta_a = rowsum(G_a o_a), dS_a^T = P_a^T (h_v G_a^T - delta_a^T)
      dS = scale (dS_v + dS_a^T)
      dh_v = dout_v + P_a^T G_a + dS h_a,   dh_a = dout_a + P_v^T G_v + dS^T h_v
      dgate = sum over the frame of dout * o.
    """
    acc = _acc_dtype(h_a)
    a, v = h_a.to(acc), h_v.to(acc)
    da, dv = dout_a.to(acc), dout_v.to(acc)
    g_a = gate_a.to(acc)[:, None, None] * da
    g_v = gate_v.to(acc)[:, None, None] * dv
    s = v @ a.transpose(1, 2) * scale
    p_v = torch.exp(s - lse_v[..., None])
    p_at = torch.exp(s - lse_a[:, None, :])
    delta_v = (g_v * o_v).sum(-1)
    delta_a = (g_a * o_a).sum(-1)
    ds_v = p_v * (g_v @ a.transpose(1, 2) - delta_v[..., None])
    ds_at = p_at * (v @ g_a.transpose(1, 2) - delta_a[:, None, :])
    ds = scale * (ds_v + ds_at)
    dh_v = dv + p_at @ g_a + ds @ a
    dh_a = da + p_v.transpose(1, 2) @ g_v + ds.transpose(1, 2) @ v
    dgate_a = (da * o_a).sum(dim=(1, 2))
    dgate_v = (dv * o_v).sum(dim=(1, 2))
    return dh_a.to(h_a.dtype).contiguous(), dh_v.to(h_v.dtype).contiguous(), dgate_a, dgate_v
