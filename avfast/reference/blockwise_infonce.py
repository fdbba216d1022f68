"""Plain-PyTorch reference for MA-AVT's blockwise contrastive loss.

For each of K blocks, with unit features a_i = z_a[k, i] / |z_a[k, i]|, v likewise, and
logits S_ij = v_i . a_j / tau over the valid (foreground) samples:

    L_k = (CE(S, diag) + CE(S^T, diag)) / 2,   reduction over k: mean | sum | none.

Dims: K blocks, B batch (Br rows, Bc columns), d feature width.

- ``blockwise_infonce``: the literal loss, per block, as upstream computes it (the oracle).
- ``cosine_lse``: the primitive the kernels implement: row and column log-sum-exps of the
  scaled cosine-similarity matrix and its shifted diagonal, without a loss around them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

NORM_EPS = 1e-12  # as F.normalize


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def blockwise_infonce(
    z_a: Tensor, z_v: Tensor, *, valid: Tensor | None = None, tau: float = 0.07, reduction: str = "mean"
) -> Tensor:
    """z_a, z_v (K, B, d); valid (B,) bool -> loss () or (K,) for reduction="none";
    float32 (float64 for float64 inputs). No valid sample: 0."""
    acc = _acc_dtype(z_a)
    if valid is not None:
        z_a, z_v = z_a[:, valid], z_v[:, valid]
    losses = []
    for a, v in zip(z_a.to(acc), z_v.to(acc)):
        if a.shape[0] == 0:
            losses.append((a.sum() + v.sum()) * 0)  # keeps both inputs in the graph: zero grads
            continue
        logits = nnf.normalize(v, dim=-1, eps=NORM_EPS) @ nnf.normalize(a, dim=-1, eps=NORM_EPS).T / tau
        target = torch.arange(a.shape[0], device=a.device)
        losses.append((nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)) / 2)
    per_block = torch.stack(losses)
    if reduction == "none":
        return per_block
    return per_block.sum() if reduction == "sum" else per_block.mean()


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
    """Log-sum-exps of S_ij = cos(z_row[k, i], z_col[k, j]) / tau.

    z_row (K, Br, d), z_col (K, Bc, d), valid_row (Br,), valid_col (Bc,) bool.
    Returns lse_row (K, Br) over valid columns, lse_col (K, Bc) over valid rows (zeros when
    col_lse is False) and diag (K, Br) = S[i, i + row_offset], float32 (float64 for float64
    inputs). Entries of invalid rows / columns, of rows or columns with nothing valid to
    sum over, and diag entries whose column is out of range or invalid are 0.
    """
    acc = _acc_dtype(z_row)
    K, Br, _ = z_row.shape
    Bc = z_col.shape[1]
    vr = valid_row if valid_row is not None else torch.ones(Br, dtype=torch.bool, device=z_row.device)
    vc = valid_col if valid_col is not None else torch.ones(Bc, dtype=torch.bool, device=z_row.device)
    s = nnf.normalize(z_row.to(acc), dim=-1, eps=NORM_EPS) @ nnf.normalize(z_col.to(acc), dim=-1, eps=NORM_EPS).transpose(1, 2) / tau
    pair = vr[:, None] & vc[None, :]  # (Br, Bc)
    s_masked = s.masked_fill(~pair, float("-inf"))

    def lse(dim: int) -> Tensor:
        has = pair.any(dim=dim)
        safe = torch.where(has.unsqueeze(dim), s_masked, torch.zeros_like(s_masked))
        return torch.where(has, torch.logsumexp(safe, dim=dim), torch.zeros((), dtype=acc, device=s.device))

    lse_row = lse(-1)
    lse_col = lse(-2) if col_lse else s.new_zeros(K, Bc)
    cols = torch.arange(Br, device=s.device) + row_offset
    in_range = (cols >= 0) & (cols < Bc)
    safe_cols = cols.clamp(0, Bc - 1)
    diag_ok = in_range & vr & vc[safe_cols]
    diag = torch.where(diag_ok, s[:, torch.arange(Br, device=s.device), safe_cols], torch.zeros((), dtype=acc, device=s.device))
    return lse_row, lse_col, diag


def cosine_lse_bwd(
    g_lse_row: Tensor, g_lse_col: Tensor, g_diag: Tensor, z_row: Tensor, z_col: Tensor,
    valid_row: Tensor | None, valid_col: Tensor | None, lse_row: Tensor, lse_col: Tensor,
    tau: float, row_offset: int, col_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Explicit backward of ``cosine_lse`` (the kernels' math), contiguous, in the inputs' dtypes.

    Over valid pairs, P = exp(S - lse_row), Q = exp(S - lse_col):
    dS = g_row P + g_col Q + g_diag at (i, i + row_offset); d zhat_row = dS zhat_col / tau,
    d zhat_col = dS^T zhat_row / tau; dz = (d zhat - zhat (zhat . d zhat)) / |z|.
    """
    acc = _acc_dtype(z_row)
    K, Br, _ = z_row.shape
    Bc = z_col.shape[1]
    vr = valid_row if valid_row is not None else torch.ones(Br, dtype=torch.bool, device=z_row.device)
    vc = valid_col if valid_col is not None else torch.ones(Bc, dtype=torch.bool, device=z_row.device)
    pair = vr[:, None] & vc[None, :]
    zr, zc = z_row.to(acc), z_col.to(acc)
    norm_r = zr.norm(dim=-1, keepdim=True)
    norm_c = zc.norm(dim=-1, keepdim=True)
    ur, uc = zr / norm_r.clamp_min(NORM_EPS), zc / norm_c.clamp_min(NORM_EPS)
    s = ur @ uc.transpose(1, 2) / tau
    ds = g_lse_row.to(acc)[..., None] * torch.exp(s - lse_row.to(acc)[..., None])
    if col_lse:
        ds = ds + g_lse_col.to(acc)[:, None, :] * torch.exp(s - lse_col.to(acc)[:, None, :])
    on_diag = torch.arange(Bc, device=s.device)[None, :] == torch.arange(Br, device=s.device)[:, None] + row_offset
    ds = ds + torch.where(on_diag, g_diag.to(acc)[..., None], torch.zeros((), dtype=acc, device=s.device))
    ds = torch.where(pair, ds, torch.zeros((), dtype=acc, device=s.device))

    def through_norm(d_unit: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
        radial = torch.where(norm > NORM_EPS, (unit * d_unit).sum(-1, keepdim=True), 0.0)
        return (d_unit - unit * radial) / norm.clamp_min(NORM_EPS)

    dz_row = through_norm(ds @ uc / tau, ur, norm_r)
    dz_col = through_norm(ds.transpose(1, 2) @ ur / tau, uc, norm_c)
    return dz_row.to(z_row.dtype).contiguous(), dz_col.to(z_col.dtype).contiguous()
