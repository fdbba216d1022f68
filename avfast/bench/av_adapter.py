"""Benchmark: STG-CMA's AV-Adapter, one placement, both modalities.

Inputs: the frozen sublayer outputs s_v (N, Lv, D), s_a (N, La, D) of N = B*T frames
(batch-first), the two bottlenecks D -> r -> D (GELU), the block's gates gate_v, gate_a
(1,), unscaled softmax as upstream; random non-zero weights and gates, every tensor in the
benchmark dtype. Output (fc2_v(h_v'), fc2_a(h_a')); fwd+bwd differentiates w.r.t. s_v,
s_a, the four Linear layers and both gates. Providers (same inputs and weights):

  upstream_eager        upstream's formulation in plain PyTorch: fc1 + GELU, the two
                        attentions written out (avfast.reference av_adapter_attention_literal:
                        bmm, softmax, bmm in each direction), gates, fc2
  upstream_compiled     the same under torch.compile
  upstream_cudagraphs   the same under torch.compile(mode="reduce-overhead") (CUDA graphs)
  avfast_triton         avfast.nn.AVAdapter (avfast.ops.av_adapter_attention), AVFAST_BACKEND=triton
  avfast_cuda           the same with AVFAST_BACKEND=cuda (avfast._C)
  avfast_cudagraphs     avfast.nn.AVAdapter (automatic backend) under reduce-overhead, fullgraph

Each case runs fwd (under torch.no_grad) and fwd+bwd (torch.autograd.grad of a random
output gradient). Before timing, a check compares the outputs and all gradients of every
available backend with upstream's formulation in float64.

Usage: ``python -m avfast.bench.av_adapter [--quick] [--device cpu]`` or
``python benchmarks/bench_av_adapter.py``; results go to
benchmarks/results/<device-slug>/av_adapter.{json,md,png}.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from avfast import _backend
from avfast.bench.common import (
    DTYPES,
    MODES,
    Case,
    Timing,
    auto_backend_note,
    bench_parser,
    default_out_dir,
    device_slug,
    ensure_triton_interpreter,
    env_info,
    env_var,
    late_interpreter,
    peak_hbm,
    print_row,
    reset_compiled_state,
    result_row,
    run_provider,
    split_list,
    warm_device,
    write_results,
)
from avfast.nn.adapters import AVAdapter
from avfast.reference.av_adapter_attention import av_adapter_attention_literal

OP = "av_adapter"
BACKEND_OP = "av_adapter_attention"  # the op inside, as named in avfast._backend
RESULTS_STEM = "av_adapter"
SCALE = None  # upstream: unscaled softmax

# provider -> kind (plain: PyTorch peer; avfast)
PROVIDERS = {
    "upstream_eager": "plain",
    "upstream_compiled": "plain",
    "upstream_cudagraphs": "plain",
    "avfast_triton": "avfast",
    "avfast_cuda": "avfast",
    "avfast_cudagraphs": "avfast",
}
CHECK_PROVIDERS = ("upstream_eager", "avfast_reference", "avfast_triton", "avfast_cuda")
FORCED_BACKEND = {"avfast_reference": "reference", "avfast_triton": "triton", "avfast_cuda": "cuda"}


@dataclass(frozen=True)
class AdapterShape:
    N: int  # frames, B*T
    Lv: int
    La: int
    D: int
    r: int

    @property
    def name(self) -> str:
        return f"N{self.N}-Lv{self.Lv}-La{self.La}-D{self.D}-r{self.r}"


# STG-CMA on AVE (T = 10 one-second segments per clip): 2 clips (N=20) and 16 clips
# (N=160); ViT-B/16 (197 visual, 49 audio tokens, D=768, r=48) and ViT-L/14 (257, 64, 1024, 64).
GPU_SHAPES = (
    AdapterShape(20, 197, 49, 768, 48),
    AdapterShape(20, 257, 64, 1024, 64),
    AdapterShape(160, 197, 49, 768, 48),
)
QUICK_SHAPES = (AdapterShape(2, 9, 5, 32, 4), AdapterShape(3, 7, 1, 24, 3))
CHECK_SHAPE = AdapterShape(3, 13, 6, 40, 5)


def hbm_bytes(s: AdapterShape, elem: int) -> dict[str, int]:
    """Bytes that must cross HBM at least once (perfect fusion: the (N, L, r) hidden
    tokens stay on chip and are recomputed in the backward; the gates ignored), for
    floor_ms = bytes / peak_bytes_per_s * 1e3:

        tokens  = s_v + s_a = N*(Lv+La)*D          (the outputs have the same size)
        weights = 2 * (D*r + r + r*D + D)           (fc1 and fc2 of both modalities)
        fwd     = tokens (read) + weights (read) + outputs (written)       = 2 tokens + weights
        bwd     = tokens, dout, weights (read) + d tokens, d weights (written) = 3 tokens + 2 weights
        fwd+bwd = 5 tokens + 3 weights
    all times the element size.
    """
    tokens = s.N * (s.Lv + s.La) * s.D
    weights = 2 * (2 * s.D * s.r + s.r + s.D)
    return {"fwd": elem * (2 * tokens + weights), "fwd+bwd": elem * (5 * tokens + 3 * weights)}


# ----------------------------------------------------------------------------- providers


def upstream_av_adapter(module: AVAdapter, s_v: torch.Tensor, s_a: torch.Tensor, gate_v: torch.Tensor,
                        gate_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's formulation with ``module``'s weights: GELU(fc1), the literal two-way
    attention, fc2; batch-first."""
    h_v = module.visual.act(module.visual.D_fc1(s_v))
    h_a = module.audio.act(module.audio.D_fc1(s_a))
    h_a, h_v = av_adapter_attention_literal(h_a, h_v, gate_a, gate_v, scale=SCALE)
    return module.visual.D_fc2(h_v), module.audio.D_fc2(h_a)


