"""AVS heads on each method the papers evaluate on AVSBench (STG-CMA, DG-SCT, DeepAVFusion):
the models' dense features, the decoder, forward/backward at tiny configs, the loader and
the AVS Trainer (fit, best.pt, avfast eval)."""

import json

import pytest
import torch

from avfast.models import build_model
from avfast.models.base import spread_layers
from avfast.nn import GuidedDecoder
from avfast.tasks.segmentation import (FRAMES, AVSModel, MaskMetrics, avs_loader, build_avs_model, make_avsbench,
                                       read_avsbench)
from seeding import fresh_seed, random_audio

TINY = {"deepavfusion": dict(img_size=32, patch_size=8), "stgcma": dict(img_size=32, patch_size=8),
        "dgsct": dict(img_size=32)}


def audio_for(model, batch: int) -> torch.Tensor:
    """Random audio of the preset's per-window feature shape, (batch, 5, ...)."""
    cfg = model.config
    if model.method == "deepavfusion":
        return torch.randn(batch, FRAMES, 1, *cfg.audio_size)
    if model.method == "stgcma":
        return torch.randn(batch, FRAMES, cfg.audio_frames, cfg.num_mel_bins)
    return torch.randn(batch, FRAMES, cfg.sample_rate) * 0.1


def test_spread_layers_picks_first_and_last_like_upstream():
    assert spread_layers(12, 4) == [0, 3, 7, 11]  # DeepAVFusion's np.linspace(0, 11, 4).astype(int)
    assert spread_layers(2, 4) == [0, 0, 0, 1] and spread_layers(5, 1) == [0]
    with pytest.raises(ValueError, match="levels: expected an integer >= 1, got 0"):
        spread_layers(4, 0)


@pytest.mark.parametrize("method", ["deepavfusion", "stgcma", "dgsct"])
def test_dense_features_have_the_shapes_dense_shapes_says_and_leave_forward_unchanged(method):
    fresh_seed()
    overrides = {**TINY[method], **({} if method == "deepavfusion" else {"num_frames": FRAMES})}
    model = build_model(method, "tiny", num_classes=3, **overrides).eval()
    frames = torch.randn(2, 1 if method == "deepavfusion" else FRAMES, 3, 32, 32)
    cfg = model.config
    audio = random_audio(method, cfg, 2, FRAMES)
    with torch.no_grad():
        maps, a = model.dense_features(frames, audio)
        shapes, audio_dim = model.dense_shapes()
        n = frames.shape[0] * frames.shape[1]
        assert [tuple(m.shape) for m in maps] == [(n, c, *grid) for c, grid in shapes]
        assert tuple(a.shape) == (n, audio_dim)
        if method == "deepavfusion":  # the encoder's outputs do not change with return_layers
            image, spec = frames[:, 0], audio
            plain = model.encoder(image, spec)
            *again, layers = model.encoder(image, spec, return_layers=True)
            for x, y in zip(plain, again):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            g = cfg.img_size // cfg.patch_size
            torch.testing.assert_close(maps[-1], layers[-1][0].transpose(1, 2).unflatten(2, (g, g)), rtol=0, atol=0)
            torch.testing.assert_close(a, plain[1].mean(1), rtol=0, atol=0)
        elif method == "stgcma":
            v, a_tokens = model.forward_features(frames, audio)
            v2, a2, kept = model.forward_features(frames, audio, keep=(0, 1))
            torch.testing.assert_close(v, v2, rtol=0, atol=0)
            torch.testing.assert_close(kept[1], v, rtol=0, atol=0)  # the last block's tokens
            torch.testing.assert_close(a, model.backbone.norm(a_tokens[:, 0]), rtol=0, atol=0)
        else:
            f_v, f_a = model.forward_features(frames, audio)
            f_v2, f_a2, stages = model.forward_features(frames, audio, stages=True)
            torch.testing.assert_close(f_v, f_v2, rtol=0, atol=0)
            torch.testing.assert_close(a, f_a.flatten(0, 1), rtol=0, atol=0)
            assert len(stages) == len(cfg.visual_depths)


