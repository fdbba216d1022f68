"""DeepAVFusion model: tiny forward/backward, float64 equality with the literal upstream
formulation (concatenate [F ; V] through the ViT blocks, keep the modality rows, the literal
pair-tensor fusion blocks, the AV-MAE decoders and norm-pix loss), upstream checkpoint loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.models.vision_transformer import Block

from avfast.bench.upstream.deepavfusion import (
    UpstreamDeepAVFusion,
    UpstreamEncoder,
    decode,
    patch_loss,
    patchify,
    random_masking,
    sincos_pos_embed,
)
from avfast.models import build_model
from avfast.models.deepavfusion import (
    DeepAVFusion,
    DeepAVFusionConfig,
    DeepAVFusionMAE,
    DeepAVFusionMAEConfig,
    block_rows,
    build,
    build_mae,
)

AUDIO = (1, 128, 192)


def inputs(cfg, B=2, dtype=torch.float32):
    frames = torch.randn(B, 1, 3, cfg.img_size, cfg.img_size, dtype=dtype)
    audio = torch.randn(B, *AUDIO, dtype=dtype)
    return frames, audio


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Float64, random weights everywhere (biases and LayerNorm affine too)."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


# ------------------------------------------------------------------ literal upstream formulation
# avfast.bench.upstream.deepavfusion: the encoder concatenating [F ; V] through the timm blocks
# and slicing, the literal fusion blocks of avfast.reference.fusion_blocks (dense: the pair
# tensor materialised) sharing the model's parameters, the literal AV-MAE.


# ------------------------------------------------------------------ expected upstream key names

def vit_keys(prefix, depth):
    keys = {f"{prefix}patch_embed.proj.weight", f"{prefix}patch_embed.proj.bias", f"{prefix}pos_embed",
            f"{prefix}norm.weight", f"{prefix}norm.bias"}
    for k in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{prefix}blocks.{k}.{name}.weight", f"{prefix}blocks.{k}.{name}.bias"}
    return keys


def encoder_keys(depth, arch="factorized"):
    keys = vit_keys("encoder.image.", depth) | vit_keys("encoder.audio.", depth)
    keys |= {"encoder.fusion_tokens", "encoder.fusion_norm.weight", "encoder.fusion_norm.bias"}
    attn = (("attn_v.q", "attn_v.kv", "attn_v.proj", "attn_a.q", "attn_a.kv", "attn_a.proj", "q", "k", "v", "proj")
            if arch == "factorized" else ("q", "kv", "proj"))
    for i in range(depth):
        names = ["norm1_mm", "norm1_aud", "norm1_img", "norm2", "mlp.fc1", "mlp.fc2"] + [f"attn.{a}" for a in attn]
        keys |= {f"encoder.fusion_blocks.{i}.{n}.{p}" for n in names for p in ("weight", "bias")}
    return keys


def decoder_keys(depth):
    keys = set()
    for m in ("image", "audio"):
        keys |= {f"{m}_decoder_mask_token", f"{m}_decoder_pos_embed"}
        keys |= {f"{m}_decoder_{n}.{p}" for n in ("embed", "norm", "pred") for p in ("weight", "bias")}
        keys |= {k.replace("x.blocks.", f"{m}_decoder_blocks.") for k in vit_keys("x.", depth) if ".blocks." in k}
    return keys


HEAD_KEYS = {f"{h}_head.{p}" for h in ("image", "audio", "fusion") for p in ("weight", "bias")}


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("arch", ["factorized", "dense"])
def test_tiny_forward_backward_reaches_every_trainable_parameter(arch):
    torch.manual_seed(0)
    model = build("tiny", fusion_arch=arch, drop_path=0.0)  # no stochastic depth: every branch gets a grad
    cfg = model.config
    frames, audio = inputs(cfg, B=3)
    out = model(frames, audio)
    for key in ("logits", "logits_image", "logits_audio", "logits_fusion"):
        assert out[key].shape == (3, cfg.num_classes)
    batch = {"label": torch.tensor([0, 3, 9])}
    loss, metrics = model.loss(out, batch)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "acc"}
    assert torch.equal(model.predict(out), out["logits"])
    loss.backward()
    assert model.trainable_parameters() == list(model.parameters())  # fine-tuning trains everything
    assert not any(p.requires_grad for p in model.buffers())
    for name, p in model.named_parameters():
        if name.endswith("attn.k.bias") and arch == "factorized":
            # the pair key bias cancels in the softmax: its gradient is exactly zero upstream too
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tiny_mae_pretrain_loss_backward():
    torch.manual_seed(0)
    mae = build_mae("tiny")
    frames, audio = inputs(mae.config, B=2)
    out = mae(frames, audio)
    assert out["pred_image"].shape == (2, 4, 16 * 16 * 3) and out["pred_audio"].shape == (2, 96, 16 * 16)
    assert out["mask_image"].sum(1).tolist() == [3, 3] and out["mask_audio"].sum(1).tolist() == [77, 77]
    loss, metrics = mae.pretrain_loss(frames, audio)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "loss_image", "loss_audio"}
    loss.backward()
    missing = [n for n, p in mae.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0) and not n.endswith("attn.k.bias")]
    assert missing == []
    assert mae.image_decoder_pos_embed.requires_grad  # upstream quirk: trainable decoder position tables
    with pytest.raises(TypeError, match="no logits"):
        mae.predict(out)


@pytest.mark.parametrize("arch", ["factorized", "dense"])
def test_encoder_equals_literal_upstream_float64(arch):
    torch.manual_seed(1)
    model = randomize(build("tiny", fusion_arch=arch, drop_path=0.0)).eval()
    cfg = model.config
    image, audio = (t[:, 0] if t.dim() == 5 else t for t in inputs(cfg, B=2, dtype=torch.float64))
    ours = model.encoder(image, audio)
    upstream = UpstreamDeepAVFusion(model)
    ref = upstream.encoder(image, audio)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-10
    # the classifier: three heads on mean-pooled streams, logits averaged
    out = model(image[:, None], audio)
    heads = (model.image_head, model.audio_head, model.fusion_head)
    logits = sum(h(x.mean(dim=1)) for h, x in zip(heads, ref)) / 3.0
    assert (out["logits"] - logits).abs().max().item() <= 1e-10
    assert (upstream(image[:, None], audio)["logits"] - logits).abs().max().item() <= 1e-10


def test_block_rows_equals_full_block_including_drop_path_float64():
    torch.manual_seed(2)
    block = randomize(Block(32, 4, 4.0, qkv_bias=True, drop_path=0.5)).train()
    prefix, x = torch.randn(3, 5, 32, dtype=torch.float64), torch.randn(3, 7, 32, dtype=torch.float64)
    torch.manual_seed(3)
    full = block(torch.cat([prefix, x], dim=1))[:, 5:]
    torch.manual_seed(3)
    rows = block_rows(block, prefix, x)
    assert (rows - full).abs().max().item() <= 1e-10


def test_pos_embed_is_upstream_sincos_for_the_actual_grids():
    model = build("base", num_classes=5, depth=1)  # base widths and grids, one layer to stay cheap
    image_pe, audio_pe = model.encoder.image.pos_embed, model.encoder.audio.pos_embed
    assert image_pe.shape == (1, 196, 768) and audio_pe.shape == (1, 96, 768)
    assert torch.allclose(image_pe[0].double(), sincos_pos_embed(768, (14, 14)), atol=1e-6)
    assert torch.allclose(audio_pe[0].double(), sincos_pos_embed(768, (8, 12)), atol=1e-6)
    assert model.encoder.fusion_tokens.shape == (1, 32, 768)
    blk = model.encoder.fusion_blocks[0]
    assert blk.attn.scale == 64 ** -0.5 and blk.attn.q.weight.shape == (192, 768) and blk.mlp.fc1.out_features == 768
    assert blk.norm1_mm.eps == 1e-5 and model.encoder.image.blocks[0].norm1.eps == 1e-6
    assert model.encoder.fusion_norm.eps == 1e-5


def test_mae_loss_equals_literal_upstream_float64():
    cfg = DeepAVFusionMAEConfig.tiny()
    torch.manual_seed(4)
    mae = randomize(DeepAVFusionMAE(cfg)).eval()
    frames, audio = inputs(cfg, B=3, dtype=torch.float64)
    encoder = UpstreamEncoder(mae.encoder, cfg)
    torch.manual_seed(5)
    out = mae(frames, audio)

    torch.manual_seed(5)  # same random draws: image noise first, then audio
    image = frames[:, 0]
    keep_i, mask_i, restore_i = random_masking(3, cfg.image_tokens, cfg.image_mask_ratio, dtype=torch.float64)
    keep_a, mask_a, restore_a = random_masking(3, cfg.audio_tokens, cfg.audio_mask_ratio, dtype=torch.float64)
    assert keep_i.shape == (3, 1) and keep_a.shape == (3, 19)
    x_i, x_a, x_f = encoder(image, audio, keep_i, keep_a)
    pred_i = decode(mae, "image", x_i, x_f, restore_i)
    pred_a = decode(mae, "audio", x_a, x_f, restore_a)
    loss_i = patch_loss(patchify(image, 16), pred_i, mask_i)
    loss_a = patch_loss(patchify(audio, 16), pred_a, mask_a)

    assert torch.equal(out["mask_image"], mask_i) and torch.equal(out["mask_audio"], mask_a)
    assert (out["pred_image"] - pred_i).abs().max().item() <= 1e-10
    assert (out["pred_audio"] - pred_a).abs().max().item() <= 1e-10
    assert abs(out["loss"].item() - (loss_i + loss_a).item()) <= 1e-10
    assert abs(out["loss_image"].item() - loss_i.item()) <= 1e-10


def test_base_mae_masks_keep_upstream_counts():
    cfg = DeepAVFusionMAEConfig.base()
    assert int(cfg.image_tokens * (1 - cfg.image_mask_ratio)) == 49
    assert int(cfg.audio_tokens * (1 - cfg.audio_mask_ratio)) == 19
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.drop_path) == (512, 8, 16, 0.0)


def upstream_mae_state(seed, arch="factorized"):
    """An AV-MAE checkpoint shaped like upstream's: DDP prefix, encoder. + decoder keys."""
    torch.manual_seed(seed)
    src = build_mae("tiny", fusion_arch=arch)
    assert set(src.state_dict()) == encoder_keys(2, arch) | decoder_keys(2)
    return src, {"module." + k: v.clone() for k, v in src.state_dict().items()}


