"""`avfast demo --task avs` end to end (synthetic S4 clips, a tiny DeepAVFusion AVS model
trained on the CPU with the demo's defaults), and `avfast localize` on its checkpoint: the
PNG's hot region overlaps the true sounding disc. Also localize on a classification
checkpoint (Grad-CAM of a video) and its errors."""

import json

import pytest
import torch

from avfast.cli import main


@pytest.fixture(scope="module")
def avs_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("avs-demo")
    assert main(["demo", "--task", "avs", "--out", str(out), "--workers", "0"]) == 0
    return out


def test_avs_demo_reaches_miou_half(avs_demo, capsys):
    records = [json.loads(line) for line in open(avs_demo / "run-avs-deepavfusion" / "log.jsonl")]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1]["val_miou"] >= 0.5  # predicting background everywhere scores 0 (every mask has a disc)
    losses = [r["loss"] for r in records if r["event"] == "step"]
    assert losses[-1] < 0.5 * losses[0]


def test_localize_png_hot_region_overlaps_the_sounding_disc(avs_demo, tmp_path, capsys):
    from torchvision.io import read_image

    from avfast.tasks.localization import map_from_png
    from avfast.tasks.segmentation import read_avsbench

    data = next(p for p in avs_demo.iterdir() if p.name.startswith("avs-s4"))
    assert main(["localize", "--checkpoint", str(avs_demo / "run-avs-deepavfusion" / "best.pt"), "--data", str(data),
                 "--split", "test", "--index", "1", "--out", str(tmp_path)]) == 0
    clip = read_avsbench(data, "s4", "test")[1]
    png = tmp_path / f"{clip.id}.png"
    assert f"wrote {png}" in capsys.readouterr().out
    for t, mask_path in enumerate(clip.masks):
        hot = map_from_png(png, t, 5) > 0.5
        disc = read_image(mask_path)[0] > 0
        iou = float((hot & disc).sum()) / float((hot | disc).sum())
        assert iou >= 0.3, (t, iou)
    with pytest.raises(SystemExit) as err:
        main(["localize", "--checkpoint", str(avs_demo / "run-avs-deepavfusion" / "best.pt"), "--out", str(tmp_path)])
    assert err.value.code == 2 and "data: an AVS checkpoint maps a clip of an AVSBench root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["localize", "--checkpoint", str(avs_demo / "run-avs-deepavfusion" / "best.pt"), "--data", str(data),
              "--index", "8", "--out", str(tmp_path)])
    assert "index: expected 0 <= index < 8 (the clips of 'test'), got 8" in capsys.readouterr().err


def test_localize_maps_a_video_with_a_classification_checkpoint(tmp_path, capsys):
    from avfast.data.synthetic import make_dataset
    from avfast.tasks.localization import map_from_png
    from avfast.train.loop import TrainConfig, make_trainer

    make_dataset(tmp_path / "clips", num_classes=2, clips_per_class=3, suffix=".mkv", duration=1.0, fps=8,
                 size=32, seed=1)
    cfg = TrainConfig(method="deepavfusion", data=str(tmp_path / "clips"), out=str(tmp_path / "run"), size="tiny",
                      epochs=1, max_steps=1, batch_size=2, workers=0, loader="cpu", progress=False)
    make_trainer(cfg).fit()
    video = next((tmp_path / "clips").glob("*/*.mkv"))
    assert main(["localize", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--video", str(video),
                 "--out", str(tmp_path / "maps")]) == 0
    values = map_from_png(tmp_path / "maps" / f"{video.stem}.png", 0, 1)
    assert values.shape == (32, 32) and float(values.max()) >= 0.99  # Grad-CAM scaled to peak at 1
    with pytest.raises(SystemExit):
        main(["localize", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "maps")])
    assert "video: a deepavfusion classification checkpoint maps a video file" in capsys.readouterr().err
    assert torch.isfinite(values).all()
