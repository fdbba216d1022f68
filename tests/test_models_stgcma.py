"""STG-CMA model (avfast.models.stgcma) against a literal restatement of upstream's CLIP model."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as nnf
from torch import nn

from avfast.bench.upstream.stgcma import UpstreamSTGCMANet
from avfast.models import build_model
from avfast.models.stgcma import STGCMA, STGCMAConfig, _drop_path, audio_pos_embed, build

B, T = 2, 10


def inputs(cfg: STGCMAConfig, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, 3, cfg.img_size, cfg.img_size, generator=g, dtype=dtype)
    audio = torch.randn(B, T, cfg.audio_frames, cfg.num_mel_bins, generator=g, dtype=dtype)
    return frames, audio


# ------------------------------------------------------------------ upstream, restated
# Upstream's MM_CLIP_AVE in "fusion" mode written out in its own layout and names lives in
# avfast.bench.upstream.stgcma (UpstreamSTGCMANet): tokens (L, B*T, D) sequence-first, torch's
# nn.MultiheadAttention, T-attention over 't (b n) d' sequences, the per-frame cross-attention
# as bmm + softmax without scaling. Here it gets random weights of its own.


def random_upstream(cfg: STGCMAConfig, heads: int | None = None) -> UpstreamSTGCMANet:
    """Random float64 weights of O(1) activations, every adapter and gate non-zero."""
    net = UpstreamSTGCMANet(cfg, heads=heads).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p_ in net.named_parameters():
            noise = torch.randn(p_.shape, generator=gen, dtype=p_.dtype)
            if "ln_" in name:
                p_.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif "gate_" in name:
                p_.copy_(0.5 + 0.2 * noise)
            elif p_.dim() >= 2 and "embedding" not in name:
                p_.copy_(noise * p_[0].numel() ** -0.5)
            else:
                p_.copy_(0.2 * noise)
    return net


def checkpoint(net: nn.Module) -> dict[str, torch.Tensor]:
    """What upstream saves: a DataParallel state dict."""
    return {f"module.{k}": v.clone() for k, v in net.state_dict().items()}


def upstream_trainable(name: str) -> bool:
    """Upstream's filter (traintest_adapt_ave29.py) plus the head."""
    return any(s in name for s in ("adapter", "Adapter", "temporal_embedding", "ln_post", "gate_", "mlp_head"))


