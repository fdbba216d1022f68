"""Triton kernels for dense audio-visual pair attention (backend contract of
``avfast.reference.av_pair_attention``: ``av_pair_attention_fwd`` / ``_bwd``).

Dims: B batch, F fusion queries, Na/Nv audio/visual keys, H heads, Dq/Dv head widths.
One launch covers both halves (audio keys, then visual keys) with an online softmax per
half. When B*H*ceil(F/BLOCK_F) programs would not fill the GPU, the keys are split over
``num_splits`` programs whose partial results are merged by log-sum-exp.
Inputs come checked (avfast.ops); any strides are accepted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avfast.kernels.triton import has_triton
from avfast.kernels.triton.common import dot_precision, on_device, pow2

if has_triton():
    import triton
    import triton.language as tl

    from avfast.kernels.triton.common import dot

BLOCK_N = 64  # keys per inner step
MAX_BLOCK_F = 64  # queries per program
MIN_PROGRAMS = 264  # about two programs per SM on an H100 (132 SMs)


def _strides(t: Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


if has_triton():

    @triton.jit
    def _key_range(N, split, num_splits, BLOCK_N: tl.constexpr):
        """[start, end) of the keys that split `split` of `num_splits` covers (whole key blocks)."""
        chunk = tl.cdiv(tl.cdiv(N, BLOCK_N), num_splits) * BLOCK_N
        start = split * chunk
        return start, tl.minimum(start + chunk, N)

    @triton.jit
    def _load_key_block(
        n0, end, b, h,
        k_ptr, stride_k_b, stride_k_n, stride_k_h, stride_k_d,
        v_ptr, stride_v_b, stride_v_n, stride_v_h, stride_v_d,
        mask_ptr, stride_mask_b, stride_mask_n,
        Dq, Dv, HAS_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        """Keys n0 .. n0+BLOCK_N of (b, h): k (BLOCK_N, BLOCK_DQ), v (BLOCK_N, BLOCK_DV), zero
        past `end` and the head widths, and key_ok (BLOCK_N,): in range and not padded."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_dq = tl.arange(0, BLOCK_DQ)
        offs_dv = tl.arange(0, BLOCK_DV)
        n_ok = offs_n < end
        k = tl.load(
            k_ptr + b * stride_k_b + h * stride_k_h + offs_n[:, None] * stride_k_n + offs_dq[None, :] * stride_k_d,
            mask=n_ok[:, None] & (offs_dq[None, :] < Dq), other=0.0,
        )
        v = tl.load(
            v_ptr + b * stride_v_b + h * stride_v_h + offs_n[:, None] * stride_v_n + offs_dv[None, :] * stride_v_d,
            mask=n_ok[:, None] & (offs_dv[None, :] < Dv), other=0.0,
        )
        key_ok = n_ok
        if HAS_MASK:
            pad = tl.load(mask_ptr + b * stride_mask_b + offs_n * stride_mask_n, mask=n_ok, other=1)
            key_ok = key_ok & (pad == 0)
        return k, v, key_ok

    @triton.jit
    def _attend_half(
        q, b, h, split, num_splits, N, scale,
        k_ptr, stride_k_b, stride_k_n, stride_k_h, stride_k_d,
        v_ptr, stride_v_b, stride_v_n, stride_v_h, stride_v_d,
        mask_ptr, stride_mask_b, stride_mask_n,
        Dq, Dv,
        HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        """Online softmax of q (BLOCK_F, BLOCK_DQ) over this split's keys of one half.
        Returns the normalized output (BLOCK_F, BLOCK_DV) and the lse (BLOCK_F,),
        -inf where the split holds no valid key."""
        start, end = _key_range(N, split, num_splits, BLOCK_N)
        m = tl.full((BLOCK_F,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_F,), tl.float32)
        acc = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            k, v, key_ok = _load_key_block(
                n0, end, b, h,
                k_ptr, stride_k_b, stride_k_n, stride_k_h, stride_k_d,
                v_ptr, stride_v_b, stride_v_n, stride_v_h, stride_v_d,
                mask_ptr, stride_mask_b, stride_mask_n, Dq, Dv, HAS_MASK, BLOCK_N, BLOCK_DQ, BLOCK_DV,
            )
            s = dot(q, tl.trans(k), DOT_PRECISION)
            s = tl.where(key_ok[None, :], s * scale, float("-inf"))  # (BLOCK_F, BLOCK_N)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m - m_ref)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION)
            m = m_new
        has_key = l != 0  # NaN scores keep their NaN (l > 0 would read them as "no key")
        o = acc / tl.where(has_key, l, 1.0)[:, None]
        lse = tl.where(has_key, m + tl.log(tl.where(has_key, l, 1.0)), float("-inf"))
        return o, lse

    @triton.jit
    def _av_pair_attention_fwd_kernel(
        q_ptr, stride_q_b, stride_q_f, stride_q_h, stride_q_d,
        ka_ptr, stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
        va_ptr, stride_va_b, stride_va_n, stride_va_h, stride_va_d,
        kv_ptr, stride_kv_b, stride_kv_n, stride_kv_h, stride_kv_d,
        vv_ptr, stride_vv_b, stride_vv_n, stride_vv_h, stride_vv_d,
        bias_ptr, stride_bias_h, stride_bias_d,
        mask_a_ptr, stride_mask_a_b, stride_mask_a_n,
        mask_v_ptr, stride_mask_v_b, stride_mask_v_n,
        out_ptr, stride_out_b, stride_out_f, stride_out_h,
        ohalf_ptr, stride_ohalf_s, stride_ohalf_b, stride_ohalf_f, stride_ohalf_h, stride_ohalf_x,
        lse_ptr, stride_lse_s, stride_lse_b, stride_lse_f, stride_lse_h,
        F, H, Na, Nv, Dq, Dv, scale, num_splits,
        HAS_BIAS: tl.constexpr, HAS_MASK_A: tl.constexpr, HAS_MASK_V: tl.constexpr,
        FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # program (b*H + h, F block, key split). FINAL: one split, write out / o_half / lse;
        # else write this split's partial o_half and lse at index `split` for the merge.
        bh = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors may pass 2^31 elements
        b = bh // H
        h = bh % H
        pid_f = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2).to(tl.int64)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_dq = tl.arange(0, BLOCK_DQ)
        offs_dv = tl.arange(0, BLOCK_DV)
        f_ok = offs_f < F
        q = tl.load(
            q_ptr + b * stride_q_b + h * stride_q_h + offs_f[:, None] * stride_q_f + offs_dq[None, :] * stride_q_d,
            mask=f_ok[:, None] & (offs_dq[None, :] < Dq), other=0.0,
        )  # (BLOCK_F, BLOCK_DQ)
        o_a, lse_a = _attend_half(
            q, b, h, split, num_splits, Na, scale,
            ka_ptr, stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
            va_ptr, stride_va_b, stride_va_n, stride_va_h, stride_va_d,
            mask_a_ptr, stride_mask_a_b, stride_mask_a_n, Dq, Dv,
            HAS_MASK_A, DOT_PRECISION, BLOCK_F, BLOCK_N, BLOCK_DQ, BLOCK_DV,
        )
        o_v, lse_v = _attend_half(
            q, b, h, split, num_splits, Nv, scale,
            kv_ptr, stride_kv_b, stride_kv_n, stride_kv_h, stride_kv_d,
            vv_ptr, stride_vv_b, stride_vv_n, stride_vv_h, stride_vv_d,
            mask_v_ptr, stride_mask_v_b, stride_mask_v_n, Dq, Dv,
            HAS_MASK_V, DOT_PRECISION, BLOCK_F, BLOCK_N, BLOCK_DQ, BLOCK_DV,
        )
        dv_ok = f_ok[:, None] & (offs_dv[None, :] < Dv)
        if FINAL:
            valid = (lse_a != float("-inf")) & (lse_v != float("-inf"))  # (BLOCK_F,); NaN stays valid
            o_a = tl.where(valid[:, None], o_a, 0.0)
            o_v = tl.where(valid[:, None], o_v, 0.0)
            lse_a = tl.where(valid, lse_a, float("inf"))
            lse_v = tl.where(valid, lse_v, float("inf"))
            out = o_a + o_v
            if HAS_BIAS:
                bias = tl.load(bias_ptr + h * stride_bias_h + offs_dv * stride_bias_d, mask=offs_dv < Dv, other=0.0)
                out += tl.where(valid[:, None], bias.to(tl.float32)[None, :], 0.0)
            tl.store(
                out_ptr + b * stride_out_b + h * stride_out_h + offs_f[:, None] * stride_out_f + offs_dv[None, :],
                out, mask=dv_ok,
            )
        row_half = split * stride_ohalf_s + b * stride_ohalf_b + h * stride_ohalf_h + offs_f[:, None] * stride_ohalf_f
        tl.store(ohalf_ptr + row_half + offs_dv[None, :], o_a, mask=dv_ok)
        tl.store(ohalf_ptr + row_half + stride_ohalf_x + offs_dv[None, :], o_v, mask=dv_ok)
        row_lse = split * stride_lse_s + b * stride_lse_b + h * stride_lse_h + offs_f * stride_lse_f
        tl.store(lse_ptr + row_lse, lse_a, mask=f_ok)
        tl.store(lse_ptr + row_lse + 1, lse_v, mask=f_ok)

    # Backward, per half, with P = exp(scale * q k^T - lse) (0 on padded keys and on rows
    # whose lse is +inf) and delta = rowsum(dout * o_half):
    #   dV = P^T dout,  dP = dout V^T,  dS = P * (dP - delta),
    #   dK = scale * dS^T Q,  dQ += scale * dS K.
    @triton.jit
    def _grad_half(
        q, do, o_ptr_row, lse_ptr_row, f_ok, b, h, split, num_splits, N, scale,
        k_ptr, stride_k_b, stride_k_n, stride_k_h, stride_k_d,
        v_ptr, stride_v_b, stride_v_n, stride_v_h, stride_v_d,
        mask_ptr, stride_mask_b, stride_mask_n,
        dk_ptr, stride_dk_s, stride_dk_b, stride_dk_n, stride_dk_h,
        dv_ptr, stride_dv_s, stride_dv_b, stride_dv_n, stride_dv_h,
        pid_f, Dq, Dv,
        HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        """Adds this F block's share of dK, dV for this split's keys of one half
        (written at index pid_f of dk_ptr / dv_ptr) and returns its dQ (BLOCK_F, BLOCK_DQ)."""
        offs_dq = tl.arange(0, BLOCK_DQ)
        offs_dv = tl.arange(0, BLOCK_DV)
        o = tl.load(o_ptr_row + offs_dv[None, :], mask=f_ok[:, None] & (offs_dv[None, :] < Dv), other=0.0)
        delta = tl.sum(do.to(tl.float32) * o, 1)  # (BLOCK_F,)
        lse = tl.load(lse_ptr_row, mask=f_ok, other=float("inf"))  # (BLOCK_F,)
        dq = tl.zeros((BLOCK_F, BLOCK_DQ), tl.float32)
        start, end = _key_range(N, split, num_splits, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            k, v, key_ok = _load_key_block(
                n0, end, b, h,
                k_ptr, stride_k_b, stride_k_n, stride_k_h, stride_k_d,
                v_ptr, stride_v_b, stride_v_n, stride_v_h, stride_v_d,
                mask_ptr, stride_mask_b, stride_mask_n, Dq, Dv, HAS_MASK, BLOCK_N, BLOCK_DQ, BLOCK_DV,
            )
            s = dot(q, tl.trans(k), DOT_PRECISION)
            p = tl.exp(s * scale - lse[:, None])
            p = tl.where(key_ok[None, :] & f_ok[:, None], p, 0.0)  # (BLOCK_F, BLOCK_N)
            dv = dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION)  # (BLOCK_N, BLOCK_DV)
            dp = dot(do, tl.trans(v), DOT_PRECISION)  # (BLOCK_F, BLOCK_N)
            ds = p * (dp - delta[:, None])  # (BLOCK_F, BLOCK_N)
            dk = dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_DQ)
            dq += dot(ds.to(k.dtype), k, DOT_PRECISION)
            tl.store(
                dk_ptr + pid_f * stride_dk_s + b * stride_dk_b + h * stride_dk_h
                + offs_n[:, None] * stride_dk_n + offs_dq[None, :],
                dk, mask=n_ok[:, None] & (offs_dq[None, :] < Dq),
            )
            tl.store(
                dv_ptr + pid_f * stride_dv_s + b * stride_dv_b + h * stride_dv_h
                + offs_n[:, None] * stride_dv_n + offs_dv[None, :],
                dv, mask=n_ok[:, None] & (offs_dv[None, :] < Dv),
            )
        return dq * scale

    @triton.jit
    def _av_pair_attention_bwd_kernel(
        do_ptr, stride_do_b, stride_do_f, stride_do_h, stride_do_d,
        q_ptr, stride_q_b, stride_q_f, stride_q_h, stride_q_d,
        ka_ptr, stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
        va_ptr, stride_va_b, stride_va_n, stride_va_h, stride_va_d,
        kv_ptr, stride_kv_b, stride_kv_n, stride_kv_h, stride_kv_d,
        vv_ptr, stride_vv_b, stride_vv_n, stride_vv_h, stride_vv_d,
        mask_a_ptr, stride_mask_a_b, stride_mask_a_n,
        mask_v_ptr, stride_mask_v_b, stride_mask_v_n,
        ohalf_ptr, stride_ohalf_b, stride_ohalf_f, stride_ohalf_h, stride_ohalf_x,
        lse_ptr, stride_lse_b, stride_lse_f, stride_lse_h,
        dq_ptr, stride_dq_s, stride_dq_b, stride_dq_f, stride_dq_h,
        dka_ptr, stride_dka_s, stride_dka_b, stride_dka_n, stride_dka_h,
        dva_ptr, stride_dva_s, stride_dva_b, stride_dva_n, stride_dva_h,
        dkv_ptr, stride_dkv_s, stride_dkv_b, stride_dkv_n, stride_dkv_h,
        dvv_ptr, stride_dvv_s, stride_dvv_b, stride_dvv_n, stride_dvv_h,
        F, H, Na, Nv, Dq, Dv, scale, num_splits,
        HAS_MASK_A: tl.constexpr, HAS_MASK_V: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # program (b*H + h, F block, key split): dK, dV of the split's keys from this F block
        # (index pid_f of the dk/dv buffers) and dQ of this F block from the split's keys
        # (index split of the dq buffer).
        bh = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors may pass 2^31 elements
        b = bh // H
        h = bh % H
        pid_f = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2).to(tl.int64)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_dq = tl.arange(0, BLOCK_DQ)
        offs_dv = tl.arange(0, BLOCK_DV)
        f_ok = offs_f < F
        q = tl.load(
            q_ptr + b * stride_q_b + h * stride_q_h + offs_f[:, None] * stride_q_f + offs_dq[None, :] * stride_q_d,
            mask=f_ok[:, None] & (offs_dq[None, :] < Dq), other=0.0,
        )  # (BLOCK_F, BLOCK_DQ)
        do = tl.load(
            do_ptr + b * stride_do_b + h * stride_do_h + offs_f[:, None] * stride_do_f + offs_dv[None, :] * stride_do_d,
            mask=f_ok[:, None] & (offs_dv[None, :] < Dv), other=0.0,
        ).to(q.dtype)  # (BLOCK_F, BLOCK_DV)
        o_row = ohalf_ptr + b * stride_ohalf_b + h * stride_ohalf_h + offs_f[:, None] * stride_ohalf_f
        lse_row = lse_ptr + b * stride_lse_b + h * stride_lse_h + offs_f * stride_lse_f
        dq = _grad_half(
            q, do, o_row, lse_row, f_ok, b, h, split, num_splits, Na, scale,
            ka_ptr, stride_ka_b, stride_ka_n, stride_ka_h, stride_ka_d,
            va_ptr, stride_va_b, stride_va_n, stride_va_h, stride_va_d,
            mask_a_ptr, stride_mask_a_b, stride_mask_a_n,
            dka_ptr, stride_dka_s, stride_dka_b, stride_dka_n, stride_dka_h,
            dva_ptr, stride_dva_s, stride_dva_b, stride_dva_n, stride_dva_h,
            pid_f, Dq, Dv, HAS_MASK_A, DOT_PRECISION, BLOCK_F, BLOCK_N, BLOCK_DQ, BLOCK_DV,
        )
        dq += _grad_half(
            q, do, o_row + stride_ohalf_x, lse_row + 1, f_ok, b, h, split, num_splits, Nv, scale,
            kv_ptr, stride_kv_b, stride_kv_n, stride_kv_h, stride_kv_d,
            vv_ptr, stride_vv_b, stride_vv_n, stride_vv_h, stride_vv_d,
            mask_v_ptr, stride_mask_v_b, stride_mask_v_n,
            dkv_ptr, stride_dkv_s, stride_dkv_b, stride_dkv_n, stride_dkv_h,
            dvv_ptr, stride_dvv_s, stride_dvv_b, stride_dvv_n, stride_dvv_h,
            pid_f, Dq, Dv, HAS_MASK_V, DOT_PRECISION, BLOCK_F, BLOCK_N, BLOCK_DQ, BLOCK_DV,
        )
        tl.store(
            dq_ptr + split * stride_dq_s + b * stride_dq_b + h * stride_dq_h
            + offs_f[:, None] * stride_dq_f + offs_dq[None, :],
            dq, mask=f_ok[:, None] & (offs_dq[None, :] < Dq),
        )


def _num_splits(programs: int, n_keys: int, device: torch.device) -> int:
    """Key splits so that about MIN_PROGRAMS programs run; 1 off the GPU."""
    if device.type != "cuda" or programs >= MIN_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(n_keys, BLOCK_N), triton.cdiv(MIN_PROGRAMS, programs)))


