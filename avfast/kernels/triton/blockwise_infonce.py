"""Triton kernels for the scaled-cosine log-sum-exps behind the blockwise InfoNCE loss
(backend contract of ``avfast.reference.blockwise_infonce.cosine_lse``).

S_ij = cos(x_i, y_j) / tau for each block k; X rows (K, Bx, d), Y columns (K, By, d).
Every score tile is a GEMM tile: a k-loop over d in BLOCK_K chunks accumulates x . y in
fp32, then the row norms (computed once, up front) scale it. Nothing of size Bx x By is
kept beyond one panel of the backward (bounded by ``PANEL_ELEMENTS``): memory O(B d).

Forward: programs (block k, row tile, column split) stream their columns once and write
partial row log-sum-exps (merged over splits by the launcher) and column sums that meet in
a float64 buffer through atomic adds, each term taken relative to the bound S <= 1/tau,
which float64 holds without underflow for tau >= 0.003. Where scores span at most 80
(tau >= 0.025, MA-AVT's 0.07 included) every exp(S - 1/tau) is a normal fp32, so rows and
columns share one exp per score and no running maxima (BOUND_REF); otherwise rows keep an
online softmax and columns a per-tile maximum. The shifted diagonal S[i, i + shift] is a
row-wise dot product, computed by the launcher.

Backward, with P_ij = exp(S_ij - lse_x_i), Q_ij = exp(S_ij - lse_y_j) over valid pairs:
  dS_ij = (g_x_i P_ij + g_y_j Q_ij + g_diag_i [j == i + shift]) / tau
  d xhat = dS yhat,   d yhat = dS^T xhat,   d x_i = (d xhat_i - xhat_i (xhat_i . d xhat_i)) / |x_i|
in row panels: one kernel writes the panel's dS (recomputing S), two GEMM kernels take it
into d xhat (complete per panel) and d yhat (accumulated over panels in fp32).
All K blocks go in one launch (program_id 0). Inputs come checked (avfast.ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avfast.kernels.triton import has_triton
from avfast.kernels.triton.common import dot_precision, on_device, pow2, sm_count

NORM_EPS = 1e-12  # as F.normalize
PANEL_ELEMENTS = 1 << 25  # dS panel budget (elements) beyond the O(B d) floor of the backward
BOUND_REF_RANGE = 80.0  # scores span 2/tau; past e^-80 (tau < 0.025) fp32 needs running maxima
MIN_PROGRAMS = 264  # two waves on 132 SMs: split columns until a forward launch has this many

if has_triton():
    import triton
    import triton.language as tl

    from avfast.kernels.triton.common import dot

    @triton.jit
    def _valid(ptr, offs, n, HAS_VALID: tl.constexpr):
        ok = offs < n
        if HAS_VALID:
            ok = ok & (tl.load(ptr + offs, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _scores(
        x_ptr, stride_x_k, stride_x_b, stride_x_d, y_ptr, stride_y_k, stride_y_b, stride_y_d,
        k, offs_m, offs_n, Bx, By, D,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Raw dot products x_i . y_j of a (BLOCK_M, BLOCK_N) tile by a k-loop over d, fp32."""
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + k * stride_x_k + offs_m[:, None] * stride_x_b + offs_k[None, :] * stride_x_d
        y_ptrs = y_ptr + k * stride_y_k + offs_n[None, :] * stride_y_b + offs_k[:, None] * stride_y_d
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            d_ok = offs_k + k0 < D
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < Bx) & d_ok[None, :], other=0.0)
            yt = tl.load(y_ptrs, mask=(offs_n[None, :] < By) & d_ok[:, None], other=0.0)
            acc += dot(x, yt, DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_x_d
            y_ptrs += BLOCK_K * stride_y_d
        return acc

    @triton.jit
    def _cosine_lse_fwd_kernel(
        x_ptr, stride_x_k, stride_x_b, stride_x_d,
        y_ptr, stride_y_k, stride_y_b, stride_y_d,
        rinv_x_ptr, rinv_y_ptr, valid_x_ptr, valid_y_ptr,
        m_part_ptr, l_part_ptr, colsum_ptr,
        K, Bx, By, D, inv_tau, cols_per_split,
        HAS_VALID_X: tl.constexpr, HAS_VALID_Y: tl.constexpr, WITH_COL: tl.constexpr, BOUND_REF: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program (block k, tile of BLOCK_M rows, split of cols_per_split columns)
        k = tl.program_id(0).to(tl.int64)  # int64: k * stride_k passes 2^31 at K12 x B262144 x d768
        offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(2)
        m_ok = _valid(valid_x_ptr, offs_m, Bx, HAS_VALID_X)
        rinv_x = tl.load(rinv_x_ptr + k * Bx + offs_m, mask=offs_m < Bx, other=0.0)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        col_start = split * cols_per_split
        for n0 in range(col_start, tl.minimum(col_start + cols_per_split, By), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = _valid(valid_y_ptr, offs_n, By, HAS_VALID_Y)
            rinv_y = tl.load(rinv_y_ptr + k * By + offs_n, mask=offs_n < By, other=0.0)
            s = _scores(x_ptr, stride_x_k, stride_x_b, stride_x_d, y_ptr, stride_y_k, stride_y_b, stride_y_d,
                        k, offs_m, offs_n, Bx, By, D, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            pair_ok = m_ok[:, None] & n_ok[None, :]
            s = tl.where(pair_ok, s * (rinv_x[:, None] * rinv_y[None, :] * inv_tau), float("-inf"))
            if BOUND_REF:  # every exp(s - 1/tau) >= exp(-2/tau) is a normal fp32: no maxima
                e = tl.exp(s - inv_tau)
                l += tl.sum(e, 1)
                if WITH_COL:
                    c_sum = tl.sum(e, 0)
                    term = c_sum.to(tl.float64)
            else:
                m_new = tl.maximum(m, tl.max(s, 1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
                m = m_new
                if WITH_COL:
                    c_max = tl.max(s, 0)  # (BLOCK_N,)
                    c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
                    c_sum = tl.sum(tl.exp(s - c_ref[None, :]), 0)
                    term = c_sum.to(tl.float64) * tl.exp(c_ref.to(tl.float64) - inv_tau)
            if WITH_COL:  # column sums relative to the bound 1/tau, added up in float64
                tl.atomic_add(colsum_ptr + k * By + offs_n, term, mask=n_ok & (c_sum > 0))
        if BOUND_REF:
            m = tl.where(l > 0, inv_tau, float("-inf"))
        out = (split * K + k) * Bx + offs_m
        tl.store(m_part_ptr + out, m, mask=offs_m < Bx)
        tl.store(l_part_ptr + out, l, mask=offs_m < Bx)

    @triton.jit
    def _cosine_dscore_kernel(
        x_ptr, stride_x_k, stride_x_b, stride_x_d,
        y_ptr, stride_y_k, stride_y_b, stride_y_d,
        rinv_x_ptr, rinv_y_ptr, valid_x_ptr, valid_y_ptr,
        lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, g_diag_ptr,
        ds_ptr, stride_ds_k, stride_ds_m,
        row0, rows, Bx, By, D, inv_tau, shift,
        HAS_VALID_X: tl.constexpr, HAS_VALID_Y: tl.constexpr, HAS_Y_TERM: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program (block k, row tile of the panel [row0, row0 + rows), column tile): its dS tile
        k = tl.program_id(0).to(tl.int64)
        local_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = row0 + local_m
        offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_panel = local_m < rows
        m_ok = _valid(valid_x_ptr, offs_m, Bx, HAS_VALID_X) & in_panel
        n_ok = _valid(valid_y_ptr, offs_n, By, HAS_VALID_Y)
        rinv_x = tl.load(rinv_x_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        rinv_y = tl.load(rinv_y_ptr + k * By + offs_n, mask=n_ok, other=0.0)
        s = _scores(x_ptr, stride_x_k, stride_x_b, stride_x_d, y_ptr, stride_y_k, stride_y_b, stride_y_d,
                    k, offs_m, offs_n, Bx, By, D, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        s = s * (rinv_x[:, None] * rinv_y[None, :] * inv_tau)
        g_x = tl.load(g_x_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        lse_x = tl.load(lse_x_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        ds = g_x[:, None] * tl.exp(tl.minimum(s - lse_x[:, None], 0.0))
        if HAS_Y_TERM:
            g_y = tl.load(g_y_ptr + k * By + offs_n, mask=n_ok, other=0.0)
            lse_y = tl.load(lse_y_ptr + k * By + offs_n, mask=n_ok, other=0.0)
            ds += g_y[None, :] * tl.exp(tl.minimum(s - lse_y[None, :], 0.0))
        g_diag = tl.load(g_diag_ptr + k * Bx + offs_m, mask=m_ok, other=0.0)
        ds += tl.where(offs_n[None, :] == offs_m[:, None] + shift, g_diag[:, None], 0.0)
        ds = tl.where(m_ok[:, None] & n_ok[None, :], ds * inv_tau, 0.0)
        tl.store(
            ds_ptr + k * stride_ds_k + local_m[:, None] * stride_ds_m + offs_n[None, :],
            ds.to(ds_ptr.dtype.element_ty), mask=in_panel[:, None] & (offs_n[None, :] < By),
        )

    @triton.jit
    def _panel_matmul_kernel(
        a_ptr, stride_a_k, stride_a_m, stride_a_r,
        b_ptr, stride_b_k, stride_b_r, stride_b_n,
        c_ptr, stride_c_k, stride_c_m, stride_c_n,
        K, M, N, R, r_per_split,
        ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program (split s x block k, tile of C): C[s K + k] (+)= A[k] @ B[k] over the
        # reduction rows [s r_per_split, (s + 1) r_per_split) of R; fp32 C
        pid = tl.program_id(0)
        k = (pid % K).to(tl.int64)
        r_start = (pid // K) * r_per_split
        r_end = tl.minimum(r_start + r_per_split, R)
        offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = r_start + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + k * stride_a_k + offs_m[:, None] * stride_a_m + offs_r[None, :] * stride_a_r
        b_ptrs = b_ptr + k * stride_b_k + offs_r[:, None] * stride_b_r + offs_n[None, :] * stride_b_n
        c_ptrs = c_ptr + pid.to(tl.int64) * stride_c_k + offs_m[:, None] * stride_c_m + offs_n[None, :] * stride_c_n
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if ACCUMULATE:  # start from C: no second accumulator-sized tile in registers
            acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for r0 in range(r_start, r_end, BLOCK_K):
            r_ok = offs_r + (r0 - r_start) < r_end
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & r_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=r_ok[:, None] & (offs_n[None, :] < N), other=0.0)
            acc += dot(a, b, DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_a_r
            b_ptrs += BLOCK_K * stride_b_r
        tl.store(c_ptrs, acc, mask=c_mask)


def _edge(n: int, large: int) -> int:
    """Tile edge for n rows or columns: ``large``, or the power of two covering n (>= 16)."""
    return min(large, pow2(n))


def _tiles(K: int, M: int, N: int, large_m: int = 128, large_n: int = 128) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a K-batched M x N output: the large tiles when they make
    MIN_PROGRAMS programs, else 64-edged ones, which fill the SMs at MA-AVT's K12 B256."""
    bm, bn = _edge(M, large_m), _edge(N, large_n)
    if K * triton.cdiv(M, bm) * triton.cdiv(N, bn) >= MIN_PROGRAMS:
        return bm, bn
    return _edge(M, 64), _edge(N, 64)


def _wide_edge(z: Tensor) -> int:
    """The long tile edge of the panel GEMMs: 256 for 16-bit operands (128 x 256 tiles: 85
    FLOP per L2 byte against 64 at 128 x 128), 128 for fp32, which spills at 256."""
    return 256 if z.element_size() == 2 else 128


def _warps(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 128 * 128 else 4


def _fwd_config(K: int, Br: int, Bc: int, bound_ref: bool, element_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps): tiles as ``_tiles`` (256 x 128 with
    32-wide k steps for 16-bit inputs on the BOUND_REF path, the largest that does not
    spill there: 85 FLOP per L2 byte against 64 at 128 x 128), and column splits until the
    launch has MIN_PROGRAMS programs (or one column tile each)."""
    tall = bound_ref and element_size == 2
    block_m, block_n = _tiles(K, Br, Bc, 256 if tall else 128, 128)
    col_tiles = triton.cdiv(Bc, block_n)
    programs = K * triton.cdiv(Br, block_m)
    splits = max(1, min(col_tiles, triton.cdiv(MIN_PROGRAMS, programs)))
    return block_m, block_n, 32 if block_m > 128 else 64, splits, _warps(block_m, block_n)


def _row_rinv(z: Tensor) -> Tensor:
    """1 / max(|z_kb|, eps) per row, float32 (K, B): one read of z, no fp32 copy of it."""
    norm = torch.linalg.vector_norm(z, dim=-1, dtype=torch.float32)
    return 1.0 / norm.clamp_min(NORM_EPS)


def _shifted_diag(
    z_row: Tensor, z_col: Tensor, rinv_row: Tensor, rinv_col: Tensor,
    valid_row: Tensor | None, valid_col: Tensor | None, tau: float, shift: int,
) -> Tensor:
    """diag (K, Br) = S[i, i + shift], 0 where that column is out of range or invalid: one
    row-wise dot product per row (O(B d)), accumulated in fp32 as the kernels' dots."""
    Br, Bc = z_row.shape[1], z_col.shape[1]
    cols = torch.arange(Br, device=z_row.device) + shift
    ok = (cols >= 0) & (cols < Bc)
    safe = cols.clamp(0, Bc - 1)
    # one block at a time: fp32 copies of one (B, d) pair, not of all K
    dots = torch.stack([torch.linalg.vecdot(zr.float(), zc[safe].float()) for zr, zc in zip(z_row, z_col)])
    s = dots * rinv_row * rinv_col[:, safe] / tau
    if valid_row is not None:
        ok = ok & valid_row
    if valid_col is not None:
        ok = ok & valid_col[safe]
    return torch.where(ok, s, 0.0)


def _valid_arg(valid: Tensor | None) -> Tensor | None:
    return None if valid is None else valid.to(torch.uint8).contiguous()


def cosine_lse_fwd(
    z_row: Tensor, z_col: Tensor, valid_row: Tensor | None, valid_col: Tensor | None,
    tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward launcher: (lse_row (K, Br), lse_col (K, Bc), diag (K, Br)), float32."""
    K, Br, D = z_row.shape
    Bc = z_col.shape[1]
    bound_ref = 2.0 / tau <= BOUND_REF_RANGE
    block_m, block_n, block_k, splits, num_warps = _fwd_config(K, Br, Bc, bound_ref, z_row.element_size())
    cols_per_split = triton.cdiv(triton.cdiv(Bc, block_n), splits) * block_n
    splits = triton.cdiv(Bc, cols_per_split)
    dev = z_row.device
    rinv_row, rinv_col = _row_rinv(z_row), _row_rinv(z_col)
    m_part = torch.empty(splits, K, Br, device=dev, dtype=torch.float32)
    l_part = torch.empty(splits, K, Br, device=dev, dtype=torch.float32)
    colsum = torch.zeros(K, Bc if col_lse else 1, device=dev, dtype=torch.float64)
    with on_device(z_row):
        _cosine_lse_fwd_kernel[(K, triton.cdiv(Br, block_m), splits)](
            z_row, *z_row.stride(), z_col, *z_col.stride(),
            rinv_row, rinv_col, _valid_arg(valid_row), _valid_arg(valid_col),
            m_part, l_part, colsum,
            K, Br, Bc, D, 1.0 / tau, cols_per_split,
            HAS_VALID_X=valid_row is not None, HAS_VALID_Y=valid_col is not None, WITH_COL=col_lse,
            BOUND_REF=bound_ref, DOT_PRECISION=dot_precision(z_row), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=3,
        )
    m_max = m_part.amax(0)
    m_ref = torch.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = (l_part * torch.exp(m_part - m_ref)).sum(0)
    lse_row = torch.where(l_sum > 0, m_ref + torch.log(torch.where(l_sum > 0, l_sum, 1.0)), 0.0)
    if col_lse:
        lse_col = torch.where(colsum > 0, colsum.log() + 1.0 / tau, 0.0).float()
    else:
        lse_col = torch.zeros(K, Bc, device=dev, dtype=torch.float32)
    return lse_row, lse_col, _shifted_diag(z_row, z_col, rinv_row, rinv_col, valid_row, valid_col, tau, row_offset)


def _panel_rows(K: int, Br: int, Bc: int, D: int, block_m: int) -> int:
    """Rows per backward panel: all of them when K x Br x Bc fits the budget, else as many
    row tiles as keep the dS panel within max(PANEL_ELEMENTS, K (Br + Bc) d)."""
    budget = max(PANEL_ELEMENTS, K * (Br + Bc) * D)
    if K * Br * Bc <= budget:
        return Br
    return max(block_m, budget // (K * Bc) // block_m * block_m)


SPLIT_K_MIN = 1024  # reduction rows per split of a split-K panel GEMM


def _split_k(tiles: int, R: int, sms: int) -> int:
    """Reduction splits for ``tiles`` output tiles: at least MIN_PROGRAMS programs, at most
    one split per SPLIT_K_MIN rows, and the count that best fills the last wave on ``sms``."""
    most = max(1, R // SPLIT_K_MIN)
    least = min(most, triton.cdiv(MIN_PROGRAMS, tiles))
    if least == 1:
        return 1

    def fill(s: int) -> float:
        return tiles * s / (triton.cdiv(tiles * s, sms) * sms)

    return max(range(least, min(most, 2 * least) + 1), key=lambda s: (fill(s), -s))


def _matmul(a: Tensor, b: Tensor, c: Tensor, accumulate: bool, precision: str) -> None:
    """c (K, M, N) fp32 (+)= a (K, M, R) @ b (K, R, N), any strides. 128 x 256 tiles for
    large outputs; a long reduction over few output tiles is split (split-K) into fp32
    partials summed here, in a fixed order."""
    K, M, R = a.shape
    N = b.shape[2]
    block_m, block_n = _edge(M, 128), _edge(N, _wide_edge(a))
    tiles = K * triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = _split_k(tiles, R, sm_count(a))
    if tiles * splits < MIN_PROGRAMS:  # neither large tiles nor a long reduction: smaller tiles
        block_m, block_n = _tiles(K, M, N)
        splits = 1
    r_per_split = triton.cdiv(triton.cdiv(R, splits), 64) * 64
    splits = triton.cdiv(R, r_per_split)
    out = c if splits == 1 else torch.empty(splits * K, M, N, device=c.device, dtype=torch.float32)
    _panel_matmul_kernel[(splits * K, triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        a, *a.stride(), b, *b.stride(), out, *out.stride(), K, M, N, R, r_per_split,
        ACCUMULATE=accumulate and splits == 1, DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=_warps(block_m, block_n),
        num_stages=2 if accumulate and block_n > 128 else 3,  # 3 stages + the loaded C tile spill
    )
    if splits > 1:
        total = out.view(splits, K, M, N).sum(0)
        if accumulate:
            c += total
        else:
            c.copy_(total)


def _normalize_backward(z: Tensor, rinv: Tensor, d_unit: Tensor) -> Tensor:
    """F.normalize's backward: (d_unit - zhat (zhat . d_unit)) / |z|, in z's dtype."""
    unit = z.float() * rinv[..., None]
    radial = torch.where(rinv < 1.0 / NORM_EPS, (unit * d_unit).sum(-1), 0.0)
    return ((d_unit - unit * radial[..., None]) * rinv[..., None]).to(z.dtype)


def cosine_lse_bwd(
    g_lse_row: Tensor, g_lse_col: Tensor, g_diag: Tensor,
    z_row: Tensor, z_col: Tensor, valid_row: Tensor | None, valid_col: Tensor | None,
    lse_row: Tensor, lse_col: Tensor, tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Backward launcher: (dz_row (K, Br, d), dz_col (K, Bc, d)) in the inputs' dtypes."""
    K, Br, D = z_row.shape
    Bc = z_col.shape[1]
    dev, precision = z_row.device, dot_precision(z_row)
    g_row, g_col, g_diag = (g.float().contiguous() for g in (g_lse_row, g_lse_col, g_diag))
    rinv_row, rinv_col = _row_rinv(z_row), _row_rinv(z_col)
    unit_row = (z_row.float() * rinv_row[..., None]).to(z_row.dtype)
    unit_col = (z_col.float() * rinv_col[..., None]).to(z_col.dtype)
    d_unit_row = torch.empty(K, Br, D, device=dev, dtype=torch.float32)
    d_unit_col = torch.empty(K, Bc, D, device=dev, dtype=torch.float32)
    block_m, block_n = _tiles(K, Br, Bc)  # 128 x 256 spills (softmax terms beside the tile)
    panel = _panel_rows(K, Br, Bc, D, block_m)
    ds = torch.empty(K, panel, Bc, device=dev, dtype=z_row.dtype)
    valid_x, valid_y = _valid_arg(valid_row), _valid_arg(valid_col)
    with on_device(z_row):
        for row0 in range(0, Br, panel):
            rows = min(panel, Br - row0)
            _cosine_dscore_kernel[(K, triton.cdiv(rows, block_m), triton.cdiv(Bc, block_n))](
                z_row, *z_row.stride(), z_col, *z_col.stride(), rinv_row, rinv_col, valid_x, valid_y,
                lse_row, g_row, lse_col, g_col, g_diag, ds, *ds.stride()[:2],
                row0, rows, Br, Bc, D, 1.0 / tau, row_offset,
                HAS_VALID_X=valid_row is not None, HAS_VALID_Y=valid_col is not None, HAS_Y_TERM=col_lse,
                DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
                num_warps=_warps(block_m, block_n), num_stages=3,
            )
            ds_panel = ds[:, :rows]
            _matmul(ds_panel, unit_col, d_unit_row[:, row0:row0 + rows], False, precision)
            _matmul(ds_panel.transpose(1, 2), unit_row[:, row0:row0 + rows], d_unit_col, row0 > 0, precision)
    return _normalize_backward(z_row, rinv_row, d_unit_row), _normalize_backward(z_col, rinv_col, d_unit_col)
