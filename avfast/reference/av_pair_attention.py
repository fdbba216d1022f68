"""Plain-PyTorch reference for dense audio-visual pair attention.

Fusion queries attend over every audio-visual pair token, with pair keys and values
affine in the pair: K_ij = k_a[i] + k_v[j], V_ij = v_a[i] + v_v[j] + v_bias.
The joint softmax over (i, j) is the outer product of two softmaxes, so exactly

    out = softmax(scale q k_a^T) v_a + softmax(scale q k_v^T) v_v + v_bias.

Dims: B batch, F fusion queries, Na audio keys, Nv visual keys, H heads,
Dq query/key head width, Dv value head width.

Masks follow ``nn.MultiheadAttention``: ``key_padding_mask_a[b, i] = True`` drops audio
key i of sample b. A sample with no valid audio key or no valid visual key has no valid
pair: its output rows are zero (v_bias is not added) and carry no gradient.

This file holds
- ``av_pair_attention_literal``: the pair tensor materialized, as upstream computes it
  (the oracle every backend is tested against);
- ``av_pair_attention_two_attention``: the exact two-attention form;
- ``av_pair_attention_fwd`` / ``av_pair_attention_bwd``: the backend contract that the
  Triton and CUDA kernels also implement (explicit backward, residuals o_half and lse);
- ``pair_attention_map``: the joint (B, H, F, Na*Nv) attention map.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_scores(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """q (B, F, H, Dq), k (B, N, H, Dq), mask (B, N) or None -> scores (B, H, F, N)."""
    s = torch.einsum("bfhd,bnhd->bhfn", q, k) * scale
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    return s


def av_pair_attention_literal(
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
    """Attention over the materialized (Na*Nv) pair grid, audio-major (pair p = i*Nv + j).

    q (B, F, H, Dq); k_a (B, Na, H, Dq); v_a (B, Na, H, Dv); k_v (B, Nv, H, Dq);
    v_v (B, Nv, H, Dv); v_bias (H, Dv); masks (B, Na) / (B, Nv) bool.
    Returns (B, F, H, Dv) in q's dtype, computed in q's dtype.
    """
    B, Na, H, Dq = k_a.shape
    Nv = k_v.shape[1]
    Dv = v_a.shape[-1]
    k_pair = (k_a[:, :, None] + k_v[:, None, :]).reshape(B, Na * Nv, H, Dq)
    v_pair = v_a[:, :, None] + v_v[:, None, :]
    if v_bias is not None:
        v_pair = v_pair + v_bias
    v_pair = v_pair.reshape(B, Na * Nv, H, Dv)
    mask = None
    if key_padding_mask_a is not None or key_padding_mask_v is not None:
        pad_a = key_padding_mask_a if key_padding_mask_a is not None else k_a.new_zeros(B, Na, dtype=torch.bool)
        pad_v = key_padding_mask_v if key_padding_mask_v is not None else k_v.new_zeros(B, Nv, dtype=torch.bool)
        mask = (pad_a[:, :, None] | pad_v[:, None, :]).reshape(B, Na * Nv)
    s = _masked_scores(q, k_pair, mask, scale)
    if mask is not None:  # a sample with no valid pair: softmax over zeros, then zeroed
        has_pair = ~mask.all(dim=-1)[:, None, None, None]
        p = torch.softmax(torch.where(has_pair, s, torch.zeros_like(s)), dim=-1) * has_pair
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("bhfn,bnhd->bfhd", p, v_pair)


def av_pair_attention_two_attention(
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
    """The exact two-attention form; same arguments and result as the literal form."""
    out, _, _ = av_pair_attention_fwd(
        q, k_a, v_a, k_v, v_v, v_bias, key_padding_mask_a, key_padding_mask_v, scale
    )
    return out


def av_pair_attention_fwd(
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
    """Forward of the backend contract.

    Returns
    - out (B, F, H, Dv) in q's dtype;
    - o_half (B, F, H, 2, Dv): the normalized audio ([..., 0, :]) and visual ([..., 1, :])
      attention outputs without bias, zero on rows with no valid pair;
    - lse (B, F, H, 2): log-sum-exp of the scaled scores per half, +inf on rows with no
      valid pair (so that exp(s - lse) = 0 there).
    o_half and lse are float32 (float64 for float64 inputs).
    """
    acc = _acc_dtype(q)
    qf = q.to(acc)
    halves, lses = [], []
    for k, v, mask in ((k_a, v_a, key_padding_mask_a), (k_v, v_v, key_padding_mask_v)):
        s = _masked_scores(qf, k.to(acc), mask, scale)
        lse = torch.logsumexp(s, dim=-1)  # (B, H, F); -inf where every key is padded
        p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(acc).min))
        halves.append(torch.einsum("bhfn,bnhd->bfhd", p, v.to(acc)))
        lses.append(lse.transpose(1, 2))  # (B, F, H)
    valid = (lses[0] != -torch.inf) & (lses[1] != -torch.inf)  # (B, F, H); NaN stays valid (it propagates)
    o_half = torch.stack(halves, dim=3) * valid[..., None, None]
    lse = torch.where(valid[..., None], torch.stack(lses, dim=-1), torch.inf)
    out = o_half.sum(dim=3)
    if v_bias is not None:
        out = out + v_bias.to(acc) * valid[..., None]
    return out.to(q.dtype).contiguous(), o_half.contiguous(), lse.contiguous()


def av_pair_attention_bwd(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the backend contract; contiguous gradients of q, k_a, v_a, k_v, v_v.

    Per half, with P = exp(scale q k^T - lse) and delta = rowsum(dout * o_half):
    dV = P^T dout, dS = P * (dout V^T - delta), dQ += scale dS K, dK = scale dS^T Q.
    The v_bias gradient (sum of dout over valid rows) is taken by the caller.
    """
    acc = _acc_dtype(q)
    qf, do = q.to(acc), dout.to(acc)
    dq = torch.zeros_like(qf)
    grads = []
    for half, (k, v, mask) in enumerate(((k_a, v_a, key_padding_mask_a), (k_v, v_v, key_padding_mask_v))):
        kf, vf = k.to(acc), v.to(acc)
        s = _masked_scores(qf, kf, mask, scale)
        p = torch.exp(s - lse[..., half].transpose(1, 2)[..., None])  # (B, H, F, N)
        delta = (do * o_half[:, :, :, half]).sum(-1).transpose(1, 2)  # (B, H, F)
        dp = torch.einsum("bfhd,bnhd->bhfn", do, vf)
        ds = p * (dp - delta[..., None])
        dq += torch.einsum("bhfn,bnhd->bfhd", ds, kf) * scale
        grads.append((torch.einsum("bhfn,bfhd->bnhd", ds, qf) * scale).to(k.dtype).contiguous())
        grads.append(torch.einsum("bhfn,bfhd->bnhd", p, do).to(v.dtype).contiguous())
    return (dq.to(q.dtype).contiguous(), *grads)


def pair_attention_map(
    q: Tensor,
    k_a: Tensor,
    k_v: Tensor,
    *,
    scale: float,
    key_padding_mask_a: Tensor | None = None,
    key_padding_mask_v: Tensor | None = None,
) -> Tensor:
    """Joint attention map (B, H, F, Na*Nv), audio-major, as the outer product of the
    two softmaxes; float32 (float64 for float64 inputs). Rows with no valid pair are zero."""
    acc = _acc_dtype(q)
    qf = q.to(acc)
    p = []
    for k, mask in ((k_a, key_padding_mask_a), (k_v, key_padding_mask_v)):
        s = _masked_scores(qf, k.to(acc), mask, scale)
        pk = torch.softmax(s, dim=-1)
        if mask is not None:  # every key padded: a zero row (NaN from values stays NaN)
            pk = torch.where(mask.all(dim=-1)[:, None, None, None], torch.zeros_like(pk), pk)
        p.append(pk)
    B, H, F, Na = p[0].shape
    return (p[0][..., :, None] * p[1][..., None, :]).reshape(B, H, F, Na * p[1].shape[-1])