def _num_stages(q: Tensor, Dq: int, Dv: int) -> int:
    """One pipeline stage for wide fp32 heads (> 128), whose tiles would not fit three."""
    return 1 if q.element_size() * max(pow2(Dq), pow2(Dv)) > 512 else 3


def _mask_arg(mask: Tensor | None) -> tuple:
    if mask is None:
        return (None, 0, 0)
    m = mask.view(torch.uint8)
    return (m, *m.stride())


def av_pair_attention_fwd(
    q: Tensor, k_a: Tensor, v_a: Tensor, k_v: Tensor, v_v: Tensor,
    v_bias: Tensor | None, key_padding_mask_a: Tensor | None, key_padding_mask_v: Tensor | None,
    scale: float, num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward launcher: returns (out (B, F, H, Dv), o_half (B, F, H, 2, Dv) fp32,
    lse (B, F, H, 2) fp32) as in the reference contract."""
    B, F, H, Dq = q.shape
    Na, Nv, Dv = k_a.shape[1], k_v.shape[1], v_a.shape[-1]
    block_f = min(pow2(F), MAX_BLOCK_F)
    grid_f = triton.cdiv(F, block_f)
    if num_splits is None:
        num_splits = _num_splits(grid_f * B * H, max(Na, Nv), q.device)
    final = num_splits == 1
    out = torch.empty(B, F, H, Dv, device=q.device, dtype=q.dtype)
    o_half = torch.empty(num_splits, B, F, H, 2, Dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(num_splits, B, F, H, 2, device=q.device, dtype=torch.float32)
    with on_device(q):
        _av_pair_attention_fwd_kernel[(B * H, grid_f, num_splits)](
            q, *q.stride(), k_a, *k_a.stride(), v_a, *v_a.stride(), k_v, *k_v.stride(), v_v, *v_v.stride(),
            v_bias, *_strides(v_bias, 2),
            *_mask_arg(key_padding_mask_a), *_mask_arg(key_padding_mask_v),
            out, *out.stride()[:3],
            o_half, *o_half.stride()[:5], lse, *lse.stride()[:4],
            F, H, Na, Nv, Dq, Dv, scale, num_splits,
            HAS_BIAS=v_bias is not None,
            HAS_MASK_A=key_padding_mask_a is not None, HAS_MASK_V=key_padding_mask_v is not None,
            FINAL=final, DOT_PRECISION=dot_precision(q),
            BLOCK_F=block_f, BLOCK_N=BLOCK_N, BLOCK_DQ=pow2(Dq), BLOCK_DV=pow2(Dv),
            num_stages=_num_stages(q, Dq, Dv),
        )
    if final:
        return out, o_half[0], lse[0]
    return _merge_splits(o_half, lse, v_bias, q.dtype)


def _merge_splits(
    o_part: Tensor, lse_part: Tensor, v_bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Merges per-split o_half (S, B, F, H, 2, Dv) and lse (S, B, F, H, 2) by log-sum-exp."""
    lse = torch.logsumexp(lse_part, dim=0)  # (B, F, H, 2), -inf where no split has a key
    weight = torch.exp(lse_part - lse.clamp_min(torch.finfo(torch.float32).min))
    o_half = (weight[..., None] * o_part).sum(dim=0)
    valid = (lse != -torch.inf).all(dim=-1)  # (B, F, H); NaN stays valid (it propagates)
    o_half = o_half * valid[..., None, None]
    lse = torch.where(valid[..., None], lse, torch.inf)
    out = o_half.sum(dim=3)
    if v_bias is not None:
        out = out + v_bias.float() * valid[..., None]
    return out.to(dtype), o_half, lse


def av_pair_attention_bwd(
    dout: Tensor, q: Tensor, k_a: Tensor, v_a: Tensor, k_v: Tensor, v_v: Tensor,
    key_padding_mask_a: Tensor | None, key_padding_mask_v: Tensor | None,
    o_half: Tensor, lse: Tensor, scale: float, num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward launcher: gradients of q, k_a, v_a, k_v, v_v in their dtypes."""
    B, F, H, Dq = q.shape
    Na, Nv, Dv = k_a.shape[1], k_v.shape[1], v_a.shape[-1]
    block_f = min(pow2(F), MAX_BLOCK_F)
    grid_f = triton.cdiv(F, block_f)
    if num_splits is None:
        num_splits = _num_splits(grid_f * B * H, max(Na, Nv), q.device)

    def grad_buffer(like: Tensor, parts: int) -> Tensor:
        # direct output when one program writes each element, else fp32 partials to sum
        if parts == 1:
            return torch.empty((1, *like.shape), device=like.device, dtype=like.dtype)
        return torch.empty((parts, *like.shape), device=like.device, dtype=torch.float32)

    o_half, lse = o_half.contiguous(), lse.contiguous()  # the kernel reads their last dims densely
    dq = grad_buffer(q, num_splits)
    dk_a, dv_a, dk_v, dv_v = (grad_buffer(t, grid_f) for t in (k_a, v_a, k_v, v_v))
    with on_device(q):
        _av_pair_attention_bwd_kernel[(B * H, grid_f, num_splits)](
            dout, *dout.stride(), q, *q.stride(),
            k_a, *k_a.stride(), v_a, *v_a.stride(), k_v, *k_v.stride(), v_v, *v_v.stride(),
            *_mask_arg(key_padding_mask_a), *_mask_arg(key_padding_mask_v),
            o_half, *o_half.stride()[:4], lse, *lse.stride()[:3],
            dq, *dq.stride()[:4], dk_a, *dk_a.stride()[:4], dv_a, *dv_a.stride()[:4],
            dk_v, *dk_v.stride()[:4], dv_v, *dv_v.stride()[:4],
            F, H, Na, Nv, Dq, Dv, scale, num_splits,
            HAS_MASK_A=key_padding_mask_a is not None, HAS_MASK_V=key_padding_mask_v is not None,
            DOT_PRECISION=dot_precision(q),
            BLOCK_F=block_f, BLOCK_N=BLOCK_N, BLOCK_DQ=pow2(Dq), BLOCK_DV=pow2(Dv),
            num_stages=_num_stages(q, Dq, Dv),
        )
    grads = [g[0] if g.shape[0] == 1 else g.sum(dim=0).to(t.dtype)
             for g, t in zip((dq, dk_a, dv_a, dk_v, dv_v), (q, k_a, v_a, k_v, v_v))]
    return tuple(grads)
