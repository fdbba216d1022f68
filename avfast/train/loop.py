"""Training and evaluation of the four methods: one loop for ``avfast train``, ``pretrain``,
``eval`` and ``demo``, single process or DDP under torchrun.

bf16 autocast on CUDA, AdamW on the trainable parameters with a warm-up + cosine schedule,
a tqdm bar with clips/s, JSON-lines logs, atomic checkpoints (``last.pt`` at every epoch end
and every ``checkpoint_every`` steps, ``best.pt`` on the best validation accuracy) and exact
resume: the data order, crops and random generators continue where they stopped.

Bad rows (a missing file, an unknown label, a duplicate id, a path escaping the data root,
a row that does not parse, a clip the decoder cannot read) are left out and reported with
their file and row number: a ``bad_row`` event each in log.jsonl, and their counts by
reason in the ``summary`` event and line that end ``fit``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from avfast.data.manifest import BadRow, Manifest, align_classes, check_clips, read_manifest
from avfast.data.presets import Preset, get_preset
from avfast.models import build_model
from avfast.nn.contrastive import local_negatives
from avfast.train.checkpoint import (load_checkpoint, load_newest_good, rng_state, save_checkpoint, set_rng_state,
                                     stale_temporaries)


@dataclasses.dataclass
class TrainConfig:
    """Settings of one run (saved in its checkpoints)."""

    method: str
    data: str
    out: str = "runs/avfast"
    task: str = "classify"  # a key of TASKS
    avs_subset: str = "s4"  # task "avs": AVSBench's "s4" or "ms3"
    val_split: str = "val"  # tasks "avs", "avvp", "avqa": the split validation (and avfast eval) scores
    val_data: str | None = None
    val_fraction: float = 0.2
    size: str = "base"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    background_p: float | None = None
    compile: bool = False
    amp: bool = True
    loader: str = "auto"
    workers: int = 4
    seed: int = 0
    pretrained: str | None = None
    pretrain: bool = False
    resume: bool | str = False  # False, True / "last" (OUT/last.pt) or "auto" (last.pt, else last.pt.prev)
    checkpoint_every: int | None = None
    log_every: int = 10
    progress: bool = True
    device: str | None = None
    num_classes: int | None = None
    text_weights: list[str] = dataclasses.field(default_factory=list)  # task "text": KIND[:MODEL]=PATH towers
    shots: int | None = None  # task "text": train on this many clips per class (few-shot)
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


DEFAULT_BACKGROUND_P = {"mavt": 0.2}  # MA-AVT's bg_prob
PER_SECOND = ("stgcma", "dgsct")  # per-second heads whose last class is "background"


def load_manifest(path: str, bad: list[BadRow] | None = None) -> Manifest:
    """The usable rows of a folder of clips, a prepared folder (its manifest.csv) or a
    manifest file; the others are appended to ``bad`` (raised with ``bad=None``)."""
    prepared = Path(path) / "manifest.csv"
    if prepared.is_file():
        manifest = Manifest.load(prepared, bad=bad)
    else:
        manifest = read_manifest(path, missing="keep", bad=bad)
    return check_clips(manifest, bad)


def split_manifest(manifest: Manifest, fraction: float, seed: int) -> tuple[Manifest, Manifest]:
    """(train, validation): ``fraction`` of each class's clips, drawn with ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 7])
    by_class: dict[int, list[int]] = {}
    for i, clip in enumerate(manifest.clips):
        by_class.setdefault(clip.labels[0] if clip.labels else -1, []).append(i)
    val: list[int] = []
    for members in by_class.values():
        take = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        val += rng.permutation(members)[:take].tolist()
    chosen = set(val)
    pick = lambda idx: Manifest([manifest.clips[i] for i in idx], manifest.classes, manifest.root)  # noqa: E731
    return pick([i for i in range(len(manifest)) if i not in chosen]), pick(sorted(val))


def model_preset(model) -> Preset:
    """The model's data preset with frames at the model's ``img_size``."""
    preset = get_preset(model.preset)
    size = getattr(model.config, "img_size", preset.video.size)
    return dataclasses.replace(preset, video=dataclasses.replace(preset.video, size=size))


