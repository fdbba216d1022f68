"""MA-AVT model: shapes and gradients, float64 equality with upstream's literal two-pass
formulation (avfast.bench.upstream.mavt), upstream state-dict loading, the quirk switch,
backbone weights, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from avfast.bench.upstream.mavt import UpstreamMAVT
from avfast.models import build_model
from avfast.models.mavt import MAVT, MAVTConfig, build

TINY = MAVTConfig.tiny()
AUDIO = (1, 224, 224)  # the mavt preset's log-STFT


def make_inputs(B, seed=0, dtype=torch.float32, cfg=TINY, audio_side=224):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, 1, 3, cfg.img_size, cfg.img_size, generator=g, dtype=dtype)
    audio = torch.randn(B, 1, audio_side, audio_side, generator=g, dtype=dtype)
    return frames, audio


def make_batch(background, num_classes=TINY.num_classes, seed=0):
    background = torch.tensor(background, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.randint(0, num_classes, (len(background),), generator=g), "background": background}


def expected_trainable(model):
    return {n for n, _ in model.named_parameters() if not n.startswith("vit.")} | {"vit.cls_token"}


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("B", [1, 4])
def test_tiny_forward_backward(B):
    torch.manual_seed(0)
    model = build("tiny", num_classes=7)
    frames, audio = make_inputs(B)
    out = model(frames, audio)
    K, D = TINY.depth, TINY.embed_dim
    assert out["logits"].shape == (B, 7)
    assert out["bg_logit"].shape == (B,)
    assert out["shared_visual"].shape == out["shared_audio"].shape == (K, B, D)
    assert model.predict(out) is out["logits"]
    background = [False, True, False, False][:B] if B > 1 else [False]
    loss, metrics = model.loss(out, make_batch(background, 7))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) == {"loss", "ce_fg", "bce_bg", "contrastive"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["loss"] == pytest.approx(metrics["ce_fg"] + metrics["bce_bg"] + metrics["contrastive"], rel=1e-6)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model)
    named = dict(model.named_parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(named[n]) for n in trainable}
    for name, p in named.items():
        if name in trainable:  # B = 1: the contrastive logits are 1 x 1, that loss exactly 0
            zero_ok = B == 1 and name.startswith("contrastive.")
            assert p.grad is not None and (p.grad.abs().sum() > 0 or zero_ok), name
        else:
            assert p.grad is None, name


def test_all_background_batch_gives_bce_only():
    torch.manual_seed(0)
    model = build("tiny")
    out = model(*make_inputs(3))
    loss, metrics = model.loss(out, make_batch([True, True, True]))
    assert metrics["ce_fg"] == 0.0 and metrics["contrastive"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["bce_bg"])
    loss.backward()
    assert model.fg_class.weight.grad.abs().sum() == 0
    assert model.bg_class.weight.grad.abs().sum() > 0


def test_missing_background_key_means_all_foreground():
    torch.manual_seed(0)
    model = build("tiny")
    out = model(*make_inputs(3))
    batch = make_batch([False, False, False])
    assert model.loss(out, {"label": batch["label"]})[1] == model.loss(out, batch)[1]


def test_audio_resized_to_frame_size():
    torch.manual_seed(0)
    model = build("tiny").double()
    frames, audio = make_inputs(2, dtype=torch.float64)
    small = F.interpolate(audio, size=(TINY.img_size,) * 2, mode="bilinear", align_corners=False)
    a, b = model(frames, audio), model(frames, small)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- float64 vs upstream


def test_float64_equals_upstream_two_pass_formulation():
    """Upstream's literal computation (avfast.bench.upstream.mavt: visual and audio streams in
    two separate passes, LSA on B per-sample copies of the tokens, explicit attention / MLP per
    block, explicit two-direction CE on each block's logits) on the model's own parameters."""
    torch.manual_seed(1)
    model = build("tiny").double()
    frames, audio = make_inputs(6, seed=3, dtype=torch.float64, audio_side=TINY.img_size)
    batch = make_batch([False, True, False, False, True, False], seed=4)
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(frames, audio)
    loss, metrics = model.loss(out, batch)
    grads = torch.autograd.grad(loss, params)

    upstream = UpstreamMAVT(model)
    ref = upstream(frames, audio)
    ref_loss, ref_metrics = upstream.loss(ref, batch)
    ref_grads = torch.autograd.grad(ref_loss, params)

    assert loss.dtype == torch.float64
    assert (out["logits"] - ref["logits"]).abs().max() <= 1e-10
    assert (out["bg_logit"] - ref["bg_logit"]).abs().max() <= 1e-10
    assert abs(loss.item() - ref_loss.item()) <= 1e-10
    for key in ("ce_fg", "bce_bg", "contrastive"):
        assert abs(metrics[key] - ref_metrics[key]) <= 1e-10
    for p, g, r in zip(params, grads, ref_grads):
        assert (g - r).abs().max() <= 1e-10


# ----------------------------------------------------------------------------- upstream checkpoints


def upstream_shapes(cfg, head_classes=11):
    """Upstream MA_AVT state-dict names (UPSTREAM.md §2.3) and their shapes for ``cfg``."""
    D, K, C, P = cfg.embed_dim, cfg.depth, cfg.num_classes, cfg.proj_dim
    N, H = (cfg.img_size // cfg.patch_size) ** 2, int(cfg.embed_dim * cfg.mlp_ratio)
    shapes = {
        "ViT.v.cls_token": (1, 1, D), "ViT.v.pos_embed": (1, N + 1, D),
        "ViT.v.patch_embed.proj.weight": (D, 3, cfg.patch_size, cfg.patch_size), "ViT.v.patch_embed.proj.bias": (D,),
        "ViT.v.norm.weight": (D,), "ViT.v.norm.bias": (D,),
        "ViT.v.head.weight": (head_classes, D), "ViT.v.head.bias": (head_classes,),
        "audio_tokens": (cfg.n_audio_tokens, D), "visual_tokens": (cfg.n_visual_tokens, D),
        "shared_tokens": (cfg.n_shared_tokens, D), "bg_cls_token": (1, D),
        "fg_class.weight": (C, 2 * D), "fg_class.bias": (C,), "bg_class.weight": (1, 2 * D), "bg_class.bias": (1,),
    }
    for i in range(K):
        pre = f"ViT.v.blocks.{i}."
        shapes.update({pre + "norm1.weight": (D,), pre + "norm1.bias": (D,),
                       pre + "attn.qkv.weight": (3 * D, D), pre + "attn.qkv.bias": (3 * D,),
                       pre + "attn.proj.weight": (D, D), pre + "attn.proj.bias": (D,),
                       pre + "norm2.weight": (D,), pre + "norm2.bias": (D,),
                       pre + "mlp.fc1.weight": (H, D), pre + "mlp.fc1.bias": (H,),
                       pre + "mlp.fc2.weight": (D, H), pre + "mlp.fc2.bias": (D,),
                       f"audio_proj.{i}.weight": (P, D), f"audio_proj.{i}.bias": (P,),
                       f"vis_proj.{i}.weight": (P, D), f"vis_proj.{i}.bias": (P,), f"logit_scale.{i}": ()})
    for lsa in ("audio_attn", "visual_attn", "shared_attn"):
        shapes.update({f"{lsa}.qkv.weight": (3 * D, D), f"{lsa}.qkv.bias": (3 * D,),
                       f"{lsa}.proj.weight": (D, D), f"{lsa}.proj.bias": (D,)})
    return shapes


def upstream_state(cfg, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"module." + k: 0.1 * torch.randn(s, generator=g) for k, s in upstream_shapes(cfg).items()}


def test_upstream_key_map_covers_base_model():
    model = build("base")
    assert model.seq_len == 208  # CLS + 196 patches + BG-CLS + 5 unimodal + 5 shared
    shapes = upstream_shapes(model.config)
    mapping = model.upstream_key_map(shapes)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(mapping.values()) == sorted(ours)
    assert all(ours[mapping[k]] == shapes[k] for k in mapping)
    dropped = set(shapes) - set(mapping)
    assert dropped == {"ViT.v.head.weight", "ViT.v.head.bias"} | {f"logit_scale.{i}" for i in range(12)}
    D, K, C = 768, 12, 309  # upstream's trainables: tokens, LSA, projections, heads, ViT CLS
    n_trainable = (16 * D + D + 3 * (4 * D * D + 4 * D) + 2 * K * (512 * D + 512) + (2 * D + 1) * C + 2 * D + 1)
    assert sum(p.numel() for p in model.trainable_parameters()) == n_trainable


def test_upstream_state_dict_loads_strictly_and_changes_outputs(tmp_path):
    torch.manual_seed(0)
    model = build("tiny")
    frames, audio = make_inputs(2)
    before = model(frames, audio)["logits"]
    state = upstream_state(TINY)
    model.load_upstream_state_dict(state)
    ours = model.state_dict()
    assert torch.equal(ours["vit.blocks.1.attn.qkv.weight"], state["module.ViT.v.blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["contrastive.vis_proj.1.bias"], state["module.vis_proj.1.bias"])
    assert torch.equal(ours["shared_attn.proj.weight"], state["module.shared_attn.proj.weight"])
    after = model(frames, audio)["logits"]
    assert not torch.allclose(before, after)
    # through build(pretrained=...) from an upstream-style checkpoint file
    path = tmp_path / "mavt.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "best_acc": 0.5}, path)
    loaded = build("tiny", pretrained=str(path))
    torch.testing.assert_close(loaded(frames, audio)["logits"], after, rtol=0, atol=0)


def test_upstream_state_dict_wrong_or_missing_key_raises():
    model = build("tiny")
    state = upstream_state(TINY)
    with pytest.raises(KeyError, match="audio_tokenz"):
        model.load_upstream_state_dict({**state, "module.audio_tokenz": torch.zeros(5, 64)})
    missing = {k: v for k, v in state.items() if k != "module.fg_class.bias"}
    with pytest.raises(RuntimeError, match="fg_class.bias"):
        model.load_upstream_state_dict(missing)
    bad_shape = {**state, "module.fg_class.bias": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="fg_class.bias"):
        model.load_upstream_state_dict(bad_shape)


# ----------------------------------------------------------------------------- quirks


def test_quirk_switch():
    torch.manual_seed(0)
    quirky = build("tiny")
    torch.manual_seed(0)
    paper = build("tiny", upstream_quirks=False)
    # token init: randn (std 1) vs truncated N(0, 0.02)
    for name in ("audio_tokens", "visual_tokens", "shared_tokens"):
        assert getattr(quirky, name).std() > 0.5 and getattr(paper, name).std() < 0.05
    paper.load_state_dict(quirky.state_dict())  # same keys: same weights from here on
    # position embedding: 1-D linear interpolation to N+2 vs pretrained entries + none for BG-CLS
    pos = quirky.vit.pos_embed
    interp = F.interpolate(pos.permute(0, 2, 1), pos.shape[1] + 1, mode="linear").permute(0, 2, 1)
    torch.testing.assert_close(quirky.position_embedding(), interp, rtol=0, atol=0)
    torch.testing.assert_close(paper.position_embedding()[:, :-1], pos, rtol=0, atol=0)
    assert paper.position_embedding()[:, -1].abs().max() == 0
    # LSA: MHA(x) vs x + MHA(x)
    x = torch.randn(1, 5, TINY.embed_dim)
    torch.testing.assert_close(paper.audio_attn(x), x + quirky.audio_attn(x))
    frames, audio = make_inputs(2)
    assert not torch.allclose(quirky(frames, audio)["logits"], paper(frames, audio)["logits"])


def test_position_embedding_cached_and_refreshed():
    model = build("tiny")
    first = model.position_embedding()
    assert model.position_embedding() is first
    assert first.shape == (1, model.num_patches + 2, TINY.embed_dim) and not first.requires_grad
    state = model.state_dict()
    state["vit.pos_embed"] = state["vit.pos_embed"] + 1.0
    model.load_state_dict(state)
    refreshed = model.position_embedding()
    torch.testing.assert_close(refreshed, first + 1.0)
    assert model.double().position_embedding().dtype == torch.float64
    model.float()
    with torch.inference_mode():  # a cache filled at inference still serves training
        model(*make_inputs(2))
    assert not model.position_embedding().is_inference()


# ----------------------------------------------------------------------------- backbone weights


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_from_local_timm_file(tmp_path, suffix):
    torch.manual_seed(3)
    source = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = build("tiny", backbone_weights=str(path))
    src = source.state_dict()
    for key, value in model.vit.state_dict().items():
        assert torch.equal(value, src[key]), key
    assert model.vit.cls_token.requires_grad and not model.vit.pos_embed.requires_grad


def test_backbone_weights_missing_file():
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        build("tiny", backbone_weights="/nonexistent/vit.pth")


# ----------------------------------------------------------------------------- config / errors


def test_configs_and_registry():
    base = MAVTConfig.base()
    assert (base.img_size, base.patch_size, base.embed_dim, base.depth, base.num_heads) == (224, 16, 768, 12, 12)
    assert (base.n_audio_tokens, base.n_visual_tokens, base.n_shared_tokens, base.lsa_heads) == (5, 5, 5, 8)
    assert (base.proj_dim, base.tau, base.num_classes, base.upstream_quirks) == (512, 0.07, 309, True)
    model = build_model("mavt", "tiny", num_classes=4, tau=0.1)
    assert isinstance(model, MAVT) and model.preset == "mavt"
    assert model.config.num_classes == 4 and model.contrastive.tau == 0.1
    assert math.isclose(model.config.tau, 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_audio_tokens=4), "n_audio_tokens"),
    (dict(lsa_heads=3), "embed_dim"),
    (dict(img_size=60), "img_size"),
    (dict(depth=0), "depth"),
    (dict(tau=0.0), "tau"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("tiny", **kwargs)


def test_build_errors():
    with pytest.raises(ValueError, match="size"):
        build("huge")
    with pytest.raises(ValueError, match="overrides"):
        build("tiny", n_tokens=3)
    with pytest.raises(TypeError, match="config"):
        MAVT(dict(img_size=64))


def test_input_errors():
    model = build("tiny")
    frames, audio = make_inputs(2)
    with pytest.raises(ValueError, match=r"frames must be .*\(B, 1, 3, 64, 64\).*got \(2, 1, 3, 32, 32\)"):
        model(frames[..., :32, :32], audio)
    with pytest.raises(ValueError, match="frames"):
        model(frames.expand(-1, 2, -1, -1, -1), audio)
    with pytest.raises(ValueError, match=r"audio must be .*got \(3, 1, 224, 224\)"):
        model(frames, torch.randn(3, *AUDIO))
    with pytest.raises(ValueError, match="audio"):
        model(frames, audio[:, 0])
    out = model(frames, audio)
    with pytest.raises(ValueError, match="label"):
        model.loss(out, {"label": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="background"):
        model.loss(out, {"label": torch.zeros(2, dtype=torch.int64), "background": torch.zeros(2)})
