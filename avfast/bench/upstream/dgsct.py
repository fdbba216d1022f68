"""DG-SCT the way the released code computes it (UPSTREAM.md §4, AVE ``MMIL_Net``), on our
model's parameters.

What upstream does per step, N = B*T one-second segments:

* data loader: each one-second waveform is tiled by doubling (``cat((w, w))`` until it is
  long enough, then cut) to the 10-s clip HTS-AT expects, so every SEGMENT goes through
  HTS-AT as a full 10-s clip (front-end, 64 x 64 tokens in stage 1: 10x the audio compute of
  one second at the base config);
* tokens (N, L, C) as timm 0.6 keeps them (patch merging at the END of a stage), a reshape to
  the (N, H, W, C) grid around every frozen block call;
* the frozen Swin-V2 and HTS-AT stages side by side, with upstream's block list: for stages of
  unequal depth, ``[None, None, a0, None, None, a1, ...]`` (HTS-AT block k with Swin block
  3k+2; q - 1 Nones for a depth ratio q), a Swin block alone where the entry is None;
* per paired block four adapters (``VisualAdapter``) in upstream's order: audio p1, visual p1
  from the block inputs; x + norm1(attn(x)) + p1; the WHOLE HTS-AT block, + p1; audio p2,
  visual p2 from those states; x + norm2(mlp(x)) + p2; a + p2;
* every adapter in the channels-first (N, C, tokens, 1) conv layout: each call permutes both
  modalities' tokens into it (a copy per adapter, 8 per paired block) and back; the guide is
  mixed over its TOKEN axis first by the 1x1 ``conv_adapter`` (Ny -> Nx "channels", the
  (N, Nx, Cy) product materialised: 80 x 4096 x 192 for the stage-1 audio adapter at B = 8),
  then projected Cy -> Cx by ``fc`` (about twice the FLOPs of the other exact order there);
  the latent tokens expanded to N rows; the channel guidance as the mean over tokens of the
  materialised (N, Nx, Cx) product; the bottleneck as grouped 1x1 ``Conv2d`` + ``BatchNorm2d``
  on (N, C, Nx, 1);
* pooling by the spatial maps of the last p2 adapters (bmm), the visual tokens after Swin's
  final norm, the audio tokens without HTS-AT's;
* ``TemporalAttention``: LSTMs batch-first, then the (T, B, d) sequence-first encoder and
  decoder layers written out (attention weights returned, so no fused attention), gates;
  ``CMBS``: class activation scores sorted over time (top 4 by a full sort), the is-event and
  event classifiers;
* loss from the (B, T, C) one-hot labels: BCE-with-logits(is_event) + BCE-with-logits(av gate,
  a probability) + CE(event) + CE(av score), the targets picked by ``max`` over the one-hot
  rows; ``.item()`` on every term (host syncs).

Costly parts against ``avfast.models.dgsct.DGSCT`` (the same math, float64 equal,
tests/test_models_dgsct.py): the layout copies around every adapter, the token-mixing-first
order where projecting first is cheaper, the materialised channel-guidance product, the
unfused temporal attention. Both tile the audio (``upstream_quirks``) and run the same frozen
backbone blocks.

    up = UpstreamDGSCT(model)          # shares model's parameters (no copies)
    out = up(frames, audio)            # same keys as model(frames, audio)
    loss, metrics = up.loss(out, batch)

Not restated: torchlibrosa's conv1d STFT (the model's ``torch.stft`` front-end computes the
same DFT), CMBS's AV/VA interaction branches (computed and discarded upstream; the model holds
no parameters for them), mixup (never applied upstream). Not upstream: ``squeeze(-1)`` where
upstream's ``squeeze()`` fails at B = 1; the per-second ``logits`` are assembled as the model
does (their argmax is upstream's decision, ``upstream_decision``); acc is a fraction, not a
percentage; the frozen backbones are in the mode the model keeps them in (upstream's train mode
with ``backbone_train_mode=True``); the gradient reaching each BatchNorm2d is made contiguous
(one copy per call in backward), as PyTorch's CPU kernel gets the gradients of upstream's
layout wrong (``_ContiguousGrad``).

The pieces are functions of the model too (``upstream_adapter``, ``upstream_features``,
``upstream_temporal_and_head``, ``upstream_decision``), so that the tests can run them with
``paper=True`` on a model built with ``upstream_quirks=False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avfast.bench.upstream._common import require_quirks
from avfast.models.dgsct import DGSCT, DualGuidedAdapter

# ------------------------------------------------------------------ the adapter


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. Not upstream: PyTorch's CPU
    batch-norm backward (seen in 2.11) returns wrong input, weight and bias gradients for an
    NCHW-contiguous (N, C, L, 1) input when the incoming gradient has strides (., 1, C, 1),
    which is what upstream's ``squeeze(-1).permute(0, 2, 1)`` after the BatchNorm2d sends back."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _batch_norm_2d(bn: nn.modules.batchnorm._BatchNorm, z: Tensor) -> Tensor:
    """``nn.BatchNorm2d.forward`` with ``bn``'s parameters and statistics on z (N, C, H, W):
    batch statistics and a running-stats update in train mode, the running stats in eval.
    The gradient reaching it is made contiguous (``_ContiguousGrad``)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    out = F.batch_norm(z.contiguous(), bn.running_mean if keep else None, bn.running_var if keep else None,
                       bn.weight, bn.bias, use_batch, momentum, bn.eps)
    return _ContiguousGrad.apply(out)


