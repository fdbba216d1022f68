"""Benchmark harness shared by every ``avfast.bench.<op>`` module.

- ``Case`` / ``Result``: frozen dataclasses; a result becomes one long-format row
  {op, provider, kind, mode, case, shape, dtype, median_ms, p20_ms, p80_ms, peak_mem_mb,
  status, error, note, hbm_floor_ms, gpu, torch, triton, cuda, commit}.
- ``run_provider``: warm-up (compilation, CUDA-graph capture), peak memory, timing; an
  OOM or any other failure becomes a row with ``status`` and ``error`` instead of a crash.
- Timing: ``triton.testing.do_bench`` on CUDA (median, p20, p80; it flushes L2 between
  calls), a ``time.perf_counter`` loop on CPU (only a smoke check, not a benchmark).
- Writers: JSON (rows + metadata + cases), Markdown (one table per case), PNG
  (``plot_results``; matplotlib imported lazily, skipped with a note when missing).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf

MODES = ("fwd", "fwd+bwd")
KINDS = ("plain", "avfast", "other")  # plain PyTorch peer / avfast / third-party kernel
REPO_ROOT = Path(__file__).resolve().parents[2]

# Peak HBM bandwidth (bytes/s) for the floor estimates, by a substring of the device
# name; first match wins. The default is the H100 SXM (HBM3) figure.
PEAK_HBM_BYTES_PER_S = (
    ("h200", 4.8e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),
)
DEFAULT_PEAK_HBM = ("H100 SXM (assumed)", 3.35e12)


@dataclass(frozen=True)
class Case:
    """One input configuration. ``shape`` holds named sizes; ``hbm_bytes`` maps a mode to
    the bytes that must cross HBM at least once (empty when not estimated)."""

    op: str
    name: str
    shape: dict[str, Any] = field(hash=False)
    hbm_bytes: dict[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Timing:
    """Measurement settings. CUDA: do_bench ``warmup_ms`` / ``rep_ms``; CPU: ``cpu_reps``
    timed calls. ``warmup_calls`` calls precede everything (compile, graph capture)."""

    warmup_calls: int = 3
    warmup_ms: float = 50.0
    rep_ms: float = 200.0
    cpu_reps: int = 10


@dataclass(frozen=True)
class Result:
    op: str
    provider: str
    kind: str
    mode: str
    case: str
    shape: dict[str, Any] = field(hash=False)
    dtype: str
    status: str = "ok"  # ok | skip | oom | error
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mem_mb: float | None = None
    hbm_floor_ms: float | None = None
    error: str | None = None
    note: str = ""


# --------------------------------------------------------------------------- environment


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def peak_lookup(name: str, table: Sequence[tuple[str, float]], default: tuple[str, float]) -> tuple[str, float]:
    """(name, value) of the first ``table`` entry whose key is a substring of the device
    name (case-insensitive), else ``default``."""
    lowered = name.lower()
    for key, value in table:
        if key in lowered:
            return name, value
    return default


def peak_hbm(name: str) -> tuple[str, float]:
    """(label, bytes/s) of the peak HBM bandwidth used for the floor estimates."""
    return peak_lookup(name, PEAK_HBM_BYTES_PER_S, DEFAULT_PEAK_HBM)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Short commit of the source checkout, '+dirty' when it has changes; None outside git."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device | str) -> dict[str, Any]:
    """Versions and device, stored in the JSON metadata and copied into every row."""
    device = torch.device(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "xformers": _version("xformers"),
        "avfast": _version("avfast"),
        "python": platform.python_version(),
        "commit": git_commit(),
    }


ROW_ENV_KEYS = ("gpu", "torch", "triton", "cuda", "commit")


# ------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    """Frees what the last provider left on the GPU (gc first: autograd graphs hold tensors)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_compiled_state() -> None:
    """Drops dynamo caches and CUDA-graph pools, so providers neither share compiled
    code nor keep each other's memory."""
    torch._dynamo.reset()


