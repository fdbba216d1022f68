"""``avfast train`` survives SIGKILL: killed at random moments (and once in the middle of
writing a checkpoint), restarted with the same command, it finishes with the weights of a
run that was never interrupted, bit for bit, and every checkpoint on disk loads."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from avfast.data.synthetic import make_dataset
from seeding import fresh_seed

KILLS = 4  # random moments, after the one in the middle of a checkpoint write
TIMEOUT = 300  # s for one run


def train_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "avfast", "train", "--method", "deepavfusion", "--size", "tiny",
            "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "2", "--workers", "0",
            "--loader", "cpu", "--checkpoint-every", "1", "--log-every", "1", "--seed", "3", "--quiet",
            "--resume", "auto"]


def environment() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo + (os.pathsep + path if path else "")}


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith((".pt", ".pt.prev")))


def assert_every_checkpoint_loads(out: Path) -> None:
    for path in checkpoints(out):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "avfast-checkpoint-1", path


def writing(out: Path) -> bool:
    """Whether a temporary file of last.pt exists (a save in progress)."""
    return out.is_dir() and any(name.startswith(".last.pt.tmp-") for name in os.listdir(out))


def kill_during_a_checkpoint_write(cmd, out: Path, env, skip: int) -> bool:
    """Starts a run, lets ``skip`` saves of last.pt pass, freezes it (SIGSTOP) as soon as
    the next one's temporary file exists, and SIGKILLs it there if the file is still being
    written; False if the run finished first."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, was_writing = time.monotonic() + TIMEOUT, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            now_writing = writing(out)
            if now_writing and not was_writing and skip > 0:
                skip -= 1
            elif now_writing and skip == 0:
                proc.send_signal(signal.SIGSTOP)
                if writing(out):
                    proc.kill()
                    proc.wait()
                    return True
                proc.send_signal(signal.SIGCONT)  # the rename won the race: wait for the next save
            was_writing = now_writing
            time.sleep(0.0002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def log_lines(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def kill_while_training(cmd, out: Path, env, delay: float) -> bool:
    """Starts a run and SIGKILLs it ``delay`` s after it logged its first training step
    (so that every kill lands inside training: steps, saves, evaluation); False if the
    run finished first."""
    seen = log_lines(out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and log_lines(out) < seen + 3 and time.monotonic() < deadline:
            time.sleep(0.005)  # start, resume, a step
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return True
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigkill_at_random_moments_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path):
    rng = random.Random(fresh_seed())
    data = tmp_path / "clips"
    make_dataset(data, num_classes=2, clips_per_class=8, suffix=".mkv", duration=1.0, fps=10, size=32, seed=5)
    env = environment()

    start = time.monotonic()
    straight = subprocess.run(train_command(data, tmp_path / "straight"), env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_time = time.monotonic() - start

    out = tmp_path / "killed"
    cmd = train_command(data, out)
    assert kill_during_a_checkpoint_write(cmd, out, env, skip=rng.randrange(4)), \
        "the run ended before a checkpoint write could be caught"
    assert any(p.name.startswith(".last.pt.tmp-") for p in out.iterdir())  # killed mid-write
    assert_every_checkpoint_loads(out)
    kills, resumable = 1, 0  # resumable: restarts that found a last.pt
    for _ in range(KILLS):
        resumable += (out / "last.pt").is_file()
        if kill_while_training(cmd, out, env, rng.uniform(0.0, 0.2) * run_time):
            kills += 1
        assert_every_checkpoint_loads(out)

    resumable += (out / "last.pt").is_file()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_every_checkpoint_loads(out)
    assert kills >= 3, f"only {kills} of the runs were killed before they finished"
    assert not any(".tmp-" in p.name for p in out.iterdir()), "a stale temporary file was left"
    want = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    got = torch.load(out / "last.pt", weights_only=True)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for key, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][key][name], value), (key, name)
    resumes = [line for line in (out / "log.jsonl").read_text().splitlines() if '"event": "resume"' in line]
    assert len(resumes) == resumable, "each restart that found a checkpoint says where it resumed from"
