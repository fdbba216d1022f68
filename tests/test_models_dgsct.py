"""DG-SCT: tiny forward/backward, the (N, tokens, C) adapter and the whole block wiring against
upstream's formulation written literally (float64), upstream checkpoint keys, quirks, losses."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avfast.models.dgsct import DGSCT, DGSCTConfig, DualGuidedAdapter, build

B, T = 2, 10


def inputs(dtype=torch.float32, batch=B, samples=32000, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, T, 3, 32, 32, generator=g, dtype=dtype)
    audio = torch.randn(batch, T, samples, generator=g, dtype=dtype) * 0.1
    return frames, audio


def randomize_trainable(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every trainable tensor (gates, BN statistics included): with upstream's
    zero gates every adapter starts as a no-op and its inner gradients vanish."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if "gate" in name else 0.2))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean") and not name.startswith(("visual.", "audio.")):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype) * 0.1)
            elif name.endswith("running_var") and not name.startswith(("visual.", "audio.")):
                buf.copy_(torch.rand(buf.shape, generator=g, dtype=buf.dtype) + 0.5)
    return model


def tiny(dtype=torch.float64, seed=0, **overrides) -> DGSCT:
    torch.manual_seed(seed)
    return randomize_trainable(build("tiny", **overrides).to(dtype), seed)


# ---------------------------------------------------------------------- upstream, literally


def upstream_adapter(ad: DualGuidedAdapter, x4: torch.Tensor, y4: torch.Tensor, training: bool, offset: float):
    """Upstream VisualAdapter.forward (bottleneck, multimodal) in its (N, C, tokens, 1) layout:
    1x1 conv over the guide's TOKEN axis first, then the channel Linear; grouped 1x1 convs and
    BatchNorm2d in the bottleneck. Returns (update (N, Cx, Nx, 1), spatial map (N, 1, Nx))."""
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
    z = F.batch_norm(z, ad.bn1.running_mean.clone(), ad.bn1.running_var.clone(), ad.bn1.weight, ad.bn1.bias,
                     training, 0.1, ad.bn1.eps)
    z = F.conv2d(F.relu(z), ad.up_weight[..., None, None], groups=ad.groups)
    z = F.batch_norm(z, ad.bn2.running_mean.clone(), ad.bn2.running_var.clone(), ad.bn2.weight, ad.bn2.bias,
                     training, 0.1, ad.bn2.eps)
    out = ad.ln_post(z.squeeze(-1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(-1)
    return ad.gate * out, spatial_map


def as_conv(t: torch.Tensor) -> torch.Tensor:
    """(N, L, C) -> upstream's (N, C, L, 1)."""
    return t.permute(0, 2, 1).unsqueeze(-1)