def auto_backend_note(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto -> <backend>': what avfast picks for ``op`` with AVFAST_BACKEND unset."""
    from avfast import _backend

    with env_var("AVFAST_BACKEND", None):
        return "auto -> " + _backend.select(op, device, dtype)


@contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Sets (or, with None, unsets) an environment variable and restores it afterwards."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def time_ms(fn: Callable[[], Any], device: torch.device, timing: Timing) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    times = []
    for _ in range(max(1, timing.cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return times[0], times[0], times[0]
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")  # 20/40/60/80 %
    return statistics.median(times), p20, p80


def _short_error(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def run_provider(
    case: Case,
    provider: str,
    kind: str,
    mode: str,
    build: Callable[[], Callable[[], Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    timing: Timing,
    skip: str | None = None,
    note: str = "",
    hbm_bw: float | None = None,
) -> Result:
    """Measures ``build()()`` and returns its row; never raises for a failing provider.

    ``build`` makes the zero-argument callable for one step (compiling lazily is fine).
    ``skip``: a reason not to run at all (unavailable backend). Memory (CUDA only):
    ``max_memory_allocated`` over the warm-up calls (compilation, CUDA-graph capture) and
    one more call, minus what was allocated before them (inputs, weights), so a CUDA
    graph's private pool counts. Then ``time_ms``.
    """
    floor_bytes = case.hbm_bytes.get(mode)
    floor_ms = floor_bytes / hbm_bw * 1e3 if floor_bytes and hbm_bw else None
    base = dict(
        op=case.op, provider=provider, kind=kind, mode=mode, case=case.name,
        shape=dict(case.shape), dtype=str(dtype).removeprefix("torch."), hbm_floor_ms=floor_ms, note=note,
    )
    if skip is not None:
        return Result(**base, status="skip", error=skip)
    fn = None
    try:
        fn = build()
        cleanup(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        for _ in range(max(1, timing.warmup_calls)):
            fn()
        synchronize(device)
        peak_mb = None
        if device.type == "cuda":
            peak_mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        med, p20, p80 = time_ms(fn, device, timing)
        return Result(**base, median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_mb=peak_mb)
    except torch.OutOfMemoryError as err:
        return Result(**base, status="oom", error=_short_error(err, 200))
    except Exception as err:  # noqa: BLE001  (any failure of a provider is a result)
        return Result(**base, status="error", error=_short_error(err))
    finally:
        del fn
        cleanup(device)


def result_row(result: Result, env: dict[str, Any]) -> dict[str, Any]:
    row = dataclasses.asdict(result)
    row.update({k: env.get(k) for k in ROW_ENV_KEYS})
    return row


def print_row(row: dict[str, Any]) -> None:
    if row["status"] == "ok":
        mem = f"{row['peak_mem_mb']:9.1f} MB" if row["peak_mem_mb"] is not None else "        - MB"
        what = f"{row['median_ms']:9.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}) {mem}"
    else:
        what = f"{row['status'].upper()}: {row['error']}"
    print(f"  {row['case']:<34} {row['mode']:<8} {row['provider']:<28} {what}", flush=True)


# -------------------------------------------------------------------------------- writers


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["op"], row["provider"], row["mode"], row["case"])


def merge_payload(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """New rows replace old rows of the same (op, provider, mode, case); the rest stay."""
    fresh = {_row_key(r) for r in new["rows"]}
    rows = [r for r in old.get("rows", []) if _row_key(r) not in fresh] + new["rows"]
    cases = {(c["op"], c["name"]): c for c in old.get("cases", [])}
    cases.update({(c["op"], c["name"]): c for c in new["cases"]})
    return {**new, "rows": rows, "cases": list(cases.values())}


def write_json(path: Path, payload: dict[str, Any], merge: bool = False) -> dict[str, Any]:
    """Writes ``payload`` (metadata, cases, rows); with ``merge``, into the existing file's
    rows. Returns what was written."""
    path = Path(path)
    if merge and path.exists():
        payload = merge_payload(json.loads(path.read_text()), payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return payload


def _fmt_ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_mb(x: float | None) -> str:
    return "-" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.1f}")


def _ordered(seq) -> list:
    return list(dict.fromkeys(seq))


def best_plain(rows: Sequence[dict[str, Any]], case: str, mode: str) -> dict[str, Any] | None:
    """Fastest successful plain-PyTorch row of (case, mode)."""
    ok = [r for r in rows if r["case"] == case and r["mode"] == mode and r["kind"] == "plain" and r["status"] == "ok"]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def markdown(payload: dict[str, Any], title: str) -> str:
    """One table per case: rows = providers; fwd / fwd+bwd median ms, peak MB, and for
    avfast rows the speed-up over the fastest plain-PyTorch peer of the same case."""
    meta, rows = payload["metadata"], payload["rows"]
    cases = {c["name"]: c for c in payload.get("cases", [])}
    lines = [f"# {title}", ""]
    lines.append(
        f"{meta.get('gpu')} · {meta.get('dtype')} · torch {meta.get('torch')} · triton {meta.get('triton')} · "
        f"CUDA {meta.get('cuda')} · commit {meta.get('commit')} · {meta.get('created')}"
    )
    lines.append("")
    for note in meta.get("notes", []):
        lines += [f"> {note}", ""]
    timer = ("median of `triton.testing.do_bench` (L2 flushed between calls)" if meta.get("device", "").startswith("cuda")
             else "median of a `time.perf_counter` loop (CPU)")
    lines += [
        f"Times: {timer}; p20/p80 are in the JSON. "
        "fwd runs under `torch.no_grad()`; fwd+bwd is forward plus `torch.autograd.grad` of a random "
        "output gradient. Peak MB: memory allocated beyond the inputs and weights during warm-up "
        "(compilation, CUDA-graph capture) and one call. × = speed-up of an avfast provider over the "
        "fastest plain-PyTorch peer of the same case and mode.",
        "",
    ]
    for op in _ordered(r["op"] for r in rows):
        lines += [f"## {op}", ""]
        for case_name in _ordered(r["case"] for r in rows if r["op"] == op):
            crow = [r for r in rows if r["op"] == op and r["case"] == case_name]
            lines += [f"### {case_name}", ""]
            case = cases.get(case_name, {})
            if case.get("shape"):
                lines += ["`" + ", ".join(f"{k}={v}" for k, v in case["shape"].items()) + "`", ""]
            best = {m: best_plain(crow, case_name, m) for m in MODES}
            peers = [f"{m} {b['provider']} {_fmt_ms(b['median_ms'])} ms" for m, b in best.items() if b]
            if peers:
                lines += ["Fastest plain-PyTorch peer: " + "; ".join(peers) + ".", ""]
            if case.get("hbm_floor_ms"):
                fl = case["hbm_floor_ms"]
                lines += [
                    f"HBM floor ({case.get('hbm_bandwidth_label')}, {case.get('hbm_bytes_per_s', 0) / 1e12:.2f} TB/s): "
                    + "; ".join(f"{m} {fl[m] * 1e3:.3g} µs ({case['hbm_bytes'][m] / 1e6:.3g} MB)" for m in MODES if m in fl)
                    + ".",
                    "",
                ]
            lines += [
                "| provider | fwd ms | fwd+bwd ms | fwd MB | fwd+bwd MB | fwd × | fwd+bwd × | note |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            footnotes = []
            for provider in _ordered(r["provider"] for r in crow):
                by_mode = {r["mode"]: r for r in crow if r["provider"] == provider}
                cells, mems, speed, notes = [], [], [], []
                for m in MODES:
                    r = by_mode.get(m)
                    if r is None:
                        cells.append("")
                        mems.append("")
                        speed.append("")
                        continue
                    if r["status"] != "ok":
                        footnotes.append(f"- {provider}, {m}: {r['status']}: {r['error']}")
                        cells.append(r["status"])
                        mems.append("")
                        speed.append("")
                        continue
                    cells.append(_fmt_ms(r["median_ms"]))
                    mems.append(_fmt_mb(r["peak_mem_mb"]))
                    b = best[m]
                    speed.append(f"{b['median_ms'] / r['median_ms']:.2f}×" if r["kind"] == "avfast" and b else "")
                    if r.get("note"):
                        notes.append(r["note"])
                note = "; ".join(_ordered(notes))
                lines.append(f"| {provider} | {' | '.join(cells)} | {' | '.join(mems)} | {' | '.join(speed)} | {note} |")
            lines.append("")
            if footnotes:
                lines += [*_ordered(footnotes), ""]
    return "\n".join(lines)


def write_markdown(path: Path, payload: dict[str, Any], title: str) -> None:
    Path(path).write_text(markdown(payload, title))


def plot_payload(payload: dict[str, Any], png_path: Path, title: str | None = None) -> bool:
    """Bar chart (log ms) per case, providers on x, fwd and fwd+bwd bars. Returns False,
    with a printed note, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no plot written ({png_path}). "
              f"Plot the JSON elsewhere with avfast.bench.common.plot_results or benchmarks/plot.py.")
        return False
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    cases = _ordered((r["op"], r["case"]) for r in payload["rows"])
    if not cases:
        return False
    ncols = 2 if len(cases) > 1 else 1
    nrows = math.ceil(len(cases) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (op, case) in zip(axes.flat, cases):
        providers = _ordered(r["provider"] for r in payload["rows"] if r["op"] == op and r["case"] == case)
        width = 0.4
        for i, mode in enumerate(MODES):
            ys = []
            for p in providers:
                hit = [r for r in rows if r["op"] == op and r["case"] == case and r["provider"] == p and r["mode"] == mode]
                ys.append(hit[0]["median_ms"] if hit else float("nan"))
            ax.bar([x + (i - 0.5) * width for x in range(len(providers))], ys, width, label=mode)
        ax.set_xticks(range(len(providers)))
        ax.set_xticklabels(providers, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{op}: {case}", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    meta = payload.get("metadata", {})
    fig.suptitle(title or f"{meta.get('gpu')} · {meta.get('dtype')} · torch {meta.get('torch')}", fontsize=10)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Replots a results JSON written by an ``avfast.bench`` module (no GPU needed)."""
    return plot_payload(json.loads(Path(json_path).read_text()), Path(png_path))


# ------------------------------------------------------------------- run plumbing


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def late_interpreter() -> str | None:
    """Why the Triton interpreter cannot run here although TRITON_INTERPRET=1, or None.

    triton decides at decoration time whether a @triton.jit function is interpreted, and
    its standard library (tl.cdiv, ...) is decorated when triton.language is imported,
    which ``import avfast`` already does (through torch._dynamo). So TRITON_INTERPRET=1
    set later leaves compiled-mode library functions that the interpreter cannot call.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton.language" not in sys.modules:
        return None
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    if isinstance(getattr(standard, "cdiv", None), InterpretedFunction):
        return None
    return ("TRITON_INTERPRET=1 was set after triton was imported; set it in the environment "
            "(TRITON_INTERPRET=1 avfast bench ...)")


def ensure_triton_interpreter(device: torch.device) -> None:
    """On CPU, Triton kernels run only through the interpreter. Sets TRITON_INTERPRET=1
    when unset; that works only if triton.language is not imported yet (else see
    ``late_interpreter``: the triton rows are then skipped with the reason)."""
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        problem = late_interpreter()
        print("note: set TRITON_INTERPRET=1 so that the Triton kernels run on CPU (interpreter)"
              + (f"; but {problem}" if problem else ""))


def warm_device(device: torch.device, dtype: torch.dtype) -> None:
    """Creates cuBLAS/cuDNN handles and workspaces before the first measured provider."""
    if device.type != "cuda":
        return
    x = torch.randn(4, 2, 64, 64, device=device, dtype=dtype, requires_grad=True)
    out = nnf.scaled_dot_product_attention(x, x, x) @ x.transpose(-1, -2)
    torch.autograd.grad(out.sum(), x)
    torch.cuda.synchronize(device)


def default_out_dir(slug: str, quick: bool) -> Path:
    root = REPO_ROOT if (REPO_ROOT / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results" / (slug + ("-quick" if quick else ""))


def write_results(payload: dict, out_dir: Path, stem: str, title: str, extra_markdown: str,
                  device: torch.device, merge: bool) -> dict:
    """Writes <stem>.json (merged into an existing file when ``merge``), .md and .png under
    out_dir, prints where, and returns the payload as written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    payload = write_json(json_path, payload, merge=merge)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(payload, title) + "\n" + extra_markdown)
    png_path = out_dir / f"{stem}.png"
    plotted = plot_payload(payload, png_path)
    print(f"wrote {json_path}\nwrote {md_path}" + (f"\nwrote {png_path}" if plotted else ""))
    if device.type != "cuda":
        print("NOTE: CPU timings above are a smoke check, not the GPU benchmark.")
    print(f"kernel check {'PASSED' if payload['check']['passed'] else 'FAILED'}", flush=True)
    return payload


def bench_parser(prog: str, description: str, providers: Sequence[str], case_example: str):
    """The arguments every benchmark takes: --device --dtype --quick --out --providers --cases."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (fp32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions, fp32")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>/)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of: " + ",".join(providers))
    parser.add_argument("--cases", default=None, help=f"comma-separated substrings of case names, e.g. {case_example}")
    return parser


def split_list(text: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None or '' -> None."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None



def select(names: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``names`` in their order, restricted to ``wanted`` when given."""
    return [n for n in names if not wanted or n in wanted]


def keep_cases(shapes: Sequence[Any], cases: Sequence[str] | None) -> list[Any]:
    """Shapes whose ``name`` contains one of ``cases`` (all when none given)."""
    return [s for s in shapes if not cases or any(c in s.name for c in cases)]


# ------------------------------------------------------------------ shared op helpers


def backend_env(forced: str | None):
    """AVFAST_BACKEND for one provider: a backend name to set, "" to unset (automatic
    choice), None to leave as is."""
    return env_var("AVFAST_BACKEND", forced or None) if forced is not None else nullcontext()


def triton_skip(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the forced Triton backend of ``op`` is not measured here, or None."""
    from avfast import _backend

    reason = _backend.unavailable_reason("triton", op, device, dtype)
    if reason is None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the interpreter is not a benchmark (export TRITON_INTERPRET=0)"
    if reason is None and device.type == "cpu":
        return late_interpreter()
    return reason


def backend_skip(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a forced backend ("" / None: automatic, never skipped) is not measured here."""
    from avfast import _backend

    if backend == "triton":
        return triton_skip(op, device, dtype)
    return _backend.unavailable_reason(backend, op, device, dtype) if backend else None


def backend_note(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Row note of a forced backend ("" / None: what the automatic choice picks)."""
    if not backend:
        return auto_backend_note(op, device, dtype)
    if device.type == "cpu" and backend == "triton":
        return "Triton interpreter"
    if device.type == "cpu" and backend == "cuda":
        return "CUDA kernel code run serially on the host"
    return ""


def make_step(f: Callable, inputs: Sequence[torch.Tensor], mode: str, *, leaves: Sequence[torch.Tensor] | None = None,
              dout: Any = None, ctx: Callable | None = None, cudagraphs: bool = False) -> Callable[[], Any]:
    """One timed call: ``f(*inputs)`` under no_grad (fwd), or ``torch.autograd.grad`` of
    ``dout`` (None: a scalar output) w.r.t. ``leaves`` (default: the inputs). ``ctx``: a
    context factory entered around ``f``; ``cudagraphs``: mark a CUDA-graph step first."""
    leaves = inputs if leaves is None else leaves
    mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
    if ctx is None:
        if mode == "fwd":
            def step():
                mark()
                with torch.no_grad():
                    return f(*inputs)
        else:
            def step():
                mark()
                return torch.autograd.grad(f(*inputs), leaves, dout)
        return step
    if mode == "fwd":
        def step():
            mark()
            with torch.no_grad(), ctx():
                return f(*inputs)
    else:
        def step():
            mark()
            with ctx():
                out = f(*inputs)
            return torch.autograd.grad(out, leaves, dout)
    return step


def measure_case(case: Case, providers: Sequence[str], kinds: dict[str, str],
                 provider: Callable[[str, str], tuple[Callable[[], Callable[[], Any]], str | None, str, str | None]],
                 *, device: torch.device, dtype: torch.dtype, timing: Timing, hbm_bw: float | None = None) -> list[Result]:
    """Rows of every provider in both modes; ``provider(name, mode)`` returns (build, skip
    reason, note, forced AVFAST_BACKEND as in ``backend_env``)."""
    results = []
    for name in providers:
        for mode in MODES:
            build, skip, note, forced = provider(name, mode)
            with backend_env(forced):
                results.append(run_provider(case, name, kinds[name], mode, build, device=device,
                                            dtype=dtype, timing=timing, skip=skip, note=note, hbm_bw=hbm_bw))
            print_row(result_row(results[-1], {}))
    return results


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- check


def max_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))


def check_bound(plain: Sequence[torch.Tensor], want: Sequence[torch.Tensor], rel: float) -> float:
    """2x the error of the plain formulation in the benchmark dtype plus ``rel`` times the
    reference's magnitude (at least 1)."""
    mag = max(1.0, max(float(t.abs().max()) for t in want))
    return 2 * max_err(plain, want) + rel * mag


def check_providers(title: str, providers: Sequence[str], bound_out: float, bound_grad: float,
                    reason: Callable[[str], str | None], errors: Callable[[str], tuple[float, float]],
                    third_party: Sequence[str] = ()) -> tuple[list[dict[str, Any]], bool]:
    """Prints ``title`` and one line per provider; returns (entries, passed).

    ``reason(name)``: why the provider is skipped, or None; ``errors(name)``: its (output,
    gradient) errors. A provider that raises FAILs, except ``third_party`` ones (SKIP)."""
    print(title)
    print(f"  {'provider':<18} {'out err':>10} {'bound':>10} {'grad err':>10} {'bound':>10}  result")
    entries = []
    for name in providers:
        entry = {"provider": name, "out_err": None, "grad_err": None,
                 "out_bound": bound_out, "grad_bound": bound_grad, "result": "SKIP", "reason": reason(name)}
        if entry["reason"] is None:
            try:
                entry["out_err"], entry["grad_err"] = errors(name)
                ok = entry["out_err"] <= bound_out and entry["grad_err"] <= bound_grad
                entry["result"] = "PASS" if ok else "FAIL"
            except Exception as err:  # noqa: BLE001
                entry["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                entry["result"] = "SKIP" if name in third_party else "FAIL"  # third-party: may not run here
        entries.append(entry)
        if entry["out_err"] is not None:
            print(f"  {name:<18} {entry['out_err']:10.2e} {bound_out:10.2e} {entry['grad_err']:10.2e} "
                  f"{bound_grad:10.2e}  {entry['result']}")
        else:
            print(f"  {name:<18} {'':>10} {'':>10} {'':>10} {'':>10}  {entry['result']}: {entry['reason']}")
    passed = all(e["result"] != "FAIL" for e in entries)
    print(f"  check {'PASSED' if passed else 'FAILED'}", flush=True)
    return entries, passed


def check_summary(device: torch.device, dtype: torch.dtype, shape: Any, entries: list[dict[str, Any]],
                  passed: bool, **extra: Any) -> dict[str, Any]:
    """The check's JSON entry: device, dtype, shape, ``extra`` (scale, tau, ...), results, passed."""
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "shape": dataclasses.asdict(shape),
            **extra, "results": entries, "passed": passed}


def check_markdown(result: dict[str, Any], heading: str, description: str, out_label: str = "out err") -> str:
    """``## <heading> (PASSED|FAILED)``, ``description`` and one table row per provider."""
    lines = [f"## {heading} ({'PASSED' if result['passed'] else 'FAILED'})", "", description, "",
             f"| provider | {out_label} | grad err | result |", "|---|---:|---:|---|"]
    for e in result["results"]:
        errs = [f"{e[k]:.2e}" if e[k] is not None else "-" for k in ("out_err", "grad_err")]
        why = f" ({e['reason']})" if e["reason"] else ""
        lines.append(f"| {e['provider']} | {errs[0]} | {errs[1]} | {e['result']}{why} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ run()


@dataclass
class BenchRun:
    """What ``prepare_run`` resolved: device, dtype, environment, output folder, the HBM
    peak, the timing settings and the notes."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    env: dict[str, Any]
    slug: str
    out_dir: Path
    hbm_label: str
    hbm_bw: float
    timing: Timing
    notes: list[str]


def run_timing(device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return Timing(warmup_calls=3, warmup_ms=10, rep_ms=30) if quick else Timing(3, 50, 200)
    return Timing(warmup_calls=1, cpu_reps=3) if quick else Timing(warmup_calls=2, cpu_reps=10)


def prepare_run(command: str, device: str | torch.device | None, dtype: torch.dtype | str | None, quick: bool,
                out_dir: str | os.PathLike | None, providers: Sequence[str] | None, known: Sequence[str], *,
                notes: Sequence[str] = (), cpu_detail: str = "Triton runs interpreted",
                validate: Callable[[], None] | None = None) -> BenchRun:
    """The run() prologue: device (default cuda when available) and dtype (default bf16,
    fp32 with ``quick``); unknown ``providers`` (not in ``known``) and then ``validate()``
    raise ValueError; Triton interpreter on CPU; environment, output folder, HBM peak,
    timing; prints the banner with ``notes`` (op notes, then the CPU and quick notes)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float32 if quick else torch.bfloat16)
    unknown = [p for p in providers or () if p not in known]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; choose from {list(known)}")
    if validate is not None:
        validate()
    ensure_triton_interpreter(device)
    env = env_info(device)
    slug = device_slug(env["gpu"])
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(slug, quick)
    hbm_label, hbm_bw = peak_hbm(env["gpu"])

    notes = list(notes)
    if device.type != "cuda":
        notes.append("CPU run: a smoke check of the kernels and the harness. These timings are NOT the GPU "
                     f"benchmark ({cpu_detail}).")
    if quick:
        notes.append("--quick: tiny shapes and few repetitions" + (", one CPU thread." if device.type == "cpu" else "."))
    banner = "=" * 88
    print(banner)
    print(f"{command}: {env['gpu']} ({device}), {str(dtype)[6:]}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}")
    for n in notes:
        print("NOTE: " + n)
    print(banner, flush=True)
    return BenchRun(device, dtype, quick, env, slug, out_dir, hbm_label, hbm_bw, run_timing(device, quick), notes)


def run_cases(run: BenchRun, jobs: Iterable[Callable[[], tuple[Case, list[Result]]]]) -> tuple[list[Case], list[Result]]:
    """Warms the device and runs each job (one case each); on CPU with --quick, one thread.
    Restores the thread count and drops compiled state afterwards."""
    warm_device(run.device, run.dtype)
    case_list, results = [], []
    threads = torch.get_num_threads()
    if run.device.type == "cpu" and run.quick:
        torch.set_num_threads(1)  # tiny shapes: idle intra-op threads only add scheduler stalls
    try:
        for job in jobs:
            case, res = job()
            case_list.append(case)
            results += res
    finally:
        torch.set_num_threads(threads)
        reset_compiled_state()
    return case_list, results


def case_entry(run: BenchRun, c: Case) -> dict[str, Any]:
    """A case's JSON entry, with the HBM floor when the case has byte estimates."""
    entry = {"op": c.op, "name": c.name, "shape": c.shape, "hbm_bytes": c.hbm_bytes}
    if c.hbm_bytes:
        entry.update(hbm_bandwidth_label=run.hbm_label, hbm_bytes_per_s=run.hbm_bw,
                     hbm_floor_ms={m: b / run.hbm_bw * 1e3 for m, b in c.hbm_bytes.items()})
    return entry


def build_payload(run: BenchRun, check_result: dict[str, Any], case_list: Sequence[Case], results: Sequence[Result],
                  providers: dict[str, str], metadata: dict[str, Any] | None = None,
                  extra_case: Callable[[Case], dict[str, Any]] | None = None) -> dict[str, Any]:
    """{metadata, check, cases, rows}; ``metadata`` (scale, tau, ...) goes between the
    timing and the notes, ``extra_case(c)`` is appended to each case entry."""
    return {
        "metadata": {
            **run.env, "device": str(run.device), "device_slug": run.slug, "dtype": str(run.dtype).removeprefix("torch."),
            "quick": run.quick, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": dataclasses.asdict(run.timing), **(metadata or {}), "notes": run.notes, "providers": providers,
        },
        "check": check_result,
        "cases": [{**case_entry(run, c), **(extra_case(c) if extra_case else {})} for c in case_list],
        "rows": [result_row(r, run.env) for r in results],
    }


def bench_main(parser, run: Callable[..., dict[str, Any]], argv: Sequence[str] | None, extra: Sequence[str] = ()) -> int:
    """Parses ``argv`` with a ``bench_parser`` and calls ``run``; 1 when the check fails."""
    args = parser.parse_args(list(argv) if argv is not None else None)
    started = time.perf_counter()
    payload = run(device=args.device, dtype=args.dtype, quick=args.quick, out_dir=args.out,
                  providers=split_list(args.providers), cases=split_list(args.cases),
                  **{k: getattr(args, k) for k in extra})
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0 if payload["check"]["passed"] else 1