def randomize_trainable(model: nn.Module, seed: int = 2) -> None:
    """Non-zero adapters/gates/embeddings, so that every trainable parameter gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------ tests


def test_tiny_forward_backward_and_trainable_set():
    torch.manual_seed(0)
    model = build("tiny")
    cfg = model.config
    assert model.preset == "stgcma" and (cfg.img_size, cfg.embed_dim, cfg.depth, cfg.heads) == (32, 64, 2, 2)
    randomize_trainable(model)
    model.train()
    frames, audio = inputs(cfg)
    out = model(frames, audio)
    assert out["logits"].shape == (B, T, 29) and out["features"].shape == (B, T, 128)
    assert model.predict(out) is out["logits"]
    segment_labels = torch.randint(0, 29, (B, T))
    loss, metrics = model.loss(out, {"segment_labels": segment_labels, "label": torch.zeros(B, dtype=torch.long)})
    assert torch.isfinite(loss) and set(metrics) == {"loss", "acc"}
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # trainable exactly where upstream's name filter says so
    mapping = model.upstream_key_map(random_upstream(cfg).state_dict().keys())
    params = dict(model.named_parameters())
    assert {k: params[n].requires_grad for k, n in mapping.items()} == {k: upstream_trainable(k) for k in mapping}


def test_loss_targets():
    model = build("tiny", num_classes=5).eval()
    with torch.no_grad():
        out = model(*inputs(model.config))
    label = torch.tensor([1, 4])
    broadcast, _ = model.loss(out, {"label": label})
    explicit, metrics = model.loss(out, {"segment_labels": label[:, None].expand(B, T)})
    ref = nnf.cross_entropy(out["logits"].reshape(-1, 5), label.repeat_interleave(T))
    torch.testing.assert_close(broadcast, ref)
    torch.testing.assert_close(explicit, ref)
    assert metrics["acc"] == float((out["logits"].argmax(-1) == label[:, None]).float().mean())
    with pytest.raises(ValueError, match=r"segment_labels.*\[0, 5\)"):
        model.loss(out, {"segment_labels": torch.full((B, T), 5)})
    with pytest.raises(ValueError, match=r"label.*\(2,\)"):
        model.loss(out, {"label": torch.zeros(B, T, dtype=torch.long)})
    with pytest.raises(KeyError, match="segment_labels"):
        model.loss(out, {"background": torch.zeros(B, dtype=torch.bool)})


@pytest.mark.parametrize("upstream_heads", [None, 4])
def test_matches_upstream_float64(upstream_heads):
    """Whole model, two blocks: our (N, L, D) timm wiring vs upstream's (L, N, D) formulation."""
    cfg = STGCMAConfig.tiny(upstream_heads=upstream_heads)
    upstream = random_upstream(cfg, heads=cfg.heads).eval()
    model = STGCMA(cfg).double().eval()
    model.load_upstream_state_dict(checkpoint(upstream))
    frames, audio = inputs(cfg, torch.float64)
    with torch.no_grad():
        ref_v, ref_a = upstream.forward_features(audio, frames.permute(0, 2, 1, 3, 4))
        ref = upstream(audio, frames.permute(0, 2, 1, 3, 4))
        v, a = model.forward_features(frames, audio)
        logits = model(frames, audio)["logits"]
    assert ref.abs().max() > 0.1 and ref_v.abs().max() > 1.0
    assert (v - ref_v.permute(1, 0, 2)).abs().max() <= 1e-10
    assert (a - ref_a.permute(1, 0, 2)).abs().max() <= 1e-10
    assert (logits.reshape(B * T, -1) - ref).abs().max() <= 1e-10
    if upstream_heads is not None:  # the head count matters: upstream's 8-head ViT-B differs
        correct = STGCMA(STGCMAConfig.tiny()).double().eval()
        correct.load_upstream_state_dict(checkpoint(upstream))
        with torch.no_grad():
            assert (correct(frames, audio)["logits"] - logits).abs().max() > 1e-4


