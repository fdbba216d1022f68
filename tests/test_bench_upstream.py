"""avfast.bench.upstream: upstream's formulations share the model's parameters and, float32 at
the tiny configs, give the model's outputs, loss and gradients (the float64 equality tests are
in tests/test_models_*.py)."""

from __future__ import annotations

import pytest
import torch

from avfast.bench.upstream import (
    UpstreamDeepAVFusion,
    UpstreamDeepAVFusionMAE,
    UpstreamDGSCT,
    UpstreamMAVT,
    UpstreamSTGCMA,
    UpstreamSTGCMANet,
)
from avfast.models import deepavfusion, dgsct, mavt, stgcma

TOL = dict(rtol=1e-4, atol=1e-4)


def same_parameters(upstream, model):
    """Every parameter of the wrapper is one of the model's and the reverse (no copies)."""
    assert {id(p) for p in upstream.parameters()} == {id(p) for p in model.parameters()}
    assert [id(p) for p in upstream.trainable_parameters()] == [id(p) for p in model.trainable_parameters()]


def loss_and_grads(f, out, batch, params):
    loss, metrics = f.loss(out, batch)
    assert torch.isfinite(loss) and all(isinstance(v, float) for v in metrics.values())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, metrics, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_against_model(upstream, model, frames, audio, batch, out_keys):
    params = model.trainable_parameters()
    ours = model(frames, audio)
    ref = upstream(frames, audio)
    assert set(out_keys) <= set(ref)
    for key in out_keys:
        torch.testing.assert_close(ref[key], ours[key], **TOL)
    assert upstream.predict(ref) is ref["logits"]
    loss, metrics, grads = loss_and_grads(model, ours, batch, params)
    ref_loss, ref_metrics, ref_grads = loss_and_grads(upstream, ref, batch, params)
    assert set(ref_metrics) == set(metrics)
    torch.testing.assert_close(ref_loss, loss, **TOL)
    assert sum(g.abs().sum() for g in ref_grads) > 0
    for p, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(r, g, rtol=1e-3, atol=1e-4 * max(1.0, g.abs().max().item()))


def test_mavt_matches_model():
    torch.manual_seed(0)
    model = mavt.build("tiny").eval()
    upstream = UpstreamMAVT(model)
    same_parameters(upstream, model)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(4, 1, 3, 64, 64, generator=g)
    audio = torch.randn(4, 1, 224, 224, generator=g)  # the preset's spectrogram: resized as the model does
    batch = {"label": torch.tensor([1, 2, 3, 4]), "background": torch.tensor([False, True, False, False])}
    check_against_model(upstream, model, frames, audio, batch,
                        ("logits", "bg_logit", "shared_visual", "shared_audio"))


def test_stgcma_matches_model_and_uses_upstream_names():
    torch.manual_seed(0)
    model = stgcma.build("tiny").eval()
    with torch.no_grad():  # non-zero adapters and gates, so that the cross-modal paths count
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    upstream = UpstreamSTGCMA(model)
    same_parameters(upstream, model)
    assert {id(p) for p in upstream.net.parameters()} == {id(p) for p in model.parameters()}
    with torch.device("meta"):
        names = set(UpstreamSTGCMANet(model.config).state_dict())
    assert set(upstream.net.state_dict()) == names  # upstream's checkpoint names
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    frames = torch.randn(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(2, cfg.num_frames, cfg.audio_frames, cfg.num_mel_bins, generator=g)
    batch = {"segment_labels": torch.randint(0, cfg.num_classes, (2, cfg.num_frames), generator=g),
             "label": torch.zeros(2, dtype=torch.long)}
    check_against_model(upstream, model, frames, audio, batch, ("logits", "features"))
    model.train()  # a mode set on the model alone reaches the upstream modules
    upstream(frames, audio)
    assert upstream.net.training and upstream.net.mlp_head[1].training


@pytest.mark.parametrize("arch", ["factorized", "dense"])
def test_deepavfusion_matches_model(arch):
    torch.manual_seed(0)
    model = deepavfusion.build("tiny", fusion_arch=arch).eval()
    upstream = UpstreamDeepAVFusion(model)
    same_parameters(upstream, model)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(3, 1, 3, 32, 32, generator=g)
    audio = torch.randn(3, 1, 128, 192, generator=g)
    batch = {"label": torch.tensor([0, 3, 9])}
    check_against_model(upstream, model, frames, audio, batch,
                        ("logits", "logits_image", "logits_audio", "logits_fusion"))
    soft = {"label": torch.softmax(torch.randn(3, 10, generator=g), -1)}
    check_against_model(upstream, model, frames, audio, soft, ("logits",))


def test_deepavfusion_dense_block_materialises_pairs():
    model = deepavfusion.build("tiny", fusion_arch="dense")
    block = UpstreamDeepAVFusion(model).encoder.fusion_blocks[0]
    assert block.attn.kv.weight is model.encoder.fusion_blocks[0].attn.kv.weight
    seen = []
    handle = block.attn.kv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x_f, x_i, x_a = torch.randn(2, 8, 64), torch.randn(2, 4, 64), torch.randn(2, 96, 64)
    block(x_f, x_i, x_a)
    handle.remove()
    assert seen == [(2, 96 * 4, 128)]  # (B, Na*Nv, 2D) pair tokens


def test_deepavfusion_mae_matches_model():
    torch.manual_seed(0)
    mae = deepavfusion.build_mae("tiny").eval()
    upstream = UpstreamDeepAVFusionMAE(mae)
    same_parameters(upstream, mae)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 1, 3, 32, 32, generator=g)
    audio = torch.randn(2, 1, 128, 192, generator=g)
    params = mae.trainable_parameters()
    torch.manual_seed(5)
    ours = mae(frames, audio)
    torch.manual_seed(5)  # the same masks
    ref = upstream(frames, audio)
    for key in ("mask_image", "mask_audio"):
        assert torch.equal(ref[key], ours[key])
    for key in ("pred_image", "pred_audio", "loss", "loss_image", "loss_audio"):
        torch.testing.assert_close(ref[key], ours[key], **TOL)
    _, metrics, grads = loss_and_grads(mae, ours, None, params)
    _, ref_metrics, ref_grads = loss_and_grads(upstream, ref, None, params)
    assert set(ref_metrics) == set(metrics)
    for g_, r in zip(grads, ref_grads):
        torch.testing.assert_close(r, g_, rtol=1e-3, atol=1e-4 * max(1.0, g_.abs().max().item()))
    with pytest.raises(TypeError, match="no logits"):
        upstream.predict(ref)


