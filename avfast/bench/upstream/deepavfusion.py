"""DeepAVFusion the way the released code computes it (UPSTREAM.md §1), on our model's parameters.

What upstream does per layer l, fusion tokens F (B, nF, D), image V (B, Nv, D), audio A (B, Na, D):

* V' = ImageBlock_l(cat[F ; V])[:, nF:] and A' = AudioBlock_l(cat[F ; A])[:, nF:]: the
  modality blocks run over the concatenation, so the nF fusion rows get queries, attention
  output, projection and MLP that are computed and thrown away (32 of 228 image rows and 32 of
  128 audio rows at the released sizes), and each concatenation and slice is a copy;
* F' = FusionBlock_l(F, V, A) with upstream's fusion blocks, literally
  (``avfast.reference.fusion_blocks``):
  - dense: every pair token [LN(a_i) ; LN(v_j)] is MATERIALISED, (B, Na*Nv, 2D) (18,816
    pairs at 96 x 196: 3.7 GB in fp32 at B = 32, per layer, kept for backward), projected by
    one Linear(2D, 2d') (about 22 GFLOP per sample and layer) and attended to with one softmax
    over all Na*Nv pairs, the (B, H, nF, Na*Nv) scores stored;
  - factorized: two cross-attentions of the aggregation tokens, then the (n_aggV * n_aggA)
    pair grid [dV_i ; dA_j] materialised (8 x 8 pairs), projected and attended to;
  both with unfused softmax attention, DropPath on the two residual branches as upstream;
* then LayerNorms on the three streams; the classifier averages three linear heads on the
  mean-pooled streams and takes timm's label-smoothing (or soft-target) cross-entropy.

AV-MAE pre-training (``UpstreamDeepAVFusionMAE``): per-sample random masking by argsort of
uniform noise, the same encoder on the kept patches, per modality a decoder of full ViT blocks
over [embedded fusion tokens ; restored patch tokens] (the fusion rows again computed to the
end and dropped), norm-pix MSE on the masked patches.

Against ``avfast.models.deepavfusion`` (same math, float64 equal): ours skips the discarded
fusion rows and, for the dense block, never forms the pair tensor (two attentions sharing the
queries, exact).

    up = UpstreamDeepAVFusion(model)       # shares model's parameters (no copies)
    out = up(frames, audio)                # same keys as model(frames, audio)
    loss, metrics = up.loss(out, batch)
    mae_up = UpstreamDeepAVFusionMAE(mae)  # out = mae_up(frames, audio); mae_up.loss(out)

Both need ``upstream_quirks=True`` (the released fusion attention scale). Not reproduced: the
division of the loss by class frequency of upstream's fine-tuning (a constant factor for
single-label data).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as nnf
from timm.layers import DropPath
from torch import Tensor, nn

from avfast.bench.upstream._common import require_quirks, share_parameters
from avfast.models.deepavfusion import DeepAVFusion, DeepAVFusionEncoder, DeepAVFusionMAE, _check_inputs
from avfast.reference.fusion_blocks import UpstreamDenseFusionBlock, UpstreamFactorizedFusionBlock

# ------------------------------------------------------------------ front-end


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> Tensor:
    """MAE's 2-D sin-cos table as upstream builds it: meshgrid(w, h), the first half of the
    channels from the column index; float64 (gh*gw, dim)."""
    gh, gw = grid
    grid_w, grid_h = torch.meshgrid(torch.arange(gw, dtype=torch.float64), torch.arange(gh, dtype=torch.float64),
                                    indexing="xy")
    grid = torch.stack([grid_w, grid_h]).reshape(2, 1, gh, gw)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = torch.einsum("m,d->md", pos.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], dim=1)


def embed_patches(trunk: nn.Module, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
    """Conv patches + position table (B, N, D); ids_keep (B, K) gathers the kept patches."""
    w = trunk.patch_embed.proj
    t = nnf.conv2d(x, w.weight, w.bias, stride=w.stride).flatten(2).transpose(1, 2) + trunk.pos_embed
    if ids_keep is not None:
        t = t.gather(dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, t.shape[2]))
    return t


# ------------------------------------------------------------------ encoder


class _UpstreamDropPath:
    """Upstream's residuals with DropPath(drop_path) on both branches."""

    def __init__(self, *args, drop_path: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _residuals(self, x_fusion_normed: Tensor, delta: Tensor) -> Tensor:
        x = x_fusion_normed + self.drop_path(delta)  # the residual stream is the normalised tokens
        return x + self.drop_path(self.mlp(self.norm2(x)))


class UpstreamDenseBlock(_UpstreamDropPath, UpstreamDenseFusionBlock):
    """The literal dense block (pair tensor materialised) with upstream's DropPath."""


class UpstreamFactorizedBlock(_UpstreamDropPath, UpstreamFactorizedFusionBlock):
    """The literal factorized block with upstream's DropPath."""


def upstream_fusion_block(ours: nn.Module, cfg) -> nn.Module:
    """The literal block of ``cfg.fusion_arch`` whose parameters, norms' eps and DropPath module
    are those of ``ours`` (an avfast fusion block of the same layout): shared, not copied."""
    D, heads = cfg.embed_dim, cfg.fusion_num_heads
    with torch.device("meta"):
        if cfg.fusion_arch == "factorized":
            ref = UpstreamFactorizedBlock(D, heads, cfg.fusion_attn_ratio, cfg.fusion_mlp_ratio, True,
                                          cfg.num_fusion_tkns)
        else:
            ref = UpstreamDenseBlock(D, heads, cfg.fusion_attn_ratio, cfg.fusion_mlp_ratio, True)
    share_parameters(ref, dict(ours.named_parameters()), f"upstream_fusion_block({cfg.fusion_arch})")
    for name in ("norm1_mm", "norm1_aud", "norm1_img", "norm2"):
        getattr(ref, name).eps = getattr(ours, name).eps
    ref.drop_path = ours.drop_path
    return ref.train(ours.training)


class UpstreamEncoder(nn.Module):
    """Upstream's encoder loop over ``encoder`` (ours; registered) with ``fusion_blocks``, the
    literal blocks sharing its fusion blocks' parameters.

    forward(image (B, 3, S, S), audio (B, 1, mels, frames), ids_keep_image, ids_keep_audio)
    -> normalised image (B, Nv, D), audio (B, Na, D), fusion (B, nF, D) tokens.
    """

    def __init__(self, encoder: DeepAVFusionEncoder, cfg):
        super().__init__()
        self.encoder = encoder
        self.fusion_blocks = nn.ModuleList(upstream_fusion_block(blk, cfg) for blk in encoder.fusion_blocks)

    def forward(self, image: Tensor, audio: Tensor, ids_i: Tensor | None = None,
                ids_a: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.encoder
        x_image, x_audio = embed_patches(enc.image, image, ids_i), embed_patches(enc.audio, audio, ids_a)
        x_fusion = enc.fusion_tokens.expand(image.shape[0], -1, -1)
        nI, nA, nF = x_image.shape[1], x_audio.shape[1], x_fusion.shape[1]
        for blk_i, blk_a, blk_f in zip(enc.image.blocks, enc.audio.blocks, self.fusion_blocks):
            _, new_i = blk_i(torch.cat((x_fusion, x_image), dim=1)).split((nF, nI), dim=1)
            _, new_a = blk_a(torch.cat((x_fusion, x_audio), dim=1)).split((nF, nA), dim=1)
            x_fusion = blk_f(x_fusion, x_image, x_audio)
            x_image, x_audio = new_i, new_a
        return enc.image.norm(x_image), enc.audio.norm(x_audio), enc.fusion_norm(x_fusion)


# ------------------------------------------------------------------ classifier


class UpstreamDeepAVFusion(nn.Module):
    """Upstream's fine-tuning classifier over ``model``'s parameters (``model`` registered,
    ``encoder`` = UpstreamEncoder on ``model.encoder``; nothing copied).

    forward(frames (B, 1, 3, S, S), audio (B, 1, 128, 192)) -> dict as ``DeepAVFusion.forward``:
    "logits" (B, C) (mean of the three heads), "logits_image", "logits_audio", "logits_fusion".
    loss(out, batch) -> (loss, {"loss", "acc"}).
    """

    def __init__(self, model: DeepAVFusion):
        super().__init__()
        if not isinstance(model, DeepAVFusion):
            raise TypeError(f"UpstreamDeepAVFusion: model must be an avfast.models.deepavfusion.DeepAVFusion, "
                            f"got {type(model).__name__}")
        require_quirks("UpstreamDeepAVFusion", model.config)
        self.model = model
        self.encoder = UpstreamEncoder(model.encoder, model.config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        image, audio = _check_inputs("UpstreamDeepAVFusion", self.model.config, frames, audio)
        x_image, x_audio, x_fusion = self.encoder(image, audio)
        out = {
            "logits_image": self.model.image_head(x_image.mean(dim=1)),
            "logits_audio": self.model.audio_head(x_audio.mean(dim=1)),
            "logits_fusion": self.model.fusion_head(x_fusion.mean(dim=1)),
        }
        out["logits"] = (out["logits_image"] + out["logits_audio"] + out["logits_fusion"]) / 3.0
        return out

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """timm's criteria as upstream uses them: label-smoothing CE, (1 - s) NLL + s mean(-log p),
        for (B,) int64 labels; sum(-target log p) for (B, C) soft (mixup) targets."""
        logits, label = out["logits"], batch["label"]
        B, C = logits.shape
        logprobs = nnf.log_softmax(logits, dim=-1)
        if label.dtype == torch.int64 and tuple(label.shape) == (B,):
            s = self.model.config.label_smoothing
            nll = -logprobs.gather(dim=-1, index=label.unsqueeze(1)).squeeze(1)
            loss = ((1.0 - s) * nll + s * -logprobs.mean(dim=-1)).mean()
            hard = label
        elif label.is_floating_point() and tuple(label.shape) == (B, C):
            loss = torch.sum(-label * logprobs, dim=-1).mean()
            hard = label.argmax(-1)
        else:
            raise ValueError(f"UpstreamDeepAVFusion.loss: batch['label'] must be (B,) int64 or (B, C) float = "
                             f"({B},) or ({B}, {C}), got {tuple(label.shape)} {label.dtype}")
        acc = (logits.argmax(-1) == hard).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]


# ------------------------------------------------------------------ AV-MAE


def random_masking(N: int, L: int, ratio: float, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream's masking: argsort of torch.rand(N, L); ids_keep (N, keep), mask (N, L) with 1 =
    masked, ids_restore (N, L)."""
    noise = torch.rand(N, L, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = int(L * (1 - ratio))
    mask = torch.ones([N, L], dtype=dtype, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, dim=1, index=ids_restore), ids_restore


def decode(mae: DeepAVFusionMAE, m: str, x: Tensor, x_fusion: Tensor, ids_restore: Tensor) -> Tensor:
    """Upstream's decoder of modality m: embed, append mask tokens, unshuffle, position table,
    [fusion ; tokens] through every block, predict the token rows -> (B, L, P)."""
    def g(name):
        return getattr(mae, f"{m}_decoder_{name}")

    bs, nF, nMask = x.shape[0], x_fusion.shape[1], ids_restore.shape[1] - x.shape[1]
    x, x_fusion = g("embed")(x), g("embed")(x_fusion)
    x = torch.cat([x, g("mask_token").repeat(bs, nMask, 1)], dim=1)
    x = x.gather(dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])) + g("pos_embed")
    x = torch.cat([x_fusion, x], dim=1)
    for blk in g("blocks"):
        x = blk(x)
    return g("pred")(g("norm")(x[:, nF:, :]))


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C) through upstream's einsum."""
    bs, c = x.shape[:2]
    gH, gW = x.shape[2] // p, x.shape[3] // p
    x = x.reshape(bs, c, gH, p, gW, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(bs, gH * gW, p * p * c)


def patch_loss(target: Tensor, pred: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over the masked patches of the per-patch MSE; target normalised per patch (norm-pix)."""
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()


class UpstreamDeepAVFusionMAE(nn.Module):
    """Upstream's AV-MAE over ``mae``'s parameters (``mae`` registered, ``encoder`` =
    UpstreamEncoder on ``mae.encoder``).

    forward(frames (B, 1, 3, S, S), audio (B, 1, 128, 192)) -> dict as ``DeepAVFusionMAE.forward``
    ("loss", "loss_image", "loss_audio", "pred_image", "pred_audio", "mask_image", "mask_audio");
    the masks draw torch.rand as ours (image first, then audio), so a seed gives both the same
    masks. loss(out, batch=None) -> (out["loss"], {"loss", "loss_image", "loss_audio"}).
    """

    def __init__(self, mae: DeepAVFusionMAE):
        super().__init__()
        if not isinstance(mae, DeepAVFusionMAE):
            raise TypeError(f"UpstreamDeepAVFusionMAE: model must be an avfast.models.deepavfusion.DeepAVFusionMAE, "
                            f"got {type(mae).__name__}")
        require_quirks("UpstreamDeepAVFusionMAE", mae.config)
        self.model = mae
        self.encoder = UpstreamEncoder(mae.encoder, mae.config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        cfg, mae = self.model.config, self.model
        image, audio = _check_inputs("UpstreamDeepAVFusionMAE", cfg, frames, audio)
        B = image.shape[0]
        keep_i, mask_i, restore_i = random_masking(B, cfg.image_tokens, cfg.image_mask_ratio, image.device, image.dtype)
        keep_a, mask_a, restore_a = random_masking(B, cfg.audio_tokens, cfg.audio_mask_ratio, audio.device, audio.dtype)
        x_i, x_a, x_f = self.encoder(image, audio, keep_i, keep_a)
        pred_i = decode(mae, "image", x_i, x_f, restore_i)
        pred_a = decode(mae, "audio", x_a, x_f, restore_a)
        loss_i = patch_loss(patchify(image, cfg.patch_size), pred_i, mask_i, cfg.norm_pix_loss)
        loss_a = patch_loss(patchify(audio, cfg.audio_patch_size), pred_a, mask_a, cfg.norm_pix_loss)
        return {"loss": loss_i + loss_a, "loss_image": loss_i, "loss_audio": loss_a,
                "pred_image": pred_i, "pred_audio": pred_a, "mask_image": mask_i, "mask_audio": mask_a}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor] | None = None
             ) -> tuple[Tensor, dict[str, float]]:
        return out["loss"], {k: out[k].item() for k in ("loss", "loss_image", "loss_audio")}

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        raise TypeError("UpstreamDeepAVFusionMAE.predict: a pre-training model has no logits")


__all__ = [
    "UpstreamDeepAVFusion",
    "UpstreamDeepAVFusionMAE",
    "UpstreamDenseBlock",
    "UpstreamEncoder",
    "UpstreamFactorizedBlock",
    "decode",
    "embed_patches",
    "patch_loss",
    "patchify",
    "random_masking",
    "sincos_pos_embed",
    "upstream_fusion_block",
]