def test_decoder_brings_each_level_to_twice_the_grid_above_and_rejects_a_grid_that_does_not_fit():
    fresh_seed()
    vit = GuidedDecoder([(8, (4, 4))] * 3, 5, out_size=40, width=16, min_width=4, predictor_width=4)
    swin = GuidedDecoder([(16, (2, 2)), (8, (4, 4)), (4, (8, 8))], 5, out_size=32, width=16, min_width=4,
                      predictor_width=4)
    assert isinstance(vit.lateral[0], torch.nn.Conv2d) and vit.lateral[2].stride == (4, 4)
    assert all(isinstance(m, torch.nn.Conv2d) for m in swin.lateral)
    out = vit([torch.randn(3, 8, 4, 4) for _ in range(3)], torch.randn(3, 5))
    assert out.shape == (3, 40, 40)
    assert swin([torch.randn(2, 16, 2, 2), torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)],
                torch.randn(2, 5)).shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"level 1's grid to divide \(8, 8\).*got \(3, 3\)"):
        GuidedDecoder([(8, (4, 4)), (8, (3, 3))], 5, out_size=32)
    with pytest.raises(ValueError, match="maps: expected 3 levels, got 2"):
        vit([torch.randn(3, 8, 4, 4)] * 2, torch.randn(3, 5))


@pytest.mark.parametrize("method", ["deepavfusion", "stgcma", "dgsct"])
def test_avs_model_forward_backward_at_tiny_size(method):
    fresh_seed()
    model = build_avs_model(method, "tiny", iou_weight=0.5, **TINY[method])
    frames = torch.randn(2, FRAMES, 3, 32, 32)
    out = model(frames, audio_for(model, 2))
    assert out["logits"].shape == (2, FRAMES, 32, 32)
    masks = (torch.rand(2, FRAMES, 32, 32) > 0.7).float()
    annotated = torch.tensor([[True, False, False, False, False]] * 2)
    loss, metrics = model.loss(out, {"masks": masks, "annotated": annotated})
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("decoder.") for n in trainable) and any(n.startswith("backbone.") for n in trainable)
    # every trainable parameter learns from the masks, but a key bias (it cancels in softmax)
    missing = [n for n, p in trainable.items() if (p.grad is None and not n.endswith("attn.k.bias"))
               or (p.grad is not None and not torch.isfinite(p.grad).all())]
    assert not missing, missing
    for name in model.backbone.dense_unused:  # the classification heads (and more) are frozen
        assert all(not p.requires_grad for p in model.backbone.get_submodule(name).parameters())


def test_avs_model_rejects_methods_and_inputs_it_cannot_take():
    with pytest.raises(ValueError, match=r"method: expected one of \('stgcma', 'dgsct', 'deepavfusion'\).*'mavt'"):
        build_avs_model("mavt", "tiny")
    with pytest.raises(ValueError, match="backbone: expected num_frames 1 or 5.*got 10"):
        AVSModel("stgcma", build_model("stgcma", "tiny", num_classes=2))
    with pytest.raises(ValueError, match="iou_weight: expected a number >= 0, got -1"):
        build_avs_model("deepavfusion", "tiny", iou_weight=-1, **TINY["deepavfusion"])
    model = build_avs_model("deepavfusion", "tiny", **TINY["deepavfusion"])
    with pytest.raises(ValueError, match=r"frames: expected \(B, 5, 3, S, S\), got \(2, 4, 3, 32, 32\)"):
        model(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 1, 128, 192))


def test_avs_loader_orders_shards_and_leaves_out_an_unreadable_clip(tmp_path):
    make_avsbench(tmp_path, "s4", clips={"train": 5, "val": 2, "test": 0}, size=32)
    clips = read_avsbench(tmp_path, "s4", "train")
    with open(clips[2].frames[3], "wb") as f:
        f.write(b"not a png")
    preset = build_model("stgcma", "tiny", num_classes=2).preset
    loader = avs_loader(clips, preset, batch_size=2, train=True, seed=4)
    assert len(loader) == 3
    seen = [b["index"].tolist() for b in loader.batches()]
    assert sorted(i for b in seen for i in b) == [0, 1, 3, 4]  # clip 2 left out
    assert set(loader.unreadable) == {2} and loader.unreadable[2][0] == "unreadable"
    assert loader.skipped == {"unreadable": 1} and loader.epoch == 1
    loader.set_epoch(0)
    assert [b["index"].tolist() for b in loader.batches(start=1)] == seen[1:]  # resume mid-epoch
    val = avs_loader(read_avsbench(tmp_path, "s4", "val"), preset, batch_size=4, train=False)
    batch = next(iter(val))
    assert batch["index"].tolist() == [0, 1] and batch["annotated"].all()
    halves = [avs_loader(clips, preset, batch_size=8, train=False, shard_id=k, num_shards=2) for k in (0, 1)]
    assert [next(iter(h))["index"].tolist() for h in halves] == [[0, 4], [1, 3]]
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        avs_loader(clips, preset, batch_size=0, train=True)


