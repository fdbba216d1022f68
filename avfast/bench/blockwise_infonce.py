"""Benchmark: MA-AVT's blockwise contrastive loss (all K blocks, both directions).

Inputs: unnormalized features z_a, z_v (K, B, d), all samples valid (foreground),
tau = 0.07, loss = mean over blocks; fwd+bwd differentiates w.r.t. z_a and z_v.
Providers (all on the same inputs):

  upstream_eager        upstream's formulation: per block F.normalize, the (B, B) logits,
                        two F.cross_entropy (v->a and a->v), mean over blocks
  upstream_compiled     the same under torch.compile
  upstream_cudagraphs   the same under torch.compile(mode="reduce-overhead") (CUDA graphs)
  inf_cl                Inf-CL's cal_inf_loss (tiled Triton InfoNCE) per block and direction,
                        on normalized features, when the ``inf_cl`` package is installed
  avfast_triton         avfast.ops.blockwise_infonce, AVFAST_BACKEND=triton
  avfast_auto           avfast.ops.blockwise_infonce, automatic backend
  avfast_cudagraphs     avfast.ops.blockwise_infonce (automatic) under reduce-overhead

Each case runs fwd (under torch.no_grad) and fwd+bwd (torch.autograd.grad of the loss).
Before timing, a check compares the loss and both feature gradients of every available
provider, with background samples and reduction="none", against the reference in float64.

Usage: ``python -m avfast.bench.blockwise_infonce [--quick] [--device cpu]`` or
``python benchmarks/bench_blockwise_infonce.py``; results go to
benchmarks/results/<device-slug>/blockwise_infonce.{json,md,png}.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
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
    peak_lookup,
    prepare_run,
    reset_compiled_state,
    run_cases,
    select,
    write_results,
)
from avfast.ops import blockwise_infonce
from avfast.reference.blockwise_infonce import blockwise_infonce as reference_infonce

OP = "blockwise_infonce"
BACKEND_OP = "cosine_lse"  # the op family name in avfast._backend
RESULTS_STEM = "blockwise_infonce"
TAU = 0.07  # upstream's fixed temperature

# provider -> kind (plain: PyTorch peer; avfast; other: third-party kernels)
PROVIDERS = {
    "upstream_eager": "plain",
    "upstream_compiled": "plain",
    "upstream_cudagraphs": "plain",
    "inf_cl": "other",
    "avfast_triton": "avfast",
    "avfast_auto": "avfast",
    "avfast_cudagraphs": "avfast",
}
CHECK_PROVIDERS = ("upstream_eager", "inf_cl", "avfast_reference", "avfast_triton", "avfast_auto")
FORCED_BACKEND = {"avfast_reference": "reference", "avfast_triton": "triton", "avfast_auto": ""}

# dense tensor-core peak (FLOP/s) for the matmul floor, by a substring of the device name
PEAK_MATMUL_FLOPS = (("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12))
DEFAULT_PEAK_MATMUL = ("H100 SXM (assumed)", 989e12)


@dataclass(frozen=True)
class LossShape:
    K: int
    B: int
    d: int

    @property
    def name(self) -> str:
        return f"K{self.K}-B{self.B}-d{self.d}"


# MA-AVT (12 blocks, batch 256 per GPU, 512-d projections / 768-d features, and a larger
# batch), then one block at large batch sizes (the Inf-CL regime).
GPU_SHAPES = (
    LossShape(12, 256, 512),
    LossShape(12, 256, 768),
    LossShape(12, 1024, 768),
    LossShape(1, 16384, 768),
    LossShape(1, 65536, 768),
    LossShape(1, 262144, 768),
)
QUICK_SHAPES = (LossShape(3, 8, 16), LossShape(1, 33, 24))
CHECK_SHAPE = LossShape(3, 37, 40)
CHECK_INVALID = (0, 5, 6, 20, 36)  # background samples in the check


def hbm_bytes(s: LossShape, elem: int) -> dict[str, int]:
    """Bytes that must cross HBM at least once (perfect fusion; the (K, B) log-sum-exps
    and the loss ignored), for floor_ms = bytes / peak_bytes_per_s * 1e3:

        inputs  = z_a + z_v = 2 * K*B*d
        fwd     = inputs (read)
        bwd     = inputs (read again) + their gradients (written) = 2 * inputs
        fwd+bwd = 3 * inputs
    all times the element size.
    """
    inputs = 2 * s.K * s.B * s.d
    return {"fwd": elem * inputs, "fwd+bwd": elem * 3 * inputs}


def matmul_flops(s: LossShape) -> dict[str, int]:
    """Multiply-add FLOPs of the similarity products, counted 2 per multiply-add:

        fwd     = S = V A^T per block, once for both directions      = 2 K B^2 d
        bwd     = S recomputed + dV = dS A + dA = dS^T V               = 6 K B^2 d
        fwd+bwd = 8 K B^2 d
    """
    one = 2 * s.K * s.B * s.B * s.d
    return {"fwd": one, "fwd+bwd": 4 * one}


def peak_matmul(name: str) -> tuple[str, float]:
    return peak_lookup(name, PEAK_MATMUL_FLOPS, DEFAULT_PEAK_MATMUL)


# ----------------------------------------------------------------------------- providers


def upstream_loss(z_a: torch.Tensor, z_v: torch.Tensor, valid: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Upstream's formulation, block by block, in the inputs' dtype: drop background
    samples, normalize, (B, B) logits / tau, cross-entropy both ways."""
    losses = []
    for a, v in zip(z_a.unbind(0), z_v.unbind(0)):
        if valid is not None:
            a, v = a[valid], v[valid]
        logits = nnf.normalize(v, dim=-1) @ nnf.normalize(a, dim=-1).T / TAU
        target = torch.arange(logits.shape[0], device=logits.device)
        losses.append((nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)) / 2)
    per_block = torch.stack(losses)
    return per_block if reduction == "none" else per_block.mean()


