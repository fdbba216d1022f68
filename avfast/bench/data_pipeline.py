"""Benchmark: clips per second, end to end to (GPU) tensors, for the data paths.

Providers, on the same prepared clips, same preset, same batch size:

  cpu_pyav   avfast.data.CPULoader: PyAV decoding + torch front-ends in ``--workers``
             DataLoader workers; batches moved to the GPU when there is one
  dali       avfast.data.DALILoader: DALI decoding (``mixed`` on a GPU, ``cpu`` without),
             resize on the decoder's device, features on the GPU

Clips: ``--data DIR`` (a prepared folder with manifest.csv), else synthetic clips made once
under ``--cache`` (H.264 + AAC mp4 of ``--seconds`` s, prepared: FLAC audio, h264 video with
16-frame GOPs on a GPU, VP9 without one, since DALI's CPU decoder reads VP9 but not H.264).
Throughput counts the samples delivered after one warm-up batch, until ``--batches``
batches or the end of the data; results go to benchmarks/results/<device>/data_pipeline.*.
Target (issue 5): dali >= 4x cpu_pyav with 16 workers on the stgcma preset (H100 machine).

Usage: ``avfast bench data [--presets deepavfusion,stgcma] [--workers 16] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from avfast.bench.common import default_out_dir, device_slug, env_info

PRESETS = ("deepavfusion", "stgcma")
PROVIDERS = ("cpu_pyav", "dali")
TARGET = ("stgcma", 4.0)


def synthetic_prepared(cache: Path, clips: int, seconds: float, size: int, gpu: bool, workers: int) -> Path:
    """A prepared folder of synthetic clips under ``cache`` (made once, then reused)."""
    from avfast.data.prepare import prepare
    from avfast.data.synthetic import make_dataset

    codec = "h264" if gpu else "vp9"
    key = f"clips{clips}-s{seconds:g}-px{size}-{codec}"
    raw, dst = cache / f"raw-{key}", cache / f"prepared-{key}"
    if not (dst / "manifest.csv").exists():
        per_class = -(-clips // 4)
        make_dataset(raw, num_classes=4, clips_per_class=per_class, suffix=".mp4", duration=seconds,
                     fps=25, size=size)
        report = prepare(raw, dst, reencode=codec, gop=16, workers=workers, progress=False)
        if report.failed:
            raise RuntimeError(f"preparing the synthetic clips failed: {report.failed[:3]}")
    return dst


def measure(make_loader, batches: int, device: torch.device) -> dict:
    """Samples per second after one warm-up batch, synchronising the device at both ends."""
    loader = make_loader()
    it = iter(loader)
    first = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        count += batch["index"].numel()
        if i + 1 >= batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    shapes = {k: list(v.shape) for k, v in first.items() if torch.is_tensor(v)}
    return {"clips_per_s": count / seconds if count else None, "clips": count, "seconds": seconds,
            "shapes": shapes}


def run(args) -> dict:
    from avfast.data import CPULoader, DALILoader, Manifest

    gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if gpu else "cpu")
    data = Path(args.data) if args.data else synthetic_prepared(
        Path(args.cache), args.clips, args.seconds, args.size, gpu, args.workers)
    manifest = Manifest.load(data / "manifest.csv")
    rows = []
    for preset in args.presets:
        for provider in args.providers:
            if provider == "cpu_pyav":
                make = lambda: CPULoader(manifest, preset, batch_size=args.batch_size, train=True,  # noqa: E731
                                         num_workers=args.workers, device=device if gpu else None)
            else:
                make = lambda: DALILoader(manifest, preset, batch_size=args.batch_size, train=True,  # noqa: E731
                                          device_id=0 if gpu else None, num_threads=args.dali_threads)
            try:
                row = {"status": "ok", **measure(make, args.batches, device)}
            except Exception as err:  # a failing provider becomes a row, not a crash
                row = {"status": "error", "error": f"{type(err).__name__}: {err}"[:400]}
            row.update(preset=preset, provider=provider, batch_size=args.batch_size,
                       workers=args.workers if provider == "cpu_pyav" else args.dali_threads,
                       decoder=("mixed" if gpu else "cpu") if provider == "dali" else "pyav")
            print(f"{preset:<13} {provider:<9} {row.get('clips_per_s') or 0:9.1f} clips/s  {row.get('error', '')}")
            rows.append(row)
    return {"meta": {**env_info(device), "data": str(data), "clips": len(manifest),
                     "quick": args.quick, "target": {"preset": TARGET[0], "dali_over_cpu": TARGET[1]}},
            "rows": rows}


def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    lines = [f"# Data pipeline throughput ({meta['gpu']})", "",
             f"{meta['clips']} clips from `{meta['data']}`; commit {meta['commit']}; torch {meta['torch']}.",
             "", "| preset | provider | decoder | workers/threads | batch | clips/s | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['clips_per_s']:.1f}" if r.get("clips_per_s") else "-"
        lines.append(f"| {r['preset']} | {r['provider']} | {r['decoder']} | {r['workers']} | "
                     f"{r['batch_size']} | {rate} | {r['status']} {r.get('error', '')} |")
    lines.append("")
    for preset, ratio in speedups(rows).items():
        target = f" (target >= {TARGET[1]}x)" if preset == TARGET[0] else ""
        lines.append(f"- {preset}: dali / cpu_pyav = {ratio:.2f}x{target}")
    return "\n".join(lines) + "\n"


def speedups(rows: list[dict]) -> dict[str, float]:
    """preset -> dali clips/s over cpu_pyav clips/s, where both ran."""
    rate = {(r["preset"], r["provider"]): r.get("clips_per_s") for r in rows}
    return {p: rate[(p, "dali")] / rate[(p, "cpu_pyav")] for p, _ in rate
            if rate.get((p, "dali")) and rate.get((p, "cpu_pyav"))}


def plot(payload: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r.get("clips_per_s")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['preset']}\n{r['provider']}" for r in rows]
    ax.bar(labels, [r["clips_per_s"] for r in rows], color=["#888" if r["provider"] == "cpu_pyav" else "#76b900" for r in rows])
    ax.set_ylabel("clips / s")
    ax.set_title(f"avfast data paths, {payload['meta']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avfast bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="prepared folder with manifest.csv (default: synthetic clips)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "avfast", "bench-data"))
    p.add_argument("--presets", default=",".join(PRESETS), type=lambda s: s.split(","))
    p.add_argument("--providers", default=",".join(PROVIDERS), type=lambda s: s.split(","))
    p.add_argument("--workers", type=int, default=16, help="CPU path DataLoader workers")
    p.add_argument("--dali-threads", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", type=int, default=360, help="synthetic clips' frame side")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--quick", action="store_true", help="a small smoke run (results-quick/ folder)")
    p.add_argument("--out", help="results folder (default benchmarks/results/<device>/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in args.presets:
        if name not in ("deepavfusion", "mavt", "stgcma", "dgsct"):
            raise SystemExit(f"--presets: expected names from deepavfusion,mavt,stgcma,dgsct, got {name!r}")
    for name in args.providers:
        if name not in PROVIDERS:
            raise SystemExit(f"--providers: expected names from {','.join(PROVIDERS)}, got {name!r}")
    if args.quick:
        args.clips, args.seconds, args.size, args.batches = 8, 3.0, 64, 2
        args.batch_size, args.workers, args.dali_threads = 2, min(args.workers, 2), 2
    started = time.perf_counter()
    payload = run(args)
    out = Path(args.out) if args.out else default_out_dir(device_slug(payload["meta"]["gpu"]), args.quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "data_pipeline.md").write_text(markdown(payload))
    plot(payload, out / "data_pipeline.png")
    print(f"results: {out}/data_pipeline.{{json,md,png}}")
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0 if all(r["status"] == "ok" for r in payload["rows"]) else 1
