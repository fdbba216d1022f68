"""MA-AVT's block-wise semantic contrastive loss on ``avfast.ops`` (single process and
torch.distributed).

Per block k, with unit features a_i = z_a[k, i] / |z_a[k, i]|, v_i likewise, over the valid
(foreground) samples of the *global* batch and logits S_ij = v_i . a_j / tau:

    L_k = (CE_i(S_i., i) + CE_j(S_.j, j)) / 2,   loss = mean_k L_k  (or sum, or per block).

``BlockwiseContrastiveLoss`` adds upstream's per-block projections (Linear(dim_in, dim_out)
for audio and for vision, one pair per block; keys ``audio_proj.{k}.*``, ``vis_proj.{k}.*``,
so an upstream state_dict loads strictly), computed as one batched GEMM per modality.

Distributed: ``gathered_blockwise_infonce`` gathers the features of every rank with gradient
(``torch.distributed.nn.functional.all_gather``) and scores the local rows against the global
columns. Its value on every rank is the loss of the concatenated global batch, and after
every rank has called ``backward`` each rank's feature gradients are exactly those of the
single-process loss for its slice of the batch. Projection parameters (replicated on every
rank) receive the local samples' share; their *sum* over ranks is the single-process
gradient, so DDP's gradient *averaging* yields 1/world_size of it, as in upstream's MA-AVT
training (multiply the loss by the world size for the single-process step).

Dims: K blocks, B (local) batch, d feature width; dim_in / dim_out of the projections.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from avfast.ops import blockwise_infonce, cosine_lse
from avfast.ops.blockwise_infonce import check_blockwise_inputs, check_reduction, infonce_from_lse, reduce_blocks

Reduction = Literal["mean", "sum", "none"]


_LOCAL_DEPTH = [0]


@contextmanager
def local_negatives() -> Iterator[None]:
    """Inside this block the losses of this module score each rank's batch on its own (no
    gather): for evaluation, where ranks hold shards of unequal size."""
    _LOCAL_DEPTH[0] += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH[0] -= 1


def _world(group) -> int:
    """World size of ``group``; 1 without an initialized process group or inside
    ``local_negatives``."""
    if _LOCAL_DEPTH[0] or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather(t: Tensor, group, world: int) -> list[Tensor]:
    """all_gather without gradient."""
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def gathered_blockwise_infonce(
    z_a: Tensor,
    z_v: Tensor,
    valid: Tensor | None = None,
    tau: float = 0.07,
    reduction: Reduction = "mean",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Blockwise InfoNCE over the global batch of all ranks of ``group``.

    z_a, z_v: (K, B, d) this rank's unnormalized audio / visual features, any float dtype,
    B the same on every rank (pad a short last batch with valid=False samples).
    valid: (B,) bool, False = background sample, removed from rows and columns; None = all
    valid. tau: temperature. reduction: "mean" | "sum" over blocks, or "none" -> (K,).
    group: process group (default: the world).

    Returns the loss of the concatenated global batch (float32; float64 for float64
    inputs), the same value on every rank. Every rank must call this and then ``backward``
    (the gather's backward is a collective). Gradients: see the module docstring. Without
    an initialized process group, or with one rank, this is ``avfast.ops.blockwise_infonce``.
    """
    where = "gathered_blockwise_infonce"
    check_blockwise_inputs(z_a, z_v, valid, reduction, where)
    world = _world(group)
    if world == 1:
        return blockwise_infonce(z_a, z_v, valid=valid, tau=tau, reduction=reduction)
    rank = dist.get_rank(group)
    K, B, d = z_a.shape
    shapes = torch.cat(_gather(torch.tensor([K, B, d], device=z_a.device), group, world)).view(world, 3)
    if not bool((shapes == shapes[rank]).all()):
        sizes = [tuple(s) for s in shapes.tolist()]
        raise ValueError(f"{where}: z_a must be (K, B, d) with the same B on every rank (pad with valid=False "
                         f"samples), got (K, B, d) per rank {sizes}")

    if valid is None:
        valid = torch.ones(B, dtype=torch.bool, device=z_a.device)
    valid_all = torch.cat(_gather(valid.to(torch.uint8), group, world)).bool()  # (world*B,)
    from torch.distributed.nn.functional import all_gather  # with gradient: backward sums over ranks

    g = group if group is not None else dist.group.WORLD
    z_a_all = torch.cat(all_gather(z_a, group=g), dim=1)  # (K, world*B, d)
    z_v_all = torch.cat(all_gather(z_v, group=g), dim=1)

    # local rows i against all columns; row i's positive is column rank*B + i
    offset = rank * B
    lse_va, _, diag = cosine_lse(z_v, z_a_all, tau=tau, valid_row=valid, valid_col=valid_all,
                                 row_offset=offset, col_lse=False)
    lse_av, _, _ = cosine_lse(z_a, z_v_all, tau=tau, valid_row=valid, valid_col=valid_all,
                              row_offset=offset, col_lse=False)
    local = infonce_from_lse(lse_va, lse_av, diag, valid, valid_all.sum())  # (K,) this rank's rows
    # Value: the global loss (sum over ranks). Gradient: only this rank's rows, as the
    # gather's backward sums every rank's contributions to each rank's features.
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return reduce_blocks(local + (total - local.detach()), reduction)


