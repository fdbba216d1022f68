"""Train a method on a folder of clips with the Python API (TrainConfig + Trainer).

The folder holds one sub-folder per class, ``root/<class>/<clip>.mp4`` (any container PyAV
reads); a fraction of each class (``--val-fraction``) is held out for validation. The run
writes ``log.jsonl``, ``last.pt`` and ``best.pt`` under ``--out``; ``avfast eval`` or
``avfast.train.evaluate_checkpoint`` scores a checkpoint later.

``--synthetic`` first writes a small folder of synthetic clips (class k: a coloured square
and a tone, see ``avfast.data.synthetic``), so the script runs anywhere, without downloads:

    python examples/train_on_folder.py --synthetic                       # tiny DeepAVFusion, CPU ok
    python examples/train_on_folder.py --synthetic --method mavt --epochs 4
    python examples/train_on_folder.py --data /data/my_clips --size base --epochs 10 --lr 1e-4
"""

import argparse
import os
import time
from pathlib import Path

from avfast.train import Trainer, TrainConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="folder root/<class>/<clip>.mp4 (with --synthetic: where to write it; "
                                   "default <out>/synthetic-clips)")
parser.add_argument("--synthetic", action="store_true", help="write a small synthetic clip folder first")
parser.add_argument("--classes", type=int, default=4, help="--synthetic: number of classes")
parser.add_argument("--clips-per-class", type=int, default=8, help="--synthetic: clips per class")
parser.add_argument("--method", default="deepavfusion", choices=["deepavfusion", "mavt", "stgcma"])
parser.add_argument("--size", default="tiny", help="model size: tiny (CPU-friendly), base, ...")
parser.add_argument("--out", default="runs/train_on_folder", help="logs and checkpoints")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--val-fraction", type=float, default=0.25)
parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU when present)")
args = parser.parse_args()

if args.data is None and not args.synthetic:
    parser.error("pass --data ROOT (a folder root/<class>/<clip>.mp4) or --synthetic")
data = Path(args.data or Path(args.out) / "synthetic-clips")

if args.synthetic:
    from avfast.data.synthetic import make_dataset

    start = time.perf_counter()
    make_dataset(data, num_classes=args.classes, clips_per_class=args.clips_per_class, suffix=".mp4",
                 duration=2.0, fps=10, size=64, seed=0)  # root/class_00/clip_000.mp4, ...
    print(f"wrote {args.classes} x {args.clips_per_class} synthetic clips to {data} "
          f"({time.perf_counter() - start:.1f} s)")

cfg = TrainConfig(
    method=args.method, data=str(data), out=args.out, size=args.size,
    epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
    weight_decay=0.01, warmup_epochs=0.5, val_fraction=args.val_fraction,
    workers=args.workers, device=args.device, progress=False, log_every=5,
)
trainer = Trainer(cfg)  # reads the folder, splits it, builds the model, loaders and optimizer
classes = trainer.train_set.classes
print(f"{args.method} ({args.size}) on {trainer.device}: {len(classes)} classes, "
      f"{len(trainer.train_set)} training / {len(trainer.val_set)} validation clips")

result = trainer.fit()  # prints one line per epoch; checkpoints last.pt / best.pt in --out
if "val_accuracy" not in result:  # stopped by --max-steps before an epoch ended
    result = trainer.evaluate()
print(f"validation accuracy {result['val_accuracy']:.1%} (chance {1 / len(classes):.0%}), "
      f"loss {result['val_loss']:.3f}; logs and checkpoints in {cfg.out}")