def num_classes_of(manifest: Manifest, method: str) -> int:
    """Classes the head predicts: the manifest's, plus background for per-second labels and
    for the per-second methods (whose heads reserve the last class for background)."""
    segments = bool(manifest.clips) and all(c.segment_labels is not None for c in manifest.clips)
    return len(manifest.classes) + (1 if segments or method in PER_SECOND else 0)


class TrainStep(torch.nn.Module):
    """Forward and loss in one module, so that DDP and torch.compile see the whole step
    (parameters used only in the loss, e.g. MA-AVT's projections, included).
    forward(frames, audio, batch) -> (loss, metrics, outputs). A model whose forward takes more
    than frames and audio names those batch entries in ``batch_inputs`` (AVQA: the question)."""

    def __init__(self, model, pretrain: bool):
        super().__init__()
        self.model, self.pretrain = model, pretrain

    def forward(self, frames, audio, batch):
        if self.pretrain:
            loss, metrics = self.model.pretrain_loss(frames, audio)
            return loss, metrics, {}
        out = self.model(frames, audio, *(batch[k] for k in getattr(self.model, "batch_inputs", ())))
        loss, metrics = self.model.loss(out, batch)
        return loss, metrics, out


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def make_loader(cfg: TrainConfig, manifest: Manifest, preset: Preset, *, train: bool, device: torch.device,
                rank: int, world: int):
    """The DALI loader on CUDA with DALI installed and prepared audio, else the CPU loader."""
    background_p = cfg.background_p if cfg.background_p is not None else DEFAULT_BACKGROUND_P.get(cfg.method, 0.0)
    common = dict(batch_size=cfg.batch_size, train=train, seed=cfg.seed, shard_id=rank, num_shards=world,
                  background_p=background_p if train else 0.0)
    kind = cfg.loader
    if kind == "auto":
        prepared = all(c.audio_path for c in manifest.clips)
        kind = "dali" if device.type == "cuda" and dali_installed() and prepared else "cpu"
    if kind == "dali":
        from avfast.data.dali import DALILoader

        return DALILoader(manifest, preset, device_id=device.index or 0, **common)
    if kind != "cpu":
        raise ValueError(f"loader: expected 'auto', 'cpu' or 'dali', got {cfg.loader!r}")
    from avfast.data.cpu import CPULoader

    return CPULoader(manifest, preset, num_workers=cfg.workers, device=device, **common)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up then cosine decay to zero, as a LambdaLR factor."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def accuracy_counts(logits: torch.Tensor, batch: dict) -> tuple[int, int]:
    """(correct, total) of argmax predictions: per clip, or per second for (B, T, C)."""
    if logits.dim() == 3:
        target = batch.get("segment_labels")
        if target is None:
            target = batch["label"][:, None].expand(-1, logits.shape[1])
    else:
        target = batch["label"]
    pred = logits.argmax(-1)
    return int((pred == target).sum()), target.numel()


def _by_reason(rows: list[BadRow]) -> str:
    """'reason: count, ...' of ``rows``, reasons sorted."""
    counts = collections.Counter(row.reason for row in rows)
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