def test_upstream_state_dict_loads_strictly_and_changes_outputs():
    cfg = STGCMAConfig.tiny()
    state = checkpoint(random_upstream(cfg).float())
    torch.manual_seed(0)
    model = STGCMA(cfg).eval()
    frames, audio = inputs(cfg)
    with torch.no_grad():
        before = model(frames, audio)["logits"]
        model.load_upstream_state_dict(state)
        after = model(frames, audio)["logits"]
    assert (before - after).abs().max() > 1e-3
    blk = model.backbone.blocks[1]
    torch.testing.assert_close(blk.attn.qkv.weight, state["module.transformer.resblocks.1.attn.in_proj_weight"])
    torch.testing.assert_close(model.backbone.cls_token.flatten(), state["module.class_embedding"])
    torch.testing.assert_close(model.adapters[0].gate_a, state["module.transformer.resblocks.0.gate_a"])
    torch.testing.assert_close(model.backbone.norm.weight, state["module.ln_post.weight"])

    with pytest.raises(KeyError, match="transformer.resblocks.2.gate_v"):  # a third block: no place for it
        model.load_upstream_state_dict({**state, "module.transformer.resblocks.2.gate_v": torch.zeros(1)})
    with pytest.raises(KeyError, match="bogus"):
        model.load_upstream_state_dict({**state, "module.bogus": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if "MLP_Adapter_Audio.D_fc2.bias" not in k}
    with pytest.raises(RuntimeError, match="MLP_Adapter_Audio.D_fc2.bias"):
        model.load_upstream_state_dict(missing)
    wrong = {**state, "module.mlp_head.2.weight": torch.zeros(7, cfg.head_hidden)}
    with pytest.raises(RuntimeError, match="mlp_head.2.weight"):
        model.load_upstream_state_dict(wrong)


def test_build_pretrained_file(tmp_path):
    cfg = STGCMAConfig.tiny()
    state = checkpoint(random_upstream(cfg).float())
    path = tmp_path / "audio_model_wa.pth"
    torch.save(state, path)
    model = build_model("stgcma", "tiny", pretrained=str(path))
    torch.testing.assert_close(model.pos_embed_audio[0], state["module.positional_embedding_audio"])
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build("tiny", pretrained=str(tmp_path / "missing.pth"))


def test_audio_pos_embed_crop_and_layout():
    """Image grid g = 14 with entries encoding (row, col); audio grid 6 time x 8 freq."""
    g, t, f = 14, 6, 8
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.cat([torch.tensor([[-1.0, -1.0]]), torch.stack([rows, cols], -1).reshape(-1, 2).float()])[None]
    r0, c0 = g // 2 - f // 2, g // 2 - t // 2  # freq rows, time columns of the centre crop
    crop = [(r0 + fi, c0 + ti) for fi in range(f) for ti in range(t)]  # freq-major
    quirk, correct = audio_pos_embed(pos, (t, f), True), audio_pos_embed(pos, (t, f), False)
    assert quirk.shape == correct.shape == (1, 1 + t * f, 2)
    assert quirk[0, 0].tolist() == correct[0, 0].tolist() == [-1.0, -1.0]
    for ti in range(t):
        for fi in range(f):
            k = 1 + ti * f + fi  # audio patches come time-major
            assert tuple(correct[0, k].tolist()) == (r0 + fi, c0 + ti)
            assert tuple(quirk[0, k].tolist()) == crop[k - 1]
    # grid larger than the image's (the tiny config): bilinear resize to (f rows, t columns)
    small = torch.randn(1, 1 + 4, 3)
    grid = small[:, 1:].reshape(1, 2, 2, 3).permute(0, 3, 1, 2)
    want = nnf.interpolate(nnf.interpolate(grid, size=(2, t), mode="bilinear"), size=(f, t), mode="bilinear")
    torch.testing.assert_close(audio_pos_embed(small, (t, f), True)[0, 1:], want.reshape(3, -1).T)
    torch.testing.assert_close(audio_pos_embed(small, (t, f), False)[0, 1:], want.transpose(2, 3).reshape(3, -1).T)


def test_quirks_flag():
    outs, models = [], []
    for quirks in (True, False):
        torch.manual_seed(0)
        model = build("tiny", upstream_quirks=quirks).eval()
        with torch.no_grad():
            outs.append(model(*inputs(model.config))["logits"])
        models.append(model)
    up, paper = models
    w = up.backbone.patch_embed.proj.weight
    torch.testing.assert_close(up.patch_embed_audio.weight, w.sum(1, keepdim=True))  # upstream: sum over RGB
    torch.testing.assert_close(paper.patch_embed_audio.weight, w.mean(1, keepdim=True))  # paper: average
    torch.testing.assert_close(up.pos_embed_audio, audio_pos_embed(up.backbone.pos_embed, (6, 8), True))
    torch.testing.assert_close(paper.pos_embed_audio, audio_pos_embed(up.backbone.pos_embed, (6, 8), False))
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    # DropPath of the temporal branch: upstream masks token positions (dim 1 of (N, L, D)) across frames
    torch.manual_seed(0)
    x = torch.ones(40, 50, 3)
    tokens, frames = _drop_path(x, 0.5, dim=1), _drop_path(x, 0.5, dim=0)
    assert (tokens == tokens[:1]).all() and (frames == frames[:, :1]).all()
    assert set(tokens.unique().tolist()) == set(frames.unique().tolist()) == {0.0, 2.0}
    model = build("tiny", drop_path_rate=0.5).train()
    randomize_trainable(model)
    with torch.no_grad():
        first = model(*inputs(model.config))["logits"]
        second = model(*inputs(model.config))["logits"]
    assert (first - second).abs().max() > 0  # dropout / drop path active in training


def test_backbone_weights_files(tmp_path):
    torch.manual_seed(0)
    source = build("tiny")
    timm_state = {f"{k}": v.clone() for k, v in source.backbone.state_dict().items()}
    timm_state["head.weight"] = torch.randn(16, 64)  # a CLIP checkpoint's projection: dropped
    timm_path = tmp_path / "vit_timm.pth"
    torch.save({"state_dict": timm_state}, timm_path)
    # OpenAI CLIP layout, whole model: visual tower under "visual.", a text tower beside it
    upstream = checkpoint(random_upstream(STGCMAConfig.tiny()).float())
    clip_state = {f"visual.{k[len('module.'):]}": v for k, v in upstream.items()
                  if not any(s in k for s in ("Adapter", "gate_", "temporal", "audio", "mlp_head"))}
    clip_state["visual.proj"] = torch.randn(64, 16)
    clip_state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(96, 32)
    clip_path = tmp_path / "clip_vit.pt"
    torch.save(clip_state, clip_path)

    model = build("tiny", backbone_weights=str(timm_path))
    for k, v in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)
    model = build("tiny", backbone_weights=str(clip_path))
    torch.testing.assert_close(model.backbone.blocks[0].mlp.fc2.weight,
                               upstream["module.transformer.resblocks.0.mlp.c_proj.weight"])
    torch.testing.assert_close(model.backbone.pos_embed[0], upstream["module.positional_embedding"])
    w = upstream["module.conv1.weight"]
    torch.testing.assert_close(model.patch_embed_audio.weight, w.sum(1, keepdim=True))
    torch.testing.assert_close(model.pos_embed_audio, audio_pos_embed(model.backbone.pos_embed, (6, 8), True))
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        build("tiny", backbone_weights=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="backbone_weights"):
        build("tiny", embed_dim=32, backbone_weights=str(timm_path))


