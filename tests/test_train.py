"""The training loop: checkpoints, exact resume, evaluation, split, DDP (2 gloo processes)."""

import dataclasses
import json
import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from avfast.data.manifest import Manifest, read_folder
from avfast.data.synthetic import make_dataset
from avfast.models.base import AVModel
from avfast.train import loop
from avfast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from avfast.train.loop import Trainer, TrainConfig, split_manifest
from seeding import module_seed

SEED = module_seed()


class Probe(AVModel):
    """A small trainable model on pooled frames and audio, with dropout (to exercise RNG
    restore on resume) and a frozen part."""

    preset = "deepavfusion"

    def __init__(self, num_classes: int):
        super().__init__()
        self.config = type("Config", (), {"img_size": 32})()
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(3 + 128, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, num_classes))

    def forward(self, frames, audio):
        v = self.frozen(frames.mean(dim=(1, 3, 4)))
        a = audio.mean(dim=(1, 3))
        return {"logits": self.head(torch.cat([v, a], dim=1))}

    def loss(self, out, batch):
        loss = nn.functional.cross_entropy(out["logits"], batch["label"])
        return loss, {"ce": float(loss.detach())}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-clips")
    make_dataset(root, num_classes=3, clips_per_class=4, suffix=".mkv", duration=1.0, fps=10, size=32,
                 seed=SEED % 1000)
    return str(root)


@pytest.fixture(autouse=True)
def probe_model(monkeypatch):
    monkeypatch.setattr(loop, "build_model", lambda method, size, num_classes, pretrained, **kw: Probe(num_classes))


def config(clips, out, **kw):
    base = dict(method="probe", data=clips, out=str(out), epochs=2, batch_size=3, lr=1e-2, workers=0,
                seed=SEED, log_every=1, progress=False, loader="cpu")
    return TrainConfig(**{**base, **kw})


def step_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["event"] == "step"}


def test_resume_after_a_crash_reproduces_the_next_steps(clips, tmp_path):
    """A run that dies after step 5 resumes from its step-4 checkpoint (mid-epoch) and then
    computes steps 5 and 6 bit-identically to an uninterrupted run."""
    straight = Trainer(config(clips, tmp_path / "a", epochs=2))
    straight.fit()
    crashing = Trainer(config(clips, tmp_path / "b", epochs=2, checkpoint_every=2))
    step = crashing.train_step

    def crash_before_step_6(batch):
        if crashing.step == 5:
            raise RuntimeError("simulated crash")
        return step(batch)

    crashing.train_step = crash_before_step_6
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit()
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 1, 1)
    resumed = Trainer(config(clips, tmp_path / "b", epochs=2, checkpoint_every=2, resume=True))
    assert resumed.step == 4
    resumed.fit()
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert a[5] == b[5] and a[6] == b[6]  # bit-identical on the CPU
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_max_steps_stops_mid_epoch_evaluates_and_saves(clips, tmp_path):
    trainer = Trainer(config(clips, tmp_path, epochs=3, max_steps=2))
    result = trainer.fit()
    assert "val_accuracy" in result and trainer.step == 2
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0, 2)
    assert (tmp_path / "best.pt").is_file()
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # the schedule spans the steps that run


def test_fit_logs_evaluates_and_keeps_best(clips, tmp_path):
    trainer = Trainer(config(clips, tmp_path, epochs=2))
    result = trainer.fit()
    assert set(result) == {"val_loss", "val_accuracy"} and 0.0 <= result["val_accuracy"] <= 1.0
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    events = [json.loads(line)["event"] for line in open(tmp_path / "log.jsonl")]
    assert events[0] == "start" and events.count("epoch") == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    frozen = trainer.model.frozen.weight
    assert not frozen.requires_grad and all(p.requires_grad for p in trainer.model.trainable_parameters())


def test_evaluate_checkpoint_and_class_mismatch(clips, tmp_path):
    Trainer(config(clips, tmp_path / "run", epochs=1)).fit()
    result = loop.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), clips, workers=0)
    assert 0.0 <= result["val_accuracy"] <= 1.0
    other = tmp_path / "other"
    make_dataset(other, num_classes=2, clips_per_class=2, suffix=".mkv", duration=1.0, fps=10, size=32)
    (other / "class_00").rename(other / "zebra")
    with pytest.raises(ValueError, match="data: expected the checkpoint's classes"):
        loop.evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), str(other), workers=0)


