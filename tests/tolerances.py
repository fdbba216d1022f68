"""Shared pieces of the kernels' test tolerances."""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def score_bound(q: torch.Tensor, keys, scale: float) -> float:
    """|scale| max|q| (max|k_a| + max|k_v|) in the L2 norms of the head vectors: a bound on
    the pair-attention scores."""
    qn = q.double().norm(dim=-1).max().item()
    return abs(scale) * qn * sum(k.double().norm(dim=-1).max().item() for k in keys)


def recompute_term(score_max: float, exact: torch.Tensor) -> float:
    """Kernels recompute exp(S - lse) in fp32 from scores up to ``score_max``: a relative
    rounding of eps32 * score_max, a few times, on the result's magnitude."""
    magnitude = max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    return 4 * EPS32 * score_max * magnitude