class Trainer:
    """One run: model, data, optimizer, logs and checkpoints under ``cfg.out``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device:
            self.device = torch.device(cfg.device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", local_rank)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed + self.rank)
        self.out = Path(cfg.out)
        self.bad_rows: list[BadRow] = []  # of the manifests, then clips found unreadable
        self.train_set, self.val_set, self.classes = self.load_data()
        if not len(self.train_set):
            raise ValueError(f"data: expected usable clips in {cfg.data!r}, got none of "
                             f"{len(self.bad_rows)} rows: " + "; ".join(map(str, self.bad_rows[:5])))
        self.bad_rows.sort(key=lambda row: (row.file, row.row or 0))
        if self.rank == 0 and self.bad_rows:
            print(f"data: left out {len(self.bad_rows)} rows ({_by_reason(self.bad_rows)}), first: "
                  f"{self.bad_rows[0]}", flush=True)
        self.model = self.build_model()
        self.model.to(self.device)
        self.preset = model_preset(self.model)
        self.train_loader = self.make_loader(self.train_set, train=True)
        self.val_loader = self.make_loader(self.val_set, train=False) if len(self.val_set) else None
        params = self.model.trainable_parameters()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        steps_per_epoch = len(self.train_loader)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(round(cfg.warmup_epochs * steps_per_epoch), total))
        self.step_module = TrainStep(self.model, cfg.pretrain)
        self.train_module = self.step_module
        if self.world > 1:  # parameters with no gradient (e.g. a bias that cancels in softmax) exist
            self.train_module = torch.nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)
        self.epoch, self.batch_in_epoch, self.step, self.best = 0, 0, 0, -math.inf
        self.resume_notes: list[dict[str, Any]] = []
        if self.rank == 0:
            for name in ("last.pt", "best.pt"):
                for stale in stale_temporaries(self.out / name):  # a writer killed mid-save
                    stale.unlink(missing_ok=True)
                    self.resume_notes.append({"event": "removed", "file": str(stale),
                                              "why": "temporary file of a save that was killed"})
        if cfg.resume:
            self._resume(cfg.resume)

    # ------------------------------------------------------------------ what a task defines

    score_name = "val_accuracy"  # the validation result that picks best.pt (higher is better)

    def load_data(self) -> tuple[Any, Any, list[str]]:
        """(train clips, validation clips, class names); bad rows go to ``self.bad_rows``."""
        cfg = self.cfg
        manifest = load_manifest(cfg.data, self.bad_rows)
        if cfg.val_data:
            val = align_classes(load_manifest(cfg.val_data, self.bad_rows), manifest.classes, self.bad_rows)
            train = manifest
        else:
            train, val = split_manifest(manifest, cfg.val_fraction, cfg.seed) if len(manifest) else (manifest, manifest)
        self.num_classes = cfg.num_classes or num_classes_of(manifest, cfg.method)
        return train, val, manifest.classes

    def build_model(self):
        return self.model_for(self.cfg, self.num_classes)

    @staticmethod
    def model_for(cfg: TrainConfig, num_classes: int):
        """The model a run of ``cfg`` trains (``num_classes`` outputs)."""
        overrides = dict(cfg.model_overrides)
        if cfg.pretrain:
            from avfast.models.deepavfusion import build_mae

            if cfg.method != "deepavfusion":
                raise ValueError(f"method: pretraining (AV-MAE) expects 'deepavfusion', got {cfg.method!r}")
            return build_mae(cfg.size, pretrained=cfg.pretrained, **overrides)
        return build_model(cfg.method, cfg.size, num_classes=num_classes, pretrained=cfg.pretrained, **overrides)

    def make_loader(self, clips, *, train: bool):
        return make_loader(self.cfg, clips, self.preset, train=train, device=self.device, rank=self.rank,
                           world=self.world)

    metric_width = 2  # length of metric_sums

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        """(metric_width,) float64 sums over one validation batch that ``metrics`` turns into
        results (summed over batches and ranks): here (correct, count)."""
        correct, count = accuracy_counts(self.model.predict(out).float(), batch)
        return torch.tensor([correct, count], dtype=torch.float64)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return {"val_accuracy": float(sums[0] / sums[1].clamp_min(1))}

    # ------------------------------------------------------------------ resume

    def _resume(self, mode: bool | str) -> None:
        """Continue from OUT/last.pt: "last" (or True) raises naming the file when it
        cannot be read; "auto" falls back to last.pt.prev (said in the log) and starts
        afresh when neither exists."""
        mode = "last" if mode is True else mode
        if mode not in ("last", "auto"):
            raise ValueError(f"resume: expected False, True, 'last' or 'auto', got {mode!r}")
        last = self.out / "last.pt"
        if mode == "last":
            ckpt, source = (load_checkpoint(last), last) if last.is_file() else (None, None)
        else:
            ckpt, source, problems = load_newest_good(last, keep_corrupt=self.rank == 0)
            for problem in problems:
                print(f"resume: {problem}; falling back", flush=True)
                self.resume_notes.append({"event": "resume_fallback", "problem": problem})
        if ckpt is not None:
            self.restore(ckpt)
            self.resume_notes.append({"event": "resume", "file": str(source), "epoch": self.epoch,
                                      "step": self.step})

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "step": self.step, "best": self.best,
                "config": dataclasses.asdict(self.cfg), "classes": self.classes,
                "num_classes": self.num_classes,
                "unreadable": [dataclasses.asdict(b) for b in self.bad_rows if b.reason == "unreadable"]}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        self.step, self.best = ckpt["step"], ckpt["best"]
        self._add_bad([BadRow(**fields) for fields in ckpt.get("unreadable", [])])
        states = ckpt["rng"]
        if isinstance(states, list):  # one per rank
            if len(states) != self.world:
                raise ValueError(f"resume: expected a checkpoint of {self.world} processes, got {len(states)}")
            states = states[self.rank]
        set_rng_state(states)

    def save(self, name: str = "last.pt") -> None:
        """Every rank calls this (it gathers each rank's generator states); rank 0 writes.
        last.pt keeps the one it replaces as last.pt.prev (what ``--resume auto`` falls
        back to)."""
        states = rng_state()
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, states)
            states = gathered
        if self.rank == 0:
            save_checkpoint(self.out / name, keep_previous=name == "last.pt", rng=states, **self.state())

    def _add_bad(self, rows: list[BadRow]) -> list[BadRow]:
        """Append the rows not yet in ``bad_rows``; returns those."""
        known = set(self.bad_rows)
        new = [row for row in dict.fromkeys(rows) if row not in known]
        self.bad_rows.extend(new)
        return new

    def _note_unreadable(self) -> None:
        """The clips the loaders found unreadable (every rank's, under DDP) become bad rows;
        each new one is logged."""
        found = [BadRow.of(clips[i], "unreadable", message)
                 for loader, clips in ((self.train_loader, self.train_set), (self.val_loader, self.val_set))
                 if loader is not None for i, (_, message) in sorted(loader.unreadable.items())]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, found)
            found = [row for part in gathered for row in part]
        for row in self._add_bad(found):
            self.log({"event": "bad_row", **dataclasses.asdict(row)})

    def _summary(self, result: dict[str, float]) -> None:
        """The ``summary`` event and line: steps, clips used, bad rows by reason."""
        counts = collections.Counter(row.reason for row in self.bad_rows)
        used = len(self.train_set) + len(self.val_set) - counts["unreadable"]
        self.log({"event": "summary", "step": self.step, "clips_used": used, "bad_rows": dict(counts), **result})
        if self.rank == 0:
            bad = (f"{len(self.bad_rows)} bad rows left out ({_by_reason(self.bad_rows)}), each a bad_row "
                   f"event in {self.out / 'log.jsonl'}") if self.bad_rows else "no bad rows"
            print(f"summary: {self.step} steps, {used} clips used, {bad}", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # ------------------------------------------------------------------ steps

    def autocast(self):
        enabled = self.cfg.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def compute_loss(self, batch: dict, module=None) -> tuple[torch.Tensor, dict[str, float], dict]:
        with self.autocast():
            return (module or self.train_module)(batch["frames"], batch["audio"], batch)

    def train_step(self, batch: dict) -> dict[str, float]:
        self.model.train()
        loss, metrics, _ = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss: expected a finite value, got {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": float(loss.detach()), **metrics}

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float]:
        """Mean loss and accuracy (per second for per-second methods) over ``loader``: each
        rank scores its own (unpadded) shard without collectives, then the totals are summed.
        The generators' states are restored afterwards, so evaluating never changes training."""
        loader = loader or self.val_loader
        self.model.eval()
        saved = rng_state()
        # loss sum, clips, then the task's metric sums
        totals = torch.zeros(2 + (0 if self.cfg.pretrain else self.metric_width), dtype=torch.float64)
        for batch in loader:
            with local_negatives():
                loss, _, out = self.compute_loss(batch, self.step_module)
            n = batch["index"].numel()
            totals[:2] += torch.tensor([float(loss) * n, n], dtype=torch.float64)
            if out:
                totals[2:] += self.metric_sums(batch, out)
        set_rng_state(saved)
        totals = totals.to(self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        totals = totals.cpu()
        result = {"val_loss": float(totals[0] / totals[1].clamp_min(1))}
        if not self.cfg.pretrain:
            result.update(self.metrics(totals[2:]))
        return result

    def fit(self) -> dict[str, float]:
        """Train until ``epochs`` (or ``max_steps``); evaluate and checkpoint after each
        epoch and at the stop; returns the last evaluation."""
        from tqdm.auto import tqdm

        cfg, result = self.cfg, {}
        self.log({"event": "start", "config": dataclasses.asdict(cfg), "world": self.world,
                  "device": str(self.device), "train_clips": len(self.train_set), "val_clips": len(self.val_set)})
        for note in self.resume_notes:
            self.log(note)
        for row in self.bad_rows:
            self.log({"event": "bad_row", **dataclasses.asdict(row)})
        while self.epoch < cfg.epochs and not self._done():
            loader = self.train_loader
            loader.set_epoch(self.epoch)
            bar = tqdm(total=len(loader), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                       disable=not cfg.progress or self.rank != 0, unit="batch")
            tick, clips = time.perf_counter(), 0
            for batch in loader.batches(start=self.batch_in_epoch):
                metrics = self.train_step(batch)
                self.batch_in_epoch += 1
                clips += batch["index"].numel() * self.world
                rate = clips / max(1e-9, time.perf_counter() - tick)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", clips_s=f"{rate:.1f}")
                if self.step % cfg.log_every == 0:
                    self.log({"event": "step", "epoch": self.epoch, "step": self.step,
                              "lr": self.scheduler.get_last_lr()[0], "clips_per_s": rate, **metrics})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self._done():
                    break
            bar.close()
            finished = self.batch_in_epoch >= len(loader)
            event = {"event": "epoch" if finished else "stop", "epoch": self.epoch, "step": self.step,
                     "skipped": loader.skipped}
            if finished:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            # evaluate, then best.pt, then last.pt: a kill before last.pt is written replays
            # this stretch from the previous last.pt, evaluation and best.pt included
            result = self.evaluate() if self.val_loader is not None else {}
            self._note_unreadable()
            score = result.get(self.score_name, -result.get("val_loss", math.inf))
            improved = bool(result) and score > self.best
            if improved:
                self.best = score
                self.save("best.pt")
            self.save()
            self.log({**event, **result})
            if self.rank == 0 and result:
                print(f"{event['event']} {event['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        self._summary(result)
        return result

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps


TASKS = {"classify": "avfast.train.loop:Trainer", "avs": "avfast.train.tasks:AVSTrainer",
         "separation": "avfast.train.tasks:SeparationTrainer", "avvp": "avfast.train.tasks:AVVPTrainer",
         "avqa": "avfast.train.tasks:AVQATrainer", "text": "avfast.train.tasks:TextTrainer"}


def trainer_class(task: str) -> type[Trainer]:
    """The Trainer class of ``task``."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    module, name = TASKS[task].split(":")
    return getattr(importlib.import_module(module), name)


def make_trainer(cfg: TrainConfig) -> Trainer:
    """The Trainer of ``cfg.task``."""
    return trainer_class(cfg.task)(cfg)


def model_from_checkpoint(path: str) -> tuple[torch.nn.Module, TrainConfig]:
    """(the trained model in eval mode, on the CPU; its run's TrainConfig) of a checkpoint
    written by ``avfast train``."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**{**ckpt["config"], "pretrained": None})
    model = trainer_class(cfg.task).model_for(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def checkpoint_evaluator(path: str, data: str, *, batch_size: int = 8, workers: int = 4,
                         device: str | None = None, split: str = "test") -> Trainer:
    """A Trainer holding the model of a checkpoint written by ``avfast train``, evaluating on
    ``data`` (all of it; an AVS checkpoint: the AVSBench ``split`` under it): call ``.evaluate()``."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**{**ckpt["config"], "data": data, "val_data": data, "batch_size": batch_size,
                         "workers": workers, "device": device, "resume": False, "pretrained": None,
                         "num_classes": ckpt["num_classes"], "out": str(Path(path).parent), "val_split": split})
    trainer = make_trainer(cfg)
    if trainer.classes != ckpt["classes"]:
        raise ValueError(f"data: expected the checkpoint's classes {ckpt['classes'][:5]}..., "
                         f"got {trainer.classes[:5]}... from {data!r}")
    trainer.model.load_state_dict(ckpt["model"])
    return trainer


def evaluate_checkpoint(path: str, data: str, **kwargs) -> dict[str, float]:
    """Accuracy of a checkpoint on ``data`` (see ``checkpoint_evaluator``)."""
    return checkpoint_evaluator(path, data, **kwargs).evaluate()
