"""The scripts in examples/ run as a user runs them (a subprocess from the repository root,
tiny settings, on the CPU) and print their key lines."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, timeout: float = 60) -> str:
    """stdout of ``python examples/<script> <args>`` run from the repository root; fails on a
    non-zero exit with the script's output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("AVFAST_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_on_folder_synthetic(tmp_path):
    run = tmp_path / "run"
    out = run_example("train_on_folder.py", "--synthetic", "--out", str(run), "--epochs", "1", "--classes", "2",
                      "--clips-per-class", "3", "--batch-size", "4", "--workers", "0", "--device", "cpu")
    assert re.search(r"^validation accuracy \d+\.\d%", out, re.M), out
    assert "2 classes, 4 training / 2 validation clips" in out, out
    assert (run / "synthetic-clips" / "class_01").is_dir()
    assert (run / "last.pt").is_file() and (run / "log.jsonl").is_file()


def test_swap_into_upstream_model():
    out = run_example("swap_into_upstream_model.py", "--dim", "32", "--heads", "2", "--depth", "1")
    for line in ("DeepAVFusion dense: swapped 1 blocks -> DenseAVFusionBlock",
                 "DeepAVFusion factorized: swapped 1 blocks -> FactorizedAVFusionBlock",
                 "loaded strictly into 1 x STGCMABlockAdapters",
                 "STG-CMA: swapped 1 blocks -> AVFastSTGCMABlock"):
        assert line in out, out
    assert out.count("state_dict keys unchanged") == 3, out


@pytest.mark.parametrize("method", ["deepavfusion", "mavt", "stgcma"])
def test_load_upstream_checkpoint_fake(method):
    out = run_example("load_upstream_checkpoint.py", "--make-fake", "--method", method, "--batch", "1")
    assert f"wrote a fake upstream {method} checkpoint" in out, out
    found = re.search(r"loaded (\d+) upstream tensors strictly into \w+ \(tiny\), (\d+) equal after loading", out)
    assert found and int(found[1]) == int(found[2]) > 0, out
    if method == "mavt":  # upstream-only entries are named and left out
        assert "upstream-only entries left out: 4 (ViT.v.head.bias" in out, out
    assert re.search(r"^forward: .* -> logits \(1, .*finite: True$", out, re.M), out
