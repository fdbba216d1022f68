"""Benchmark: dense audio-visual pair attention (op) and DeepAVFusion's dense fusion block.

Op level, inputs already projected, q (B, F, H, Dq), k_a/v_a (B, Na, H, Dq|Dv),
k_v/v_v (B, Nv, H, Dq|Dv), v_bias (H, Dv); providers (all on the same inputs):

  literal               avfast.reference av_pair_attention_literal: the (Na*Nv) pair tensor, as upstream
  avfast_reference      avfast.ops.av_pair_attention with AVFAST_BACKEND=reference (two attentions, einsum)
  two_sdpa              two F.scaled_dot_product_attention calls summed + v_bias (cuDNN > flash > efficient
                        when Dq == Dv, else SDPA's own choice)
  two_sdpa_compiled     the same under torch.compile
  two_sdpa_cudagraphs   the same under torch.compile(mode="reduce-overhead") (CUDA graphs)
  xformers              xformers memory_efficient_attention twice, when installed
  avfast_triton         avfast.ops.av_pair_attention, AVFAST_BACKEND=triton
  avfast_cuda           avfast.ops.av_pair_attention, AVFAST_BACKEND=cuda (avfast._C)
  avfast_cudagraphs     avfast.ops.av_pair_attention (automatic backend) under reduce-overhead

Block level: one DeepAVFusion dense fusion layer (D=768, 12 heads, attn_ratio 0.25,
mlp_ratio 1.0): upstream's literal and factorized blocks vs avfast.nn.DenseAVFusionBlock
eager, compiled and with CUDA graphs; see avfast.bench.fusion_block.

Each case runs fwd (under torch.no_grad) and fwd+bwd (torch.autograd.grad of a random
output gradient, so no .grad accumulation). Before timing, a kernel-vs-reference check
compares every available backend with the literal reference computed in float64.

Usage: ``python -m avfast.bench.av_pair_attention [--quick] [--device cpu]`` or
``avfast bench pair-attention``; results go to benchmarks/results/<device-slug>/.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nnf

from avfast import _backend
from avfast.bench.common import (
    bench_parser,
    split_list,
    write_results,
    DTYPES,
    default_out_dir,
    ensure_triton_interpreter,
    late_interpreter,
    warm_device,
    MODES,
    Case,
    Timing,
    auto_backend_note,
    device_slug,
    env_info,
    env_var,
    peak_hbm,
    print_row,
    reset_compiled_state,
    result_row,
    run_provider,
)
from avfast.bench.fusion_block import BLOCK_PROVIDERS, GPU_BLOCK_SHAPES, QUICK_BLOCK_SHAPES
from avfast.bench.fusion_block import run_case as _block_case
from avfast.ops import av_pair_attention
from avfast.reference import av_pair_attention as ref

OP = "av_pair_attention"
RESULTS_STEM = "av_pair_attention"
SCALE = (768 / 12) ** -0.5  # upstream's softmax scale for D=768, 12 heads, whatever Dq is

# provider -> kind (plain: PyTorch peer; avfast; other: third-party kernels)
OP_PROVIDERS = {
    "literal": "plain",
    "avfast_reference": "plain",
    "two_sdpa": "plain",
    "two_sdpa_compiled": "plain",
    "two_sdpa_cudagraphs": "plain",
    "xformers": "other",
    "avfast_triton": "avfast",
    "avfast_cuda": "avfast",
    "avfast_cudagraphs": "avfast",
}
CHECK_PROVIDERS = ("two_sdpa", "xformers", "avfast_reference", "avfast_triton", "avfast_cuda")
FORCED_BACKEND = {"avfast_reference": "reference", "avfast_triton": "triton", "avfast_cuda": "cuda",
              }


@dataclass(frozen=True)
class PairShape:
    B: int
    Na: int
    Nv: int
    F: int
    H: int
    Dq: int
    Dv: int

    @property
    def name(self) -> str:
        return f"B{self.B}-Na{self.Na}-Nv{self.Nv}-F{self.F}-H{self.H}-Dq{self.Dq}-Dv{self.Dv}"


# Shapes from DeepAVFusion: VGGSound/AudioSet pretraining (96 audio x 196 image tokens),
# Dv=64 as with attn_ratio 1.0 on the values, fine-tuning crops (19 x 49), and F=1/Na=1.
# Block-level shapes and providers: avfast.bench.fusion_block.
GPU_OP_SHAPES = (
    PairShape(64, 96, 196, 16, 12, 16, 16),
    PairShape(64, 96, 196, 16, 12, 16, 64),
    PairShape(128, 19, 49, 16, 12, 16, 16),
    PairShape(64, 1, 7, 1, 12, 16, 16),
)
QUICK_OP_SHAPES = (PairShape(2, 7, 11, 4, 2, 16, 16), PairShape(2, 5, 9, 3, 2, 16, 8))
CHECK_SHAPE = PairShape(2, 7, 11, 5, 3, 16, 8)


def hbm_bytes(s: PairShape, elem: int) -> dict[str, int]:
    """Bytes that must cross HBM at least once (perfect fusion, residuals such as the lse
    ignored), for the floor estimate floor_ms = bytes / peak_bytes_per_s * 1e3
    (3.35e12 B/s on an H100 SXM):

        inputs  = q B*F*H*Dq + (k_a, v_a) B*Na*H*(Dq+Dv) + (k_v, v_v) B*Nv*H*(Dq+Dv) + v_bias H*Dv
        fwd     = inputs (read) + out B*F*H*Dv (written)
        bwd     = inputs (read) + dout B*F*H*Dv (read) + one gradient per input (written = inputs)
        fwd+bwd = fwd + bwd = 3 * inputs + 2 * B*F*H*Dv
    all times the element size.
    """
    inputs = s.B * s.F * s.H * s.Dq + (s.B * s.Na + s.B * s.Nv) * s.H * (s.Dq + s.Dv) + s.H * s.Dv
    out = s.B * s.F * s.H * s.Dv
    return {"fwd": elem * (inputs + out), "fwd+bwd": elem * (3 * inputs + 2 * out)}


# --------------------------------------------------------------------------- op providers


def _pair_inputs(s: PairShape, device, dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[q, k_a, v_a, k_v, v_v, v_bias] (leaves, requires_grad) and dout (B, F, H, Dv)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    inputs = [rand(s.B, s.F, s.H, s.Dq), rand(s.B, s.Na, s.H, s.Dq), rand(s.B, s.Na, s.H, s.Dv),
              rand(s.B, s.Nv, s.H, s.Dq), rand(s.B, s.Nv, s.H, s.Dv), rand(s.H, s.Dv)]
    return [t.requires_grad_() for t in inputs], rand(s.B, s.F, s.H, s.Dv)


def literal(q, k_a, v_a, k_v, v_v, v_bias):
    return ref.av_pair_attention_literal(q, k_a, v_a, k_v, v_v, scale=SCALE, v_bias=v_bias)


def two_sdpa(q, k_a, v_a, k_v, v_v, v_bias):
    """The exact two-attention form with SDPA; SDPA wants (B, H, N, D)."""
    qt = q.transpose(1, 2)
    o = nnf.scaled_dot_product_attention(qt, k_a.transpose(1, 2), v_a.transpose(1, 2), scale=SCALE)
    o = o + nnf.scaled_dot_product_attention(qt, k_v.transpose(1, 2), v_v.transpose(1, 2), scale=SCALE)
    return o.transpose(1, 2) + v_bias


def xformers_pair(q, k_a, v_a, k_v, v_v, v_bias):
    import xformers.ops as xops  # (B, M, H, K) layout, like ours

    o = xops.memory_efficient_attention(q, k_a, v_a, scale=SCALE)
    return o + xops.memory_efficient_attention(q, k_v, v_v, scale=SCALE) + v_bias


def avfast_pair(q, k_a, v_a, k_v, v_v, v_bias):
    return av_pair_attention(q, k_a, v_a, k_v, v_v, scale=SCALE, v_bias=v_bias)


def _sdpa_context(device: torch.device, Dq: int, Dv: int):
    """cuDNN > flash > efficient on CUDA when Dq == Dv (flash needs equal head widths);
    SDPA's own choice otherwise. Returns (context factory, note)."""
    if device.type != "cuda" or Dq != Dv:
        return nullcontext, "SDPA's own choice"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return (lambda: sdpa_kernel(order, set_priority=True)), "SDPA cudnn>flash>efficient"


