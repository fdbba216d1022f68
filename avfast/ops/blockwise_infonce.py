"""Blockwise symmetric InfoNCE (MA-AVT), all blocks at once, no B x B matrix stored.

L_k = (CE(S_k, diag) + CE(S_k^T, diag)) / 2,  S_k[i, j] = cos(z_v[k, i], z_a[k, j]) / tau,
over the valid samples; reduction over the K blocks.

Dims: K blocks, B batch (Br rows, Bc columns), d feature width.
``cosine_lse`` is the fused primitive (row and column log-sum-exps of S and its shifted
diagonal); ``blockwise_infonce`` assembles the loss from it in O(K B) work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avfast import _backend
from avfast.reference import blockwise_infonce as reference

OP = "cosine_lse"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_TAU = 0.003  # column sums are taken relative to exp(1/tau) in float64
REDUCTIONS = ("mean", "sum", "none")


def _check_features(name: str, z, op: str) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor (K, B, d), got {type(z).__name__}")
    if z.dim() != 3 or 0 in z.shape:
        raise ValueError(f"{op}: {name} must be (K, B, d) with K, B, d >= 1, got {tuple(z.shape)}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {z.dtype}")


def _check_valid(name: str, valid, n: int, z: Tensor, op: str) -> None:
    if valid is None:
        return
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"{op}: {name} must be a bool Tensor (B,) (False = background sample), got {got}")
    if tuple(valid.shape) != (n,):
        raise ValueError(f"{op}: {name} must be (B,) = ({n},), got {tuple(valid.shape)}")
    if valid.device != z.device:
        raise ValueError(f"{op}: {name} must be on the features' device {z.device}, got {valid.device}")


def _check_tau(tau, op: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (float, int)) or not math.isfinite(tau) or tau < MIN_TAU:
        raise ValueError(f"{op}: tau must be a finite float >= {MIN_TAU}, got {tau!r}")


def _check_cosine_lse(z_row, z_col, valid_row, valid_col, tau, op: str = OP) -> None:
    _check_features("z_row", z_row, op)
    _check_features("z_col", z_col, op)
    K, _, d = z_row.shape
    if z_col.shape[0] != K or z_col.shape[2] != d:
        raise ValueError(f"{op}: z_col must be (K, Bc, d) = ({K}, *, {d}), got {tuple(z_col.shape)}")
    if z_col.dtype != z_row.dtype:
        raise TypeError(f"{op}: z_col must have z_row's dtype {z_row.dtype}, got {z_col.dtype}")
    if z_col.device != z_row.device:
        raise ValueError(f"{op}: z_col must be on z_row's device {z_row.device}, got {z_col.device}")
    _check_valid("valid_row", valid_row, z_row.shape[1], z_row, op)
    _check_valid("valid_col", valid_col, z_col.shape[1], z_row, op)
    _check_tau(tau, op)


def _kernels(backend: str):
    """(forward, backward) of the cosine_lse contract for ``backend``."""
    if backend == "triton":
        from avfast.kernels.triton import blockwise_infonce as triton_kernels

        return triton_kernels.cosine_lse_fwd, triton_kernels.cosine_lse_bwd
    return _reference_fwd, reference.cosine_lse_bwd


def _reference_fwd(z_row, z_col, valid_row, valid_col, tau, row_offset, col_lse):
    outs = reference.cosine_lse(z_row, z_col, tau=tau, valid_row=valid_row, valid_col=valid_col,
                                row_offset=row_offset, col_lse=col_lse)
    return tuple(o.contiguous() for o in outs)


@torch.library.custom_op("avfast::cosine_lse", mutates_args=())
def _cosine_lse(
    z_row: Tensor, z_col: Tensor, valid_row: Tensor | None, valid_col: Tensor | None,
    tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse_row (K, Br), lse_col (K, Bc), diag (K, Br)); see avfast.reference.blockwise_infonce."""
    _check_cosine_lse(z_row, z_col, valid_row, valid_col, tau)
    forward, _ = _kernels(_backend.select(OP, z_row.device, z_row.dtype))
    with _backend.no_autocast(z_row.device):
        return forward(z_row, z_col, valid_row, valid_col, tau, row_offset, col_lse)


@_cosine_lse.register_fake
def _(z_row, z_col, valid_row, valid_col, tau, row_offset, col_lse):
    _check_cosine_lse(z_row, z_col, valid_row, valid_col, tau)
    K, Br, _ = z_row.shape
    acc = torch.float64 if z_row.dtype == torch.float64 else torch.float32
    return (z_row.new_empty(K, Br, dtype=acc), z_row.new_empty(K, z_col.shape[1], dtype=acc),
            z_row.new_empty(K, Br, dtype=acc))