def from_conv(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(-1).permute(0, 2, 1)


def upstream_features(model: DGSCT, frames: torch.Tensor, audio: torch.Tensor, paper: bool = False):
    """Upstream MMIL_Net.forward_swin up to the pooled features, with (N, L, C) tokens as timm
    0.6 keeps them (patch merging at the end of a stage), upstream's hard-coded block list for
    unequal stages, and its loop of p1/p2 adapters; the data loader's tiling of each second.
    paper=True: the paper's form instead (zero padding, factor + 1, Eq. 2 on the audio side,
    HTS-AT's final norm)."""
    cfg = model.config
    n = frames.shape[0] * frames.shape[1]
    wave = audio.reshape(n, -1)
    if paper:
        wave = torch.cat([wave, wave.new_zeros(n, max(cfg.audio_clip_samples - wave.shape[1], 0))], dim=1)
    while wave.size(-1) < cfg.audio_clip_samples:
        wave = torch.cat((wave, wave), dim=-1)
    wave = wave[:, :cfg.audio_clip_samples]
    f_v = model.visual.patch_embed(frames.reshape(n, 3, cfg.img_size, cfg.img_size)).flatten(1, 2)
    f_a = model.audio.patch_embed(model.audio.front_end(wave)).flatten(1, 2)

    def grid(t):
        side = int(math.isqrt(t.shape[1]))
        return t.reshape(t.shape[0], side, side, t.shape[2])

    offset = 1.0 if paper else 1 - cfg.guide_alpha
    idx = 0
    stages = list(zip(model.visual.layers, model.audio.layers))
    for s, (vstage, astage) in enumerate(stages):
        if len(vstage.blocks) == len(astage.blocks):
            aud_blocks = list(astage.blocks)
        else:  # upstream's hard-coded [None, None, a0, None, None, a1, ...] for 18 vs 6
            aud_blocks = [blk for a_blk in astage.blocks for blk in (None, None, a_blk)]
            assert len(aud_blocks) == len(vstage.blocks)
        for blk, blk_a in zip(vstage.blocks, aud_blocks):
            if blk_a is None:
                f_v = blk(grid(f_v)).flatten(1, 2)
                continue
            ad = model.adapters[idx]
            a_res, _ = upstream_adapter(ad.audio_p1, as_conv(f_a), as_conv(f_v), False, offset)
            v_res, _ = upstream_adapter(ad.visual_p1, as_conv(f_v), as_conv(f_a), False, offset)
            f_v = f_v + blk.norm1(blk._attn(grid(f_v))).flatten(1, 2)
            f_v = f_v + from_conv(v_res)
            if paper:
                f_a = f_a + blk_a._attn(blk_a.norm1(grid(f_a))).flatten(1, 2)
            else:
                f_a = blk_a(grid(f_a)).flatten(1, 2)
            f_a = f_a + from_conv(a_res)
            a_res, a_map = upstream_adapter(ad.audio_p2, as_conv(f_a), as_conv(f_v), False, offset)
            v_res, v_map = upstream_adapter(ad.visual_p2, as_conv(f_v), as_conv(f_a), False, offset)
            f_v = f_v + blk.norm2(blk.mlp(f_v))
            f_v = f_v + from_conv(v_res)
            if paper:
                f_a = f_a + blk_a.mlp(blk_a.norm2(f_a))
            f_a = f_a + from_conv(a_res)
            idx += 1
        if s + 1 < len(stages):  # timm 0.6: the next stage's patch merging ends this stage
            f_v = stages[s + 1][0].downsample(grid(f_v)).flatten(1, 2)
        if astage.downsample is not None:
            f_a = astage.downsample(grid(f_a)).flatten(1, 2)
    f_v = model.visual.norm(f_v)
    if paper:
        f_a = model.audio.norm(f_a)
    return torch.bmm(v_map, f_v).squeeze(1), torch.bmm(a_map, f_a).squeeze(1)


def seq_first(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    copy = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, dropout=0.0).to(mha.in_proj_weight.dtype)
    copy.load_state_dict(mha.state_dict())
    return copy


def upstream_temporal_and_head(model: DGSCT, f_v: torch.Tensor, f_a: torch.Tensor):
    """Upstream TemporalAttention + CMBS (eval mode) with their (T, B, d) layout and their
    encoder/decoder layers written out."""
    tm, hd = model.temporal, model.head

    def encoder_layer(layer, src):
        src = layer.norm1(src + seq_first(layer.self_attn)(src, src, src)[0])
        return layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))

    def encoder(module, x):
        x = module.proj(x)
        for layer in module.encoder.layers:
            x = encoder_layer(layer, x)
        return x

    def decoder(module, tgt, memory):
        tgt, layer = module.proj(tgt), module.layer
        memory = torch.cat([memory, tgt], dim=0)
        tgt = layer.norm1(tgt + seq_first(layer.multihead_attn)(tgt, memory, memory)[0])
        return layer.norm2(tgt + layer.linear2(F.relu(layer.linear1(tgt))))

    audio_feature = tm.audio_fc(f_a)
    visual_feature = F.relu(tm.video_fc(f_v))
    audio_rnn, _ = tm.audio_rnn(audio_feature)
    visual_rnn, _ = tm.video_rnn(visual_feature)
    audio_in, visual_in = audio_rnn.transpose(1, 0), visual_rnn.transpose(1, 0)  # (T, B, .)
    video_kv = encoder(tm.video_encoder, visual_in)
    audio_query = decoder(tm.audio_decoder, audio_in, video_kv)
    audio_kv = encoder(tm.audio_encoder, audio_in)
    video_query = decoder(tm.video_decoder, visual_in, audio_kv)
    audio_gate, video_gate = torch.sigmoid(tm.audio_gate(audio_kv)), torch.sigmoid(tm.video_gate(video_kv))
    video_query = video_query + audio_gate * video_query * tm.gamma
    audio_query = audio_query + video_gate * audio_query * tm.gamma
    av_gate = audio_gate * video_gate

    video_cas = hd.video_cas(video_query).permute(1, 0, 2)
    audio_cas = hd.audio_cas(audio_query).permute(1, 0, 2)
    score_v = video_cas.sort(descending=True, dim=1)[0][:, :4, :].mean(1)
    score_a = audio_cas.sort(descending=True, dim=1)[0][:, :4, :].mean(1)
    av_score = (score_v + score_a) / 2
    fused = (video_query + audio_query) / 2
    is_event = hd.is_event(fused)  # (T, B, 1)
    event = hd.event(fused.transpose(1, 0).max(1)[0]) + hd.gamma * av_score
    return is_event.transpose(1, 0).squeeze(-1), event, av_score, av_gate.transpose(1, 0).squeeze(-1)


