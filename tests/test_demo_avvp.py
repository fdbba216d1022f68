"""`avfast demo --task avvp` end to end (synthetic LLP videos, a tiny DG-SCT with the HAN
parser trained on the CPU on weak labels with the demo's defaults): LLP's segment-level F1
(type@AV and event@AV) beats the best constant prediction's by >= 0.2, and `avfast eval`
scores the checkpoint on the test split."""

import json
import subprocess
import sys

import pytest

from avfast.cli import main
from avfast.tasks.parsing import constant_baseline, read_llp


def test_avvp_demo_beats_the_best_constant_prediction(tmp_path, capsys):
    run = subprocess.run([sys.executable, "-m", "avfast", "demo", "--task", "avvp", "--out", str(tmp_path),
                          "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "type@AV" in run.stdout and "best constant prediction" in run.stdout
    records = [json.loads(line) for line in open(tmp_path / "run-avvp-dgsct" / "log.jsonl")]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 8
    data = next(tmp_path.glob("llp-*"))
    _, constant = constant_baseline(read_llp(data, "train"), read_llp(data, "val"))
    last = epochs[-1]
    for name in ("segment_type", "segment_event"):
        assert last[f"val_{name}"] >= constant[name] + 0.2, (name, last[f"val_{name}"], constant[name])
    assert main(["eval", "--checkpoint", str(tmp_path / "run-avvp-dgsct" / "best.pt"), "--data", str(data),
                 "--split", "test", "--workers", "0"]) == 0
    assert "val_segment_type=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--task", "avvp", "--method", "deepavfusion", "--out", str(tmp_path)])
    assert "method: expected one of ('dgsct', 'stgcma') for --task avvp" in capsys.readouterr().err
