"""Triton kernels for STG-CMA's two-way adapter attention (backend contract of
``avfast.reference.av_adapter_attention``: ``av_adapter_attention_fwd`` / ``_bwd``).

A program (frame n, split of the y tokens) does both directions: it holds the tokens of
one modality ("x", the shorter one) and streams its share of the other ("y") in tiles. With S = scale y x^T per
tile, the y rows take their softmax over the x held in registers, and the x rows keep an
online softmax over the y tiles, so the scores are computed once for both directions.
Few frames (STG-CMA's 20-40) split the y tokens over several programs so the launch
covers the SMs; the x side's partial softmax states (or, backward, partial dx) are then
merged by the launcher.
Dims: N frames, Lx/Ly held/streamed tokens, r bottleneck width. Inputs come checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avfast.kernels.triton import ADAPTER_MAX_WIDTH, has_triton
from avfast.kernels.triton.common import dot_precision, on_device, pow2, sm_count

BLOCK_Y = 64  # streamed tokens per step

if has_triton():
    import triton
    import triton.language as tl

    from avfast.kernels.triton.common import dot

    @triton.jit
    def _load_tokens(ptr, stride_n, stride_l, stride_r, n, offs_l, L, R, BLOCK_R: tl.constexpr):
        offs_r = tl.arange(0, BLOCK_R)
        return tl.load(
            ptr + n * stride_n + offs_l[:, None] * stride_l + offs_r[None, :] * stride_r,
            mask=(offs_l[:, None] < L) & (offs_r[None, :] < R), other=0.0,
        )

    @triton.jit
    def _store_rows(ptr, n, offs_l, L, R, value, BLOCK_R: tl.constexpr):
        """Stores value (len(offs_l), BLOCK_R) into a contiguous (N, L, R) tensor."""
        offs_r = tl.arange(0, BLOCK_R)
        tl.store(ptr + n * L * R + offs_l[:, None] * R + offs_r[None, :], value,
                 mask=(offs_l[:, None] < L) & (offs_r[None, :] < R))

    @triton.jit
    def _av_adapter_fwd_kernel(
        x_ptr, stride_x_n, stride_x_l, stride_x_r,
        y_ptr, stride_y_n, stride_y_l, stride_y_r,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        out_x_ptr, out_y_ptr, o_x_ptr, o_y_ptr, lse_x_ptr, lse_y_ptr,
        m_part_ptr, l_part_ptr, acc_part_ptr,
        N, Lx, Ly, R, scale, y_per_split,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program (frame n, split): its y tokens completely, the x rows' partial softmax
        n = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        y_start = split * y_per_split
        offs_x = tl.arange(0, BLOCK_X)
        x_ok = offs_x < Lx
        x = _load_tokens(x_ptr, stride_x_n, stride_x_l, stride_x_r, n, offs_x, Lx, R, BLOCK_R)  # (BLOCK_X, BLOCK_R)
        g_x = tl.load(gx_ptr + n * stride_gx)
        g_y = tl.load(gy_ptr + n * stride_gy)
        m_x = tl.full((BLOCK_X,), float("-inf"), tl.float32)
        l_x = tl.zeros((BLOCK_X,), tl.float32)
        acc_x = tl.zeros((BLOCK_X, BLOCK_R), tl.float32)
        for y0 in range(y_start, tl.minimum(y_start + y_per_split, Ly), BLOCK_Y):
            offs_y = y0 + tl.arange(0, BLOCK_Y)
            y_ok = offs_y < Ly
            y = _load_tokens(y_ptr, stride_y_n, stride_y_l, stride_y_r, n, offs_y, Ly, R, BLOCK_R)  # (BLOCK_Y, BLOCK_R)
            s = dot(y, tl.trans(x), DOT_PRECISION) * scale
            s = tl.where(y_ok[:, None] & x_ok[None, :], s, float("-inf"))  # (BLOCK_Y, BLOCK_X)
            # y rows: softmax over all of x, in this tile
            m_y = tl.where(y_ok, tl.max(s, 1), 0.0)
            p_y = tl.exp(s - m_y[:, None])
            l_y = tl.where(y_ok, tl.sum(p_y, 1), 1.0)
            o_y = dot(p_y.to(x.dtype), x, DOT_PRECISION) / l_y[:, None]  # (BLOCK_Y, BLOCK_R)
            _store_rows(o_y_ptr, n, offs_y, Ly, R, o_y, BLOCK_R)
            _store_rows(out_y_ptr, n, offs_y, Ly, R, y.to(tl.float32) + g_y * o_y, BLOCK_R)
            tl.store(lse_y_ptr + n * Ly + offs_y, m_y + tl.log(l_y), mask=y_ok)
            # x rows: online softmax over the y tiles (columns of s)
            m_new = tl.maximum(m_x, tl.max(s, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p_x = tl.exp(s - m_ref[None, :])  # (BLOCK_Y, BLOCK_X)
            alpha = tl.exp(m_x - m_ref)
            l_x = l_x * alpha + tl.sum(p_x, 0)
            acc_x = acc_x * alpha[:, None] + dot(tl.trans(p_x.to(y.dtype)), y, DOT_PRECISION)
            m_x = m_new
        if SPLIT:  # partial state (m, l, acc) of split s at [s N + n], merged by the launcher
            part = split * N + n
            tl.store(m_part_ptr + part * Lx + offs_x, m_x, mask=x_ok)
            tl.store(l_part_ptr + part * Lx + offs_x, l_x, mask=x_ok)
            _store_rows(acc_part_ptr, part, offs_x, Lx, R, acc_x, BLOCK_R)
        else:
            l_safe = tl.where(x_ok, l_x, 1.0)
            o_x = acc_x / l_safe[:, None]
            _store_rows(o_x_ptr, n, offs_x, Lx, R, o_x, BLOCK_R)
            _store_rows(out_x_ptr, n, offs_x, Lx, R, x.to(tl.float32) + g_x * o_x, BLOCK_R)
            tl.store(lse_x_ptr + n * Lx + offs_x, tl.where(x_ok, m_x, 0.0) + tl.log(l_safe), mask=x_ok)

    # Backward per frame, S = scale y x^T, P_y = exp(S - lse_y), P_x^T = exp(S - lse_x),
    # G = gate * dout, delta = rowsum(G * o):
    #   dS = scale (P_y (G_y x^T - delta_y) + P_x^T (y G_x^T - delta_x^T))
    #   dy = dout_y + P_x^T G_x + dS x,   dx = dout_x + P_y^T G_y + dS^T y
    @triton.jit
    def _av_adapter_bwd_kernel(
        dout_x_ptr, stride_dox_n, stride_dox_l, stride_dox_r,
        dout_y_ptr, stride_doy_n, stride_doy_l, stride_doy_r,
        x_ptr, stride_x_n, stride_x_l, stride_x_r,
        y_ptr, stride_y_n, stride_y_l, stride_y_r,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        o_x_ptr, o_y_ptr, lse_x_ptr, lse_y_ptr,
        dx_ptr, dy_ptr, dx_part_ptr,
        N, Lx, Ly, R, scale, y_per_split,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program (frame n, split): dy of its y tiles; dx accumulated over them (a partial
        # sum at [split N + n] when the y tokens are split)
        n = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        y_start = split * y_per_split
        offs_x = tl.arange(0, BLOCK_X)
        offs_r = tl.arange(0, BLOCK_R)
        x_ok = offs_x < Lx
        xr_ok = x_ok[:, None] & (offs_r[None, :] < R)
        x = _load_tokens(x_ptr, stride_x_n, stride_x_l, stride_x_r, n, offs_x, Lx, R, BLOCK_R)
        dout_x = _load_tokens(dout_x_ptr, stride_dox_n, stride_dox_l, stride_dox_r, n, offs_x, Lx, R, BLOCK_R)
        o_x = tl.load(o_x_ptr + n * Lx * R + offs_x[:, None] * R + offs_r[None, :], mask=xr_ok, other=0.0)
        lse_x = tl.load(lse_x_ptr + n * Lx + offs_x, mask=x_ok, other=0.0)
        g_x = tl.load(gx_ptr + n * stride_gx)
        g_y = tl.load(gy_ptr + n * stride_gy)
        # G in the inputs' dtype, the operand of the dP dots; delta from the same rounded G,
        # so that dP - delta cancels exactly where it should (a softmax over one key)
        gx = (g_x * dout_x.to(tl.float32)).to(x.dtype)  # (BLOCK_X, BLOCK_R)
        delta_x = tl.sum(gx.to(tl.float32) * o_x, 1)
        dx = tl.zeros((BLOCK_X, BLOCK_R), tl.float32)
        for y0 in range(y_start, tl.minimum(y_start + y_per_split, Ly), BLOCK_Y):
            offs_y = y0 + tl.arange(0, BLOCK_Y)
            y_ok = offs_y < Ly
            yr_ok = y_ok[:, None] & (offs_r[None, :] < R)
            y = _load_tokens(y_ptr, stride_y_n, stride_y_l, stride_y_r, n, offs_y, Ly, R, BLOCK_R)
            dout_y = _load_tokens(dout_y_ptr, stride_doy_n, stride_doy_l, stride_doy_r, n, offs_y, Ly, R, BLOCK_R)
            o_y = tl.load(o_y_ptr + n * Ly * R + offs_y[:, None] * R + offs_r[None, :], mask=yr_ok, other=0.0)
            lse_y = tl.load(lse_y_ptr + n * Ly + offs_y, mask=y_ok, other=0.0)
            gy = (g_y * dout_y.to(tl.float32)).to(y.dtype)  # (BLOCK_Y, BLOCK_R)
            delta_y = tl.sum(gy.to(tl.float32) * o_y, 1)
            pair_ok = y_ok[:, None] & x_ok[None, :]
            s = dot(y, tl.trans(x), DOT_PRECISION) * scale  # (BLOCK_Y, BLOCK_X)
            p_y = tl.where(pair_ok, tl.exp(s - lse_y[:, None]), 0.0)
            p_xt = tl.where(pair_ok, tl.exp(s - lse_x[None, :]), 0.0)
            ds_y = p_y * (dot(gy, tl.trans(x), DOT_PRECISION) - delta_y[:, None])
            ds_xt = p_xt * (dot(y, tl.trans(gx), DOT_PRECISION) - delta_x[None, :])
            ds = (ds_y + ds_xt) * scale
            dy = dout_y.to(tl.float32) + dot(p_xt.to(x.dtype), gx, DOT_PRECISION) + dot(ds.to(x.dtype), x, DOT_PRECISION)
            _store_rows(dy_ptr, n, offs_y, Ly, R, dy, BLOCK_R)
            dx += dot(tl.trans(p_y.to(y.dtype)), gy, DOT_PRECISION)
            dx += dot(tl.trans(ds.to(y.dtype)), y, DOT_PRECISION)
        if SPLIT:
            _store_rows(dx_part_ptr, split * N + n, offs_x, Lx, R, dx, BLOCK_R)
        else:
            _store_rows(dx_ptr, n, offs_x, Lx, R, dout_x.to(tl.float32) + dx, BLOCK_R)


def _roles(h_a: Tensor, h_v: Tensor) -> bool:
    """True when audio is the held side x (it is the shorter one)."""
    return h_a.shape[1] <= h_v.shape[1]


MAX_WIDTH = ADAPTER_MAX_WIDTH  # wider r: the cuda or reference backend


def _plan(
    N: int, Lx: int, Ly: int, R: int, element_size: int, sms: int, backward: bool = False,
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_X, BLOCK_Y, BLOCK_R, num_stages, splits, y_per_split): 64-token y tiles (32
    for the backward, whose five live score-sized tiles spill at 64 in bf16, for wide fp32
    tiles, or when 64 leave SMs idle), and the y tokens split over programs until the
    launch covers the SMs twice (or each program has one y tile)."""
    if R > MAX_WIDTH:
        raise ValueError(f"av_adapter_attention: the triton kernels take r <= {MAX_WIDTH}, got r={R}; "
                         "use the cuda or reference backend (AVFAST_BACKEND)")
    wide = element_size * pow2(R) > 128
    small = backward or wide or N * triton.cdiv(Ly, BLOCK_Y) < sms
    block_y = min(BLOCK_Y // 2 if small else BLOCK_Y, pow2(Ly))
    y_tiles = triton.cdiv(Ly, block_y)
    splits = max(1, min(y_tiles, triton.cdiv(2 * sms, N)))
    y_per_split = triton.cdiv(y_tiles, splits) * block_y
    return pow2(Lx), block_y, pow2(R), 1 if wide else 3, triton.cdiv(Ly, y_per_split), y_per_split


def _merge_x(m_part: Tensor, l_part: Tensor, acc_part: Tensor) -> tuple[Tensor, Tensor]:
    """The x rows' softmax from per-split states (S, N, Lx[, R]): (o_x, lse_x), fp32."""
    m = m_part.amax(0)
    w = torch.exp(m_part - m)
    l_sum = (l_part * w).sum(0)
    return (acc_part * w[..., None]).sum(0) / l_sum[..., None], m + torch.log(l_sum)


def av_adapter_attention_fwd(
    h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward launcher: (out_a, out_v, o_a, o_v, lse_a, lse_v) as the reference contract."""
    N, La, R = h_a.shape
    Lv = h_v.shape[1]
    dev = h_a.device
    out_a = torch.empty(N, La, R, device=dev, dtype=h_a.dtype)
    out_v = torch.empty(N, Lv, R, device=dev, dtype=h_v.dtype)
    o_a, o_v = (torch.empty(N, L, R, device=dev, dtype=torch.float32) for L in (La, Lv))
    lse_a, lse_v = (torch.empty(N, L, device=dev, dtype=torch.float32) for L in (La, Lv))
    audio_held = _roles(h_a, h_v)
    x, y = (h_a, h_v) if audio_held else (h_v, h_a)
    gx, gy = (gate_a, gate_v) if audio_held else (gate_v, gate_a)
    outs = (out_a, out_v, o_a, o_v, lse_a, lse_v) if audio_held else (out_v, out_a, o_v, o_a, lse_v, lse_a)
    Lx, Ly = x.shape[1], y.shape[1]
    block_x, block_y, block_r, num_stages, splits, y_per_split = _plan(
        N, Lx, Ly, R, x.element_size(), sm_count(h_a))
    m_part, l_part = (torch.empty(splits, N, Lx, device=dev, dtype=torch.float32) for _ in range(2))
    acc_part = torch.empty(splits, N, Lx, R, device=dev, dtype=torch.float32) if splits > 1 else m_part
    with on_device(h_a):
        _av_adapter_fwd_kernel[(N, splits)](
            x, *x.stride(), y, *y.stride(), gx, gx.stride(0), gy, gy.stride(0), *outs,
            m_part, l_part, acc_part, N, Lx, Ly, R, scale, y_per_split,
            SPLIT=splits > 1, DOT_PRECISION=dot_precision(h_a),
            BLOCK_X=block_x, BLOCK_Y=block_y, BLOCK_R=block_r, num_stages=num_stages,
        )
    if splits > 1:
        out_x, o_x, lse_x = outs[0], outs[2], outs[4]
        merged_o, merged_lse = _merge_x(m_part, l_part, acc_part)
        o_x.copy_(merged_o)
        lse_x.copy_(merged_lse)
        out_x.copy_(x.float() + gx.float()[:, None, None] * merged_o)
    return out_a, out_v, o_a, o_v, lse_a, lse_v


def av_adapter_attention_bwd(
    dout_a: Tensor, dout_v: Tensor, h_a: Tensor, h_v: Tensor, gate_a: Tensor, gate_v: Tensor,
    o_a: Tensor, o_v: Tensor, lse_a: Tensor, lse_v: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward launcher: (dh_a, dh_v, dgate_a (N,), dgate_v (N,)) as the reference contract."""
    N, La, R = h_a.shape
    dh_a = torch.empty(N, La, R, device=h_a.device, dtype=h_a.dtype)
    dh_v = torch.empty(N, h_v.shape[1], R, device=h_v.device, dtype=h_v.dtype)
    audio_held = _roles(h_a, h_v)
    if audio_held:
        args = (dout_a, dout_v, h_a, h_v, gate_a, gate_v, o_a, o_v, lse_a, lse_v, dh_a, dh_v)
    else:
        args = (dout_v, dout_a, h_v, h_a, gate_v, gate_a, o_v, o_a, lse_v, lse_a, dh_v, dh_a)
    dout_x, dout_y, x, y, gx, gy, o_x, o_y, lse_x, lse_y, dx, dy = args
    Lx, Ly = x.shape[1], y.shape[1]
    block_x, block_y, block_r, num_stages, splits, y_per_split = _plan(
        N, Lx, Ly, R, x.element_size(), sm_count(h_a), backward=True)
    dx_part = torch.empty(splits, N, Lx, R, device=h_a.device, dtype=torch.float32) if splits > 1 else dx
    with on_device(h_a):
        _av_adapter_bwd_kernel[(N, splits)](
            dout_x, *dout_x.stride(), dout_y, *dout_y.stride(), x, *x.stride(), y, *y.stride(),
            gx, gx.stride(0), gy, gy.stride(0), o_x, o_y, lse_x, lse_y, dx, dy, dx_part,
            N, Lx, Ly, R, scale, y_per_split,
            SPLIT=splits > 1, DOT_PRECISION=dot_precision(h_a),
            BLOCK_X=block_x, BLOCK_Y=block_y, BLOCK_R=block_r, num_stages=num_stages,
        )
    if splits > 1:
        dx.copy_(dout_x.float() + dx_part.sum(0))
    dgate_a = (dout_a.float() * o_a).sum(dim=(1, 2))
    dgate_v = (dout_v.float() * o_v).sum(dim=(1, 2))
    return dh_a, dh_v, dgate_a, dgate_v
