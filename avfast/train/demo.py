"""``avfast demo``: synthetic clips whose class shows in picture and sound, a tiny model
trained on them for a few minutes (CPU, or the GPU when present), accuracy against chance;
``avfast demo --task avs``: a synthetic AVSBench S4 tree and a tiny segmentation model, mIoU
and F-score against predicting the background everywhere; ``avfast demo --task
separation``: synthetic MUSIC-style solos, a tiny DeepAVFusion separation model, the SDR of
its estimates against the mixture's; ``avfast demo --task avvp``: synthetic LLP videos (audio-only,
visual-only and audio-visual events with known seconds), a tiny DG-SCT with the HAN parser
trained on their weak labels, LLP's F1 against the best constant prediction; ``avfast demo
--task avqa``: synthetic MUSIC-AVQA videos and templated questions, a tiny DG-SCT with the
grounding QA head, accuracy against the majority answer."""

from __future__ import annotations

import os
import time
from pathlib import Path

from avfast.train.loop import Trainer, TrainConfig, make_trainer

DEMO_CLASSES = 4


def demo_data(root: Path, *, clips_per_class: int, seed: int) -> Path:
    """A folder of synthetic H.264 + AAC clips, made once under ``root``."""
    from avfast.data.synthetic import make_dataset

    folder = root / f"clips-{DEMO_CLASSES}x{clips_per_class}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        make_dataset(folder, num_classes=DEMO_CLASSES, clips_per_class=clips_per_class, suffix=".mp4",
                     duration=2.0, fps=10, size=64, seed=seed)
        done.touch()
    return folder