def inf_cl_loss(z_a: torch.Tensor, z_v: torch.Tensor, valid: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    """Inf-CL's tiled InfoNCE (one direction per call) on normalized features."""
    from inf_cl import cal_inf_loss

    scale = torch.tensor(1.0 / TAU, device=z_a.device, dtype=torch.float32)
    losses = []
    for a, v in zip(z_a.unbind(0), z_v.unbind(0)):
        if valid is not None:
            a, v = a[valid], v[valid]
        a, v = nnf.normalize(a, dim=-1), nnf.normalize(v, dim=-1)
        losses.append((cal_inf_loss(v, a, scale=scale) + cal_inf_loss(a, v, scale=scale)) / 2)
    per_block = torch.stack(losses)
    return per_block if reduction == "none" else per_block.mean()


def avfast_loss(z_a: torch.Tensor, z_v: torch.Tensor, valid: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    return blockwise_infonce(z_a, z_v, valid=valid, tau=TAU, reduction=reduction)


def _inputs(s: LossShape, device, dtype, seed: int = 0) -> list[torch.Tensor]:
    """[z_a, z_v] (K, B, d), leaves with requires_grad; z_v correlated with z_a."""
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(s.K, s.B, s.d, generator=g)
    z_v = z_a + torch.randn(s.K, s.B, s.d, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (z_a, z_v)]


def _inf_cl_skip(device: torch.device) -> str | None:
    if importlib.util.find_spec("inf_cl") is None:
        return "inf_cl is not installed"
    if device.type != "cuda":
        return "Inf-CL's Triton kernels need a CUDA device"
    return None


def _provider(device: torch.device, dtype: torch.dtype, inputs, name: str, mode: str):
    """(build, skip reason, note, forced AVFAST_BACKEND) for one provider."""
    no_graphs = None if device.type == "cuda" else "CUDA graphs need a CUDA device"
    if name == "upstream_eager":
        return (lambda: make_step(upstream_loss, inputs, mode)), None, "", None
    if name in ("upstream_compiled", "upstream_cudagraphs", "avfast_cudagraphs"):
        graphs = name.endswith("cudagraphs")
        f = avfast_loss if name.startswith("avfast") else upstream_loss
        kwargs = {"mode": "reduce-overhead"} if graphs else {}
        if name.startswith("avfast"):
            kwargs["fullgraph"] = True

        def build():
            reset_compiled_state()
            return make_step(torch.compile(f, dynamic=False, **kwargs), inputs, mode, cudagraphs=graphs)

        note = backend_note(BACKEND_OP, None, device, dtype) if name.startswith("avfast") else ""
        forced = "" if name.startswith("avfast") else None
        return build, (no_graphs if graphs else None), note, forced
    if name == "inf_cl":
        return (lambda: make_step(inf_cl_loss, inputs, mode)), _inf_cl_skip(device), "", None
    backend = FORCED_BACKEND[name]
    return ((lambda: make_step(avfast_loss, inputs, mode)), backend_skip(BACKEND_OP, backend, device, dtype),
            backend_note(BACKEND_OP, backend, device, dtype), backend)


def _run_case(s: LossShape, providers, device, dtype, timing, hbm_bw) -> tuple[Case, list]:
    case = Case(OP, s.name, asdict(s), hbm_bytes(s, element_size(dtype)))
    inputs = _inputs(s, device, dtype)
    results = measure_case(case, providers, PROVIDERS, partial(_provider, device, dtype, inputs),
                           device=device, dtype=dtype, timing=timing, hbm_bw=hbm_bw)
    del inputs
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results


# --------------------------------------------------------------------------------- check


def _reference_loss(z_a, z_v, valid=None, reduction="mean"):
    return reference_infonce(z_a, z_v, valid=valid, tau=TAU, reduction=reduction)


def _eval(f, inputs, valid, dout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = f(*inputs, valid=valid, reduction="none")
    grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check(device: torch.device, dtype: torch.dtype, providers: Sequence[str] = CHECK_PROVIDERS,
          shape: LossShape = CHECK_SHAPE) -> dict[str, Any]:
    """Per-block losses (reduction="none", random output gradient) and both feature
    gradients of every available provider, with background samples, against
    avfast.reference's literal loss in float64. Bound: 2x the error of upstream's
    formulation in ``dtype`` plus 10 ulp of ``dtype`` at the reference's magnitude, plus
    the float32 recompute term of the logits (4 eps32 / tau, relative)."""
    device = torch.device(device)
    inputs64 = [t.detach() for t in _inputs(shape, device, torch.float64, seed=123)]
    valid = torch.ones(shape.B, dtype=torch.bool, device=device)
    valid[list(CHECK_INVALID)] = False
    dout = torch.rand(shape.K, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    want_out, want_grads = _eval(_reference_loss, leaves64, valid, dout)
    inputs = [t.to(dtype).requires_grad_() for t in inputs64]
    plain_out, plain_grads = _eval(upstream_loss, inputs, valid, dout)
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    bound_out = check_bound([plain_out], [want_out], 10 * eps + 4 * eps32 / TAU)
    bound_grad = check_bound(plain_grads, want_grads, 10 * eps + 4 * eps32 / TAU)

    def reason(name: str) -> str | None:
        if name == "inf_cl":
            return _inf_cl_skip(device)
        return backend_skip(BACKEND_OP, FORCED_BACKEND.get(name), device, dtype)

    def errors(name: str) -> tuple[float, float]:
        f = {"upstream_eager": upstream_loss, "inf_cl": inf_cl_loss}.get(name, avfast_loss)
        with backend_env(FORCED_BACKEND.get(name)):
            out, grads = _eval(f, inputs, valid, dout)
        return max_err([out], [want_out]), max_err(grads, want_grads)

    entries, passed = check_providers(
        f"check {OP} vs the reference in float64 ({device}, {str(dtype)[6:]}, {shape.name}, "
        f"{len(CHECK_INVALID)} background samples):",
        providers, bound_out, bound_grad, reason, errors, third_party=("inf_cl",))
    return check_summary(device, dtype, shape, entries, passed, invalid=list(CHECK_INVALID), tau=TAU)


def _check_markdown(result: dict[str, Any]) -> str:
    return check_markdown(
        result, "Check",
        f"Per-block losses and the gradients of z_a, z_v vs avfast.reference in float64, {result['dtype']} "
        f"on {result['device']}, shape `{result['shape']}`, background samples {result['invalid']}; bound = "
        f"2x the error of upstream's formulation in {result['dtype']} + 10 ulp + the float32 logit term.",
        out_label="loss err")


def _floor_markdown(cases: Sequence[dict[str, Any]]) -> str:
    lines = ["## Floors", "",
             "HBM: inputs read (fwd), inputs read twice + gradients written (fwd+bwd). Matmul: 2 K B^2 d "
             "(fwd), 8 K B^2 d (fwd+bwd) at the dense tensor-core peak (bf16/fp16; TF32 half of it).", "",
             "| case | fwd HBM µs | fwd+bwd HBM µs | fwd matmul ms | fwd+bwd matmul ms |",
             "|---|---:|---:|---:|---:|"]
    for c in cases:
        hbm, mm = c.get("hbm_floor_ms", {}), c.get("matmul_floor_ms", {})
        lines.append(f"| {c['name']} | {hbm.get('fwd', 0) * 1e3:.3g} | {hbm.get('fwd+bwd', 0) * 1e3:.3g} | "
                     f"{mm.get('fwd', 0):.3g} | {mm.get('fwd+bwd', 0):.3g} |")
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
    """Runs the check and the benchmark; writes <out_dir>/blockwise_infonce.{json,md,png}.

    device: default cuda when available, else cpu. dtype: default bfloat16 (float32 with
    ``quick``). quick: tiny shapes, few repetitions (the CPU smoke mode). out_dir: default
    benchmarks/results/<device-slug>[-quick]/. providers: names from PROVIDERS (default
    all). cases: keep cases whose name contains one of these strings. With providers or
    cases given, the rows are merged into an existing JSON. Returns the payload written.
    """
    r = prepare_run("avfast bench blockwise-infonce", device, dtype, quick, out_dir, providers, PROVIDERS, notes=[
        "All samples valid (no background) in the timed cases; tau = 0.07; loss = mean over blocks; "
        "fwd+bwd is the gradient of that scalar loss w.r.t. z_a and z_v."])
    mm_label, mm_flops = peak_matmul(r.env["gpu"])
    if r.dtype == torch.float32:
        mm_flops /= 2  # TF32
    check_result = check(r.device, r.dtype)

    names = select(PROVIDERS, providers)
    case_list, results = run_cases(r, [lambda s=s: _run_case(s, names, r.device, r.dtype, r.timing, r.hbm_bw)
                                       for s in keep_cases(QUICK_SHAPES if quick else GPU_SHAPES, cases)])

    def matmul_entry(c: Case) -> dict[str, Any]:
        flops = matmul_flops(LossShape(**c.shape))
        return {"matmul_flops": flops, "matmul_peak_label": mm_label, "matmul_flops_per_s": mm_flops,
                "matmul_floor_ms": {m: f / mm_flops * 1e3 for m, f in flops.items()}}

    payload = build_payload(r, check_result, case_list, results, PROVIDERS, metadata={"tau": TAU},
                            extra_case=matmul_entry)
    return write_results(payload, r.out_dir, RESULTS_STEM, f"{OP}: avfast vs plain PyTorch",
                         _floor_markdown(payload["cases"]) + "\n" + _check_markdown(check_result),
                         r.device, merge=bool(providers or cases))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns 1 when the check fails."""
    parser = bench_parser(
        "avfast bench blockwise-infonce",
        "Benchmark the blockwise contrastive loss (MA-AVT) against plain PyTorch peers and Inf-CL "
        "(JSON + Markdown + PNG). On a machine without a GPU use --quick: a check against the "
        "reference and a smoke run of the harness, not a benchmark.",
        PROVIDERS, "K12-B256",
    )
    return bench_main(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
