"""avfast.tasks.segmentation: AVSBench's mIoU and F-score on hand-computed cases, against a
literal per-threshold loop on random frames, and their input checks."""

import math
import os

import pytest
import torch

from avfast.tasks.segmentation import MaskMetrics, frame_fscores, frame_iou
from seeding import fresh_seed

F_HALF = 1.3 * 0.5 / (0.3 * 0.5 + 1)  # precision 1/2, recall 1


def test_iou_by_hand_including_an_empty_mask():
    prob = torch.tensor([[[0.9, 0.6], [0.1, 0.2]], [[0.0, 0.4], [0.3, 0.7]]])
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    # frame 0: predicted {0, 1}, mask {0}: 1 / 2; frame 1 (empty mask): 3 background pixels of 4
    torch.testing.assert_close(frame_iou(prob, target), torch.tensor([0.5, 0.75], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    m = MaskMetrics()
    m.update(prob[:1], target[:1])
    m.update(prob[1:], target[1:])
    assert m.compute()["miou"] == pytest.approx(0.625, abs=1e-6) and m.compute()["frames"] == 2


def test_fscore_is_the_best_threshold_of_the_frame_mean_by_hand():
    prob = torch.tensor([[[0.8, 0.3]], [[0.9, 0.2]], [[0.5, 0.5]]])
    target = torch.tensor([[[1, 0]], [[0, 1]], [[0, 0]]])  # the empty frame is left out of F
    f = frame_fscores(prob[:2], target[:2])
    t = torch.linspace(0, 1 - 1e-10, 255).double()  # float32 thresholds, as AVSBench
    # frame 0: t <= 0.3 both pixels (P 1/2, R 1), 0.3 < t <= 0.8 only the masked one (F 1), then none (0)
    half, one, zero = (torch.full_like(t, v) for v in (F_HALF, 1.0, 0.0))
    expected0 = torch.where(t <= 0.3, half, torch.where(t <= 0.8, one, zero))
    # frame 1: t <= 0.2 both (F_HALF); above, only the wrong pixel or none: 0
    expected1 = torch.where(t <= 0.2, half, zero)
    torch.testing.assert_close(f, torch.stack([expected0, expected1]), rtol=0, atol=1e-12)
    m = MaskMetrics()
    m.update(prob, target)
    out = m.compute()
    # the mean over frames peaks at F_HALF (t <= 0.2), not at the mean of each frame's best (0.78)
    assert out["fscore"] == pytest.approx(F_HALF, abs=1e-12) and out["fscore_frames"] == 2


def literal_fscores(prob, target, num=255):
    """The definition, one frame and one threshold at a time."""
    out = torch.zeros(prob.shape[0], num, dtype=torch.float64)
    for i in range(prob.shape[0]):
        for k, th in enumerate(torch.linspace(0, 1 - 1e-10, num)):
            pred = (prob[i] >= th).double()
            tp = float((pred * target[i]).sum())
            p, r = tp / (float(pred.sum()) + 1e-20), tp / (float(target[i].sum()) + 1e-20)
            f = 1.3 * p * r / (0.3 * p + r) if 0.3 * p + r > 0 else 0.0
            out[i, k] = 0.0 if math.isnan(f) else f
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 5), (2, 17, 33)])
def test_fscores_and_iou_equal_the_literal_definition_on_random_frames(shape):
    fresh_seed()
    prob = torch.rand(shape)
    prob[0].view(-1)[:3] = torch.tensor([0.0, 1.0, 0.5])[: prob[0].numel()]  # the edges
    target = (torch.rand(shape) < 0.3).long()
    view = prob.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous view
    torch.testing.assert_close(frame_fscores(view, target), literal_fscores(prob, target), rtol=0, atol=1e-12)
    literal_iou = []
    for p, t in zip(prob, target):
        pred = (p > 0.5).double()
        if t.sum() == 0:
            literal_iou.append(float(((1 - pred) * (1 - t)).sum()) / (t.numel() + 1e-7))
        else:
            literal_iou.append(float((pred * t).sum()) / (float(torch.maximum(pred, t.double()).sum()) + 1e-7))
    torch.testing.assert_close(frame_iou(view, target), torch.tensor(literal_iou, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_metrics_do_not_depend_on_batching():
    fresh_seed()
    prob, target = torch.rand(7, 9, 9), (torch.rand(7, 9, 9) < 0.2).long()
    target[2] = 0
    whole, parts = MaskMetrics(), MaskMetrics()
    whole.update(prob, target)
    for a, b in ((0, 1), (1, 4), (4, 7)):
        parts.update(prob[a:b], target[a:b])
    assert whole.compute() == pytest.approx(parts.compute(), abs=1e-12)


def test_no_foreground_frame_gives_nan_fscore_and_no_update_is_an_error():
    m = MaskMetrics()
    with pytest.raises(ValueError, match="expected at least one update, got none"):
        m.compute()
    m.update(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3))
    out = m.compute()
    assert out["miou"] == pytest.approx(1.0, abs=1e-6) and math.isnan(out["fscore"])


@pytest.mark.parametrize("prob, target, match", [
    (torch.rand(2, 3), torch.zeros(2, 3), r"prob: expected \(N, H, W\), got shape \(2, 3\)"),
    (torch.rand(2, 3, 3), torch.zeros(2, 3, 4), r"target: expected the shape of prob \(2, 3, 3\), got \(2, 3, 4\)"),
    (torch.full((1, 2, 2), 2.5), torch.zeros(1, 2, 2), r"prob: expected probabilities in \[0, 1\] .*got 2.5"),
    (torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2), r"prob: expected probabilities in \[0, 1\] .*got nan"),
    (torch.rand(1, 2, 2), torch.full((1, 2, 2), 3), r"target: expected a binary mask \(0 or 1\), got 3"),
    (torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), r"prob: expected a floating-point tensor"),
    ([[[0.5]]], torch.zeros(1, 1, 1), r"prob: expected a tensor, got list"),
])
def test_bad_inputs_name_the_argument(prob, target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        frame_iou(prob, target)
    with pytest.raises((ValueError, TypeError), match=match):
        frame_fscores(prob, target)


def test_mask_loss_is_upstream_bce_of_the_supervised_frames_plus_an_optional_soft_iou():
    from avfast.tasks.segmentation import mask_loss

    fresh_seed()
    logits = (torch.randn(4, 5, 6, dtype=torch.float64) * 3).requires_grad_()
    target = (torch.rand(4, 5, 6) < 0.4).double()
    first = torch.tensor([True, False, True, False])  # S4: the first frame of each clip
    upstream = torch.nn.BCELoss()(torch.sigmoid(logits[first]), target[first])
    torch.testing.assert_close(mask_loss(logits, target, first), upstream, rtol=1e-12, atol=1e-12)
    p, t = torch.sigmoid(logits[first]).flatten(1), target[first].flatten(1)
    soft_iou = (1 - (p * t).sum(1) / (p + t - p * t).sum(1)).mean()
    total = mask_loss(logits, target, first, iou_weight=0.5)
    torch.testing.assert_close(total, upstream + 0.5 * soft_iou, rtol=1e-12, atol=1e-12)
    total.backward()
    assert logits.grad[~first].abs().max() == 0 and logits.grad[first].abs().max() > 0
    with pytest.raises(ValueError, match=r"supervised: expected a bool tensor of shape \(4,\), got torch.int64 \(4,\)"):
        mask_loss(logits, target, first.long())
    with pytest.raises(ValueError, match="supervised: expected at least one supervised frame, got none"):
        mask_loss(logits, target, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target: expected the shape of logits \(4, 5, 6\), got \(4, 5, 5\)"):
        mask_loss(logits, target[..., :5])


def avsbench_tree(root, subset):
    """A tiny AVSBench tree: S4 rows (id, category, split) or MS3 rows (id, split), with
    every file of clips 'a' (train) and 'b' (test), and clip 'c' (test) missing its wav."""
    from avfast.tasks.segmentation import _avs_paths

    folder, meta, data = {"s4": ("Single-source", "s4_meta_data.csv", "s4_data"),
                          "ms3": ("Multi-sources", "ms3_meta_data.csv", "ms3_data")}[subset]
    base = root / folder
    base.mkdir(parents=True)
    rows = [("a", "dog", "train"), ("b", "cat", "test"), ("c", "cat", "test")]
    header = "name,category,split" if subset == "s4" else "name,split"
    lines = [",".join(r if subset == "s4" else (r[0], r[2])) for r in rows]
    (base / meta).write_text(header + "\n" + "\n".join(lines) + "\n")
    for vid, category, split in rows:
        frames, masks, audio = _avs_paths(subset, str(base / data), vid, category, split)
        for p in (*frames, *(m for m in masks if m), *((audio,) if vid != "c" else ())):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").close()
    return base / meta


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_read_avsbench_reads_its_layout_and_reports_bad_rows(tmp_path, subset):
    from avfast.tasks.segmentation import read_avsbench

    meta = avsbench_tree(tmp_path, subset)
    train = read_avsbench(tmp_path, subset, "train")
    assert [c.id for c in train] == ["a"] and len(train[0].frames) == 5
    # S4 annotates only the first training frame; MS3 all five
    assert sum(m is not None for m in train[0].masks) == (1 if subset == "s4" else 5)
    assert train[0].category == ("dog" if subset == "s4" else "")
    data = tmp_path / ("Single-source/s4_data" if subset == "s4" else "Multi-sources/ms3_data")
    if subset == "s4":  # the layout spelled out, not derived from the reader's own helper
        expected = ("visual_frames/train/dog/a/a_1.png", "gt_masks/train/dog/a/a_1.png", "audio_wav/train/dog/a.wav")
    else:
        expected = ("visual_frames/a/a.mp4_1.png", "gt_masks/train/a/a_1.png", "audio_wav/train/a.wav")
    assert (train[0].frames[0], train[0].masks[0], train[0].audio) == tuple(str(data / e) for e in expected)
    bad = []
    test = read_avsbench(tmp_path, subset, "test", bad)
    assert [c.id for c in test] == ["b"] and all(m is not None for m in test[0].masks)
    assert [(b.file, b.row, b.path, b.reason) for b in bad] == [(str(meta), 4, "c", "missing file")]
    assert "c.wav" in bad[0].detail
    with pytest.raises(ValueError, match=f"read_avsbench: {meta}:4: missing file: c "):
        read_avsbench(tmp_path, subset, "test")


def test_read_avsbench_rejects_a_malformed_layout(tmp_path):
    from avfast.tasks.segmentation import read_avsbench

    with pytest.raises(ValueError, match="subset: expected one of \\['ms3', 's4'\\], got 'avss'"):
        read_avsbench(tmp_path, "avss", "train")
    with pytest.raises(ValueError, match="split: expected 'train', 'val' or 'test', got 'dev'"):
        read_avsbench(tmp_path, "s4", "dev")
    with pytest.raises(FileNotFoundError, match="root must hold Single-source/s4_meta_data.csv"):
        read_avsbench(tmp_path, "s4", "train")
    meta = avsbench_tree(tmp_path, "s4")
    meta.write_text("name,split\na,train\n")
    expected = r"must have a header .* columns \['split', 'category'\], got \['name', 'split'\]"
    with pytest.raises(ValueError, match=expected):
        read_avsbench(tmp_path, "s4", "train")
    meta.write_text("name,category,split\n../../etc,dog,train\na,dog\n")
    bad = []
    assert read_avsbench(tmp_path, "s4", "train", bad) == []
    assert [(b.row, b.reason) for b in bad] == [(2, "escapes root"), (3, "malformed")]


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_synthetic_avsbench_reads_back_with_exact_masks_of_the_sounding_shapes(tmp_path, subset):
    import wave

    from torchvision.io import read_image

    from avfast.data.synthetic import class_colour
    from avfast.tasks.segmentation import make_avsbench, read_avsbench

    make_avsbench(tmp_path, subset, categories=3, clips={"train": 2, "test": 1}, size=32, seed=fresh_seed())
    train, test = read_avsbench(tmp_path, subset, "train"), read_avsbench(tmp_path, subset, "test")
    assert [c.id for c in train] == ["train_000", "train_001"] and [c.id for c in test] == ["test_000"]
    colours = {class_colour(k, 3) for k in range(3)}
    for clip in train + test:
        for frame, mask in zip(clip.frames, clip.masks):
            image = read_image(frame)
            assert image.shape == (3, 32, 32)
            if mask is None:
                continue
            m = read_image(mask)[0] > 0
            assert 0 < int(m.sum()) < 32 * 32
            # every masked pixel has a sounding colour; no unmasked pixel has one (grey noise elsewhere,
            # MS3's silent square included)
            pixels = {tuple(p) for p in image.permute(1, 2, 0)[m].tolist()}
            assert pixels <= colours and len(pixels) in ((1,) if subset == "s4" else (1, 2))  # MS3: two discs
            outside = {tuple(p) for p in image.permute(1, 2, 0)[~m].tolist()}
            assert not outside & pixels
        with wave.open(clip.audio) as f:
            assert (f.getframerate(), f.getnchannels(), f.getnframes()) == (16000, 1, 5 * 16000)
    if subset == "s4":
        assert {c.category for c in train + test} <= {"class_0", "class_1", "class_2"}


def test_make_avsbench_rejects_bad_arguments(tmp_path):
    from avfast.tasks.segmentation import make_avsbench

    with pytest.raises(ValueError, match="categories: expected an integer >= 3, got 2"):
        make_avsbench(tmp_path, "ms3", categories=2)
    with pytest.raises(ValueError, match="size: expected an integer >= 16, got 8"):
        make_avsbench(tmp_path, size=8)
    with pytest.raises(ValueError, match="clips: expected counts >= 0 for 'train', 'val', 'test', got \\{'dev': 1\\}"):
        make_avsbench(tmp_path, clips={"dev": 1})


@pytest.mark.parametrize("preset", ["stgcma", "deepavfusion"])
def test_avs_dataset_gives_frames_masks_and_one_audio_window_per_frame(tmp_path, preset):
    from torchvision.io import read_image

    from avfast.data.presets import get_preset
    from avfast.tasks.segmentation import AVSDataset, make_avsbench, read_avsbench

    make_avsbench(tmp_path, "s4", categories=2, clips={"train": 1, "val": 1}, size=32, seed=fresh_seed())
    spec = get_preset(preset)
    train = AVSDataset(read_avsbench(tmp_path, "s4", "train"), preset)[0]
    val = AVSDataset(read_avsbench(tmp_path, "s4", "val"), preset)[0]
    S = spec.video.size
    assert train["frames"].shape == (5, 3, S, S) and train["masks"].shape == (5, S, S)
    assert train["annotated"].tolist() == [True, False, False, False, False] and val["annotated"].all()
    assert train["masks"][1:].abs().sum() == 0 and set(train["masks"].unique().tolist()) == {0.0, 1.0}
    # the resized mask covers the same fraction of the frame as the PNG (nearest resize)
    png = read_image(read_avsbench(tmp_path, "s4", "train")[0].masks[0])[0] > 0
    assert abs(float(train["masks"][0].mean()) - float(png.float().mean())) < 0.05
    assert train["audio"].shape[0] == 5 and torch.isfinite(train["audio"]).all()
    from avfast.data import media
    from avfast.data.transforms import audio_features

    wave = media.decode_audio(read_avsbench(tmp_path, "s4", "train")[0].audio, sample_rate=spec.audio.sample_rate)
    rate, window = spec.audio.sample_rate, spec.audio.window_samples
    starts = [min(max(round((i + 0.5) * rate) - window // 2, 0), wave.numel() - window) for i in range(5)]
    if preset == "stgcma":  # 1-s windows: exactly the frame's own second
        assert starts == [i * rate for i in range(5)]
    else:  # 3-s windows: centred where there is room, else moved inside the clip
        assert starts == [0, 0, rate, 2 * rate, 2 * rate]
    expected = audio_features(torch.stack([wave[s:s + window] for s in starts])[None], spec)[0]
    torch.testing.assert_close(train["audio"], expected)
    with pytest.raises(ValueError, match="clips: expected at least one AVSClip, got none"):
        AVSDataset([], preset)
