"""Triton kernels for STG-CMA's two-way adapter attention (backend contract of
``avfast.reference.av_adapter_attention``: ``av_adapter_attention_fwd`` / ``_bwd``).

One program per frame n does both directions: it holds the tokens of one modality
("x", the shorter one) and streams the other ("y") in tiles. With S = scale y x^T per
tile, the y rows take their softmax over the x held in registers, and the x rows keep an
online softmax over the y tiles, so the scores are computed once for both directions.
Dims: N frames, Lx/Ly held/streamed tokens, r bottleneck width. Inputs come checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avfast.kernels.triton import has_triton
from avfast.kernels.triton.common import on_device, pow2, dot_precision

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
        Lx, Ly, R, scale,
        DOT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program n: frame n, both directions
        n = tl.program_id(0).to(tl.int64)
        offs_x = tl.arange(0, BLOCK_X)
        x_ok = offs_x < Lx
        x = _load_tokens(x_ptr, stride_x_n, stride_x_l, stride_x_r, n, offs_x, Lx, R, BLOCK_R)  # (BLOCK_X, BLOCK_R)
        g_x = tl.load(gx_ptr + n * stride_gx)
        g_y = tl.load(gy_ptr + n * stride_gy)
        m_x = tl.full((BLOCK_X,), float("-inf"), tl.float32)
        l_x = tl.zeros((BLOCK_X,), tl.float32)
        acc_x = tl.zeros((BLOCK_X, BLOCK_R), tl.float32)
        for y0 in range(0, Ly, BLOCK_Y):
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
        dx_ptr, dy_ptr,
        Lx, Ly, R, scale,
        DOT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program n: frame n; dx accumulates over the y tiles, dy is written per tile
        n = tl.program_id(0).to(tl.int64)
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
        gx = g_x * dout_x.to(tl.float32)  # (BLOCK_X, BLOCK_R)
        delta_x = tl.sum(gx * o_x, 1)
        dx = tl.zeros((BLOCK_X, BLOCK_R), tl.float32)
        for y0 in range(0, Ly, BLOCK_Y):
            offs_y = y0 + tl.arange(0, BLOCK_Y)
            y_ok = offs_y < Ly
            yr_ok = y_ok[:, None] & (offs_r[None, :] < R)
            y = _load_tokens(y_ptr, stride_y_n, stride_y_l, stride_y_r, n, offs_y, Ly, R, BLOCK_R)
            dout_y = _load_tokens(dout_y_ptr, stride_doy_n, stride_doy_l, stride_doy_r, n, offs_y, Ly, R, BLOCK_R)
            o_y = tl.load(o_y_ptr + n * Ly * R + offs_y[:, None] * R + offs_r[None, :], mask=yr_ok, other=0.0)
            lse_y = tl.load(lse_y_ptr + n * Ly + offs_y, mask=y_ok, other=0.0)
            gy = g_y * dout_y.to(tl.float32)  # (BLOCK_Y, BLOCK_R)
            delta_y = tl.sum(gy * o_y, 1)
            pair_ok = y_ok[:, None] & x_ok[None, :]
            s = dot(y, tl.trans(x), DOT_PRECISION) * scale  # (BLOCK_Y, BLOCK_X)
            p_y = tl.where(pair_ok, tl.exp(s - lse_y[:, None]), 0.0)
            p_xt = tl.where(pair_ok, tl.exp(s - lse_x[None, :]), 0.0)
            ds_y = p_y * (dot(gy.to(x.dtype), tl.trans(x), DOT_PRECISION) - delta_y[:, None])
            ds_xt = p_xt * (dot(y, tl.trans(gx.to(y.dtype)), DOT_PRECISION) - delta_x[None, :])
            ds = (ds_y + ds_xt) * scale
            dy = dout_y.to(tl.float32) + dot(p_xt.to(x.dtype), gx.to(x.dtype), DOT_PRECISION) + dot(ds.to(x.dtype), x, DOT_PRECISION)
            _store_rows(dy_ptr, n, offs_y, Ly, R, dy, BLOCK_R)
            dx += dot(tl.trans(p_y.to(y.dtype)), gy.to(y.dtype), DOT_PRECISION)
            dx += dot(tl.trans(ds.to(y.dtype)), y, DOT_PRECISION)
        _store_rows(dx_ptr, n, offs_x, Lx, R, dout_x.to(tl.float32) + dx, BLOCK_R)


def _roles(h_a: Tensor, h_v: Tensor) -> bool:
    """True when audio is the held side x (it is the shorter one)."""
    return h_a.shape[1] <= h_v.shape[1]


MAX_WIDTH = 128  # r beyond this (Swin's wide adapters) exceeds shared memory here: use cuda


def _blocks(Lx: int, Ly: int, R: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_X, BLOCK_Y, BLOCK_R, num_stages), smaller for wide fp32 tiles."""
    if R > MAX_WIDTH:
        raise ValueError(f"av_adapter_attention: the triton kernels take r <= {MAX_WIDTH}, got r={R}; "
                         "use the cuda or reference backend (AVFAST_BACKEND)")
    wide = element_size * pow2(R) > 128
    return pow2(Lx), min(BLOCK_Y // 2 if wide else BLOCK_Y, pow2(Ly)), pow2(R), 1 if wide else 3


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
    block_x, block_y, block_r, num_stages = _blocks(x.shape[1], y.shape[1], R, x.element_size())
    with on_device(h_a):
        _av_adapter_fwd_kernel[(N,)](
            x, *x.stride(), y, *y.stride(), gx, gx.stride(0), gy, gy.stride(0), *outs,
            x.shape[1], y.shape[1], R, scale,
            DOT_PRECISION=dot_precision(h_a), BLOCK_X=block_x, BLOCK_Y=block_y, BLOCK_R=block_r, num_stages=num_stages,
        )
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
    block_x, block_y, block_r, num_stages = _blocks(x.shape[1], y.shape[1], R, x.element_size())
    with on_device(h_a):
        _av_adapter_bwd_kernel[(N,)](
            dout_x, *dout_x.stride(), dout_y, *dout_y.stride(), x, *x.stride(), y, *y.stride(),
            gx, gx.stride(0), gy, gy.stride(0), o_x, o_y, lse_x, lse_y, dx, dy,
            x.shape[1], y.shape[1], R, scale,
            DOT_PRECISION=dot_precision(h_a), BLOCK_X=block_x, BLOCK_Y=block_y, BLOCK_R=block_r, num_stages=num_stages,
        )
    dgate_a = (dout_a.float() * o_a).sum(dim=(1, 2))
    dgate_v = (dout_v.float() * o_v).sum(dim=(1, 2))
    return dh_a, dh_v, dgate_a, dgate_v
