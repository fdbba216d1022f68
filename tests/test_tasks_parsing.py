"""avfast.tasks.parsing (AVVP on LLP): the LLP format and its bad rows, LLP's segment- and
event-level F1 on hand-made videos (and against a loop-by-loop recount on random ones), the
parser's predictions, the MIL loss by hand, and the parser head on each per-second method."""

import csv

import numpy as np
import pytest
import torch

from avfast.tasks.parsing import (EVENT_FILES, LLP_CATEGORIES, SCORES, SECONDS, SPLIT_FILES, AVParser,
                                  LLPDataset, ParsingMetrics, build_avvp_model, constant_baseline, event_runs,
                                  make_llp, mil_loss, parse, read_llp, video_scores)
from seeding import fresh_seed, random_audio


def _row(*runs, seconds=SECONDS):
    """A 0/1 row with 1s over the (start, end) runs."""
    row = np.zeros(seconds, dtype=np.int64)
    for start, end in runs:
        row[start:end] = 1
    return row


def _video(audio_rows, visual_rows, classes=3):
    """(classes, 10) arrays from {class: row}."""
    a, v = np.zeros((classes, SECONDS), np.int64), np.zeros((classes, SECONDS), np.int64)
    for k, row in audio_rows.items():
        a[k] = row
    for k, row in visual_rows.items():
        v[k] = row
    return a, v


