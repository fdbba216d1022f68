"""MA-AVT the way the released code computes it (UPSTREAM.md §2), on our model's parameters.

What upstream does per training step (``MA_AVT.forward_vit`` + ``my_vit.forward_patch``):

* two SEQUENTIAL passes through the one frozen ViT: every block runs on the visual stream,
  then again on the audio stream, each a batch of B sequences of L = N + 2 + n_uni + n_shared
  tokens;
* per stream: conv patch embed, [CLS, patches, BG-CLS], and the (1, N+1, D) position table
  linearly interpolated to N+2 entries on every call;
* LSA on B per-sample COPIES of the token parameters (``tokens.repeat(B, 1, 1)``), once per
  token set, although the tokens do not depend on the input;
* every block with explicit attention: the (B, H, L, L) logits and probabilities are
  materialised (upstream patches timm's attention to return the logits, so no fused SDPA),
  separate LayerNorm / Linear / GELU ops;
* after every block, per-block projections of the mean-pooled shared tokens, an explicit
  (B_fg, B_fg) logits matrix / 0.07 and cross-entropy in both directions; the foreground rows
  are picked with ``torch.where`` (a data-dependent index: a host synchronisation per step);
  under DDP upstream also all-gathers z_v, z_a and the background flags after every block
  (3 small collectives per block; a single process here, so none).

Costly parts against ``avfast.models.mavt.MAVT``: two half-size passes instead of one 2B
batch (twice the launches, smaller GEMMs), the materialised attention maps (memory and bandwidth
grow with L^2 per block and are kept for backward), B-fold LSA, the per-step interpolation
and the host sync. The math is the same: float64 outputs, loss and gradients agree with the
model's to rounding (tests/test_models_mavt.py).

    up = UpstreamMAVT(model)            # shares model's parameters (no copies)
    out = up(frames, audio)             # same keys as model(frames, audio)
    loss, metrics = up.loss(out, batch)

As upstream: a batch without foreground sample gives a NaN cross-entropy and contrastive
term (means over an empty set). Not upstream: a spectrogram whose size is not (S, S) is
resized bilinearly as our model does (only the small test configs need it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avfast.bench.upstream._common import require_quirks
from avfast.models.mavt import MAVT


class UpstreamMAVT(nn.Module):
    """Upstream MA-AVT's formulation over ``model``'s parameters (``model`` is a registered
    submodule; nothing is copied, so ``parameters()`` are the model's and ``requires_grad`` is
    upstream's trainable set). ``model`` must keep ``upstream_quirks=True``.

    forward(frames (B, 1, 3, S, S), audio (B, 1, F, T)) -> dict as ``MAVT.forward``:
        "logits" (B, C), "bg_logit" (B,), "shared_visual", "shared_audio" (K, B, D).
    loss(out, batch) -> (loss, metrics) with metrics loss, ce_fg, bce_bg, contrastive.
    """

    def __init__(self, model: MAVT):
        super().__init__()
        if not isinstance(model, MAVT):
            raise TypeError(f"UpstreamMAVT: model must be an avfast.models.mavt.MAVT, got {type(model).__name__}")
        require_quirks("UpstreamMAVT", model.config)
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    # ------------------------------------------------------------------ upstream's pieces

    def forward_patch(self, img: Tensor) -> Tensor:
        """img (B, 3, S, S) -> (B, N+2, D): conv patches, BG-CLS appended, CLS prepended, the
        position table interpolated along the token index to the token count on every call."""
        vit, p = self.model.vit, self.model.config.patch_size
        x = F.conv2d(img, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=p)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x, self.model.bg_cls_token.expand(x.shape[0], -1, -1)], dim=1)
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = vit.pos_embed
        if pos.shape[1] != x.shape[1]:
            pos = F.interpolate(pos.permute(0, 2, 1), x.shape[1], mode="linear").permute(0, 2, 1)
        return x + pos

    def self_attention(self, lsa: nn.Module, tokens: Tensor, batch: int) -> Tensor:
        """Upstream's LSA on ``batch`` copies of the tokens (n, D) -> (batch, n, D): qkv, explicit
        softmax(q * d^-1/2 k^T), proj; no norm, no residual."""
        D, heads = self.model.config.embed_dim, self.model.config.lsa_heads
        t = tokens[None].repeat(batch, 1, 1)
        n = t.shape[1]
        q, k, v = lsa.qkv(t).reshape(batch, n, 3, heads, D // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return lsa.proj((attn @ v).transpose(1, 2).reshape(batch, n, D))

    @staticmethod
    def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, eps=ln.eps)

    def block(self, blk: nn.Module, x: Tensor) -> Tensor:
        """A timm pre-norm block with upstream's explicit attention: x (B, L, D) -> (B, L, D)."""
        D, h = self.model.config.embed_dim, self.model.config.num_heads
        B, n, _ = x.shape
        qkv = F.linear(self.layer_norm(blk.norm1, x), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(B, n, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (D // h) ** -0.5).softmax(dim=-1)  # (B, H, L, L) materialised
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, n, D), blk.attn.proj.weight, blk.attn.proj.bias)
        y = F.gelu(F.linear(self.layer_norm(blk.norm2, x), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        return x + F.linear(y, blk.mlp.fc2.weight, blk.mlp.fc2.bias)

    # ------------------------------------------------------------------ the model contract

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        model, cfg = self.model, self.model.config
        B = model._check_inputs(frames, audio)
        S, ns, nu = cfg.img_size, cfg.n_shared_tokens, cfg.n_visual_tokens
        if audio.shape[-2:] != (S, S):  # not upstream: our model's resize for small configs
            audio = F.interpolate(audio, size=(S, S), mode="bilinear", align_corners=False)
        f_a = self.forward_patch(audio.to(frames.dtype).repeat(1, 3, 1, 1))
        f_v = self.forward_patch(frames[:, 0])
        f_a = torch.cat([f_a, self.self_attention(model.audio_attn, model.audio_tokens, B)], dim=1)
        f_v = torch.cat([f_v, self.self_attention(model.visual_attn, model.visual_tokens, B)], dim=1)
        shared = self.self_attention(model.shared_attn, model.shared_tokens, B)
        f_a, f_v = torch.cat([f_a, shared], dim=1), torch.cat([f_v, shared], dim=1)

        shared_v, shared_a = [], []
        for blk in model.vit.blocks:  # the two streams one after the other, block by block
            f_v = self.block(blk, f_v)
            f_a = self.block(blk, f_a)
            shared_v.append(f_v[:, -ns:].mean(dim=1))
            shared_a.append(f_a[:, -ns:].mean(dim=1))

        f_v, f_a = self.layer_norm(model.vit.norm, f_v), self.layer_norm(model.vit.norm, f_a)
        logits = model.fg_class(torch.cat([f_v[:, 0], f_a[:, 0]], dim=-1))
        bg_pos = -(1 + nu + ns)
        bg_logit = model.bg_class(torch.cat([f_v[:, bg_pos], f_a[:, bg_pos]], dim=-1)).squeeze(-1)
        return {"logits": logits, "bg_logit": bg_logit,
                "shared_visual": torch.stack(shared_v), "shared_audio": torch.stack(shared_a)}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Upstream's loss: CE on the foreground rows (picked by ``torch.where``), BCE of the
        background head on every row, and per block an explicit logits matrix
        z_v z_a^T / tau with CE both ways, averaged over the blocks."""
        model = self.model
        p_fg, p_bg = out["logits"], out["bg_logit"]
        B = p_fg.shape[0]
        label = batch.get("label")
        if not isinstance(label, Tensor) or label.shape != (B,) or label.dtype != torch.int64:
            raise ValueError(f"UpstreamMAVT.loss: batch['label'] must be an int64 (B,) = ({B},) tensor, "
                             f"got {getattr(label, 'shape', type(label).__name__)}")
        background = batch.get("background")
        if background is None:
            background = torch.zeros(B, dtype=torch.bool)
        label, bg_label = label.to(p_fg.device), background.to(p_fg.device).long()
        mask = torch.where(bg_label == 0)[0]
        proj = model.contrastive
        cnt = 0
        for i in range(len(model.vit.blocks)):
            audio_feat = F.normalize(proj.audio_proj[i](out["shared_audio"][i]), dim=1)[mask]
            image_feat = F.normalize(proj.vis_proj[i](out["shared_visual"][i]), dim=1)[mask]
            target = torch.arange(len(image_feat), device=p_fg.device)
            pred_img = (1 / proj.tau) * (image_feat @ audio_feat.T)
            cnt = cnt + (F.cross_entropy(pred_img, target) + F.cross_entropy(pred_img.T, target)) / 2
        cnt = cnt / len(model.vit.blocks)
        fg_loss = F.cross_entropy(p_fg[mask], label[mask])
        bg_loss = F.binary_cross_entropy_with_logits(p_bg, bg_label.to(p_bg.dtype))
        total = fg_loss + bg_loss + cnt
        values = [t.item() for t in (total, fg_loss, bg_loss, cnt)]
        return total, dict(zip(("loss", "ce_fg", "bce_bg", "contrastive"), values))

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]


__all__ = ["UpstreamMAVT"]