def run_demo(method: str = "deepavfusion", *, out: str | None = None, epochs: int = 6,
             clips_per_class: int = 16, batch_size: int = 8, workers: int | None = None,
             seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Make the clips, train a tiny ``method`` model, print and return its validation metrics."""
    root = Path(out or os.path.join(os.path.expanduser("~"), ".cache", "avfast", "demo"))
    start = time.perf_counter()
    data = demo_data(root, clips_per_class=clips_per_class, seed=seed)
    print(f"data: {DEMO_CLASSES} classes x {clips_per_class} synthetic clips in {data} "
          f"({time.perf_counter() - start:.0f} s)")
    cfg = TrainConfig(method=method, data=str(data), out=str(root / f"run-{method}"), size="tiny",
                      epochs=epochs, batch_size=batch_size, lr=1e-3, weight_decay=0.01,
                      warmup_epochs=0.5, workers=min(4, os.cpu_count() or 1) if workers is None else workers,
                      seed=seed, loader="cpu", progress=progress, log_every=5)
    result = Trainer(cfg).fit()
    chance = 1.0 / DEMO_CLASSES
    accuracy = result.get("val_accuracy", 0.0)
    print(f"\n{method} (tiny) after {epochs} epochs, {time.perf_counter() - start:.0f} s: "
          f"validation accuracy {accuracy:.1%} (chance {chance:.0%}); logs and checkpoints in {cfg.out}")
    return result


AVS_DEMO_SIZE = 64  # frame side of the synthetic clips and of the model
AVS_DEMO_MODEL = {"deepavfusion": dict(img_size=AVS_DEMO_SIZE, patch_size=8),
                  "stgcma": dict(img_size=AVS_DEMO_SIZE, patch_size=8),
                  "dgsct": dict(img_size=AVS_DEMO_SIZE)}


def avs_demo_data(root: Path, *, clips: int, seed: int) -> Path:
    """A synthetic AVSBench S4 tree (3 categories; ``clips`` train, 8 val, 8 test), made once."""
    from avfast.tasks.segmentation import make_avsbench

    folder = root / f"avs-s4-{clips}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        make_avsbench(folder, "s4", categories=3, clips={"train": clips, "val": 8, "test": 8},
                      size=AVS_DEMO_SIZE, seed=seed)
        done.touch()
    return folder


def run_avs_demo(method: str = "deepavfusion", *, out: str | None = None, epochs: int = 6, clips: int = 48,
                 batch_size: int = 8, workers: int | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, float]:
    """Make the S4 tree, train a tiny ``method`` AVS model on it (BCE + soft IoU), print and
    return its validation mIoU and F-score."""
    from avfast.tasks.segmentation import AVS_METHODS

    if method not in AVS_METHODS:
        raise ValueError(f"method: expected one of {AVS_METHODS} for --task avs, got {method!r}")
    root = Path(out or os.path.join(os.path.expanduser("~"), ".cache", "avfast", "demo"))
    start = time.perf_counter()
    data = avs_demo_data(root, clips=clips, seed=seed)
    print(f"data: {clips} synthetic S4 training clips (a sounding disc with its exact mask) in {data} "
          f"({time.perf_counter() - start:.0f} s)")
    cfg = TrainConfig(method=method, data=str(data), out=str(root / f"run-avs-{method}"), task="avs", size="tiny",
                      epochs=epochs, batch_size=batch_size, lr=2e-3, weight_decay=0.01,
                      workers=min(2, os.cpu_count() or 1) if workers is None else workers, seed=seed,
                      loader="cpu", progress=progress, log_every=5,
                      model_overrides={**AVS_DEMO_MODEL[method], "iou_weight": 1.0})
    result = make_trainer(cfg).fit()
    print(f"\n{method} (tiny) AVS after {epochs} epochs, {time.perf_counter() - start:.0f} s: validation mIoU "
          f"{result['val_miou']:.3f}, F-score {result['val_fscore']:.3f} (all background: mIoU 0); "
          f"logs and checkpoints in {cfg.out}")
    return result


def run_separation_demo(*, out: str | None = None, epochs: int = 4, clips: int = 8, batch_size: int = 8,
                        workers: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Make 4 instruments x ``clips`` synthetic solos (a MUSIC-style json), train a tiny
    DeepAVFusion to separate two-clip mixtures, print and return its validation SDR, SIR,
    SAR and SDR improvement over the mixture."""
    from avfast.tasks.separation import make_music

    root = Path(out or os.path.join(os.path.expanduser("~"), ".cache", "avfast", "demo"))
    start = time.perf_counter()
    folder = root / f"music-4x{clips}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        make_music(folder, instruments=4, clips_per_instrument=clips, size=32, seed=seed)
        done.touch()
    print(f"data: 4 instruments x {clips} synthetic solo clips (a colour and its tone each) in {folder} "
          f"({time.perf_counter() - start:.0f} s)")
    cfg = TrainConfig(method="deepavfusion", data=str(folder / "MUSIC_solo_videos.json"),
                      out=str(root / "run-separation"), task="separation", size="tiny", epochs=epochs,
                      batch_size=batch_size, lr=2e-3, weight_decay=0.01, val_fraction=0.25,
                      workers=min(2, os.cpu_count() or 1) if workers is None else workers, seed=seed,
                      loader="cpu", progress=progress, log_every=5)
    result = make_trainer(cfg).fit()
    print(f"\ndeepavfusion (tiny) separation after {epochs} epochs, {time.perf_counter() - start:.0f} s: validation "
          f"SDR {result['val_sdr']:.1f} dB (the mixture's {result['val_sdr_mixture']:.1f} dB: improvement "
          f"{result['val_sdri']:.1f} dB), SIR {result['val_sir']:.1f} dB, SAR {result['val_sar']:.1f} dB; "
          f"logs and checkpoints in {cfg.out}")
    return result


def run_avvp_demo(method: str = "dgsct", *, out: str | None = None, epochs: int = 8, clips: int = 64,
                  batch_size: int = 8, workers: int | None = None, seed: int = 0,
                  progress: bool = True) -> dict[str, float]:
    """Make a synthetic LLP folder (4 categories; ``clips`` training videos, 16 val), train a
    tiny ``method`` parser on its weak labels, print and return the validation F1 next to the
    best constant prediction's (``constant_*`` keys in the result)."""
    from avfast.tasks.parsing import PARSING_METHODS, constant_baseline, make_llp, read_llp

    if method not in PARSING_METHODS:
        raise ValueError(f"method: expected one of {PARSING_METHODS} for --task avvp, got {method!r}")
    root = Path(out or os.path.join(os.path.expanduser("~"), ".cache", "avfast", "demo"))
    start = time.perf_counter()
    folder = root / f"llp-{clips}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        make_llp(folder, categories=4, videos={"train": clips, "val": 16, "test": 8}, seed=seed)
        done.touch()
    print(f"data: {clips} synthetic 10-s LLP training videos (weak labels; events heard, seen or both) in "
          f"{folder} ({time.perf_counter() - start:.0f} s)")
    cfg = TrainConfig(method=method, data=str(folder), out=str(root / f"run-avvp-{method}"), task="avvp",
                      size="tiny", epochs=epochs, batch_size=batch_size, lr=2e-3, weight_decay=0.01,
                      workers=min(2, os.cpu_count() or 1) if workers is None else workers, seed=seed,
                      loader="cpu", progress=progress, log_every=5)
    result = make_trainer(cfg).fit()
    classes, constant = constant_baseline(read_llp(folder, "train"), read_llp(folder, "val"))
    result.update({f"constant_{k}": v for k, v in constant.items() if k != "videos"})
    print(f"\n{method} (tiny) AVVP after {epochs} epochs, {time.perf_counter() - start:.0f} s, validation F1 "
          f"(best constant prediction, classes {list(classes)}, in brackets):")
    for level in ("segment", "event"):
        print(f"  {level:7s} " + ", ".join(
            f"{name} {result[f'val_{level}_{key}']:.3f} ({constant[f'{level}_{key}']:.3f})"
            for name, key in (("audio", "audio"), ("visual", "visual"), ("audio-visual", "av"),
                              ("type@AV", "type"), ("event@AV", "event"))))
    print(f"logs and checkpoints in {cfg.out}")
    return result


def run_avqa_demo(method: str = "dgsct", *, out: str | None = None, epochs: int = 10, clips: int = 192,
                  batch_size: int = 8, workers: int | None = None, seed: int = 0,
                  progress: bool = True) -> dict[str, float]:
    """Make a synthetic MUSIC-AVQA folder (``clips`` training videos, 36 val, 12 test; 2-7
    templated questions each), train a tiny ``method`` QA model, print and return the
    validation accuracy per question type next to the majority answer's (``majority`` and
    ``type_majority`` keys in the result)."""
    from avfast.tasks.question_answering import QA_METHODS, answer_baselines, make_avqa, read_avqa

    if method not in QA_METHODS:
        raise ValueError(f"method: expected one of {QA_METHODS} for --task avqa, got {method!r}")
    root = Path(out or os.path.join(os.path.expanduser("~"), ".cache", "avfast", "demo"))
    start = time.perf_counter()
    folder = root / f"avqa-{clips}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        make_avqa(folder, videos={"train": clips, "val": 36, "test": 12}, seed=seed)
        done.touch()
    train, val = read_avqa(folder / "avqa-train.json"), read_avqa(folder / "avqa-val.json")
    print(f"data: {clips} synthetic 10-s videos, {len(train)} training questions in {folder} "
          f"({time.perf_counter() - start:.0f} s)")
    cfg = TrainConfig(method=method, data=str(folder), out=str(root / f"run-avqa-{method}"), task="avqa",
                      size="tiny", epochs=epochs, batch_size=batch_size, lr=2e-3, weight_decay=0.01,
                      workers=min(2, os.cpu_count() or 1) if workers is None else workers, seed=seed,
                      loader="cpu", progress=progress, log_every=5)
    result = make_trainer(cfg).fit()
    baselines = answer_baselines(train, val)
    result.update(baselines)
    kinds = ", ".join(f"{k.removeprefix('val_')} {v:.2f}" for k, v in result.items()
                      if k.startswith("val_") and k not in ("val_loss", "val_accuracy"))
    print(f"\n{method} (tiny) AVQA after {epochs} epochs, {time.perf_counter() - start:.0f} s: validation accuracy "
          f"{result['val_accuracy']:.1%} (the majority answer {baselines['majority']:.1%}; each question type's "
          f"majority answer {baselines['type_majority']:.1%}); {kinds}; logs and checkpoints in {cfg.out}")
    return result