@torch.library.custom_op("avfast::cosine_lse_backward", mutates_args=())
def _cosine_lse_backward(
    g_lse_row: Tensor, g_lse_col: Tensor, g_diag: Tensor, z_row: Tensor, z_col: Tensor,
    valid_row: Tensor | None, valid_col: Tensor | None, lse_row: Tensor, lse_col: Tensor,
    tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of z_row (K, Br, d) and z_col (K, Bc, d), contiguous, in their dtype."""
    _, backward = _kernels(_backend.select(OP, z_row.device, z_row.dtype))
    with _backend.no_autocast(z_row.device):
        return backward(g_lse_row, g_lse_col, g_diag, z_row, z_col, valid_row, valid_col, lse_row, lse_col,
                        tau, row_offset, col_lse)


@_cosine_lse_backward.register_fake
def _(g_lse_row, g_lse_col, g_diag, z_row, z_col, valid_row, valid_col, lse_row, lse_col, tau, row_offset,
      col_lse):
    return z_row.new_empty(z_row.shape), z_col.new_empty(z_col.shape)


def _setup_context(ctx, inputs, output):
    z_row, z_col, valid_row, valid_col, tau, row_offset, col_lse = inputs
    lse_row, lse_col, _ = output
    ctx.save_for_backward(z_row, z_col, valid_row, valid_col, lse_row, lse_col)
    ctx.tau, ctx.row_offset, ctx.col_lse = tau, row_offset, col_lse


def _backward(ctx, g_lse_row, g_lse_col, g_diag):
    z_row, z_col, valid_row, valid_col, lse_row, lse_col = ctx.saved_tensors
    dz_row, dz_col = _cosine_lse_backward(
        g_lse_row, g_lse_col, g_diag, z_row, z_col, valid_row, valid_col, lse_row, lse_col,
        ctx.tau, ctx.row_offset, ctx.col_lse,
    )
    return dz_row, dz_col, None, None, None, None, None


_cosine_lse.register_autograd(_backward, setup_context=_setup_context)


def cosine_lse(
    z_row: Tensor,
    z_col: Tensor,
    *,
    tau: float,
    valid_row: Tensor | None = None,
    valid_col: Tensor | None = None,
    row_offset: int = 0,
    col_lse: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column log-sum-exps of S_ij = cos(z_row[k, i], z_col[k, j]) / tau, fused.

    Args:
        z_row: (K, Br, d) row features, z_col: (K, Bc, d) column features, unnormalized
            (L2 normalization is fused, eps 1e-12 as F.normalize); one dtype and device.
        tau: temperature, >= 0.003.
        valid_row: (Br,) bool, valid_col: (Bc,) bool; False drops that row / column.
        row_offset: the positive pair of row i is column i + row_offset (a rank's rows
            against the global batch under torch.distributed).
        col_lse: also compute the column log-sum-exps (one pass either way).

    Returns:
        lse_row (K, Br), lse_col (K, Bc) (zeros if not col_lse), diag (K, Br) = S[i, i +
        row_offset]; float32 (float64 for float64 inputs). Entries of invalid rows or
        columns, with nothing valid to sum over, or whose diagonal column is out of range
        or invalid, are 0 and carry no gradient. Differentiable in z_row and z_col.
    Backend: triton -> reference (AVFAST_BACKEND forces one); float64 uses the reference.
    """
    _check_cosine_lse(z_row, z_col, valid_row, valid_col, tau)
    if isinstance(row_offset, bool) or not isinstance(row_offset, int):
        raise TypeError(f"{OP}: row_offset must be an int, got {row_offset!r}")
    return _cosine_lse(z_row, z_col, valid_row, valid_col, float(tau), row_offset, bool(col_lse))


def infonce_from_lse(lse_va: Tensor, lse_av: Tensor, diag: Tensor, valid: Tensor | None, n_valid) -> Tensor:
    """Per-block loss (K,) from row log-sum-exps of both directions and the positives:
    sum over valid rows of (lse_va + lse_av - 2 diag), over 2 * max(n_valid, 1)."""
    per_row = lse_va + lse_av - 2 * diag
    if valid is not None:
        per_row = per_row * valid
    return per_row.sum(dim=-1) / (2 * torch.clamp(torch.as_tensor(n_valid, device=per_row.device), min=1))


def reduce_blocks(per_block: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_block
    return per_block.sum() if reduction == "sum" else per_block.mean()


def check_reduction(reduction, op: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_blockwise_inputs(z_a, z_v, valid, reduction, op: str) -> None:
    """Checks of blockwise_infonce's arguments; errors name ``op`` and the argument."""
    _check_features("z_a", z_a, op)
    _check_features("z_v", z_v, op)
    if z_v.shape != z_a.shape:
        raise ValueError(f"{op}: z_v must be (K, B, d) = {tuple(z_a.shape)} like z_a, got {tuple(z_v.shape)}")
    if z_v.dtype != z_a.dtype:
        raise TypeError(f"{op}: z_v must have z_a's dtype {z_a.dtype}, got {z_v.dtype}")
    if z_v.device != z_a.device:
        raise ValueError(f"{op}: z_v must be on z_a's device {z_a.device}, got {z_v.device}")
    _check_valid("valid", valid, z_a.shape[1], z_a, op)
    check_reduction(reduction, op)


def blockwise_infonce(
    z_a: Tensor,
    z_v: Tensor,
    *,
    valid: Tensor | None = None,
    tau: float = 0.07,
    reduction: str = "mean",
) -> Tensor:
    """MA-AVT's blockwise audio-visual contrastive loss, fused over blocks and directions.

    Args:
        z_a, z_v: (K, B, d) audio / visual features of each block, unnormalized.
        valid: (B,) bool; False marks a background (mismatched) sample, removed from rows
            and columns as upstream does.
        tau: fixed temperature (upstream 0.07), >= 0.003.
        reduction: over blocks, "mean" (upstream), "sum" or "none" -> (K,).

    Returns:
        float32 loss (float64 for float64 inputs): per block (CE(v->a) + CE(a->v)) / 2 over
        the valid samples; 0 with zero gradients when no sample is valid.
    Memory O(K B d): the B x B logits are never stored. Single process; for negatives
    across ranks see avfast.nn.BlockwiseContrastiveLoss.
    """
    check_blockwise_inputs(z_a, z_v, valid, reduction, "blockwise_infonce")
    _check_tau(tau, "blockwise_infonce")
    lse_va, lse_av, diag = _cosine_lse(z_v, z_a, valid, valid, float(tau), 0, True)  # checked above
    n_valid = z_a.shape[1] if valid is None else valid.sum()
    return reduce_blocks(infonce_from_lse(lse_va, lse_av, diag, valid, n_valid), reduction)