def test_training_uses_every_good_row_and_reports_each_bad_one(clips, tmp_path, capsys):
    """A manifest of the 12 good clips, then one row of each bad kind and a corrupt clip:
    training visits exactly the good clips; each bad row is a bad_row event naming its file
    and row, and the summary event and line count them by reason."""
    manifest = tmp_path / "manifest.csv"
    read_folder(clips).save(manifest)
    corrupt = tmp_path / "corrupt.mkv"
    corrupt.write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 64)
    bad_rows = {17: ("class_0/absent.mkv", "missing file"), 18: ("../../etc/passwd", "escapes root"),
                19: ("class_00/clip_000.mkv", "duplicate id"), 20: ("class_01/clip_001.mkv", "unknown label"),
                21: ("class_02/clip_002.mkv", "malformed"), 22: (str(corrupt), "unreadable")}
    with open(manifest, "a") as f:
        f.write("class_0/absent.mkv,0,0.0,,,,,,,,,\n../../etc/passwd,0,0.0,,,,,,,,,\n"
                "class_00/clip_000.mkv,0,0.0,,,,,,,,,\nclass_01/clip_001.mkv,9,0.0,,,,,,,,,\n"
                f"class_02/clip_002.mkv,2,-1.0,,,,,,,,,\n{corrupt},1,0.0,,,,,,,,,\n")
    trainer = Trainer(config(str(manifest), tmp_path / "run", epochs=2, val_data=clips))
    seen = set()
    step = trainer.train_step
    trainer.train_step = lambda batch: (seen.update(batch["index"].tolist()), step(batch))[1]
    trainer.fit()
    assert len(trainer.train_set) == 13 and seen == set(range(12))  # the corrupt clip is index 12
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    reported = {r["row"]: (r["path"], r["reason"]) for r in records if r["event"] == "bad_row"}
    assert reported == bad_rows
    assert {r["file"] for r in records if r["event"] == "bad_row"} == {str(manifest)}
    summary = [r for r in records if r["event"] == "summary"]
    counts = {reason: 1 for _, reason in bad_rows.values()} | {"escapes root": 1}
    assert len(summary) == 1 and summary[0]["bad_rows"] == counts and summary[0]["clips_used"] == 24
    out = capsys.readouterr().out
    assert "summary: 10 steps, 24 clips used, 6 bad rows left out (duplicate id: 1, escapes root: 1, " in out
    assert ("data: left out 5 rows (duplicate id: 1, escapes root: 1, malformed: 1, missing file: 1, "
            f"unknown label: 1), first: {manifest}:17: missing file: class_0/absent.mkv") in out
    resumed = Trainer(config(str(manifest), tmp_path / "run", epochs=2, val_data=clips, resume=True))
    resumed.fit()  # nothing left to train: the unreadable clip is known from the checkpoint
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r for r in records if r["event"] == "summary"][-1]["bad_rows"] == counts


def test_training_without_a_usable_row_is_an_error_naming_the_rows(tmp_path):
    manifest = tmp_path / "manifest.csv"
    Manifest([], [], str(tmp_path)).save(manifest)
    with open(manifest, "a") as f:
        f.write("gone.mkv,,0.0,,,,,,,,,\n")
    with pytest.raises(ValueError, match=f"data: expected usable clips in .*got none of 1 rows: {manifest}:5: "
                                         "missing file: gone.mkv"):
        Trainer(config(str(manifest), tmp_path / "run"))


def test_split_is_stratified_and_disjoint(clips):
    manifest = loop.load_manifest(clips)
    train, val = split_manifest(manifest, 0.25, SEED)
    assert len(train) + len(val) == len(manifest) == 12
    assert sorted(c.labels[0] for c in val.clips) == [0, 1, 2]
    assert not {c.path for c in train.clips} & {c.path for c in val.clips}
    with pytest.raises(ValueError, match=r"val_fraction: expected a fraction in \(0, 1\), got 1.0"):
        split_manifest(manifest, 1.0, 0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, step=1)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", broken)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(path, step=2)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    save_checkpoint(path, step=3)
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(tmp_path / "last.pt.prev")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.prev"]
    with pytest.raises(CheckpointError, match="checkpoint: expected format 'avfast-checkpoint-1'"):
        torch.save({"state_dict": {}}, tmp_path / "up.pt")
        load_checkpoint(tmp_path / "up.pt")


def test_checkpoints_hold_only_tensors_and_plain_values(clips, tmp_path):
    """Every checkpoint a run writes loads with weights_only=True, and its generator states
    restore every generator exactly."""
    import random

    trainer = Trainer(config(clips, tmp_path, epochs=1, checkpoint_every=1))
    trainer.fit()
    for name in ("last.pt", "last.pt.prev", "best.pt"):
        torch.load(tmp_path / name, weights_only=True)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_checkpoint_is_an_error_naming_the_file(clips, tmp_path, damage):
    Trainer(config(clips, tmp_path, epochs=1)).fit()
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(1000), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=rf"checkpoint: '{re.escape(str(last))}' \(\d+ bytes\) cannot be read"):
        Trainer(config(clips, tmp_path, epochs=2, resume=True))
    with pytest.raises(CheckpointError, match=re.escape(str(last))):
        loop.checkpoint_evaluator(str(last), clips, workers=0)