def test_upstream_mae_checkpoint_loads_for_finetuning(tmp_path):
    src, state = upstream_mae_state(6)
    torch.manual_seed(7)
    model = build("tiny").eval()
    assert set(model.state_dict()) == encoder_keys(2) | HEAD_KEYS
    heads = {k: v.clone() for k, v in model.state_dict().items() if "_head." in k}
    frames, audio = inputs(model.config)
    before = model(frames, audio)["logits"]
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"state_dict": state, "epoch": 200}, path)
    loaded = build("tiny", pretrained=str(path)).eval()
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    model.load_upstream_state_dict(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())  # heads keep their init
    assert not torch.allclose(model(frames, audio)["logits"], before)


def test_upstream_finetuned_classifier_loads_strictly_and_reproduces_outputs(tmp_path):
    torch.manual_seed(8)
    src = build("tiny").eval()
    state = {"module." + k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": state}, path)
    model = build("tiny", pretrained=str(path)).eval()
    frames, audio = inputs(model.config)
    assert torch.equal(model(frames, audio)["logits"], src(frames, audio)["logits"])
    # a bare encoder state dict (keys image.*, fusion_blocks.*, ...) also loads
    bare = build("tiny")
    bare.load_upstream_state_dict(src.encoder.state_dict())
    assert torch.equal(bare.encoder.fusion_tokens, src.encoder.fusion_tokens)


def test_wrong_or_missing_upstream_keys_raise():
    _, state = upstream_mae_state(9)
    model = build("tiny")
    wrong = dict(state)
    wrong["module.encoder.fusion_blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="fusion_blocks.0.attn.extra.weight"):
        model.load_upstream_state_dict(wrong)
    missing = dict(state)
    del missing["module.encoder.image.blocks.1.mlp.fc2.weight"]
    with pytest.raises(RuntimeError, match="image.blocks.1.mlp.fc2.weight"):
        model.load_upstream_state_dict(missing)
    with pytest.raises(KeyError, match=r"fusion_blocks\.0\.attn\.kv"):  # a dense checkpoint, factorized model
        model.load_upstream_state_dict(upstream_mae_state(9, "dense")[1])


def test_upstream_mae_checkpoint_resumes_pretraining(tmp_path):
    src, state = upstream_mae_state(10)
    path = tmp_path / "mae.pth"
    torch.save({"state_dict": state, "n_steps": 1, "optimizer": {}, "scaler": {}, "epoch": 1}, path)
    mae = build_mae("tiny", pretrained=str(path))
    assert all(torch.equal(mae.state_dict()[k], v) for k, v in src.state_dict().items())


def test_upstream_quirks_flag():
    torch.manual_seed(11)
    quirky = build("tiny").eval()
    paper = build("tiny", upstream_quirks=False).eval()
    paper.load_state_dict(quirky.state_dict())
    head_width = quirky.config.embed_dim * quirky.config.fusion_attn_ratio / quirky.config.fusion_num_heads
    assert quirky.encoder.fusion_blocks[0].attn.scale == (64 / 2) ** -0.5
    assert paper.encoder.fusion_blocks[0].attn.scale == head_width ** -0.5
    frames, audio = inputs(quirky.config)
    assert not torch.allclose(quirky(frames, audio)["logits_fusion"], paper(frames, audio)["logits_fusion"])
    mae = build_mae("tiny", upstream_quirks=False)
    assert not mae.image_decoder_pos_embed.requires_grad and not mae.audio_decoder_pos_embed.requires_grad


def test_loss_label_smoothing_soft_targets_and_head_bias():
    torch.manual_seed(12)
    model = build("tiny", num_classes=4)
    logits = torch.randn(3, 4)
    label = torch.tensor([0, 2, 3])
    loss, _ = model.loss({"logits": logits}, {"label": label})
    logp = logits.log_softmax(-1)
    expected = (0.9 * -logp.gather(1, label[:, None]).squeeze(1) + 0.1 * -logp.mean(-1)).mean()
    assert torch.allclose(loss, expected)
    soft = torch.softmax(torch.randn(3, 4), -1)
    loss, _ = model.loss({"logits": logits}, {"label": soft})
    assert torch.allclose(loss, -(soft * logp).sum(-1).mean())
    freq = torch.tensor([0.1, 0.2, 0.3, 0.4])
    model.init_head_bias(freq)
    assert torch.allclose(model.fusion_head.bias, torch.log((freq + 1e-3) / (1 - freq + 1e-3)))
    with pytest.raises(ValueError, match=r"batch\['label'\] must be \(B,\) int64 or \(B, C\) float"):
        model.loss({"logits": logits}, {"label": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"class_freq must be \(C,\) = \(4,\), got \(3,\)"):
        model.init_head_bias(freq[:3])


def test_backbone_weights_from_mae_style_checkpoints(tmp_path):
    torch.manual_seed(13)
    donor = build("tiny").encoder
    for trunk, field in ((donor.image, "image_weights"), (donor.audio, "audio_weights")):
        state = {k: v for k, v in trunk.state_dict().items() if k != "pos_embed"}
        state.update({"cls_token": torch.zeros(1, 1, 64), "pos_embed": torch.zeros(1, 5, 64),
                      "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.zeros(8, 64)})
        torch.save({"model": state}, tmp_path / f"{field}.pth")
    model = build("tiny", image_weights=str(tmp_path / "image_weights.pth"),
                  audio_weights=str(tmp_path / "audio_weights.pth"))
    assert torch.equal(model.encoder.image.blocks[1].mlp.fc1.weight, donor.image.blocks[1].mlp.fc1.weight)
    assert torch.equal(model.encoder.audio.patch_embed.proj.weight, donor.audio.patch_embed.proj.weight)
    assert torch.equal(model.encoder.image.pos_embed, donor.image.pos_embed)  # ours, not the file's
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(64)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="image_weights: expected a ViT checkpoint"):
        build("tiny", image_weights=str(tmp_path / "bad.pth"))


def test_bad_arguments_are_named():
    model = build("tiny")
    frames, audio = inputs(model.config)
    with pytest.raises(ValueError, match=r"frames must be \(B, 1, 3, 32, 32\), got \(2, 3, 32, 32\)"):
        model(frames[:, 0], audio)
    with pytest.raises(ValueError, match=r"audio must be \(B, 1, mels, frames\) = \(2, 1, 128, 192\), "
                                         r"got \(2, 1, 128, 100\)"):
        model(frames, audio[..., :100])
    with pytest.raises(ValueError, match="fusion_arch: expected one of"):
        build("tiny", fusion_arch="token")
    with pytest.raises(ValueError, match="size: expected one of"):
        build("huge")
    with pytest.raises(ValueError, match=r"overrides: expected fields of DeepAVFusionConfig .* got \['dim'\]"):
        build("tiny", dim=3)
    with pytest.raises(ValueError, match="image_mask_ratio: expected a ratio"):
        build_mae("tiny", image_mask_ratio=0.9)
    with pytest.raises(FileNotFoundError, match="pretrained: expected a local checkpoint file"):
        build("tiny", pretrained="/nonexistent/ckpt.pth")


def test_registry_and_configs():
    model = build_model("deepavfusion", size="tiny", num_classes=7)
    assert isinstance(model, DeepAVFusion) and model.preset == "deepavfusion" and model.config.num_classes == 7
    base = DeepAVFusionConfig.base()
    assert (base.fusion_arch, base.num_fusion_tkns, base.fusion_attn_ratio, base.fusion_mlp_ratio) == (
        "factorized", (16, 8, 8), 0.25, 1.0)
    assert (base.img_size, base.audio_size, base.image_tokens, base.audio_tokens) == (224, (128, 192), 196, 96)
    assert (base.drop_path, base.label_smoothing, base.upstream_quirks) == (0.2, 0.1, True)
    assert dataclasses.replace(DeepAVFusionConfig.tiny(), fusion_arch="dense").fusion_arch == "dense"