def upstream_adapter(ad: DualGuidedAdapter, x4: Tensor, y4: Tensor, offset: float | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Upstream ``VisualAdapter.forward`` (bottleneck, multimodal) in its (N, C, tokens, 1)
    layout: x4 (N, Cx, Nx, 1) target, y4 (N, Cy, Ny, 1) guide. 1x1 conv over the guide's TOKEN
    axis first, then the channel Linear; grouped 1x1 convs and BatchNorm2d (``ad``'s mode) in
    the bottleneck. offset: the guidance constant (upstream 1 - alpha, the default).
    Returns (update (N, Cx, Nx, 1), spatial map (N, 1, Nx))."""
    offset = 1.0 - ad.alpha if offset is None else offset
    n = x4.shape[0]
    guide = F.conv2d(y4.transpose(2, 1), ad.guide_mix_weight[..., None, None], ad.guide_mix_bias)  # (N, Nx, Cy, 1)
    guide = F.linear(guide.squeeze(-1), ad.guide_proj.weight, ad.guide_proj.bias).permute(0, 2, 1).unsqueeze(-1)
    tokens = ad.latent_tokens.expand(n, -1, -1)
    to_guide = torch.softmax(torch.bmm(tokens, guide.squeeze(-1)), dim=-1)
    tokens = tokens + torch.bmm(to_guide, guide.squeeze(-1).permute(0, 2, 1))
    to_tokens = torch.softmax(torch.bmm(x4.squeeze(-1).permute(0, 2, 1), tokens.permute(0, 2, 1)), dim=-1)
    x4 = x4 + ad.gate_latent * torch.bmm(to_tokens, tokens).permute(0, 2, 1).unsqueeze(-1)
    pooled = guide.mean(dim=2).squeeze(-1)
    guide_q = F.relu(ad.channel_guide(pooled)).unsqueeze(-2)
    target_q = F.relu(ad.channel_target(x4.squeeze(-1).permute(0, 2, 1)))
    joint = F.relu(ad.channel_down((guide_q * target_q).mean(-2)))
    channel = ad.channel_up(joint).sigmoid().reshape(n, 1, -1)
    attended = x4.squeeze(-1).permute(0, 2, 1) * (channel + 1)
    spatial = ad.spatial_score(F.relu(ad.spatial_target(attended)) * F.relu(ad.spatial_guide(pooled)).unsqueeze(-2))
    spatial_sig = spatial.transpose(2, 1).sigmoid().transpose(2, 1)
    spatial_map = torch.softmax(torch.tanh(spatial).transpose(2, 1), dim=-1)
    x = x4.squeeze(-1).permute(0, 2, 1) * (ad.alpha * channel + ad.beta * spatial_sig + offset)
    x4 = ad.ln_before(x).permute(0, 2, 1).unsqueeze(-1)
    z = F.conv2d(x4, ad.down_weight[..., None, None], groups=ad.groups)
    z = _batch_norm_2d(ad.bn1, z)
    z = F.conv2d(F.relu(z), ad.up_weight[..., None, None], groups=ad.groups)
    z = _batch_norm_2d(ad.bn2, z)
    out = ad.ln_post(z.squeeze(-1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(-1)
    return ad.gate * out, spatial_map


def as_conv(t: Tensor) -> Tensor:
    """(N, L, C) -> upstream's (N, C, L, 1)."""
    return t.permute(0, 2, 1).unsqueeze(-1)


def from_conv(t: Tensor) -> Tensor:
    """(N, C, L, 1) -> (N, L, C)."""
    return t.squeeze(-1).permute(0, 2, 1)


# ------------------------------------------------------------------ backbones, adapters, pooling


def _grid(t: Tensor) -> Tensor:
    """(N, L, C) -> (N, sqrt L, sqrt L, C), the layout the timm 1.x blocks take."""
    side = math.isqrt(t.shape[1])
    return t.reshape(t.shape[0], side, side, t.shape[2])


def upstream_features(model: DGSCT, frames: Tensor, audio: Tensor, paper: bool = False) -> tuple[Tensor, Tensor]:
    """Upstream ``MMIL_Net.forward_swin`` up to the pooled features, with the data loader's
    tiling of each second: frames (B, T, 3, S, S), audio (B, T, L) -> f_v (N, Cv), f_a (N, Ca).
    paper=True (not upstream; the tests' reference of ``upstream_quirks=False``): zero padding,
    guidance factor + 1, Eq. 2 on the audio side, HTS-AT's final norm."""
    cfg = model.config
    n = frames.shape[0] * frames.shape[1]
    wave = audio.reshape(n, -1)
    if paper:
        wave = torch.cat([wave, wave.new_zeros(n, max(cfg.audio_clip_samples - wave.shape[1], 0))], dim=1)
    while wave.size(-1) < cfg.audio_clip_samples:  # the data loader's tiling
        wave = torch.cat((wave, wave), dim=-1)
    wave = wave[:, :cfg.audio_clip_samples]
    f_v = model.visual.patch_embed(frames.reshape(n, 3, cfg.img_size, cfg.img_size)).flatten(1, 2)
    f_a = model.audio.patch_embed(model.audio.front_end(wave)).flatten(1, 2)

    offset = 1.0 if paper else 1 - cfg.guide_alpha
    idx = 0
    stages = list(zip(model.visual.layers, model.audio.layers))
    for s, (vstage, astage) in enumerate(stages):
        if len(vstage.blocks) == len(astage.blocks):
            aud_blocks = list(astage.blocks)
        else:  # upstream's hard-coded [None, None, a0, None, None, a1, ...] for 18 vs 6
            q = len(vstage.blocks) // len(astage.blocks)
            aud_blocks = [blk for a_blk in astage.blocks for blk in [None] * (q - 1) + [a_blk]]
            assert len(aud_blocks) == len(vstage.blocks)
        for blk, blk_a in zip(vstage.blocks, aud_blocks):
            if blk_a is None:
                f_v = blk(_grid(f_v)).flatten(1, 2)
                continue
            ad = model.adapters[idx]
            a_res, _ = upstream_adapter(ad.audio_p1, as_conv(f_a), as_conv(f_v), offset)
            v_res, _ = upstream_adapter(ad.visual_p1, as_conv(f_v), as_conv(f_a), offset)
            f_v = f_v + blk.drop_path1(blk.norm1(blk._attn(_grid(f_v)))).flatten(1, 2)
            f_v = f_v + from_conv(v_res)
            if paper:
                f_a = f_a + blk_a.drop_path1(blk_a._attn(blk_a.norm1(_grid(f_a)))).flatten(1, 2)
            else:
                f_a = blk_a(_grid(f_a)).flatten(1, 2)
            f_a = f_a + from_conv(a_res)
            a_res, a_map = upstream_adapter(ad.audio_p2, as_conv(f_a), as_conv(f_v), offset)
            v_res, v_map = upstream_adapter(ad.visual_p2, as_conv(f_v), as_conv(f_a), offset)
            f_v = f_v + blk.drop_path2(blk.norm2(blk.mlp(f_v)))
            f_v = f_v + from_conv(v_res)
            if paper:
                f_a = f_a + blk_a.drop_path2(blk_a.mlp(blk_a.norm2(f_a)))
            f_a = f_a + from_conv(a_res)
            idx += 1
        if s + 1 < len(stages):  # timm 0.6: the next stage's patch merging ends this stage
            f_v = stages[s + 1][0].downsample(_grid(f_v)).flatten(1, 2)
        if astage.downsample is not None:
            f_a = astage.downsample(_grid(f_a)).flatten(1, 2)
    f_v = model.visual.norm(f_v)
    if paper:
        f_a = model.audio.norm(f_a)
    return torch.bmm(v_map, f_v).squeeze(1), torch.bmm(a_map, f_a).squeeze(1)


# ------------------------------------------------------------------ temporal module and head


def _attention(mha: nn.MultiheadAttention, q: Tensor, kv: Tensor) -> Tensor:
    """``mha`` (the model's, batch-first) called sequence-first as upstream's: q (Lq, B, d),
    kv (Lk, B, d); the head-averaged weights computed as torch does by default."""
    return F.multi_head_attention_forward(
        q, kv, kv, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias, training=mha.training,
        need_weights=True)[0]


def _encoder_layer(layer: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    src = layer.norm1(src + layer.dropout1(_attention(layer.self_attn, src, src)))
    return layer.norm2(src + layer.dropout2(layer.linear2(layer.dropout(F.relu(layer.linear1(src))))))


def _encoder(module: nn.Module, x: Tensor) -> Tensor:
    """InternalTemporalRelationModule: affine_matrix, then the encoder layers, (T, B, .)."""
    x = module.proj(x)
    for layer in module.encoder.layers:
        x = _encoder_layer(layer, x)
    return x


def _decoder(module: nn.Module, tgt: Tensor, memory: Tensor) -> Tensor:
    """CrossModalRelationAttModule: affine_matrix, then one decoder layer attending over
    [memory; tgt], (T, B, .)."""
    tgt, layer = module.proj(tgt), module.layer
    memory = torch.cat([memory, tgt], dim=0)
    tgt = layer.norm1(tgt + layer.dropout1(_attention(layer.multihead_attn, tgt, memory)))
    return layer.norm2(tgt + layer.dropout2(layer.linear2(layer.dropout(F.relu(layer.linear1(tgt))))))


def upstream_temporal_and_head(model: DGSCT, f_v: Tensor, f_a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upstream ``TemporalAttention`` + ``CMBS`` with their (T, B, d) layout, f_v (B, T, Cv),
    f_a (B, T, Ca) -> is_event (B, T), event (B, E), av_score (B, E), av_gate (B, T)
    (transposed back as upstream's training loop does)."""
    tm, hd = model.temporal, model.head
    audio_feature = tm.audio_fc(f_a)
    visual_feature = tm.fc_dropout(F.relu(tm.video_fc(f_v)))
    audio_rnn, _ = tm.audio_rnn(audio_feature)
    visual_rnn, _ = tm.video_rnn(visual_feature)
    audio_in, visual_in = audio_rnn.transpose(1, 0).contiguous(), visual_rnn.transpose(1, 0).contiguous()
    video_kv = _encoder(tm.video_encoder, visual_in)
    audio_query = _decoder(tm.audio_decoder, audio_in, video_kv)
    audio_kv = _encoder(tm.audio_encoder, audio_in)
    video_query = _decoder(tm.video_decoder, visual_in, audio_kv)
    audio_gate, video_gate = torch.sigmoid(tm.audio_gate(audio_kv)), torch.sigmoid(tm.video_gate(video_kv))
    video_query = video_query + audio_gate * video_query * tm.gamma
    audio_query = audio_query + video_gate * audio_query * tm.gamma
    av_gate = audio_gate * video_gate

    video_cas = hd.video_cas(video_query).permute(1, 0, 2)
    audio_cas = hd.audio_cas(audio_query).permute(1, 0, 2)
    score_v = video_cas.sort(descending=True, dim=1)[0][:, :hd.topk, :].mean(1)
    score_a = audio_cas.sort(descending=True, dim=1)[0][:, :hd.topk, :].mean(1)
    av_score = (score_v + score_a) / 2
    fused = (video_query + audio_query) / 2
    is_event = hd.is_event(fused)  # (T, B, 1)
    event = hd.event(fused.transpose(1, 0).max(1)[0]) + hd.gamma * av_score
    return is_event.transpose(1, 0).squeeze(-1), event, av_score, av_gate.transpose(1, 0).squeeze(-1)


def upstream_decision(is_event: Tensor, event: Tensor, background: int) -> Tensor:
    """Upstream ``compute_accuracy_supervised``'s prediction (B, T): the clip's event class
    where sigmoid(is_event) > 0.5, else background."""
    pred = (is_event.sigmoid() > 0.5).long() * event.argmax(-1)[:, None]
    pred[is_event.sigmoid() <= 0.5] = background
    return pred


# ------------------------------------------------------------------ the model contract


class UpstreamDGSCT(nn.Module):
    """Upstream DG-SCT's formulation over ``model``'s parameters (``model`` is a registered
    submodule; nothing is copied, so ``parameters()`` are the model's and ``requires_grad`` is
    upstream's trainable set). ``model`` must keep ``upstream_quirks=True`` and
    ``loss_type="upstream"``.

    forward(frames (B, T, 3, S, S), audio (B, T, L)) -> dict as ``DGSCT.forward``: "logits"
        (B, T, C), "is_event" (B, T), "event_logits", "av_score" (B, E), "av_gate" (B, T),
        "visual_features" (B, T, Cv), "audio_features" (B, T, Ca).
    loss(out, batch) -> (loss, metrics) with metrics loss, loss_is_event, loss_av_gate,
        loss_event, loss_av_score, acc.
    """

    def __init__(self, model: DGSCT):
        super().__init__()
        if not isinstance(model, DGSCT):
            raise TypeError(f"UpstreamDGSCT: model must be an avfast.models.dgsct.DGSCT, got {type(model).__name__}")
        require_quirks("UpstreamDGSCT", model.config)
        if model.config.loss_type != "upstream":
            raise ValueError(f"UpstreamDGSCT: the model must be built with loss_type='upstream' (the released "
                             f"code's loss), got {model.config.loss_type!r}")
        self.model = model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        model = self.model
        model._check_inputs(frames, audio)
        B, T = frames.shape[:2]
        f_v, f_a = upstream_features(model, frames, audio)
        f_v, f_a = f_v.view(B, T, -1), f_a.view(B, T, -1)
        is_event, event, av_score, av_gate = upstream_temporal_and_head(model, f_v, f_a)
        # not upstream: per-second logits whose argmax is upstream's decision, as the model's
        foreground = is_event[..., None] + (event - event.amax(-1, keepdim=True))[:, None, :]
        logits = torch.cat([foreground, torch.zeros_like(is_event)[..., None]], dim=-1)
        return {"logits": logits, "is_event": is_event, "event_logits": event, "av_score": av_score,
                "av_gate": av_gate, "visual_features": f_v, "audio_features": f_a}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Upstream's loss from the (B, T, C) one-hot labels (built from batch["segment_labels"]
        (B, T), else batch["label"] (B,) for every second): BCE-with-logits(is_event, is an
        event) + BCE-with-logits(av_gate, is an event) + CE(event_logits, clip event) +
        CE(av_score, clip event), the clip event = max over time of the per-second argmax of
        the foreground one-hot columns."""
        is_event, av_gate = out["is_event"], out["av_gate"]
        B, T = is_event.shape
        C = self.model.config.num_classes
        target = self.model.segment_targets(batch, B, T).to(is_event.device)
        labels = F.one_hot(target, C).to(is_event.dtype)  # upstream's (B, T, C) ground truth
        labels_bce, labels_evn = labels[:, :, :-1].max(-1)
        labels_event, _ = labels_evn.max(-1)
        loss_is_event = F.binary_cross_entropy_with_logits(is_event, labels_bce)
        label_is_gate = F.binary_cross_entropy_with_logits(av_gate, labels_bce)
        loss_cas = F.cross_entropy(out["av_score"], labels_event)
        loss_event_class = F.cross_entropy(out["event_logits"], labels_event)
        loss = loss_is_event + label_is_gate + loss_event_class + loss_cas
        pred = upstream_decision(is_event.detach(), out["event_logits"].detach(), C - 1)
        _, targets = labels.max(-1)
        acc = pred.eq(targets).sum().double() / pred.numel()
        metrics = {"loss": loss.item(), "loss_is_event": loss_is_event.item(), "loss_av_gate": label_is_gate.item(),
                   "loss_event": loss_event_class.item(), "loss_av_score": loss_cas.item(), "acc": acc.item()}
        return loss, metrics

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]


__all__ = ["UpstreamDGSCT", "as_conv", "from_conv", "upstream_adapter", "upstream_decision", "upstream_features",
           "upstream_temporal_and_head"]