def test_resume_auto_falls_back_to_the_previous_checkpoint(clips, tmp_path):
    """A damaged last.pt: --resume auto continues from last.pt.prev, says so in the log,
    keeps the damaged file as last.pt.corrupt, and ends with the uninterrupted run's weights."""
    straight = Trainer(config(clips, tmp_path / "a", epochs=2, checkpoint_every=5))
    straight.fit()
    Trainer(config(clips, tmp_path / "b", epochs=2, checkpoint_every=5)).fit()  # then last.pt is damaged
    last = tmp_path / "b" / "last.pt"
    previous_step = load_checkpoint(tmp_path / "b" / "last.pt.prev")["step"]
    assert previous_step < load_checkpoint(last)["step"] == straight.step
    last.write_bytes(last.read_bytes()[:100])
    resumed = Trainer(config(clips, tmp_path / "b", epochs=2, checkpoint_every=5, resume="auto"))
    assert resumed.step == previous_step
    assert (tmp_path / "b" / "last.pt.corrupt").is_file() and not last.exists()
    resumed.fit()
    records = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    fallback = [r for r in records if r["event"] == "resume_fallback"]
    assert len(fallback) == 1 and str(last) in fallback[0]["problem"]
    assert [r["file"] for r in records if r["event"] == "resume"] == [str(tmp_path / "b" / "last.pt.prev")]
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_auto_without_a_checkpoint_starts_afresh_and_removes_stale_temporaries(clips, tmp_path):
    stale = tmp_path / ".last.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    trainer = Trainer(config(clips, tmp_path, epochs=1, resume="auto"))
    assert trainer.step == 0 and not stale.exists()
    with pytest.raises(ValueError, match=r"resume: expected False, True, 'last' or 'auto', got 'newest'"):
        Trainer(config(clips, tmp_path, epochs=1, resume="newest"))


def _ddp_worker(rank, world, port, clips, out, method, queue):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if method == "probe":
        loop.build_model = lambda method, size, num_classes, pretrained, **kw: Probe(num_classes)
    torch.set_num_threads(1)
    trainer = Trainer(config(clips, out, method=method, size="tiny", max_steps=2, device="cpu", batch_size=2))
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.trainable_parameters()])
    queue.put((rank, flat.numpy(), trainer.train_loader.shard_id, trainer.train_loader.num_shards))
    queue.close()
    queue.join_thread()
    # leave without interpreter teardown: destroying the DDP reducer there joins gloo's loop
    # thread while holding the GIL that thread waits for, a deadlock (sweep seed 4 hung 1 h+)
    os._exit(0)


@pytest.mark.parametrize("method", ["probe", "mavt"])
def test_ddp_two_gloo_processes_stay_in_sync(clips, tmp_path, method):
    """Two ranks on different shards end with identical weights (DDP averaged the
    gradients); MA-AVT's loss uses parameters outside its forward and gathers negatives
    from both ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, clips, str(tmp_path), method, queue))
             for r in range(2)]
    for p in procs:
        p.daemon = True  # a rank that hangs cannot hold the test session at exit
        p.start()
    try:
        results = sorted(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    (r0, w0, s0, n0), (r1, w1, s1, n1) = results
    assert (s0, s1, n0, n1) == (0, 1, 2, 2)
    np.testing.assert_array_equal(w0, w1)
    assert (tmp_path / "last.pt").is_file()
    assert len(load_checkpoint(tmp_path / "last.pt")["rng"]) == 2  # each rank's generators


@pytest.mark.cuda
def test_cuda_training_with_bf16_autocast_and_the_auto_loader(tmp_path):
    """Two steps of a tiny DeepAVFusion on the GPU (bf16 autocast; the DALI loader when DALI
    is installed, the data being prepared), then resume for a third."""
    from avfast.data.prepare import prepare

    make_dataset(tmp_path / "raw", num_classes=2, clips_per_class=3, suffix=".mp4", duration=2.0, fps=10, size=32)
    prepare(tmp_path / "raw", tmp_path / "prepared", reencode="h264", workers=1, progress=False)
    from avfast.models import build_model

    loop.build_model = build_model  # the real registry (the autouse fixture restores the probe's)
    cfg = TrainConfig(method="deepavfusion", data=str(tmp_path / "prepared"), out=str(tmp_path / "run"), size="tiny",
                      epochs=2, max_steps=2, batch_size=2, workers=0, progress=False, log_every=1, val_fraction=0.3)
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    trainer.fit()
    assert all(np.isfinite(v) for v in step_losses(tmp_path / "run").values())
    resumed = Trainer(dataclasses.replace(cfg, max_steps=3, resume=True))
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 3
    assert resumed.step == 3
