"""Triton kernels for the scaled-cosine log-sum-exps behind the blockwise InfoNCE loss
(backend contract of ``avfast.reference.blockwise_infonce.cosine_lse``).

S_ij = cos(x_i, y_j) / tau for each block k; X rows (K, Bx, d), Y columns (K, By, d).
The forward streams column tiles past a row tile (L2 normalization fused, no Bx x By
matrix stored) and produces, in one pass, the row log-sum-exps (online softmax in
registers), the column log-sum-exps and the shifted diagonal. Column sums from all row
tiles meet in a float64 buffer through atomic adds, each term taken relative to the
bound S <= 1/tau, which float64 holds without underflow for tau >= 0.003.
All K blocks go in one launch (program_id 0). Inputs come checked (avfast.ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avfast.kernels.triton import has_triton
from avfast.kernels.triton.common import on_device, pow2, use_fp32_dot

NORM_EPS = 1e-12  # as F.normalize
TILE_ELEMENTS = 32 * 1024  # rows x padded d per tile, a register budget (untuned)

if has_triton():
    import triton
    import triton.language as tl

    from avfast.kernels.triton.common import dot

    @triton.jit
    def _load_unit_rows(ptr, stride_k, stride_b, stride_d, k, offs, n, D, BLOCK_D: tl.constexpr):
        """Rows offs of block k: raw tile (len(offs), BLOCK_D), zero outside, and 1/max(|row|, eps)."""
        offs_d = tl.arange(0, BLOCK_D)
        z = tl.load(
            ptr + k * stride_k + offs[:, None] * stride_b + offs_d[None, :] * stride_d,
            mask=(offs[:, None] < n) & (offs_d[None, :] < D), other=0.0,
        )
        zf = z.to(tl.float32)
        norm = tl.sqrt(tl.sum(zf * zf, 1))
        return z, 1.0 / tl.maximum(norm, 1e-12), norm

    @triton.jit
    def _valid(ptr, offs, n, HAS_VALID: tl.constexpr):
        ok = offs < n
        if HAS_VALID:
            ok = ok & (tl.load(ptr + offs, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _cosine_lse_fwd_kernel(
        x_ptr, stride_x_k, stride_x_b, stride_x_d,
        y_ptr, stride_y_k, stride_y_b, stride_y_d,
        valid_x_ptr, valid_y_ptr,
        lse_x_ptr, diag_ptr, colsum_ptr,
        Bx, By, D, inv_tau, shift,
        HAS_VALID_X: tl.constexpr, HAS_VALID_Y: tl.constexpr, WITH_COL: tl.constexpr,
        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (block k, tile of BLOCK_M rows): streams every column tile once.
        k = tl.program_id(0).to(tl.int64)  # int64: k * stride_k passes 2^31 at K12 x B262144 x d768
        offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = _valid(valid_x_ptr, offs_m, Bx, HAS_VALID_X)
        x, rinv_x, _norm_x = _load_unit_rows(x_ptr, stride_x_k, stride_x_b, stride_x_d, k, offs_m, Bx, D, BLOCK_D)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        diag = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, By, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = _valid(valid_y_ptr, offs_n, By, HAS_VALID_Y)
            y, rinv_y, _norm_y = _load_unit_rows(y_ptr, stride_y_k, stride_y_b, stride_y_d, k, offs_n, By, D, BLOCK_D)
            pair_ok = m_ok[:, None] & n_ok[None, :]
            s = dot(x, tl.trans(y), FP32_DOT) * (rinv_x[:, None] * rinv_y[None, :] * inv_tau)
            s = tl.where(pair_ok, s, float("-inf"))  # (BLOCK_M, BLOCK_N)
            is_diag = pair_ok & (offs_n[None, :] == offs_m[:, None] + shift)
            diag += tl.sum(tl.where(is_diag, s, 0.0), 1)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
            m = m_new
            if WITH_COL:
                c_max = tl.max(s, 0)  # (BLOCK_N,)
                c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_sum = tl.sum(tl.exp(s - c_ref[None, :]), 0)
                # relative to the bound 1/tau: c_sum * exp(c_ref - 1/tau), in float64
                term = c_sum.to(tl.float64) * tl.exp(c_ref.to(tl.float64) - inv_tau)
                tl.atomic_add(colsum_ptr + k * By + offs_n, term, mask=n_ok & (c_sum > 0))
        lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), 0.0)
        tl.store(lse_x_ptr + k * Bx + offs_m, lse, mask=offs_m < Bx)
        tl.store(diag_ptr + k * Bx + offs_m, diag, mask=offs_m < Bx)

    # Backward, for rows x_i (one call; the columns' gradient is the same kernel with the
    # roles of X and Y swapped). With P_ij = exp(S_ij - lse_x_i), Q_ij = exp(S_ij - lse_y_j)
    # over valid pairs and upstream gradients g_x, g_y, g_diag:
    #   dS_ij = g_x_i P_ij + g_y_j Q_ij + g_diag * [j == i + shift]
    #   d xhat_i = (1/tau) sum_j dS_ij yhat_j
    #   d x_i = (d xhat_i - xhat_i (xhat_i . d xhat_i)) / |x_i|   (F.normalize's backward)
    @triton.jit
    def _cosine_lse_bwd_kernel(
        x_ptr, stride_x_k, stride_x_b, stride_x_d,
        y_ptr, stride_y_k, stride_y_b, stride_y_d,
        valid_x_ptr, valid_y_ptr,
        lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, g_diag_ptr,
        dx_ptr, stride_dx_k, stride_dx_b,
        Bx, By, D, inv_tau, shift,
        HAS_VALID_X: tl.constexpr, HAS_VALID_Y: tl.constexpr,
        HAS_X_TERM: tl.constexpr, HAS_Y_TERM: tl.constexpr, HAS_DIAG: tl.constexpr, DIAG_ON_ROWS: tl.constexpr,
        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (block k, tile of BLOCK_M rows of X): d X for those rows.
        k = tl.program_id(0).to(tl.int64)  # int64: k * stride_k passes 2^31 at K12 x B262144 x d768
        offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = _valid(valid_x_ptr, offs_m, Bx, HAS_VALID_X)
        x, rinv_x, norm_x = _load_unit_rows(x_ptr, stride_x_k, stride_x_b, stride_x_d, k, offs_m, Bx, D, BLOCK_D)
        if HAS_X_TERM:
            g_x = tl.load(g_x_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
            lse_x = tl.load(lse_x_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        if DIAG_ON_ROWS:
            g_diag_rows = tl.load(g_diag_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, By, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = _valid(valid_y_ptr, offs_n, By, HAS_VALID_Y)
            y, rinv_y, _norm_y = _load_unit_rows(y_ptr, stride_y_k, stride_y_b, stride_y_d, k, offs_n, By, D, BLOCK_D)
            pair_ok = m_ok[:, None] & n_ok[None, :]
            s = dot(x, tl.trans(y), FP32_DOT) * (rinv_x[:, None] * rinv_y[None, :] * inv_tau)
            ds = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if HAS_X_TERM:
                ds += g_x[:, None] * tl.exp(tl.minimum(s - lse_x[:, None], 0.0))
            if HAS_Y_TERM:
                g_y = tl.load(g_y_ptr + k * By + offs_n, mask=n_ok, other=0.0)
                lse_y = tl.load(lse_y_ptr + k * By + offs_n, mask=n_ok, other=0.0)
                ds += g_y[None, :] * tl.exp(tl.minimum(s - lse_y[None, :], 0.0))
            if HAS_DIAG:
                is_diag = offs_n[None, :] == offs_m[:, None] + shift
                if DIAG_ON_ROWS:
                    ds += tl.where(is_diag, g_diag_rows[:, None], 0.0)
                else:
                    g_diag_cols = tl.load(g_diag_ptr + k * By + offs_n, mask=n_ok, other=0.0)
                    ds += tl.where(is_diag, g_diag_cols[None, :], 0.0)
            ds = tl.where(pair_ok, ds, 0.0)  # (BLOCK_M, BLOCK_N)
            y_unit = (y.to(tl.float32) * rinv_y[:, None]).to(y.dtype)  # (BLOCK_N, BLOCK_D)
            acc += dot(ds.to(y.dtype), y_unit, FP32_DOT)
        d_unit = acc * inv_tau  # (BLOCK_M, BLOCK_D)
        x_unit = x.to(tl.float32) * rinv_x[:, None]
        radial = tl.where(norm_x > 1e-12, tl.sum(x_unit * d_unit, 1), 0.0)
        dx = (d_unit - x_unit * radial[:, None]) * rinv_x[:, None]
        tl.store(
            dx_ptr + k * stride_dx_k + offs_m[:, None] * stride_dx_b + offs_d[None, :],
            dx, mask=(offs_m[:, None] < Bx) & (offs_d[None, :] < D),
        )


def _blocks(d: int, n_rows: int, n_cols: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_stages): row tiles of at most TILE_ELEMENTS padded
    16-bit elements' bytes, so that fp32 tiles (and their fp32 dots) fit shared memory."""
    block_d = pow2(d)
    rows = max(16, min(128, TILE_ELEMENTS * 2 // element_size // block_d))
    num_stages = 1 if element_size * block_d >= 4096 else 3
    return min(rows, pow2(n_rows)), min(max(16, rows // 2), pow2(n_cols)), block_d, num_stages


def _valid_arg(valid: Tensor | None) -> Tensor | None:
    return None if valid is None else valid.to(torch.uint8).contiguous()


def cosine_lse_fwd(
    z_row: Tensor, z_col: Tensor, valid_row: Tensor | None, valid_col: Tensor | None,
    tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward launcher: (lse_row (K, Br), lse_col (K, Bc), diag (K, Br)), float32."""
    K, Br, D = z_row.shape
    Bc = z_col.shape[1]
    block_m, block_n, block_d, num_stages = _blocks(D, Br, Bc, z_row.element_size())
    dev = z_row.device
    lse_row = torch.empty(K, Br, device=dev, dtype=torch.float32)
    diag = torch.empty(K, Br, device=dev, dtype=torch.float32)
    colsum = torch.zeros(K, Bc if col_lse else 1, device=dev, dtype=torch.float64)
    with on_device(z_row):
        _cosine_lse_fwd_kernel[(K, triton.cdiv(Br, block_m))](
            z_row, *z_row.stride(), z_col, *z_col.stride(),
            _valid_arg(valid_row), _valid_arg(valid_col),
            lse_row, diag, colsum,
            Br, Bc, D, 1.0 / tau, row_offset,
            HAS_VALID_X=valid_row is not None, HAS_VALID_Y=valid_col is not None, WITH_COL=col_lse,
            FP32_DOT=use_fp32_dot(z_row), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_stages=num_stages,
        )
    if col_lse:
        lse_col = torch.where(colsum > 0, colsum.log() + 1.0 / tau, 0.0).float()
    else:
        lse_col = torch.zeros(K, Bc, device=dev, dtype=torch.float32)
    return lse_row, lse_col, diag


def _grad_rows(
    x: Tensor, y: Tensor, valid_x: Tensor | None, valid_y: Tensor | None,
    lse_x: Tensor | None, g_x: Tensor | None, lse_y: Tensor | None, g_y: Tensor | None,
    g_diag: Tensor, diag_on_rows: bool, tau: float, shift: int,
) -> Tensor:
    K, Bx, D = x.shape
    By = y.shape[1]
    block_m, block_n, block_d, num_stages = _blocks(D, Bx, By, x.element_size())
    dx = torch.empty(K, Bx, D, device=x.device, dtype=x.dtype)
    with on_device(x):
        _cosine_lse_bwd_kernel[(K, triton.cdiv(Bx, block_m))](
            x, *x.stride(), y, *y.stride(), _valid_arg(valid_x), _valid_arg(valid_y),
            lse_x, g_x, lse_y, g_y, g_diag, dx, *dx.stride()[:2],
            Bx, By, D, 1.0 / tau, shift,
            HAS_VALID_X=valid_x is not None, HAS_VALID_Y=valid_y is not None,
            HAS_X_TERM=g_x is not None, HAS_Y_TERM=g_y is not None, HAS_DIAG=True, DIAG_ON_ROWS=diag_on_rows,
            FP32_DOT=use_fp32_dot(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_stages=num_stages,
        )
    return dx


def cosine_lse_bwd(
    g_lse_row: Tensor, g_lse_col: Tensor, g_diag: Tensor,
    z_row: Tensor, z_col: Tensor, valid_row: Tensor | None, valid_col: Tensor | None,
    lse_row: Tensor, lse_col: Tensor, tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Backward launcher: (dz_row (K, Br, d), dz_col (K, Bc, d)) in the inputs' dtypes.
    Two launches: rows against all columns, then columns against all rows."""
    g_row, g_col, g_diag = (g.float().contiguous() for g in (g_lse_row, g_lse_col, g_diag))
    col_terms = (lse_col, g_col) if col_lse else (None, None)
    dz_row = _grad_rows(z_row, z_col, valid_row, valid_col, lse_row, g_row, *col_terms,
                        g_diag, True, tau, row_offset)
    dz_col = _grad_rows(z_col, z_row, valid_col, valid_row, *col_terms, lse_row, g_row,
                        g_diag, False, tau, -row_offset)
    return dz_row, dz_col
