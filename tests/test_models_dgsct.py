"""DG-SCT: tiny forward/backward, the (N, tokens, C) adapter and the whole block wiring against
upstream's formulation written literally (float64), upstream checkpoint keys, quirks, losses."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avfast.bench.upstream.dgsct import (
    UpstreamDGSCT,
    as_conv,
    from_conv,
    upstream_adapter,
    upstream_decision,
    upstream_features,
    upstream_temporal_and_head,
)
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
# Upstream's formulation written literally lives in avfast.bench.upstream.dgsct: the adapter in
# its (N, C, tokens, 1) layout (1x1 conv over the guide's token axis first, grouped 1x1 convs and
# BatchNorm2d), MMIL_Net.forward_swin's loop with its block list, p1/p2 adapters and patch-merge
# placement, the pooling, TemporalAttention + CMBS in (T, B, d) and upstream's decision.


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
        ref, ref_map = upstream_adapter(ad, as_conv(x), as_conv(y), 1 - 0.3 if upstream_scale else 1.0)
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


@pytest.mark.parametrize("training", [False, True])
def test_upstream_formulation_gradients_float64(training):
    """UpstreamDGSCT (the functions above plus upstream's loss) on the model's parameters:
    outputs, loss and every trainable gradient equal the model's (adapter BatchNorms on batch
    statistics in train mode; the temporal dropouts off so that both draw nothing)."""
    model = tiny(temporal_dropout=0.0, temporal_fc_dropout=0.0).train(training)
    upstream = UpstreamDGSCT(model)
    frames, audio = inputs(torch.float64)
    batch = {"segment_labels": torch.tensor([[28, 28, 5, 5, 5, 5, 28, 28, 28, 28], [3] * 10])}
    params = model.trainable_parameters()
    out = model(frames, audio)
    loss, metrics = model.loss(out, batch)
    grads = torch.autograd.grad(loss, params)
    ref = upstream(frames, audio)
    ref_loss, ref_metrics = upstream.loss(ref, batch)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for key in ("logits", "is_event", "event_logits", "av_score", "av_gate", "visual_features", "audio_features"):
        assert (out[key] - ref[key]).abs().max() <= 1e-10, key
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 and set(metrics) == set(ref_metrics)
    for key in ("loss_is_event", "loss_av_gate", "loss_event", "loss_av_score"):
        assert abs(metrics[key] - ref_metrics[key]) <= 1e-12, key
    for p, g, r in zip(params, grads, ref_grads):
        assert (g - r).abs().max() <= 1e-10 * max(1.0, g.abs().max().item())


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
    with pytest.raises(ValueError, match="overrides: expected fields of DGSCTConfig"):
        build("tiny", window=3)
    with pytest.raises(ValueError, match=r"visual_depths\[2\] must be a multiple of audio_depths\[2\]"):
        DGSCTConfig.tiny(audio_depths=(1, 1, 2, 1))
    with pytest.raises(ValueError, match="audio_clip_samples must give at most"):
        DGSCTConfig.tiny(audio_clip_samples=64000)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DGSCTConfig.tiny(loss_type="bce")
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build("tiny", pretrained="/nonexistent/dgsct.pt")
