"""The ``avfast`` command (also ``python -m avfast``).

    avfast info                      versions, device, and which backend serves each op
    avfast bench pair-attention ...  the av_pair_attention benchmark (a kernel-vs-reference
                                     check on CPU when no GPU is present)
    avfast bench blockwise-infonce . the blockwise_infonce benchmark (likewise)
    avfast bench av-adapter ...      the STG-CMA AV-Adapter benchmark (likewise)
    avfast bench static              the static GPU-fitness gate: every kernel compiled for
                                     sm_90/sm_80 without a GPU (registers, spills, tensor
                                     cores, waves, roofline); exits 1 when a kernel fails it
    avfast prepare SRC DST ...       check a dataset's clips, extract FLAC audio (optionally
                                     re-encode the video) and write DST/manifest.csv
    avfast synth DST ...             write a folder of synthetic labelled clips
    avfast bench data ...            clips/s of the DALI and CPU data paths
    avfast train --method M --data D train a method (torchrun --nproc_per_node N -m avfast train ... for DDP)
    avfast pretrain --data D         DeepAVFusion's AV-MAE pretraining
    avfast train --task avs ...      audio-visual segmentation on an AVSBench root (S4 / MS3)
    avfast train --task separation . mix-and-separate on solo clips (DeepAVFusion; SDR/SIR/SAR)
    avfast train --task avvp ...     audio-visual video parsing on an LLP folder (weak labels)
    avfast train --task avqa ...     audio-visual question answering on a MUSIC-AVQA folder
    avfast train --task text ...     classification by similarity to class prompts of CLIP / CLAP
                                     text towers (--text-weights; --shots K: few-shot)
    avfast eval --checkpoint C --data D   accuracy (AVS: mIoU, F-score; separation: SDR, SIR, SAR;
                                     avvp: LLP's segment- and event-level F1; avqa: accuracy per type)
    avfast eval --zero-shot ...      a --task text checkpoint on data of other classes (their prompts);
                                     --shots K: a k-shot linear probe on its embeddings
    avfast demo [--task avs|separation|avvp|avqa]  synthetic clips + a tiny model trained in minutes,
                                     accuracy vs chance (avs: mIoU on synthetic S4 clips;
                                     separation: SDR gain; avvp: F1 vs the best constant)
    avfast localize --checkpoint C   a PNG of where the sound is in a clip (AVS head or Grad-CAM)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

BENCHMARKS = {
    "pair-attention": "avfast.bench.av_pair_attention",
    "blockwise-infonce": "avfast.bench.blockwise_infonce",
    "av-adapter": "avfast.bench.av_adapter",
    "data": "avfast.bench.data_pipeline",
    "train-step": "avfast.bench.train_step",
    "static": "avfast.bench.static",
}
METHODS = ("mavt", "stgcma", "dgsct", "deepavfusion")
HOST_RUN = {  # what a forced kernel backend does with CPU tensors
    "cuda": "available when forced: the CUDA kernels' code run serially on the host (for tests)",
    "triton": "available when forced: the Triton interpreter (for tests)",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    import torch

    from avfast import __version__, _backend
    from avfast.ops import OPS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = [
        ("avfast", __version__),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none"),
        ("triton", _version("triton")),
        ("timm", _version("timm")),
        ("DALI", _version("nvidia-dali-cuda130")),
        ("device", torch.cuda.get_device_name() if cuda else "cpu (no CUDA GPU)"),
        ("avfast._C", "loaded" if _backend._C is not None else _backend._C_ERROR),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("\nGPU dispatch (avfast._backend.GPU_DISPATCH: order tried on a CUDA GPU):")
    for op, by_dtype in _backend.GPU_DISPATCH.items():
        for dtype_name, order in by_dtype.items():
            print(f"  {op:<22} {dtype_name:<9} {' > '.join(order)}")
    for backend, limits in _backend.SIZE_LIMITS.items():
        for op, (size, largest) in limits.items():
            print(f"  ({backend} {op}: {size} <= {largest}, else the next in order)")
    print(f"\nbackends on {device} (auto choice marked *; AVFAST_BACKEND={os.environ.get('AVFAST_BACKEND', '')}):")
    for op in OPS:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                chosen = _backend.select(op, device, dtype)
            except (RuntimeError, ValueError) as err:
                chosen = f"error: {err}"
            print(f"  {op} {str(dtype).removeprefix('torch.')}:")
            for backend in _backend.BACKENDS:
                reason = _backend.unavailable_reason(backend, op, device, dtype)
                status = reason or "available"
                if reason is None and device.type == "cpu" and backend != "reference":
                    status = HOST_RUN[backend]
                print(f"    {'*' if backend == chosen else ' '} {backend:<9} {status}")
    return 0


def _device_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--device" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def bench(name: str, args: list[str]) -> int:
    import torch  # does not import triton

    if name == "static":  # compiles for sm_90/sm_80 without a GPU: never the interpreter
        return importlib.import_module(BENCHMARKS[name]).main(args) or 0
    device = _device_arg(args)
    if device is None and not torch.cuda.is_available():
        print("No CUDA GPU: running the CPU kernel-vs-reference check (quick mode); "
              "its timings are not the GPU benchmark.")
        device, args = "cpu", ["--device", "cpu", "--quick", *args]
    if device is not None and device.startswith("cpu"):
        # Triton kernels run through the interpreter on CPU; set before triton loads them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(BENCHMARKS[name])
    return module.main(args) or 0


def prepare(args: argparse.Namespace) -> int:
    from avfast.data.prepare import prepare as run_prepare

    report = run_prepare(args.src, args.dst, sample_rate=args.sample_rate, reencode=args.reencode,
                         gop=args.gop, max_height=args.max_height, min_duration=args.min_duration,
                         workers=args.workers, progress=not args.quiet)
    failed = report.failures_by_reason()
    print(f"prepared {report.prepared} files, {report.skipped_done} done before, "
          f"{len(report.failed)} failed; manifest: {report.manifest_path}")
    if failed:
        print(f"failures by reason (details in {os.path.join(os.path.dirname(report.manifest_path), 'failed.csv')}):")
        for reason, count in failed.items():
            print(f"  {reason:<24} {count}")
    return 0


def synth(args: argparse.Namespace) -> int:
    from avfast.data.synthetic import make_dataset

    manifest = make_dataset(args.dst, num_classes=args.classes, clips_per_class=args.clips_per_class,
                            suffix=args.suffix, duration=args.duration, fps=args.fps, size=args.size,
                            seed=args.seed)
    print(f"wrote {len(manifest)} clips of {len(manifest.classes)} classes to {args.dst}")
    return 0


def _add_data_commands(sub) -> dict[str, argparse.ArgumentParser]:
    p_prep = sub.add_parser("prepare", help="check clips, extract FLAC audio, write DST/manifest.csv")
    p_prep.add_argument("src", help="a class-per-folder tree, an avfast manifest, or a VGGSound/AVE/"
                        "AudioSet annotation file (clips looked up beside it)")
    p_prep.add_argument("dst", help="output folder (a rerun continues an interrupted one)")
    p_prep.add_argument("--sample-rate", type=int, default=16000, help="audio rate in Hz (16000)")
    p_prep.add_argument("--reencode", choices=("h264", "vp9"), help="re-encode the video (default: keep it)")
    p_prep.add_argument("--gop", type=int, default=16, help="key frame interval when re-encoding (16)")
    p_prep.add_argument("--max-height", type=int, help="scale taller video down when re-encoding")
    p_prep.add_argument("--min-duration", type=float, default=0.5, help="shorter files fail (0.5 s)")
    p_prep.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (all CPUs)")
    p_prep.add_argument("--quiet", action="store_true", help="no progress bar")
    p_synth = sub.add_parser("synth", help="write a folder of synthetic labelled clips")
    p_synth.add_argument("dst", help="output folder: DST/class_XX/clip_YYY<suffix>")
    p_synth.add_argument("--classes", type=int, default=4, help="number of classes (4)")
    p_synth.add_argument("--clips-per-class", type=int, default=6, help="clips per class (6)")
    p_synth.add_argument("--suffix", choices=(".mp4", ".mkv", ".webm"), default=".mkv",
                         help=".mp4 = H.264+AAC, .mkv = VP9+FLAC (default), .webm = VP9+Opus")
    p_synth.add_argument("--duration", type=float, default=3.0, help="seconds per clip (3)")
    p_synth.add_argument("--fps", type=int, default=10, help="frames per second (10)")
    p_synth.add_argument("--size", type=int, default=64, help="frame width and height in px (64)")
    p_synth.add_argument("--seed", type=int, default=0)
    return {"prepare": p_prep, "synth": p_synth}


class UsageError(Exception):
    """Settings or data that cannot work: reported as a usage error (exit 2)."""


def _override(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value), the value read as a Python literal when it is one."""
    import ast

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set: expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_train_commands(sub) -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for name, help_text in (("train", "train a method on a folder of clips or a manifest"),
                            ("pretrain", "DeepAVFusion AV-MAE pretraining")):
        p = sub.add_parser(name, help=help_text)
        if name == "train":
            p.add_argument("--method", required=True, choices=METHODS)
            p.add_argument("--task", choices=("classify", "avs", "separation", "avvp", "avqa", "text"),
                           default="classify",
                           help="classify (default); avs: audio-visual segmentation, --data an AVSBench root; "
                                "separation: mix-and-separate (deepavfusion), --data solo clips or a MUSIC json; "
                                "avvp: audio-visual video parsing (dgsct, stgcma), --data an LLP folder; "
                                "avqa: question answering (dgsct, stgcma), --data a MUSIC-AVQA folder; "
                                "text: classification by class prompts of text towers (dgsct, stgcma)")
            p.add_argument("--avs-subset", choices=("s4", "ms3"), default="s4", help="--task avs: S4 or MS3 (s4)")
            p.add_argument("--val-split", choices=("val", "test"), default="val",
                           help="--task avs, avvp, avqa: the split validation scores (val)")
            p.add_argument("--text-weights", action="append", default=[], metavar="KIND[:MODEL]=PATH",
                           help="--task text: a local text tower, clip[:MODEL]=FILE (open_clip, model "
                                "ViT-B-16 by default) and/or clap=FOLDER (transformers ClapModel.save_pretrained)")
            p.add_argument("--shots", type=int, help="--task text: train on this many clips per class (few-shot)")
        p.add_argument("--data", required=True, help="a folder of clips (root/<class>/<clip>), a prepared "
                       "folder (avfast prepare) or a manifest / VGGSound / AVE / AudioSet annotation file")
        p.add_argument("--val-data", help="validation data (default: a class-stratified split of --data)")
        p.add_argument("--val-fraction", type=float, default=0.2)
        p.add_argument("--out", help="run folder: log.jsonl, last.pt, best.pt (default runs/<method>)")
        p.add_argument("--size", default="base", help="model size: tiny, base (large for stgcma)")
        p.add_argument("--epochs", type=int, default=10)
        p.add_argument("--max-steps", type=int, help="stop after this many steps")
        p.add_argument("--batch-size", type=int, default=8, help="per process")
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument("--weight-decay", type=float, default=0.05)
        p.add_argument("--warmup-epochs", type=float, default=0.0)
        p.add_argument("--background-p", type=float, help="MA-AVT background pairs (default 0.2 for mavt)")
        p.add_argument("--compile", action="store_true", help="torch.compile the model")
        p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
        p.add_argument("--loader", choices=("auto", "cpu", "dali"), default="auto")
        p.add_argument("--workers", type=int, default=4, help="CPU loader workers per process")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--pretrained", help="a local upstream checkpoint file")
        p.add_argument("--resume", nargs="?", const="last", choices=("last", "auto"),
                       help="continue from OUT/last.pt (an unreadable one is an error); --resume auto: "
                            "from last.pt, else last.pt.prev (said in the log), else from scratch")
        p.add_argument("--checkpoint-every", type=int, help="also save every N steps")
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: LOCAL_RANK's GPU, else cpu)")
        p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                       metavar="KEY=VALUE", help="model config field, e.g. --set img_size=64")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        parsers[name] = p
    p_eval = sub.add_parser("eval", help="accuracy (AVS: mIoU and F-score; separation: SDR, SIR, SAR) of a "
                            "checkpoint written by avfast train")
    p_eval.add_argument("--checkpoint", required=True)
    p_eval.add_argument("--data", required=True)
    p_eval.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="an AVS / AVVP / AVQA checkpoint: the split scored (test)")
    p_eval.add_argument("--zero-shot", action="store_true",
                        help="a --task text checkpoint: score --data's own classes by their prompts")
    p_eval.add_argument("--shots", type=int, help="a --task text checkpoint: a k-shot linear probe on its "
                        "embeddings of --data (K clips per class fit it, the others score it)")
    p_eval.add_argument("--text-weights", action="append", metavar="KIND[:MODEL]=PATH",
                        help="--zero-shot: the text towers (default: the run's)")
    p_eval.add_argument("--batch-size", type=int, default=8)
    p_eval.add_argument("--workers", type=int, default=4)
    p_eval.add_argument("--device")
    p_demo = sub.add_parser("demo", help="train a tiny model on generated clips and report accuracy")
    p_demo.add_argument("--task", choices=("classify", "avs", "separation", "avvp", "avqa"), default="classify",
                        help="classify (default); avs: segmentation of synthetic AVSBench S4 clips; separation: "
                             "mix-and-separate of synthetic solos; avvp: parsing synthetic LLP videos; avqa: "
                             "templated questions over synthetic videos")
    p_demo.add_argument("--method", choices=METHODS, help="(deepavfusion; avvp, avqa: dgsct)")
    p_demo.add_argument("--out", help="folder for the clips and the run (default ~/.cache/avfast/demo)")
    p_demo.add_argument("--epochs", type=int, help="(classify, avs: 6; separation: 4; avvp: 8; avqa: 10)")
    p_demo.add_argument("--clips-per-class", type=int, default=16, help="classify: clips per class (16)")
    p_demo.add_argument("--clips", type=int, help="avs: training clips (48); separation: clips per instrument (8); "
                        "avvp: training videos (64); avqa: training videos (192)")
    p_demo.add_argument("--workers", type=int)
    p_demo.add_argument("--seed", type=int, default=0)
    p_loc = sub.add_parser("localize", help="PNG map of where the sound is in a clip, for a trained checkpoint")
    p_loc.add_argument("--checkpoint", required=True, help="last.pt / best.pt of avfast train")
    p_loc.add_argument("--data", help="an AVS checkpoint: the AVSBench root holding the clip")
    p_loc.add_argument("--subset", choices=("s4", "ms3"), help="an AVS checkpoint: S4 or MS3 (default: its run's)")
    p_loc.add_argument("--split", choices=("train", "val", "test"), default="test")
    p_loc.add_argument("--index", type=int, default=0, help="the clip's position in the split (0)")
    p_loc.add_argument("--video", help="a classification checkpoint: the video file to map (Grad-CAM)")
    p_loc.add_argument("--out", default="localize", help="folder for <clip>.png (localize)")
    parsers.update(eval=p_eval, demo=p_demo, localize=p_loc)
    return parsers


