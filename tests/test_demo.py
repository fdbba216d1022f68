"""`avfast demo` end to end: synthetic clips, a tiny DeepAVFusion trained on the CPU, the loss
falls and validation accuracy beats chance (the convergence test of the training path)."""

import json
import math

from avfast.cli import main


def test_demo_learns_the_synthetic_classes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--clips-per-class", "10",
                 "--workers", "0", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "validation accuracy" in printed and "(chance 25%)" in printed
    records = [json.loads(line) for line in open(tmp_path / "run-deepavfusion" / "log.jsonl")]
    losses = [r["loss"] for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 3 and all(e["skipped"] == {} for e in epochs)
    assert len(losses) >= 2 and losses[-1] < losses[0] < math.log(4)  # below chance-level cross-entropy
    assert losses[-1] < 0.5 * math.log(4)
    assert epochs[-1]["val_accuracy"] >= 0.75  # 8 validation clips of 4 classes: chance is 0.25
    assert (tmp_path / "run-deepavfusion" / "best.pt").is_file()