def _sdpa_choice(ctx, q, k, v) -> str:
    """Name of the SDPA backend that (q, k, v) in (B, N, H, D) would run on; '' if unknown."""
    try:
        from torch.nn.attention import SDPBackend

        names = {b.value: n.lower() for n, b in SDPBackend.__members__.items()}
        with ctx():
            idx = torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          None, 0.0, False, scale=SCALE)
        return names.get(int(idx), str(idx))
    except Exception:  # noqa: BLE001  (private API; only for the note)
        return ""


def _step(f: Callable, inputs: Sequence[torch.Tensor], dout: torch.Tensor, mode: str,
          ctx=nullcontext, cudagraphs: bool = False) -> Callable[[], Any]:
    """One timed call: f(*inputs) under no_grad (fwd), or with autograd.grad of dout."""
    mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
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
            return torch.autograd.grad(out, inputs, dout)
    return step


def _backend_note(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if backend is None:
        return auto_backend_note(OP, device, dtype)
    if device.type == "cpu" and backend == "triton":
        return "Triton interpreter"
    if device.type == "cpu" and backend == "cuda":
        return "CUDA kernel code run serially on the host"
    return ""


def _triton_skip(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = _backend.unavailable_reason("triton", OP, device, dtype)
    if reason is None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the interpreter is not a benchmark (export TRITON_INTERPRET=0)"
    if reason is None and device.type == "cpu":
        return late_interpreter()
    return reason


def _op_provider(name: str, s: PairShape, device, dtype, inputs, dout, mode):
    """(build, skip reason, note, forced AVFAST_BACKEND) for one op-level provider."""
    cuda = device.type == "cuda"
    no_graphs = None if cuda else "CUDA graphs need a CUDA device"
    if name == "literal":
        return (lambda: _step(literal, inputs, dout, mode)), None, "", None
    if name.startswith("two_sdpa"):
        ctx, note = _sdpa_context(device, s.Dq, s.Dv)
        chosen = _sdpa_choice(ctx, *inputs[:3])
        note = f"{note} ({chosen})" if chosen else note
        if name == "two_sdpa":
            return (lambda: _step(two_sdpa, inputs, dout, mode, ctx)), None, note, None
        graphs = name == "two_sdpa_cudagraphs"
        kwargs = {"mode": "reduce-overhead"} if graphs else {}

        def build():
            reset_compiled_state()
            return _step(torch.compile(two_sdpa, dynamic=False, **kwargs), inputs, dout, mode, ctx, graphs)

        return build, (no_graphs if graphs else None), note, None
    if name == "xformers":
        skip = None if importlib.util.find_spec("xformers") else "xformers is not installed"
        return (lambda: _step(xformers_pair, inputs, dout, mode)), skip, "", None
    if name == "avfast_cudagraphs":
        def build():
            reset_compiled_state()
            f = torch.compile(avfast_pair, mode="reduce-overhead", dynamic=False, fullgraph=True)
            return _step(f, inputs, dout, mode, cudagraphs=True)

        return build, no_graphs, _backend_note(None, device, dtype), ""
    backend = FORCED_BACKEND[name]
    skip = _triton_skip(device, dtype) if backend == "triton" else _backend.unavailable_reason(backend, OP, device, dtype)
    return (lambda: _step(avfast_pair, inputs, dout, mode)), skip, _backend_note(backend, device, dtype), backend


def _run_op_case(s: PairShape, providers, device, dtype, timing, hbm_bw) -> tuple[Case, list]:
    elem = torch.empty((), dtype=dtype).element_size()
    case = Case(OP, s.name, asdict(s), hbm_bytes(s, elem))
    inputs, dout = _pair_inputs(s, device, dtype)
    results = []
    for name in providers:
        for mode in MODES:
            build, skip, note, forced = _op_provider(name, s, device, dtype, inputs, dout, mode)
            # forced: a backend name to set, "" to unset (automatic choice), None to leave as is
            env = env_var("AVFAST_BACKEND", forced or None) if forced is not None else nullcontext()
            with env:
                results.append(run_provider(case, name, OP_PROVIDERS[name], mode, build, device=device,
                                            dtype=dtype, timing=timing, skip=skip, note=note, hbm_bw=hbm_bw))
            print_row(result_row(results[-1], {}))
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results


# --------------------------------------------------------------------------------- check


def _max_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))