def train(args: argparse.Namespace) -> int:
    from avfast.train import TrainConfig
    from avfast.train.loop import make_trainer

    method = "deepavfusion" if args.command == "pretrain" else args.method
    task = getattr(args, "task", "classify")
    extra = dict(task=task, avs_subset=args.avs_subset, val_split=args.val_split, text_weights=args.text_weights,
                 shots=args.shots) if args.command == "train" else {}
    cfg = TrainConfig(method=method, data=args.data, **extra, val_data=args.val_data, val_fraction=args.val_fraction,
                      out=args.out or os.path.join("runs", method + ("-pretrain" if args.command == "pretrain" else
                                                                    "" if task == "classify" else "-" + task)),
                      size=args.size, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      background_p=args.background_p, compile=args.compile, amp=not args.no_amp,
                      loader=args.loader, workers=args.workers, seed=args.seed, pretrained=args.pretrained,
                      pretrain=args.command == "pretrain", resume=args.resume or False,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                      progress=not args.quiet, device=args.device, model_overrides=dict(args.overrides))
    try:
        trainer = make_trainer(cfg)
    except (ValueError, FileNotFoundError) as err:  # settings or data that cannot work
        raise UsageError(str(err)) from err
    result = trainer.fit()
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from avfast.train.loop import checkpoint_evaluator
    from avfast.train.tasks import text_evaluator

    text = args.zero_shot or args.shots is not None
    if args.text_weights and not args.zero_shot:
        raise UsageError("--text-weights: expected with --zero-shot (other classes' prompts), got it without")
    try:
        if text:
            trainer = text_evaluator(args.checkpoint, args.data, zero_shot=args.zero_shot,
                                     text_weights=args.text_weights, batch_size=args.batch_size,
                                     workers=args.workers, device=args.device)
        else:
            trainer = checkpoint_evaluator(args.checkpoint, args.data, batch_size=args.batch_size,
                                           workers=args.workers, device=args.device, split=args.split)
        result = trainer.evaluate() if args.shots is None else trainer.few_shot_probe(args.shots, trainer.cfg.seed)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def localize(args: argparse.Namespace) -> int:
    from avfast.train.tasks import localize as write_map

    try:
        path = write_map(args.checkpoint, args.out, data=args.data, subset=args.subset, split=args.split,
                         index=args.index, video=args.video)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {path}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from avfast.train.demo import run_avqa_demo, run_avs_demo, run_avvp_demo, run_demo, run_separation_demo

    method = args.method or ("dgsct" if args.task in ("avvp", "avqa") else "deepavfusion")
    try:
        if args.task == "avqa":
            run_avqa_demo(method, out=args.out, epochs=args.epochs or 10, clips=args.clips or 192,
                          workers=args.workers, seed=args.seed)
        elif args.task == "avvp":
            run_avvp_demo(method, out=args.out, epochs=args.epochs or 8, clips=args.clips or 64,
                          workers=args.workers, seed=args.seed)
        elif args.task == "avs":
            run_avs_demo(method, out=args.out, epochs=args.epochs or 6, clips=args.clips or 48,
                         workers=args.workers, seed=args.seed)
        elif args.task == "separation":
            if method != "deepavfusion":
                raise ValueError(f"method: expected 'deepavfusion' for --task separation, got {method!r}")
            run_separation_demo(out=args.out, epochs=args.epochs or 4, clips=args.clips or 8, workers=args.workers,
                                seed=args.seed)
        else:
            run_demo(method, out=args.out, epochs=args.epochs or 6, clips_per_class=args.clips_per_class,
                     workers=args.workers, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avfast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and the backend of each op")
    p_bench = sub.add_parser("bench", help="run a benchmark; arguments after the name go to it")
    p_bench.add_argument("name", choices=sorted(BENCHMARKS))
    data_parsers = _add_data_commands(sub)
    train_parsers = _add_train_commands(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return info()
    if args.command in data_parsers:
        try:
            return prepare(args) if args.command == "prepare" else synth(args)
        except (ValueError, FileNotFoundError) as err:  # bad arguments: exit 2 with the message
            data_parsers[args.command].error(str(err))
    if args.command in train_parsers:
        run = {"train": train, "pretrain": train, "eval": evaluate, "demo": demo, "localize": localize}[args.command]
        try:
            return run(args)
        except UsageError as err:
            train_parsers[args.command].error(str(err))
    return bench(args.name, rest)


if __name__ == "__main__":
    sys.exit(main())