def test_sizes_match_clip_and_paper_parameter_counts():
    """On the meta device: base/large are timm's CLIP ViTs (QuickGELU); trainable counts as the
    paper's Table 2 (ViT-B/16 Base 11.5M, Tiny 3.5M; ViT-L/14 Base 20.1M, Tiny 10.7M)."""
    with torch.device("meta"):
        for size, arch, base_m, tiny_m in (("base", "vit_base_patch16_clip_quickgelu_224", 11.5, 3.5),
                                           ("large", "vit_large_patch14_clip_quickgelu_224", 20.1, 10.7)):
            model = build(size)
            ref = timm.create_model(arch, pretrained=False, num_classes=0)
            ours = {k: v.shape for k, v in model.backbone.state_dict().items()}
            assert ours == {k: v.shape for k, v in ref.state_dict().items()}
            assert type(model.backbone.blocks[0].mlp.act) is type(ref.blocks[0].mlp.act)
            assert model.config.heads == ref.blocks[0].attn.num_heads
            count = sum(p.numel() for p in model.trainable_parameters()) / 1e6
            assert round(count, 1) == base_m
            tiny = build(size, adapter_ratio=0.03125)
            assert round(sum(p.numel() for p in tiny.trainable_parameters()) / 1e6, 1) == tiny_m
        assert build("base", upstream_heads=8).backbone.blocks[0].attn.num_heads == 8


def test_errors_name_argument():
    model = build("tiny")
    frames, audio = inputs(model.config)
    want = r"frames must be \(B, T, 3, S, S\) = \(B, 10, 3, 32, 32\), got \(2, 10, 3, 64, 64\)"
    with pytest.raises(ValueError, match=want):
        model(torch.zeros(B, T, 3, 64, 64), audio)
    with pytest.raises(ValueError, match=r"audio must be .*\(2, 10, 102, 128\).*got \(2, 10, 128, 102\)"):
        model(frames, audio.transpose(2, 3))
    with pytest.raises(TypeError, match="audio"):
        model(frames, audio.long())
    with pytest.raises(ValueError, match="size"):
        build("huge")
    with pytest.raises(ValueError, match="overrides.*'depht'"):
        build("tiny", depht=3)
    with pytest.raises(ValueError, match="upstream_heads"):
        STGCMAConfig.tiny(upstream_heads=3)
    with pytest.raises(ValueError, match="drop_path_rate"):
        STGCMAConfig(drop_path_rate=1.0)
    with pytest.raises(TypeError, match="config"):
        STGCMA({"embed_dim": 64})