def upstream_decision(is_event: torch.Tensor, event: torch.Tensor, background: int) -> torch.Tensor:
    """Upstream compute_accuracy_supervised's prediction: event class where sigmoid > 0.5, else background."""
    pred = (is_event.sigmoid() > 0.5).long() * event.argmax(-1)[:, None]
    pred[is_event.sigmoid() <= 0.5] = background
    return pred


# ---------------------------------------------------------------------- tests


def test_tiny_forward_backward_reaches_every_trainable_parameter():
    model = tiny(torch.float32)
    model.train()
    frames, audio = inputs()
    out = model(frames, audio)
    assert out["logits"].shape == (B, T, 29) and model.predict(out).shape == (B, T, 29)
    assert out["is_event"].shape == (B, T) and out["av_gate"].shape == (B, T)
    assert out["event_logits"].shape == (B, 28) and out["av_score"].shape == (B, 28)
    assert out["visual_features"].shape == (B, T, 256) and out["audio_features"].shape == (B, T, 128)
    loss, metrics = model.loss(out, {"segment_labels": torch.randint(0, 29, (B, T))})
    assert torch.isfinite(loss) and set(metrics) >= {"loss", "acc", "loss_is_event", "loss_av_gate"}
    loss.backward()
    trainable = dict(model.named_parameters())
    no_grad = [n for n, p in trainable.items() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad
    frozen = [*model.visual.parameters(), *model.audio.parameters()]
    assert all(p.grad is None for p in frozen)
    assert {n.split(".")[0] for n, p in trainable.items() if p.requires_grad} == {"adapters", "temporal", "head"}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("upstream_scale", [True, False])
def test_adapter_matches_upstream_layout_float64(training, upstream_scale):
    torch.manual_seed(1)
    # (audio target: channels projected first) and (visual target: tokens mixed first), as in stage 1
    for dims in ((32, 36, 64, 20), (64, 20, 32, 36)):
        ad = randomize_trainable(DualGuidedAdapter(*dims, num_latents=5, upstream_scale=upstream_scale).double())
        ad.train(training)
        cx, nx, cy, ny = dims
        assert ad.project_first == (cx < cy)
        x, y = torch.randn(6, nx, cx, dtype=torch.float64), torch.randn(6, ny, cy, dtype=torch.float64)
        ours, ours_map = ad(x, y)
        ref, ref_map = upstream_adapter(ad, as_conv(x), as_conv(y), training, 1 - 0.3 if upstream_scale else 1.0)
        assert (ours - from_conv(ref)).abs().max() <= 1e-10
        assert (ours_map - ref_map.squeeze(1)).abs().max() <= 1e-10
        # the same result in upstream's order
        ad.project_first = not ad.project_first
        assert (ad(x, y)[0] - ours).abs().max() <= 1e-10


def test_block_wiring_temporal_and_head_match_upstream_float64():
    model = tiny().eval()
    frames, audio = inputs(torch.float64)
    f_v, f_a = model.forward_features(frames, audio)
    ref_v, ref_a = upstream_features(model, frames, audio)
    assert (f_v.flatten(0, 1) - ref_v).abs().max() <= 1e-10
    assert (f_a.flatten(0, 1) - ref_a).abs().max() <= 1e-10
    out = model.forward_head(f_v, f_a)
    is_event, event, av_score, av_gate = upstream_temporal_and_head(model, f_v, f_a)
    for key, ref in (("is_event", is_event), ("event_logits", event), ("av_score", av_score), ("av_gate", av_gate)):
        assert (out[key] - ref).abs().max() <= 1e-10, key
    assert torch.equal(out["logits"].argmax(-1), upstream_decision(out["is_event"], out["event_logits"], 28))


def test_upstream_loss_terms():
    model = tiny().eval()
    out = model(*inputs(torch.float64))
    segments = torch.tensor([[28, 28, 5, 5, 5, 5, 28, 28, 28, 28], [3] * 10])
    loss, metrics = model.loss(out, {"segment_labels": segments, "label": torch.tensor([0, 0])})
    labels = F.one_hot(segments, 29).double()  # upstream's (B, T, 29) one-hot GT
    labels_bce, labels_evn = labels[:, :, :-1].max(-1)
    labels_event = labels_evn.max(-1)[0]
    ref = (F.binary_cross_entropy_with_logits(out["is_event"], labels_bce)
           + F.binary_cross_entropy_with_logits(out["av_gate"], labels_bce)
           + F.cross_entropy(out["event_logits"], labels_event) + F.cross_entropy(out["av_score"], labels_event))
    assert abs(loss.item() - ref.item()) <= 1e-12
    # "label" broadcast to every second when there are no segment labels
    broadcast, _ = model.loss(out, {"label": torch.tensor([5, 3])})
    full, _ = model.loss(out, {"segment_labels": torch.tensor([[5] * 10, [3] * 10])})
    assert broadcast.item() == full.item()
    ce_model = tiny(loss_type="segment_ce").eval()
    ce_out = ce_model(*inputs(torch.float64))
    ce, _ = ce_model.loss(ce_out, {"segment_labels": segments})
    assert abs(ce.item() - F.cross_entropy(ce_out["logits"].reshape(-1, 29), segments.reshape(-1)).item()) <= 1e-12


def upstream_key(ours: str) -> str | None:
    """Our DG-SCT key -> upstream's (the test's own table), None for backbone keys."""
    m = re.fullmatch(r"adapters\.(\d+)\.(audio|visual)_p([12])\.(.+)", ours)
    if m:
        i, modality, place, rest = m.groups()
        names = {"guide_mix_weight": "conv_adapter.weight", "guide_mix_bias": "conv_adapter.bias",
                 "down_weight": "down_sampler.weight", "up_weight": "up_sampler.weight", "latent_tokens": "my_tokens",
                 "gate_latent": "gate_av", "gate": "gate"}
        modules = {"guide_proj": "fc", "channel_guide": "fc_affine_audio_1", "channel_target": "fc_affine_video_1",
                   "channel_down": "fc_affine_bottleneck", "channel_up": "fc_affine_v_c_att",
                   "spatial_target": "fc_affine_video_2", "spatial_guide": "fc_affine_audio_2",
                   "spatial_score": "fc_affine_v_s_att"}
        module, _, param = rest.partition(".")
        rest = names.get(rest) or f"{modules.get(module, module)}.{param}"
        return f"{'audio' if modality == 'audio' else 'vis'}_adapter_blocks_p{place}.{i}.{rest}"
    for old, new in (("temporal.video_fc.", "temporal_attn.v_fc."), ("temporal.audio_fc.", "temporal_attn.a_fc."),
                     ("temporal.audio_rnn.", "temporal_attn.audio_visual_rnn_layer.audio_rnn."),
                     ("temporal.video_rnn.", "temporal_attn.audio_visual_rnn_layer.visual_rnn."),
                     ("temporal.video_encoder.proj.", "temporal_attn.video_encoder.affine_matrix."),
                     ("temporal.audio_encoder.proj.", "temporal_attn.audio_encoder.affine_matrix."),
                     ("temporal.video_decoder.proj.", "temporal_attn.video_decoder.affine_matrix."),
                     ("temporal.audio_decoder.proj.", "temporal_attn.audio_decoder.affine_matrix."),
                     ("temporal.video_decoder.layer.", "temporal_attn.video_decoder.decoder.layers.0."),
                     ("temporal.audio_decoder.layer.", "temporal_attn.audio_decoder.decoder.layers.0."),
                     ("temporal.audio_gate.", "temporal_attn.audio_gated.0."),
                     ("temporal.video_gate.", "temporal_attn.video_gated.0."),
                     ("temporal.", "temporal_attn."),
                     ("head.is_event.", "CMBS.localize_module.classifier."),
                     ("head.event.", "CMBS.localize_module.event_classifier."), ("head.", "CMBS.")):
        if ours.startswith(old):
            return new + ours[len(old):]
    return None


def upstream_state(model: DGSCT) -> dict[str, torch.Tensor]:
    """A synthetic upstream DG-SCT checkpoint for ``model`` (random values): timm 0.6 Swin keys
    with their buffers and 21k head, the HTS-AT checkpoint keys, adapters with 4-D conv kernels,
    and the upstream-only parameters (gate_tk, token downsamplers, decoder self-attention, CMBS
    interaction branches)."""
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual."):
            rest = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample",
                          key[len("visual."):])
            name = "swin." + rest
        elif key.startswith("audio."):
            name = "htsat." + ("logmel_extractor.melW" if key == "audio.melW" else key[len("audio."):])
        else:
            name = upstream_key(key)
        value = value if value.dtype == torch.long else rnd(*value.shape)
        if name.endswith(("conv_adapter.weight", "down_sampler.weight", "up_sampler.weight")):
            value = value[..., None, None]
        state[name] = value
    cv = model.config.visual_dim(len(model.config.visual_depths) - 1)
    d = model.config.temporal_d_model
    state["swin.head.weight"], state["swin.head.bias"] = rnd(21841, cv), rnd(21841)
    state["swin.layers.0.blocks.0.attn.relative_coords_table"] = rnd(1, 7, 7, 2)
    state["swin.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["htsat.spectrogram_extractor.stft.conv_real.weight"] = rnd(513, 1, 1024)
    state["htsat.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["htsat.tscam_conv.weight"], state["htsat.head.weight"] = rnd(527, 128, 2, 3), rnd(527, 527)
    for i in range(len(model.adapters)):
        for kind in ("audio", "vis"):
            for place in (1, 2):
                state[f"{kind}_adapter_blocks_p{place}.{i}.gate_tk"] = torch.ones(1, dtype=torch.float64)
    state["adapter_token_downsampler.0.weight"] = rnd(8, 4)
    for part in ("video_decoder", "audio_decoder"):
        prefix = f"temporal_attn.{part}.decoder.layers.0.self_attn."
        state[prefix + "in_proj_weight"], state[prefix + "in_proj_bias"] = rnd(3 * d, d), rnd(3 * d)
        state[prefix + "out_proj.weight"], state[prefix + "out_proj.bias"] = rnd(d, d), rnd(d)
    for part in ("AVInter", "VAInter"):
        state[f"CMBS.{part}.video_multihead.in_proj_weight"] = rnd(3 * d, d)
        state[f"CMBS.{part}.norm1.weight"] = rnd(d)
    state["CMBS.video_norm.weight"], state["CMBS.audio_norm.bias"] = rnd(d), rnd(d)
    return state


def test_upstream_state_dict_loads_strictly_and_changes_outputs():
    model = tiny().eval()
    frames, audio = inputs(torch.float64)
    before = model(frames, audio)["logits"]
    state = upstream_state(model)
    model.load_upstream_state_dict({"module." + k: v for k, v in state.items()})
    assert torch.equal(model.adapters[3].visual_p2.guide_mix_weight,
                       state["vis_adapter_blocks_p2.3.conv_adapter.weight"][..., 0, 0])
    assert torch.equal(model.adapters[0].audio_p1.channel_up.weight,
                       state["audio_adapter_blocks_p1.0.fc_affine_v_c_att.weight"])
    assert torch.equal(model.visual.layers[1].downsample.reduction.weight,
                       state["swin.layers.0.downsample.reduction.weight"])
    assert torch.equal(model.audio.melW, state["htsat.logmel_extractor.melW"])
    assert torch.equal(model.temporal.video_decoder.layer.multihead_attn.in_proj_weight,
                       state["temporal_attn.video_decoder.decoder.layers.0.multihead_attn.in_proj_weight"])
    assert torch.equal(model.temporal.audio_rnn.weight_hh_l0_reverse,
                       state["temporal_attn.audio_visual_rnn_layer.audio_rnn.weight_hh_l0_reverse"])
    assert torch.equal(model.head.is_event.weight, state["CMBS.localize_module.classifier.weight"])
    assert not torch.allclose(model(frames, audio)["logits"], before)
    wrong = dict(state)
    wrong["vis_adapter_blocks_p1.0.fc_affine_vidoe_1.weight"] = wrong.pop(
        "vis_adapter_blocks_p1.0.fc_affine_video_1.weight")
    with pytest.raises(KeyError, match="fc_affine_vidoe_1"):
        model.load_upstream_state_dict(wrong)
    missing = dict(state)
    missing.pop("temporal_attn.video_gated.0.weight")
    with pytest.raises(RuntimeError, match="temporal.video_gate.weight"):
        model.load_upstream_state_dict(missing)


def test_backbone_weight_files(tmp_path):
    model = build("tiny")
    old_swin = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k):
                torch.randn_like(v) if v.is_floating_point() else v for k, v in model.visual.state_dict().items()}
    old_swin["head.weight"], old_swin["head.bias"] = torch.randn(10, 256), torch.randn(10)
    torch.save({"model": old_swin}, tmp_path / "swin.pth")
    htsat = {"sed_model." + ("logmel_extractor.melW" if k == "melW" else k):
             torch.randn_like(v) if v.is_floating_point() else v for k, v in model.audio.state_dict().items()}
    htsat["sed_model.tscam_conv.weight"] = torch.zeros(527, 128, 2, 3)
    torch.save({"state_dict": htsat, "epoch": 3}, tmp_path / "htsat.ckpt")
    loaded = build("tiny", visual_weights=str(tmp_path / "swin.pth"), audio_weights=str(tmp_path / "htsat.ckpt"))
    assert torch.equal(loaded.visual.layers[3].downsample.norm.weight, old_swin["layers.2.downsample.norm.weight"])
    assert torch.equal(loaded.audio.bn0.running_var, htsat["sed_model.bn0.running_var"])
    with pytest.raises(FileNotFoundError, match="visual_weights"):
        build("tiny", visual_weights=str(tmp_path / "absent.pth"))
    torch.save({"model": {"norm.weight": torch.zeros(3)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="visual_weights"):
        build("tiny", visual_weights=str(tmp_path / "bad.pth"))


def test_quirks():
    quirky, paper = tiny(upstream_quirks=True).eval(), tiny(upstream_quirks=False, audio_clip_samples=40000).eval()
    paper.load_state_dict(quirky.state_dict())
    frames, audio = inputs(torch.float64)
    assert not torch.allclose(quirky(frames, audio)["logits"], paper(frames, audio)["logits"])
    # upstream_quirks=False is the paper's form, written out: zero padding, factor + 1, Eq. 2, final norm
    f_v, f_a = paper.forward_features(frames, audio)
    ref_v, ref_a = upstream_features(paper, frames, audio, paper=True)
    assert (f_v.flatten(0, 1) - ref_v).abs().max() <= 1e-10 and (f_a.flatten(0, 1) - ref_a).abs().max() <= 1e-10
    # 1. tiling vs zero padding of each second to the HTS-AT clip
    long_q = tiny(upstream_quirks=True, audio_clip_samples=40000)
    wave = torch.randn(3, 32000, dtype=torch.float64)
    assert torch.equal(long_q.fit_audio(wave), torch.cat([wave, wave[:, :8000]], dim=1))
    assert torch.equal(paper.fit_audio(wave), F.pad(wave, (0, 8000)))
    # 2. the guidance constant 1 - alpha vs 1
    assert quirky.adapters[0].visual_p1.offset == pytest.approx(0.7) and paper.adapters[0].visual_p1.offset == 1.0
    # 5. the av-gate term: BCE-with-logits on a probability vs BCE
    out = quirky(frames, audio)
    labels = {"label": torch.tensor([4, 28])}
    fg = torch.tensor([[1.0] * 10, [0.0] * 10], dtype=torch.float64)
    assert quirky.loss(out, labels)[1]["loss_av_gate"] == pytest.approx(
        F.binary_cross_entropy_with_logits(out["av_gate"], fg).item())
    assert paper.loss(out, labels)[1]["loss_av_gate"] == pytest.approx(
        F.binary_cross_entropy(out["av_gate"], fg).item())


def test_frozen_backbones_stay_in_eval_mode():
    model = tiny()
    model.train()
    assert model.training and model.adapters.training and model.temporal.training
    assert not model.visual.training and not model.audio.training
    stats = model.audio.bn0.running_mean.clone()
    frames, audio = inputs(torch.float64)
    model(frames, audio)["logits"].sum().backward()
    assert torch.equal(model.audio.bn0.running_mean, stats)
    upstream = tiny(backbone_train_mode=True)
    upstream.train()
    assert upstream.visual.training and upstream.audio.training
    upstream(frames, audio)
    assert not torch.equal(upstream.audio.bn0.running_mean, stats)  # upstream's bn0 drift
    upstream.eval()
    assert not upstream.audio.training


def test_base_geometry_on_meta_device():
    with torch.device("meta"):
        model = build("base")
    cfg = model.config
    assert cfg.block_pairs[4:10] == [(2, 3 * k + 2, k) for k in range(6)] and len(model.adapters) == 12
    ad = model.adapters[0]
    audio_p1 = ad.audio_p1
    assert (audio_p1.tokens, audio_p1.dim, audio_p1.guide_tokens, audio_p1.guide_dim) == (4096, 96, 2304, 192)
    assert ad.audio_p1.project_first and not ad.visual_p1.project_first
    assert ad.audio_p1.down_weight.shape == (12, 48) and ad.audio_p1.up_weight.shape == (96, 6)
    mix = sum(p.numel() for n, p in model.named_parameters() if "guide_mix" in n)
    assert mix == 4 * sum(cfg.visual_tokens(s) * cfg.audio_tokens(s) + (cfg.visual_tokens(s) + cfg.audio_tokens(s)) / 2
                          for s, _, _ in cfg.block_pairs)
    assert 81e6 < mix < 81.3e6  # UPSTREAM.md 4.4: the token-mixing convs alone hold ~81M parameters
    assert model.temporal.video_fc.in_features == 1536 and model.temporal.audio_fc.in_features == 768


def test_bad_inputs_and_arguments():
    model = tiny(torch.float32).eval()
    frames, audio = inputs()
    with pytest.raises(ValueError, match=r"frames must be \(B, T, 3, S, S\) = \(B, 10, 3, 32, 32\)"):
        model(frames[:, :, :, :16], audio)
    with pytest.raises(ValueError, match=r"audio must be \(B, T, L\) = \(2, 10, L >= 513\)"):
        model(frames, audio[:, :5])
    with pytest.raises(TypeError, match="audio must be a float Tensor"):
        model(frames, audio.long())
    out = model(frames, audio)
    with pytest.raises(ValueError, match=r"segment_labels.*\[0, 29\)"):
        model.loss(out, {"segment_labels": torch.full((B, T), 29)})
    with pytest.raises(ValueError, match=r"label.*integer tensor \(2,\)"):
        model.loss(out, {"label": torch.zeros(B, 3, dtype=torch.long)})
    with pytest.raises(KeyError, match="segment_labels"):
        model.loss(out, {})
    with pytest.raises(ValueError, match="size: expected one of"):
        build("huge")
    with pytest.raises(ValueError, match="overrides: expected DGSCTConfig fields"):
        build("tiny", window=3)
    with pytest.raises(ValueError, match=r"visual_depths\[2\] must be a multiple of audio_depths\[2\]"):
        DGSCTConfig.tiny(audio_depths=(1, 1, 2, 1))
    with pytest.raises(ValueError, match="audio_clip_samples must give at most"):
        DGSCTConfig.tiny(audio_clip_samples=64000)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DGSCTConfig.tiny(loss_type="bce")
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build("tiny", pretrained="/nonexistent/dgsct.pt")