@pytest.fixture(scope="module")
def llp(tmp_path_factory):
    root = tmp_path_factory.mktemp("llp")
    make_llp(root, categories=3, videos={"train": 3, "val": 2, "test": 1}, seed=5)
    return root


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_read_llp_reads_weak_labels_and_events(llp):
    train, val, test = (read_llp(llp, s) for s in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [3, 2, 1]
    assert all(v.audio is None and v.visual is None for v in train)
    events = {m: [r[0] for r in _read(llp / EVENT_FILES[m])[1:]] for m in EVENT_FILES}
    for video in val + test:
        assert video.path == str(llp / "video" / f"{video.filename}.mp4")
        a, v = video.event_arrays(len(LLP_CATEGORIES))
        heard_or_seen = {int(k) for k in np.flatnonzero(a.any(1) | v.any(1))}
        assert heard_or_seen == set(video.labels)  # every weak label is heard or seen somewhere
        assert len(video.audio) == events["audio"].count(video.filename)
        assert len(video.visual) == events["visual"].count(video.filename)
    with pytest.raises(ValueError, match=r"split: expected one of \['test', 'train', 'val'\], got 'dev'"):
        read_llp(llp, "dev")
    with pytest.raises(ValueError, match="has no per-second annotation"):
        train[0].event_arrays(25)


def test_read_llp_reports_each_bad_row_with_file_and_row(llp, tmp_path):
    import shutil

    root = tmp_path / "llp"
    shutil.copytree(llp, root)
    train = root / SPLIT_FILES["train"]
    rows = _read(train)
    first = rows[1][0]
    rows += [[rows[1][0], rows[1][1]],  # row 5: duplicate
             ["gone_0_10", "Speech"],  # row 6: missing video
             ["../../etc/passwd", "Speech"],  # row 7: escapes root
             [rows[2][0] + "x", "Speech,Unicorn"],  # row 8: unknown label
             ["only_one_field"]]  # row 9: malformed
    _write(train, rows)
    bad = []
    kept = read_llp(root, "train", bad=bad)
    assert [v.filename for v in kept] == [r[0] for r in rows[1:4]]
    assert [(b.row, b.reason) for b in bad] == [(5, "duplicate id"), (6, "missing file"), (7, "escapes root"),
                                                (8, "unknown label"), (9, "malformed")]
    assert all(b.file == str(train) for b in bad) and "first at row 2" in bad[0].detail and first == bad[0].path
    assert "'Unicorn'" in bad[3].detail
    with pytest.raises(ValueError, match=r"read_llp: .*AVVP_train.csv:5: duplicate id"):
        read_llp(root, "train")
    # the event files: a bad onset, an unknown label and a short row, for a video of the split
    events = root / EVENT_FILES["visual"]
    val = read_llp(root, "val")
    name = val[0].filename
    rows = _read(events)
    rows += [[name, "3", "12", LLP_CATEGORIES[0]], [name, "2", "4", "Unicorn"], [name, "1"],
             ["not_in_any_split", "0", "99", "Unicorn"]]  # rows of other videos are not read
    _write(events, rows)
    bad = []
    assert read_llp(root, "val", bad=bad) == val  # the bad events are left out
    n = len(rows)
    assert [(b.file, b.row, b.reason) for b in bad] == [
        (str(events), n - 3, "malformed"), (str(events), n - 2, "unknown label"), (str(events), n - 1, "malformed")]
    assert "expected integer seconds 0 <= onset < offset <= 10, got onset '3', offset '12'" in bad[0].detail
    (root / SPLIT_FILES["test"]).write_text("name\tlabels\n")
    with pytest.raises(ValueError, match=r"must start with the tab-separated header \['filename', 'event_labels'\]"):
        read_llp(root, "test")
    (root / EVENT_FILES["audio"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"expected the LLP file .*AVVP_eval_audio.csv'"):
        read_llp(root, "val")


def test_segment_level_f1_by_hand():
    # audio class 0: predicted 0-2, true 1-3 -> TP 2, FP 1, FN 1 -> 2*2/(4+2) = 2/3;
    # audio class 1: predicted 5, never true -> 0; class 2: neither -> not counted.
    # visual class 0: predicted = true over 1-4 -> 1.
    pa, pv = _video({0: _row((0, 3)), 1: _row((5, 6))}, {0: _row((1, 5))})
    ga, gv = _video({0: _row((1, 4))}, {0: _row((1, 5))})
    s = video_scores(pa, pv, ga, gv)
    assert s["segment_audio"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["segment_visual"] == 1.0
    # av: predicted class 0 at 1-2 (a 0-2 and v 1-4), true 1-3 -> TP 2, FP 0, FN 1 -> 4/5
    assert s["segment_av"] == pytest.approx(4 / 5)
    # event@AV adds the audio and visual counts per class: class 0 TP 2+4, FP 1, FN 1 -> 12/14;
    # class 1 TP 0, FP 1 -> 0
    assert s["segment_event"] == pytest.approx((12 / 14 + 0) / 2)
    # a modality with nothing predicted and nothing true scores 1 (all true negatives)
    empty = np.zeros((3, SECONDS), np.int64)
    assert video_scores(empty, pv, empty, gv)["segment_audio"] == 1.0
    assert video_scores(empty, empty, empty, empty) == {name: 1.0 for name in SCORES}


def test_event_level_f1_on_overlapping_events_by_hand():
    assert event_runs(_row((0, 2), (4, 5), (9, 10))) == [(0, 2), (4, 5), (9, 10)]
    # class 0, true event 1-6 (6 s). Predictions 1-3 (IoU 3/6 = 0.5: a match) and 5-7 (IoU 2/7):
    # TP 1, FP 1, FN 0 -> 2/3.
    pa, _ = _video({0: _row((1, 4), (5, 8))}, {})
    ga, _ = _video({0: _row((1, 7))}, {})
    empty = np.zeros_like(pa)
    assert video_scores(pa, empty, ga, empty)["event_audio"] == pytest.approx(2 / 3)
    # just under the threshold: prediction 1-2 against the true 1-6 (IoU 2/6) -> TP 0, FP 1, FN 1
    pa2, _ = _video({0: _row((1, 3))}, {})
    assert video_scores(pa2, empty, ga, empty)["event_audio"] == 0.0
    # one long prediction 0-9 over two true events 0-3 and 5-9: IoU 4/10 and 5/10, so the
    # prediction is a TP (it matches the second), the first true event an FN: 2/3
    pa3, _ = _video({0: _row((0, 10))}, {})
    ga3, _ = _video({0: _row((0, 4), (5, 10))}, {})
    s = video_scores(pa3, empty, ga3, empty)
    assert s["event_audio"] == pytest.approx(2 / 3)
    # segment level on the same video: TP 9, FP 1, FN 0 -> 18/19
    assert s["segment_audio"] == pytest.approx(18 / 19)
    # event@AV adds audio and visual counts: visual class 0 predicted exactly (TP 1) -> with
    # the audio (TP 1, FP 0, FN 1): 2*2 / (4 + 1) = 4/5
    seen, _ = _video({0: _row((2, 6))}, {})
    s = video_scores(pa3, seen, ga3, seen)
    assert s["event_visual"] == 1.0 and s["event_event"] == pytest.approx(4 / 5)


def _recount(p, g):
    """LLP's per-class event TP / FP / FN, counted second by second with explicit loops."""
    def runs(row):
        out, t = [], 0
        while t < len(row):
            if row[t]:
                start = t
                while t < len(row) and row[t]:
                    t += 1
                out.append(set(range(start, t)))
            else:
                t += 1
        return out

    def iou_ok(x, y):
        return len(x & y) >= 0.5 * len(x | y)

    pr, gr = runs(p), runs(g)
    tp = sum(any(iou_ok(x, y) for y in gr) for x in pr)
    return tp, len(pr) - tp, sum(not any(iou_ok(y, x) for x in pr) for y in gr)


def _f1(counts):
    present = [(tp, fp, fn) for tp, fp, fn in counts if tp + fp or tp + fn]
    return 1.0 if not present else float(np.mean([2 * tp / (2 * tp + fp + fn) for tp, fp, fn in present]))


def test_video_scores_equal_a_loop_by_loop_recount_on_random_videos():
    fresh_seed()
    for _ in range(40):
        pa, pv, ga, gv = ((torch.rand(4, SECONDS) < torch.rand(()).item()).long().numpy() for _ in range(4))
        s = video_scores(pa, pv, ga, gv)
        pairs = {"audio": (pa, ga), "visual": (pv, gv), "av": (pa * pv, ga * gv)}
        seg = {m: [(int((p[k] * g[k]).sum()), int((p[k] * (1 - g[k])).sum()), int(((1 - p[k]) * g[k]).sum()))
                   for k in range(4)] for m, (p, g) in pairs.items()}
        evt = {m: [_recount(p[k], g[k]) for k in range(4)] for m, (p, g) in pairs.items()}
        for level, counts in (("segment", seg), ("event", evt)):
            for m in ("audio", "visual", "av"):
                assert s[f"{level}_{m}"] == pytest.approx(_f1(counts[m]))
            both = [tuple(a + v for a, v in zip(ca, cv)) for ca, cv in zip(counts["audio"], counts["visual"])]
            assert s[f"{level}_event"] == pytest.approx(_f1(both))


def test_parsing_metrics_average_over_videos_and_type_at_av():
    pa, pv = _video({0: _row((0, 3))}, {0: _row((1, 5))})
    ga, gv = _video({0: _row((1, 4))}, {0: _row((1, 5))})
    empty = np.zeros_like(pa)
    first, second = video_scores(pa, pv, ga, gv), video_scores(empty, empty, ga, gv)
    metrics = ParsingMetrics()
    metrics.update(torch.tensor(np.stack([pa, empty])), torch.tensor(np.stack([pv, empty])),
                   torch.tensor(np.stack([ga, ga])), torch.tensor(np.stack([gv, gv])))
    result = ParsingMetrics.from_tensor(metrics.to_tensor()).compute()
    assert result["videos"] == 2
    for name in SCORES:
        assert result[name] == pytest.approx((first[name] + second[name]) / 2)
    assert result["segment_type"] == pytest.approx(
        (result["segment_audio"] + result["segment_visual"] + result["segment_av"]) / 3)
    with pytest.raises(ValueError, match="expected at least one update"):
        ParsingMetrics().compute()
    with pytest.raises(ValueError, match=r"expected \(C, T\) arrays of one shape"):
        video_scores(pa, pv[:2], ga, gv)
    with pytest.raises(ValueError, match="expected 0/1 values"):
        video_scores(pa * 2, pv, ga, gv)


def test_parse_needs_the_second_and_the_video_level_probability():
    frame = torch.zeros(1, SECONDS, 2, 2)
    frame[0, 2:4, 0, 0] = 0.9  # heard at 2-3 ...
    frame[0, 5, 1, 0] = 0.5  # seen at 5 (>= 0.5) ...
    frame[0, :, 0, 1] = 0.8  # class 1 heard everywhere, but its video-level audio probability is low
    out = {"frame_prob": frame, "audio_prob": torch.tensor([[0.7, 0.4]]), "visual_prob": torch.tensor([[0.5, 0.9]])}
    audio, visual = parse(out)
    assert audio.shape == (1, 2, SECONDS)
    assert audio[0, 0].nonzero().flatten().tolist() == [2, 3] and not audio[0, 1].any()
    assert visual[0, 0].nonzero().flatten().tolist() == [5] and not visual[0, 1].any()


def test_mil_loss_by_hand():
    out = {"video_prob": torch.tensor([[0.8, 0.1]]), "audio_prob": torch.tensor([[0.6, 0.0]]),
           "visual_prob": torch.tensor([[0.99, 0.3]])}
    y = torch.tensor([[1.0, 0.0]])
    s = [0.95, 0.05]  # 0.1 smoothing
    clamp = lambda p: min(max(p, 1e-7), 1 - 1e-7)  # noqa: E731

    def bce(ps, ts):
        return -np.mean([t * np.log(clamp(p)) + (1 - t) * np.log(1 - clamp(p)) for p, t in zip(ps, ts)])

    want = bce([0.8, 0.1], [1, 0]) + bce([0.6, 0.0], s) + bce([0.99, 0.3], s)
    assert mil_loss(out, y).item() == pytest.approx(want, rel=1e-5)
    assert mil_loss(out, y, smoothing=0.0).item() == pytest.approx(
        bce([0.8, 0.1], [1, 0]) + bce([0.6, 0.0], [1, 0]) + bce([0.99, 0.3], [1, 0]), rel=1e-5)
    with pytest.raises(ValueError, match=r"targets: expected the shape of video_prob \(1, 2\), got \(2,\)"):
        mil_loss(out, y[0])
    with pytest.raises(ValueError, match=r"smoothing: expected a number in \[0, 1\), got 1"):
        mil_loss(out, y, smoothing=1)


def test_parser_pools_probabilities_with_attention():
    fresh_seed()
    parser = AVParser(6, 5, 3, width=16, heads=2, hidden=8).eval()
    out = parser(torch.randn(2, SECONDS, 6), torch.randn(2, SECONDS, 5))
    assert out["frame_prob"].shape == (2, SECONDS, 2, 3)
    frame = out["frame_prob"]
    # a modality's video-level probability is a convex combination of its per-second ones
    for key, m in (("audio_prob", 0), ("visual_prob", 1)):
        assert out[key].shape == (2, 3)
        assert bool((out[key] <= frame[:, :, m].max(1).values + 1e-6).all())
        assert bool((out[key] >= frame[:, :, m].min(1).values - 1e-6).all())
    # the video's weights sum to between 0 and 2 (HAN's pooling; the loss clamps it)
    assert bool(((out["video_prob"] >= 0) & (out["video_prob"] <= 2 * frame.flatten(1, 2).max(1).values)).all())
    with pytest.raises(ValueError, match=r"expected \(B, T, D\) sequences of equal B and T"):
        parser(torch.randn(2, SECONDS, 6), torch.randn(2, 9, 5))
    with pytest.raises(ValueError, match="heads: expected a divisor of width 16, got 3"):
        AVParser(6, 5, 3, width=16, heads=3)


@pytest.mark.parametrize("method", ["dgsct", "stgcma"])
def test_avvp_model_forward_backward_at_tiny_size(method):
    fresh_seed()
    model = build_avvp_model(method, "tiny")
    cfg = model.config
    frames = torch.randn(2, SECONDS, 3, cfg.img_size, cfg.img_size)
    out = model(frames, random_audio(method, cfg, 2, SECONDS))
    assert out["frame_prob"].shape == (2, SECONDS, 2, len(LLP_CATEGORIES))
    targets = torch.zeros(2, len(LLP_CATEGORIES))
    targets[0, 3] = targets[1, [0, 7]] = 1
    loss, metrics = model.loss(out, {"targets": targets})
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("parser.") for n in trainable) and any(n.startswith("backbone.") for n in trainable)
    missing = [n for n, p in trainable.items() if (p.grad is None and not n.endswith("attn.k.bias"))
               or (p.grad is not None and not torch.isfinite(p.grad).all())]
    assert not missing, missing
    for name in model.backbone.dense_unused:
        assert all(not p.requires_grad for p in model.backbone.get_submodule(name).parameters())


def test_avvp_model_rejects_methods_it_cannot_take():
    with pytest.raises(ValueError, match=r"method: expected one of \('dgsct', 'stgcma'\) \(per-second methods\)"):
        build_avvp_model("deepavfusion", "tiny")
    with pytest.raises(ValueError, match="backbone: expected num_frames 10"):
        build_avvp_model("dgsct", "tiny", num_frames=5)


def test_llp_dataset_items_and_constant_baseline(llp):
    from avfast.train.loop import model_preset

    model = build_avvp_model("dgsct", "tiny")
    val = read_llp(llp, "val")
    item = LLPDataset(val, model_preset(model), train=False).load(0)
    assert item["frames"].shape == (SECONDS, 3, 32, 32) and item["audio"].shape[0] == SECONDS
    a, v = val[0].event_arrays(len(LLP_CATEGORIES))
    assert torch.equal(item["audio_events"], torch.tensor(a, dtype=torch.float32)) and bool(item["evaluated"])
    assert item["targets"].nonzero().flatten().tolist() == list(val[0].labels)
    with pytest.raises(ValueError, match=r"preset: expected a per-second preset \(10 frames, 10 windows\), got "
                                         r"'deepavfusion'"):
        LLPDataset(val, "deepavfusion", train=False)
    classes, result = constant_baseline(read_llp(llp, "train"), val)
    # the constant is no better than itself scored by hand
    constant = np.zeros((len(LLP_CATEGORIES), SECONDS), np.int64)
    constant[list(classes)] = 1
    by_hand = np.mean([video_scores(constant, constant, *v.event_arrays(len(LLP_CATEGORIES)))["segment_audio"]
                       for v in val])
    assert result["segment_audio"] == pytest.approx(by_hand)
