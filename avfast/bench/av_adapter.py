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

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from avfast.bench.common import (
    Case,
    backend_env,
    backend_note,
    backend_skip,
    bench_main,
    bench_parser,
    build_payload,
    check_bound,
    check_markdown,
    check_providers,
    check_summary,
    element_size,
    keep_cases,
    make_step,
    max_err,
    measure_case,
    prepare_run,
    reset_compiled_state,
    run_cases,
    select,
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


def _step(f, module: AVAdapter, inputs: Sequence[torch.Tensor], douts, mode: str, cudagraphs: bool = False):
    """One timed call: f(*inputs) under no_grad (fwd), or autograd.grad of douts w.r.t. the
    inputs (tokens, gates) and every weight of ``module`` (fwd+bwd)."""
    return make_step(f, inputs, mode, leaves=[*inputs, *module.parameters()], dout=douts, cudagraphs=cudagraphs)


def _provider(module: AVAdapter, device: torch.device, dtype: torch.dtype, inputs, douts, name: str, mode: str):
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

        note = backend_note(BACKEND_OP, "", device, dtype) if ours else ""
        return build, (no_graphs if graphs else None), note, ("" if ours else None)
    backend = FORCED_BACKEND[name]
    return ((lambda: _step(module, module, inputs, douts, mode)), backend_skip(BACKEND_OP, backend, device, dtype),
            backend_note(BACKEND_OP, backend, device, dtype), backend)


def _run_case(s: AdapterShape, providers, device, dtype, timing, hbm_bw) -> tuple[Case, list]:
    case = Case(OP, s.name, asdict(s), hbm_bytes(s, element_size(dtype)))
    module, inputs, douts = _setup(s, device, dtype)
    results = measure_case(case, providers, PROVIDERS,
                           partial(_provider, module, device, dtype, inputs, douts),
                           device=device, dtype=dtype, timing=timing, hbm_bw=hbm_bw)
    del module, inputs, douts
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results


# --------------------------------------------------------------------------------- check


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
    bound_out = check_bound(plain_out, want_out, 10 * eps)
    bound_grad = check_bound(plain_grads, want_grads, 10 * eps)

    def errors(name: str) -> tuple[float, float]:
        f = (lambda *x: upstream_av_adapter(module, *x)) if name == "upstream_eager" else module
        with backend_env(FORCED_BACKEND.get(name) or None):
            out, grads = _eval(f, module, inputs, douts)
        return max_err(out, want_out), max_err(grads, want_grads)

    entries, passed = check_providers(
        f"check {OP} vs upstream's formulation in float64 ({device}, {str(dtype)[6:]}, {shape.name}):",
        providers, bound_out, bound_grad, lambda name: backend_skip(BACKEND_OP, FORCED_BACKEND.get(name), device, dtype),
        errors)
    return check_summary(device, dtype, shape, entries, passed, scale=SCALE)


def _check_markdown(result: dict[str, Any]) -> str:
    return check_markdown(
        result, "Check",
        f"Outputs and the gradients of s_v, s_a, gate_v, gate_a and the four Linear layers vs upstream's "
        f"formulation in float64, {result['dtype']} on {result['device']}, shape `{result['shape']}`; bound = "
        f"2x the error of upstream's formulation in {result['dtype']} + 10 ulp.")


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
    r = prepare_run("avfast bench av-adapter", device, dtype, quick, out_dir, providers, PROVIDERS, notes=[
        "One AV-Adapter placement (both modalities), batch-first tokens, every tensor in the benchmark dtype, "
        "gates (1,), unscaled softmax as upstream; fwd+bwd is the gradient w.r.t. the tokens, the gates and "
        "the four Linear layers."], cpu_detail="Triton runs interpreted, the CUDA kernel code serially on the host")
    check_result = check(r.device, r.dtype)

    names = select(PROVIDERS, providers)
    case_list, results = run_cases(r, [lambda s=s: _run_case(s, names, r.device, r.dtype, r.timing, r.hbm_bw)
                                       for s in keep_cases(QUICK_SHAPES if quick else GPU_SHAPES, cases)])
    payload = build_payload(r, check_result, case_list, results, PROVIDERS, metadata={"scale": SCALE})
    return write_results(payload, r.out_dir, RESULTS_STEM, "AV-Adapter (STG-CMA): avfast vs plain PyTorch",
                         _check_markdown(check_result), r.device, merge=bool(providers or cases))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (``avfast bench av-adapter``); returns 1 when the check fails."""
    parser = bench_parser(
        "avfast bench av-adapter",
        "Benchmark STG-CMA's AV-Adapter (one placement, both modalities) on avfast.ops.av_adapter_attention "
        "against plain PyTorch peers (JSON + Markdown + PNG). On a machine without a GPU use --quick: a check "
        "against upstream's formulation and a smoke run of the harness, not a benchmark.",
        PROVIDERS, "N20-Lv197",
    )
    return bench_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