def _setup(s: AdapterShape, device, dtype, seed: int = 0):
    """(module, [s_v, s_a, gate_v, gate_a] leaves, douts): random non-zero weights
    (fan_in^-1/2) and gates, so that every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    module = AVAdapter(s.D, s.r, scale=SCALE)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    module.to(device=device, dtype=dtype)

    def rand(*size, std=1.0):
        return (torch.randn(*size, generator=g) * std).to(device=device, dtype=dtype)

    leaves = [rand(s.N, s.Lv, s.D), rand(s.N, s.La, s.D), rand(1, std=0.5), rand(1, std=0.5)]
    douts = [rand(s.N, s.Lv, s.D), rand(s.N, s.La, s.D)]
    return module, [t.requires_grad_() for t in leaves], douts


def _step(f: Callable, module: AVAdapter, inputs: Sequence[torch.Tensor], douts, mode: str,
          cudagraphs: bool = False) -> Callable[[], Any]:
    """One timed call: f(*inputs) under no_grad (fwd), or autograd.grad of douts w.r.t. the
    inputs (tokens, gates) and every weight of ``module`` (fwd+bwd)."""
    leaves = [*inputs, *module.parameters()]
    mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
    if mode == "fwd":
        def step():
            mark()
            with torch.no_grad():
                return f(*inputs)
    else:
        def step():
            mark()
            return torch.autograd.grad(f(*inputs), leaves, douts)
    return step


def _triton_skip(device: torch.device, dtype: torch.dtype) -> str | None:
    reason = _backend.unavailable_reason("triton", BACKEND_OP, device, dtype)
    if reason is None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the interpreter is not a benchmark (export TRITON_INTERPRET=0)"
    if reason is None and device.type == "cpu":
        return late_interpreter()
    return reason


def _backend_skip(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if backend == "triton":
        return _triton_skip(device, dtype)
    return _backend.unavailable_reason(backend, BACKEND_OP, device, dtype) if backend else None


def _backend_note(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if not backend:
        return auto_backend_note(BACKEND_OP, device, dtype)
    if device.type == "cpu" and backend == "triton":
        return "Triton interpreter"
    if device.type == "cpu" and backend == "cuda":
        return "CUDA kernel code run serially on the host"
    return ""


def _provider(name: str, module: AVAdapter, device: torch.device, dtype: torch.dtype, inputs, douts, mode: str):
    """(build, skip reason, note, forced AVFAST_BACKEND) for one provider."""
    no_graphs = None if device.type == "cuda" else "CUDA graphs need a CUDA device"
    upstream = lambda *x: upstream_av_adapter(module, *x)  # noqa: E731
    if name == "upstream_eager":
        return (lambda: _step(upstream, module, inputs, douts, mode)), None, "", None
    if name in ("upstream_compiled", "upstream_cudagraphs", "avfast_cudagraphs"):
        graphs = name.endswith("cudagraphs")
        ours = name.startswith("avfast")
        kwargs = {"mode": "reduce-overhead"} if graphs else {}
        if ours:
            kwargs["fullgraph"] = True

        def build():
            reset_compiled_state()
            f = torch.compile(module if ours else upstream, dynamic=False, **kwargs)
            return _step(f, module, inputs, douts, mode, graphs)

        note = _backend_note("", device, dtype) if ours else ""
        return build, (no_graphs if graphs else None), note, ("" if ours else None)
    backend = FORCED_BACKEND[name]
    return ((lambda: _step(module, module, inputs, douts, mode)), _backend_skip(backend, device, dtype),
            _backend_note(backend, device, dtype), backend)


def _run_case(s: AdapterShape, providers, device, dtype, timing, hbm_bw) -> tuple[Case, list]:
    elem = torch.empty((), dtype=dtype).element_size()
    case = Case(OP, s.name, asdict(s), hbm_bytes(s, elem))
    module, inputs, douts = _setup(s, device, dtype)
    results = []
    for name in providers:
        for mode in MODES:
            build, skip, note, forced = _provider(name, module, device, dtype, inputs, douts, mode)
            # forced: a backend name to set, "" to unset (automatic choice), None to leave as is
            env = env_var("AVFAST_BACKEND", forced or None) if forced is not None else nullcontext()
            with env:
                results.append(run_provider(case, name, PROVIDERS[name], mode, build, device=device,
                                            dtype=dtype, timing=timing, skip=skip, note=note, hbm_bw=hbm_bw))
            print_row(result_row(results[-1], {}))
    del module, inputs, douts
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results


# --------------------------------------------------------------------------------- check


def _max_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))


def _eval(f, module, inputs, douts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out = f(*inputs)
    grads = torch.autograd.grad(out, [*inputs, *module.parameters()], douts)
    return [o.detach() for o in out], [g.detach() for g in grads]


def check(device: torch.device, dtype: torch.dtype, providers: Sequence[str] = CHECK_PROVIDERS,
          shape: AdapterShape = CHECK_SHAPE) -> dict[str, Any]:
    """Outputs and the gradients of s_v, s_a, both gates and every weight of each available
    provider against upstream's formulation in float64. Bound: 2x the error of upstream's
    formulation in ``dtype`` plus 10 ulp of ``dtype`` at the reference's magnitude."""
    device = torch.device(device)
    module64, inputs64, douts64 = _setup(shape, device, torch.float64, seed=123)
    want_out, want_grads = _eval(lambda *x: upstream_av_adapter(module64, *x), module64, inputs64, douts64)
    module = AVAdapter(shape.D, shape.r, scale=SCALE).to(device=device, dtype=dtype)
    module.load_state_dict(module64.state_dict())
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    douts = [t.to(dtype) for t in douts64]
    plain_out, plain_grads = _eval(lambda *x: upstream_av_adapter(module, *x), module, inputs, douts)
    eps = torch.finfo(dtype).eps
    mag_out = max(1.0, max(float(t.abs().max()) for t in want_out))
    mag_grad = max(1.0, max(float(t.abs().max()) for t in want_grads))
    bound_out = 2 * _max_err(plain_out, want_out) + 10 * eps * mag_out
    bound_grad = 2 * _max_err(plain_grads, want_grads) + 10 * eps * mag_grad
    print(f"check {OP} vs upstream's formulation in float64 ({device}, {str(dtype)[6:]}, {shape.name}):")
    print(f"  {'provider':<18} {'out err':>10} {'bound':>10} {'grad err':>10} {'bound':>10}  result")
    entries = []
    for name in providers:
        entry = {"provider": name, "out_err": None, "grad_err": None,
                 "out_bound": bound_out, "grad_bound": bound_grad, "result": "SKIP", "reason": None}
        backend = FORCED_BACKEND.get(name)
        if backend is not None:
            entry["reason"] = _backend_skip(backend, device, dtype)
        if entry["reason"] is None:
            f = (lambda *x: upstream_av_adapter(module, *x)) if name == "upstream_eager" else module
            try:
                with env_var("AVFAST_BACKEND", backend) if backend else nullcontext():
                    out, grads = _eval(f, module, inputs, douts)
                entry["out_err"], entry["grad_err"] = _max_err(out, want_out), _max_err(grads, want_grads)
                ok = entry["out_err"] <= bound_out and entry["grad_err"] <= bound_grad
                entry["result"] = "PASS" if ok else "FAIL"
            except Exception as err:  # noqa: BLE001
                entry["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                entry["result"] = "FAIL"
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
    lines = [f"## Check ({'PASSED' if result['passed'] else 'FAILED'})", "",
             f"Outputs and the gradients of s_v, s_a, gate_v, gate_a and the four Linear layers vs upstream's "
             f"formulation in float64, {result['dtype']} on {result['device']}, shape `{result['shape']}`; bound = "
             f"2x the error of upstream's formulation in {result['dtype']} + 10 ulp.", "",
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
) -> dict[str, Any]:
    """Runs the check and the benchmark; writes <out_dir>/av_adapter.{json,md,png}.

    device: default cuda when available, else cpu. dtype: default bfloat16 (float32 with
    ``quick``). quick: tiny shapes, few repetitions (the CPU smoke mode). out_dir: default
    benchmarks/results/<device-slug>[-quick]/. providers: names from PROVIDERS (default
    all). cases: keep cases whose name contains one of these strings. With providers or
    cases given, the rows are merged into an existing JSON. Returns the payload written.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float32 if quick else torch.bfloat16)
    unknown = [p for p in providers or () if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    ensure_triton_interpreter(device)
    env = env_info(device)
    slug = device_slug(env["gpu"])
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(slug, quick)
    hbm_label, hbm_bw = peak_hbm(env["gpu"])

    notes = ["One AV-Adapter placement (both modalities), batch-first tokens, every tensor in the benchmark dtype, "
             "gates (1,), unscaled softmax as upstream; fwd+bwd is the gradient w.r.t. the tokens, the gates and "
             "the four Linear layers."]
    if device.type != "cuda":
        notes.append("CPU run: a smoke check of the kernels and the harness. These timings are NOT the GPU "
                     "benchmark (Triton runs interpreted, the CUDA kernel code serially on the host).")
    if quick:
        notes.append("--quick: tiny shapes and few repetitions"
                     + (", one CPU thread." if device.type == "cpu" else "."))
    banner = "=" * 88
    print(banner)
    print(f"avfast bench av-adapter: {env['gpu']} ({device}), {str(dtype)[6:]}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}")
    for n in notes:
        print("NOTE: " + n)
    print(banner, flush=True)

    check_result = check(device, dtype)

    if device.type == "cuda":
        timing = Timing(warmup_calls=3, warmup_ms=10, rep_ms=30) if quick else Timing(3, 50, 200)
    else:
        timing = Timing(warmup_calls=1, cpu_reps=3) if quick else Timing(warmup_calls=2, cpu_reps=10)
    shapes = [s for s in (QUICK_SHAPES if quick else GPU_SHAPES) if not cases or any(c in s.name for c in cases)]
    names = [p for p in PROVIDERS if not providers or p in providers]

    warm_device(device, dtype)
    case_list, results = [], []
    threads = torch.get_num_threads()
    if device.type == "cpu" and quick:
        torch.set_num_threads(1)  # tiny shapes: idle intra-op threads only add scheduler stalls
    try:
        for s in shapes:
            case, res = _run_case(s, names, device, dtype, timing, hbm_bw)
            case_list.append(case)
            results += res
    finally:
        torch.set_num_threads(threads)
        reset_compiled_state()

    def case_entry(c: Case) -> dict[str, Any]:
        return {"op": c.op, "name": c.name, "shape": c.shape, "hbm_bytes": c.hbm_bytes,
                "hbm_bandwidth_label": hbm_label, "hbm_bytes_per_s": hbm_bw,
                "hbm_floor_ms": {m: b / hbm_bw * 1e3 for m, b in c.hbm_bytes.items()}}

    payload = {
        "metadata": {
            **env, "device": str(device), "device_slug": slug, "dtype": str(dtype).removeprefix("torch."),
            "quick": quick, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": asdict(timing), "scale": SCALE, "notes": notes, "providers": PROVIDERS,
        },
        "check": check_result,
        "cases": [case_entry(c) for c in case_list],
        "rows": [result_row(r, env) for r in results],
    }
    return write_results(payload, out_dir, RESULTS_STEM, "AV-Adapter (STG-CMA): avfast vs plain PyTorch",
                         _check_markdown(check_result), device, merge=bool(providers or cases))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (``avfast bench av-adapter``); returns 1 when the check fails."""
    parser = bench_parser(
        "avfast bench av-adapter",
        "Benchmark STG-CMA's AV-Adapter (one placement, both modalities) on avfast.ops.av_adapter_attention "
        "against plain PyTorch peers (JSON + Markdown + PNG). On a machine without a GPU use --quick: a check "
        "against upstream's formulation and a smoke run of the harness, not a benchmark.",
        PROVIDERS, "N20-Lv197",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    payload = run(device=args.device, dtype=args.dtype, quick=args.quick, out_dir=args.out,
                  providers=split_list(args.providers), cases=split_list(args.cases))
    return 0 if payload["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