def _eval(f, inputs, dout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = f(*inputs)
    return out.detach(), [gr.detach() for gr in torch.autograd.grad(out, inputs, dout)]


def check(device: torch.device, dtype: torch.dtype, providers: Sequence[str] = CHECK_PROVIDERS,
          shape: PairShape = CHECK_SHAPE) -> dict[str, Any]:
    """Output and input gradients of every available backend against the literal pair
    tensor in float64. Bound: 2x the error of the literal form in ``dtype`` (plain torch
    in the same precision) plus 10 ulp of ``dtype`` at the reference's magnitude."""
    device = torch.device(device)
    inputs64, dout64 = _pair_inputs(shape, device, torch.float64, seed=123)
    want_out, want_grads = _eval(literal, inputs64, dout64)
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    dout = dout64.to(dtype)
    plain_out, plain_grads = _eval(literal, inputs, dout)
    eps = torch.finfo(dtype).eps
    mag_out = max(1.0, float(want_out.abs().max()))
    mag_grad = max(1.0, max(float(t.abs().max()) for t in want_grads))
    bound_out = 2 * _max_err([plain_out], [want_out]) + 10 * eps * mag_out
    bound_grad = 2 * _max_err(plain_grads, want_grads) + 10 * eps * mag_grad
    print(f"check {OP} vs the literal pair tensor in float64 ({device}, {str(dtype)[6:]}, {shape.name}):")
    print(f"  {'provider':<18} {'out err':>10} {'bound':>10} {'grad err':>10} {'bound':>10}  result")
    entries = []
    for name in providers:
        entry = {"provider": name, "out_err": None, "grad_err": None,
                 "out_bound": bound_out, "grad_bound": bound_grad, "result": "SKIP", "reason": None}
        backend = FORCED_BACKEND.get(name)
        if name == "xformers" and not importlib.util.find_spec("xformers"):
            entry["reason"] = "xformers is not installed"
        elif backend is not None:
            entry["reason"] = (_triton_skip(device, dtype) if backend == "triton"
                               else _backend.unavailable_reason(backend, OP, device, dtype))
        if entry["reason"] is None:
            f = {"two_sdpa": two_sdpa, "xformers": xformers_pair}.get(name, avfast_pair)
            ctx = _sdpa_context(device, shape.Dq, shape.Dv)[0] if name == "two_sdpa" else nullcontext
            try:
                with env_var("AVFAST_BACKEND", backend) if backend else nullcontext(), ctx():
                    out, grads = _eval(f, inputs, dout)
                entry["out_err"], entry["grad_err"] = _max_err([out], [want_out]), _max_err(grads, want_grads)
                ok = entry["out_err"] <= bound_out and entry["grad_err"] <= bound_grad
                entry["result"] = "PASS" if ok else "FAIL"
            except Exception as err:  # noqa: BLE001
                entry["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                entry["result"] = "SKIP" if name == "xformers" else "FAIL"  # third-party: may not run here
        entries.append(entry)
        if entry["out_err"] is not None:
            print(f"  {name:<18} {entry['out_err']:10.2e} {bound_out:10.2e} {entry['grad_err']:10.2e} "
                  f"{bound_grad:10.2e}  {entry['result']}")
        else:
            print(f"  {name:<18} {'':>10} {'':>10} {'':>10} {'':>10}  {entry['result']}: {entry['reason']}")
    passed = all(e["result"] != "FAIL" for e in entries)
    print(f"  check {'PASSED' if passed else 'FAILED'}", flush=True)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "shape": asdict(shape),
            "scale": SCALE, "results": entries, "passed": passed}


def _check_markdown(result: dict[str, Any]) -> str:
    lines = [f"## Kernel check ({'PASSED' if result['passed'] else 'FAILED'})", "",
             f"Output and input gradients vs the literal pair tensor in float64, {result['dtype']} on "
             f"{result['device']}, shape `{result['shape']}`; bound = 2x the error of the literal form in "
             f"{result['dtype']} + 10 ulp.", "",
             "| provider | out err | grad err | result |", "|---|---:|---:|---|"]
    for e in result["results"]:
        errs = [f"{e[k]:.2e}" if e[k] is not None else "-" for k in ("out_err", "grad_err")]
        why = f" ({e['reason']})" if e["reason"] else ""
        lines.append(f"| {e['provider']} | {errs[0]} | {errs[1]} | {e['result']}{why} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- run


def run(
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quick: bool = False,
    out_dir: str | os.PathLike | None = None,
    providers: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    level: str = "all",
) -> dict[str, Any]:
    """Runs the check and the benchmark; writes <out_dir>/av_pair_attention.{json,md,png}.

    device: default cuda when available, else cpu. dtype: default bfloat16 (float32 with
    ``quick``). quick: tiny shapes, few repetitions (the CPU smoke mode). out_dir: default
    benchmarks/results/<device-slug>[-quick]/. providers: names from OP_PROVIDERS /
    BLOCK_PROVIDERS (default all). cases: keep cases whose name contains one of these
    strings. level: "op", "block" or "all". With providers, cases or level given, the rows
    are merged into an existing JSON (same op, provider, mode and case replaced).
    Returns the payload written to the JSON.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float32 if quick else torch.bfloat16)
    known = {**OP_PROVIDERS, **BLOCK_PROVIDERS}
    unknown = [p for p in providers or () if p not in known]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; choose from {list(known)}")
    if level not in ("all", "op", "block"):
        raise ValueError(f"level must be 'all', 'op' or 'block', got {level!r}")
    ensure_triton_interpreter(device)
    env = env_info(device)
    slug = device_slug(env["gpu"])
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(slug, quick)
    hbm_label, hbm_bw = peak_hbm(env["gpu"])

    notes = []
    if device.type != "cuda":
        notes.append("CPU run: a smoke check of the kernels and the harness. These timings are NOT the GPU "
                     "benchmark (Triton runs interpreted, the CUDA kernel code serially on the host).")
    if quick:
        notes.append("--quick: tiny shapes and few repetitions" + (", one CPU thread." if device.type == "cpu" else "."))
    banner = "=" * 88
    print(banner)
    print(f"avfast bench pair-attention: {env['gpu']} ({device}), {str(dtype)[6:]}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}")
    for n in notes:
        print("NOTE: " + n)
    print(banner, flush=True)

    check_result = check(device, dtype)

    if device.type == "cuda":
        timing = Timing(warmup_calls=3, warmup_ms=10, rep_ms=30) if quick else Timing(3, 50, 200)
    else:
        timing = Timing(warmup_calls=1, cpu_reps=3) if quick else Timing(warmup_calls=2, cpu_reps=10)
    op_shapes = QUICK_OP_SHAPES if quick else GPU_OP_SHAPES
    block_shapes = QUICK_BLOCK_SHAPES if quick else GPU_BLOCK_SHAPES
    keep = lambda name: not cases or any(c in name for c in cases)  # noqa: E731
    op_names = [p for p in OP_PROVIDERS if not providers or p in providers]
    block_names = [p for p in BLOCK_PROVIDERS if not providers or p in providers]

    warm_device(device, dtype)
    case_list, results = [], []
    threads = torch.get_num_threads()
    if device.type == "cpu" and quick:
        torch.set_num_threads(1)  # tiny shapes: idle intra-op threads only add scheduler stalls
    try:
        if level in ("all", "op") and op_names:
            for s in filter(lambda s: keep(s.name), op_shapes):
                case, res = _run_op_case(s, op_names, device, dtype, timing, hbm_bw)
                case_list.append(case)
                results += res
        if level in ("all", "block") and block_names:
            for s in filter(lambda s: keep(s.name), block_shapes):
                case, res = _block_case(s, block_names, device, dtype, timing)
                case_list.append(case)
                results += res
    finally:
        torch.set_num_threads(threads)
        reset_compiled_state()

    def case_entry(c: Case) -> dict[str, Any]:
        entry = {"op": c.op, "name": c.name, "shape": c.shape, "hbm_bytes": c.hbm_bytes}
        if c.hbm_bytes:
            entry.update(hbm_bandwidth_label=hbm_label, hbm_bytes_per_s=hbm_bw,
                         hbm_floor_ms={m: b / hbm_bw * 1e3 for m, b in c.hbm_bytes.items()})
        return entry

    payload = {
        "metadata": {
            **env, "device": str(device), "device_slug": slug, "dtype": str(dtype).removeprefix("torch."),
            "quick": quick, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": asdict(timing), "scale": SCALE, "notes": notes,
            "providers": {**OP_PROVIDERS, **BLOCK_PROVIDERS},
        },
        "check": check_result,
        "cases": [case_entry(c) for c in case_list],
        "rows": [result_row(r, env) for r in results],
    }
    return write_results(payload, out_dir, RESULTS_STEM, f"{OP}: avfast vs plain PyTorch", _check_markdown(check_result),
                         device, merge=bool(providers or cases or level != "all"))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (``avfast bench pair-attention``); returns 1 when the kernel check fails."""
    parser = bench_parser(
        "avfast bench pair-attention",
        "Benchmark av_pair_attention and the dense fusion block against plain PyTorch peers "
        "(JSON + Markdown + PNG). On a machine without a GPU use --quick: a kernel check and a "
        "smoke run of the harness, not a benchmark.",
        [*OP_PROVIDERS, *BLOCK_PROVIDERS], "B64-Na96",
    )
    parser.add_argument("--level", default="all", choices=("all", "op", "block"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    payload = run(device=args.device, dtype=args.dtype, quick=args.quick, out_dir=args.out,
                  providers=split_list(args.providers), cases=split_list(args.cases), level=args.level)
    return 0 if payload["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
