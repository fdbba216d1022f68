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

import importlib.util
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as nnf

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


def _op_provider(name: str, s: PairShape, device, dtype, inputs, dout, mode):
    """(build, skip reason, note, forced AVFAST_BACKEND) for one op-level provider."""
    cuda = device.type == "cuda"
    no_graphs = None if cuda else "CUDA graphs need a CUDA device"
    if name == "literal":
        return (lambda: make_step(literal, inputs, mode, dout=dout)), None, "", None
    if name.startswith("two_sdpa"):
        ctx, note = _sdpa_context(device, s.Dq, s.Dv)
        chosen = _sdpa_choice(ctx, *inputs[:3])
        note = f"{note} ({chosen})" if chosen else note
        if name == "two_sdpa":
            return (lambda: make_step(two_sdpa, inputs, mode, dout=dout, ctx=ctx)), None, note, None
        graphs = name == "two_sdpa_cudagraphs"
        kwargs = {"mode": "reduce-overhead"} if graphs else {}

        def build():
            reset_compiled_state()
            f = torch.compile(two_sdpa, dynamic=False, **kwargs)
            return make_step(f, inputs, mode, dout=dout, ctx=ctx, cudagraphs=graphs)

        return build, (no_graphs if graphs else None), note, None
    if name == "xformers":
        skip = None if importlib.util.find_spec("xformers") else "xformers is not installed"
        return (lambda: make_step(xformers_pair, inputs, mode, dout=dout)), skip, "", None
    if name == "avfast_cudagraphs":
        def build():
            reset_compiled_state()
            f = torch.compile(avfast_pair, mode="reduce-overhead", dynamic=False, fullgraph=True)
            return make_step(f, inputs, mode, dout=dout, cudagraphs=True)

        return build, no_graphs, backend_note(OP, None, device, dtype), ""
    backend = FORCED_BACKEND[name]
    return ((lambda: make_step(avfast_pair, inputs, mode, dout=dout)), backend_skip(OP, backend, device, dtype),
            backend_note(OP, backend, device, dtype), backend)


def _run_op_case(s: PairShape, providers, device, dtype, timing, hbm_bw) -> tuple[Case, list]:
    case = Case(OP, s.name, asdict(s), hbm_bytes(s, element_size(dtype)))
    inputs, dout = _pair_inputs(s, device, dtype)
    results = measure_case(case, providers, OP_PROVIDERS,
                           lambda name, mode: _op_provider(name, s, device, dtype, inputs, dout, mode),
                           device=device, dtype=dtype, timing=timing, hbm_bw=hbm_bw)
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results


# --------------------------------------------------------------------------------- check


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
    bound_out = check_bound([plain_out], [want_out], 10 * eps)
    bound_grad = check_bound(plain_grads, want_grads, 10 * eps)

    def reason(name: str) -> str | None:
        if name == "xformers" and not importlib.util.find_spec("xformers"):
            return "xformers is not installed"
        backend = FORCED_BACKEND.get(name)
        return backend_skip(OP, backend, device, dtype) if backend is not None else None

    def errors(name: str) -> tuple[float, float]:
        backend = FORCED_BACKEND.get(name)
        f = {"two_sdpa": two_sdpa, "xformers": xformers_pair}.get(name, avfast_pair)
        ctx = _sdpa_context(device, shape.Dq, shape.Dv)[0] if name == "two_sdpa" else nullcontext
        with backend_env(backend), ctx():
            out, grads = _eval(f, inputs, dout)
        return max_err([out], [want_out]), max_err(grads, want_grads)

    entries, passed = check_providers(
        f"check {OP} vs the literal pair tensor in float64 ({device}, {str(dtype)[6:]}, {shape.name}):",
        providers, bound_out, bound_grad, reason, errors, third_party=("xformers",))
    return check_summary(device, dtype, shape, entries, passed, scale=SCALE)


def _check_markdown(result: dict[str, Any]) -> str:
    return check_markdown(
        result, "Kernel check",
        f"Output and input gradients vs the literal pair tensor in float64, {result['dtype']} on "
        f"{result['device']}, shape `{result['shape']}`; bound = 2x the error of the literal form in "
        f"{result['dtype']} + 10 ulp.")


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
    known = {**OP_PROVIDERS, **BLOCK_PROVIDERS}

    def validate() -> None:
        if level not in ("all", "op", "block"):
            raise ValueError(f"level must be 'all', 'op' or 'block', got {level!r}")

    r = prepare_run("avfast bench pair-attention", device, dtype, quick, out_dir, providers, known, validate=validate,
                    cpu_detail="Triton runs interpreted, the CUDA kernel code serially on the host")
    check_result = check(r.device, r.dtype)

    op_names, block_names = select(OP_PROVIDERS, providers), select(BLOCK_PROVIDERS, providers)
    jobs = []
    if level in ("all", "op") and op_names:
        jobs += [lambda s=s: _run_op_case(s, op_names, r.device, r.dtype, r.timing, r.hbm_bw)
                 for s in keep_cases(QUICK_OP_SHAPES if quick else GPU_OP_SHAPES, cases)]
    if level in ("all", "block") and block_names:
        jobs += [lambda s=s: _block_case(s, block_names, r.device, r.dtype, r.timing)
                 for s in keep_cases(QUICK_BLOCK_SHAPES if quick else GPU_BLOCK_SHAPES, cases)]
    case_list, results = run_cases(r, jobs)

    payload = build_payload(r, check_result, case_list, results, known, metadata={"scale": SCALE})
    return write_results(payload, r.out_dir, RESULTS_STEM, f"{OP}: avfast vs plain PyTorch",
                         _check_markdown(check_result), r.device, merge=bool(providers or cases or level != "all"))


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
    return bench_main(parser, run, argv, extra=("level",))


if __name__ == "__main__":
    sys.exit(main())