def test_dgsct_matches_model():
    torch.manual_seed(0)
    model = dgsct.build("tiny").eval()
    with torch.no_grad():  # non-zero gates, so that the adapters and their inner gradients count
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.5 if "gate" in name else 0.1) * torch.randn_like(p))
    upstream = UpstreamDGSCT(model)
    same_parameters(upstream, model)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 10, 3, 32, 32, generator=g)
    audio = 0.1 * torch.randn(2, 10, 32000, generator=g)
    batch = {"segment_labels": torch.tensor([[28, 28, 5, 5, 5, 5, 28, 28, 28, 28], [3] * 10])}
    check_against_model(upstream, model, frames, audio, batch,
                        ("logits", "is_event", "event_logits", "av_score", "av_gate",
                         "visual_features", "audio_features"))


def test_train_mode_step_runs():
    """Training mode (DropPath, dropout on): a forward, loss and backward of each wrapper."""
    torch.manual_seed(0)
    cases = [
        (UpstreamMAVT(mavt.build("tiny").train()), (2, 1, 3, 64, 64), (2, 1, 64, 64),
         {"label": torch.tensor([0, 1])}),
        (UpstreamSTGCMA(stgcma.build("tiny").train()), (1, 10, 3, 32, 32), (1, 10, 102, 128),
         {"label": torch.tensor([3])}),
        (UpstreamDeepAVFusion(deepavfusion.build("tiny", fusion_arch="dense").train()), (2, 1, 3, 32, 32),
         (2, 1, 128, 192), {"label": torch.tensor([0, 1])}),
        (UpstreamDGSCT(dgsct.build("tiny").train()), (1, 10, 3, 32, 32), (1, 10, 32000),
         {"label": torch.tensor([3])}),
    ]
    for upstream, frames, audio, batch in cases:
        loss, _ = upstream.loss(upstream(torch.randn(frames), torch.randn(audio)), batch)
        loss.backward()
        assert any(p.grad is not None for p in upstream.trainable_parameters())


def test_errors():
    with pytest.raises(TypeError, match="UpstreamMAVT: model must be"):
        UpstreamMAVT(stgcma.build("tiny"))
    with pytest.raises(TypeError, match="UpstreamSTGCMA: model must be"):
        UpstreamSTGCMA(mavt.build("tiny"))
    with pytest.raises(TypeError, match="UpstreamDeepAVFusion: model must be"):
        UpstreamDeepAVFusion(deepavfusion.build_mae("tiny"))
    with pytest.raises(ValueError, match="upstream_quirks=True"):
        UpstreamMAVT(mavt.build("tiny", upstream_quirks=False))
    with pytest.raises(ValueError, match="upstream_quirks=True"):
        UpstreamDeepAVFusion(deepavfusion.build("tiny", upstream_quirks=False))
    with pytest.raises(TypeError, match="UpstreamDGSCT: model must be"):
        UpstreamDGSCT(mavt.build("tiny"))
    with pytest.raises(ValueError, match="upstream_quirks=True"):
        UpstreamDGSCT(dgsct.build("tiny", upstream_quirks=False))
    with pytest.raises(ValueError, match="loss_type='upstream'"):
        UpstreamDGSCT(dgsct.build("tiny", loss_type="segment_ce"))
    upstream = UpstreamMAVT(mavt.build("tiny"))
    with pytest.raises(ValueError, match="frames"):
        upstream(torch.randn(2, 1, 3, 32, 32), torch.randn(2, 1, 64, 64))