class BlockwiseContrastiveLoss(nn.Module):
    """MA-AVT's block-wise contrastive loss with its per-block projections.

    Args:
        dim_in: width of the pooled shared-token features of each block (768 upstream).
        dim_out: projection width (512 upstream).
        num_blocks: K, the number of transformer blocks (12 upstream).
        tau: fixed temperature (0.07 upstream).
        reduction: "mean" over blocks (upstream's (1/K) sum_k L_k), "sum", or "none" -> (K,).
        group: torch.distributed process group for the global batch (default: the world,
            when initialized).

    Parameters: ``audio_proj`` and ``vis_proj``, ModuleLists of K ``nn.Linear(dim_in,
    dim_out)`` (upstream's keys), applied as one batched GEMM per modality over the stacked
    weights.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int = 512,
        num_blocks: int = 12,
        tau: float = 0.07,
        reduction: Reduction = "mean",
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        check_reduction(reduction, "BlockwiseContrastiveLoss")
        if num_blocks < 1:
            raise ValueError(f"BlockwiseContrastiveLoss: num_blocks must be >= 1, got {num_blocks}")
        self.dim_in, self.dim_out, self.num_blocks = dim_in, dim_out, num_blocks
        self.tau, self.reduction, self.group = tau, reduction, group
        self.audio_proj = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(num_blocks))
        self.vis_proj = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(num_blocks))

    def extra_repr(self) -> str:
        return (f"dim_in={self.dim_in}, dim_out={self.dim_out}, num_blocks={self.num_blocks}, "
                f"tau={self.tau}, reduction={self.reduction!r}")

    def _blocks(self, name: str, feats: Tensor | Sequence[Tensor]) -> Tensor:
        """(K, B, dim_in) from a tensor or a list of K (B, dim_in) tensors."""
        K, D = self.num_blocks, self.dim_in
        if not isinstance(feats, Tensor):
            feats = list(feats)
            if len(feats) != K or any(not isinstance(f, Tensor) or f.dim() != 2 for f in feats):
                got = [tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__ for f in feats]
                raise ValueError(f"BlockwiseContrastiveLoss: {name} must be (K, B, dim_in) = ({K}, B, {D}) or a list "
                                 f"of K={K} (B, dim_in) tensors, got a list of {got}")
            feats = torch.stack(feats)
        if feats.dim() != 3 or feats.shape[0] != K or feats.shape[2] != D:
            raise ValueError(f"BlockwiseContrastiveLoss: {name} must be (K, B, dim_in) = ({K}, B, {D}), "
                             f"got {tuple(feats.shape)}")
        return feats

    @staticmethod
    def _project(x: Tensor, proj: nn.ModuleList) -> Tensor:
        """x (K, B, dim_in) -> (K, B, dim_out): x[k] @ W_k^T + b_k for all k in one bmm."""
        weight = torch.stack([lin.weight for lin in proj])  # (K, dim_out, dim_in)
        bias = torch.stack([lin.bias for lin in proj])  # (K, dim_out)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def project(self, audio_feats: Tensor | Sequence[Tensor], visual_feats: Tensor | Sequence[Tensor]
                ) -> tuple[Tensor, Tensor]:
        """Projected, unnormalized features z_a, z_v (K, B, dim_out)."""
        a = self._blocks("audio_feats", audio_feats)
        v = self._blocks("visual_feats", visual_feats)
        if v.shape[1] != a.shape[1]:
            raise ValueError(f"BlockwiseContrastiveLoss: visual_feats must have B = {a.shape[1]} samples like "
                             f"audio_feats, got {v.shape[1]}")
        return self._project(a, self.audio_proj), self._project(v, self.vis_proj)

    def forward(
        self,
        audio_feats: Tensor | Sequence[Tensor],
        visual_feats: Tensor | Sequence[Tensor],
        valid: Tensor | None = None,
    ) -> Tensor:
        """audio_feats, visual_feats: (K, B, dim_in) pooled shared-token features of every
        block (or lists of K (B, dim_in)); valid: (B,) bool, False for background samples
        (upstream: label == bg_label). Returns the loss () or (K,) with reduction="none",
        over the global batch when torch.distributed is initialized with several ranks."""
        z_a, z_v = self.project(audio_feats, visual_feats)
        if valid is not None and valid.shape != (z_a.shape[1],):
            raise ValueError(f"BlockwiseContrastiveLoss: valid must be (B,) = ({z_a.shape[1]},), "
                             f"got {tuple(valid.shape)}")
        return gathered_blockwise_infonce(z_a, z_v, valid, self.tau, self.reduction, self.group)