def test_mask_metrics_sums_add_up_across_parts():
    fresh_seed()
    prob, target = torch.rand(6, 9, 7), (torch.rand(6, 9, 7) > 0.6).float()
    target[4] = 0
    whole, parts = MaskMetrics(), []
    whole.update(prob, target)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        m = MaskMetrics()
        m.update(prob[lo:hi], target[lo:hi])
        parts.append(m.to_tensor())
    combined = MaskMetrics.from_tensor(sum(parts)).compute()
    assert combined == pytest.approx(whole.compute(), rel=1e-12)


def test_avs_trainer_fits_saves_best_and_avfast_eval_scores_the_checkpoint(tmp_path, capsys):
    from avfast.cli import main
    from avfast.train.loop import TrainConfig, checkpoint_evaluator, make_trainer

    root = tmp_path / "avs"
    make_avsbench(root, "s4", clips={"train": 4, "val": 2, "test": 2}, size=32)
    cfg = TrainConfig(method="deepavfusion", data=str(root), out=str(tmp_path / "run"), task="avs", size="tiny",
                      epochs=2, batch_size=2, lr=1e-3, workers=0, loader="cpu", progress=False,
                      model_overrides={**TINY["deepavfusion"], "decoder_width": 32})
    trainer = make_trainer(cfg)
    assert trainer.model.decoder.top[0].out_channels == 32
    result = trainer.fit()
    assert set(result) == {"val_loss", "val_miou", "val_fscore"} and 0 <= result["val_miou"] <= 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 2 and all("val_miou" in r for r in epochs)
    assert records[-1]["event"] == "summary" and records[-1]["clips_used"] == 6
    best = max(r["val_miou"] for r in epochs)
    evaluator = checkpoint_evaluator(str(tmp_path / "run" / "best.pt"), str(root), workers=0, split="val")
    assert evaluator.evaluate()["val_miou"] == pytest.approx(best, abs=1e-9)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(root),
                 "--workers", "0", "--split", "test"]) == 0
    assert "val_miou=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="loader: expected 'auto', 'cpu' or 'dali', got 'gpu'"):
        make_trainer(TrainConfig(**{**cfg.__dict__, "loader": "gpu", "out": str(tmp_path / "r2")}))


@pytest.mark.parametrize("source_size", [32, 64])
def test_avs_dali_loader_gives_the_cpu_loaders_batches_and_reads_a_bad_batch_on_the_cpu(tmp_path, source_size):
    pytest.importorskip("nvidia.dali")
    import dataclasses

    from avfast.data.presets import get_preset
    from avfast.tasks.segmentation import AVSDALILoader

    make_avsbench(tmp_path, "ms3", clips={"train": 5, "val": 0, "test": 0}, size=source_size)
    preset = get_preset("stgcma")
    preset = dataclasses.replace(preset, video=dataclasses.replace(preset.video, size=32))
    clips = read_avsbench(tmp_path, "ms3", "train")
    with open(clips[3].masks[2], "wb") as f:
        f.write(b"not a png")
    cpu = avs_loader(clips, preset, batch_size=2, train=True, seed=6)
    dali = AVSDALILoader(clips, preset, batch_size=2, train=True, seed=6, device_id=None)
    assert len(dali) == len(cpu) == 3
    std = torch.tensor(preset.video.std).view(1, 1, 3, 1, 1)
    for a, b in zip(cpu.batches(), dali.batches(), strict=True):
        assert a["index"].tolist() == b["index"].tolist()
        # frames: exact without a resize, within one 8-bit step with one (both resize as DALI does)
        step = 0 if source_size == 32 else 1
        assert float(((a["frames"] - b["frames"]) * std * 255).abs().max()) <= step + 1e-3
        for key in ("masks", "annotated", "audio"):
            torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=0)
    assert set(dali.unreadable) == set(cpu.unreadable) == {3} and dali.skipped == {"unreadable": 1}
    assert dali.epoch == 1


def test_avfast_train_rejects_a_method_without_an_avs_head(tmp_path, capsys):
    from avfast.cli import main

    make_avsbench(tmp_path, "s4", clips={"train": 1, "val": 1, "test": 0}, size=32)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "avs", "--method", "mavt", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "method: expected one of ('stgcma', 'dgsct', 'deepavfusion')" in capsys.readouterr().err
