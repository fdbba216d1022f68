"""Static GPU-fitness gate: how each kernel would run on an H100 (sm_90) and an A100
(sm_80), measured without a GPU.

    avfast bench static [--out DIR] [--only OP] [--jobs N] [--no-cuda] [--quick]

For every op's cases (the methods' shapes) the Triton launchers run on CPU tensors with
their ``*_kernel`` JIT functions swapped for recorders, so the launcher's real choices
(grid, BLOCK_* constexprs, warps, stages, splits, panels) are captured. Each launch is
bound as Triton's JIT binds it (specialization, divisibility, dtypes) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90|80, 32)``; ptxas ``-v`` gives registers
and spills, ``cuobjdump -sass`` the tensor-core instructions (HGMMA, HMMA) against FFMA.
From those: CTAs per SM, SM waves (programs / SMs) and a roofline bound per launch,
max(HBM bytes, L2 operand bytes, tensor-core or FMA FLOPs, exps) over the GPU model's
rates divided by the fill of the last wave. The CUDA C++ kernels of csrc/ are compiled
with nvcc for sm_90 (``-Xptxas -v``, ``cuobjdump -sass``) and reported per kernel.

``--quick`` compiles only the first case of each op, in bf16, and no CUDA C++ (a smoke run
of the same gate, in results/static-sm_90-quick/).

Writes ``static.json`` and ``static.md`` (default ``benchmarks/results/static-sm_90/``)
and exits 1 when a launch does not compile, a 16-bit kernel spills at a listed case on
sm_90, a launch of a case marked ``fills`` has fewer programs than the H100 has SMs, or
a case's bound exceeds its stated ratio to the GEMM floor. The model's rates are
assumptions, stated in ``GPUS``; the GPU benchmarks are the measurement.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from avfast.bench.common import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "static-sm_90"


@dataclasses.dataclass(frozen=True)
class GPUModel:
    """Per-GPU rates of the roofline (dense, per second) and the SM's resources."""

    name: str
    sms: int
    smem_per_sm: int
    hbm: float  # bytes/s
    l2: float  # bytes/s from L2 into the SMs (operands re-read by other tiles)
    tensor: dict[str, float]  # FLOP/s by tensor-core instruction and dtype class
    fma: float  # fp32 FLOP/s without tensor cores
    exp: float  # exp2 per second (MUFU)


GPUS = {
    # H100 SXM: 132 SMs at ~1.83 GHz. Tensor rates are ~3/4 of the dense datasheet figures
    # (989 TF bf16, 495 TF tf32) as sustained GEMMs reach; mma.sync (HMMA) on Hopper gets
    # about half of wgmma. L2: 5.5 TB/s measured on the H100 PCIe (114 SMs, 1.755 GHz),
    # scaled by SM count and clock to the SXM.
    "sm_90": GPUModel("H100 SXM", 132, 228 * 1024, 3.0e12, 5.5e12 * 132 / 114 * 1.83 / 1.755,
                      {"HGMMA": 750e12, "HGMMA.tf32": 370e12, "HMMA": 375e12, "HMMA.tf32": 185e12},
                      60e12, 16 * 132 * 1.83e9),
    # A100 SXM: 108 SMs at 1.41 GHz; 312 TF bf16 / 156 TF tf32 dense datasheet, ~3/4 sustained.
    "sm_80": GPUModel("A100 SXM", 108, 164 * 1024, 1.9e12, 4.5e12,
                      {"HMMA": 235e12, "HMMA.tf32": 117e12}, 19.5e12, 16 * 108 * 1.41e9),
}
TARGETS = {"sm_90": (90, "sm_90a"), "sm_80": (80, "sm_80")}  # capability, ptxas -arch
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM, SMEM_PER_CTA_RESERVED = 65536, 64, 32, 1024
DTYPES = ("bf16", "fp32", "tf32")  # tf32: fp32 inputs with torch's TF32 switch on
SASS_OPS = ("HGMMA", "HMMA", "FFMA", "MUFU.EX2", "LDL", "STL", "LDGSTS", "UTMALDG", "ATOMG", "RED")


# ---------------------------------------------------------------------------------------
# Cases: the methods' shapes, run through the launchers
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One op at one shape. ``flops`` are the op's useful FLOPs (fwd, bwd) for the GEMM
    floor; ``fills``: the problem is large enough that every launch must cover the SMs;
    ``max_floor_ratio``: gate on (sum of launch bounds) / GEMM floor on sm_90."""

    op: str
    name: str
    dims: dict
    run: Callable
    flops: tuple[float, float]
    fills: bool = True
    max_floor_ratio: float | None = None


def _torch():
    import torch

    return torch


def _dtype(name: str):
    torch = _torch()
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


def _run_pair(mod, dtype, B, F, H, Na, Nv, D, masked=False):
    torch = _torch()
    q = torch.randn(B, F, H, D, dtype=dtype)
    # DeepAVFusion's kv Linear output viewed (B, N, 2, H, D) and unbound: strided k and v
    k_a, v_a = torch.randn(B, Na, 2, H, D, dtype=dtype).unbind(2)
    k_v, v_v = torch.randn(B, Nv, 2, H, D, dtype=dtype).unbind(2)
    mask_a = torch.zeros(B, Na, dtype=torch.bool) if masked else None
    mask_v = torch.zeros(B, Nv, dtype=torch.bool) if masked else None
    block_f = min(mod.pow2(F), mod.MAX_BLOCK_F)
    splits = mod._num_splits(-(-F // block_f) * B * H, max(Na, Nv), torch.device("cuda"))  # as on a GPU
    mod.av_pair_attention_fwd(q, k_a, v_a, k_v, v_v, torch.randn(H, D, dtype=dtype), mask_a, mask_v,
                              D ** -0.5, num_splits=splits)
    o_half, lse = torch.zeros(B, F, H, 2, D), torch.zeros(B, F, H, 2)
    mod.av_pair_attention_bwd(torch.randn(B, F, H, D, dtype=dtype), q, k_a, v_a, k_v, v_v, mask_a, mask_v,
                              o_half, lse, D ** -0.5, num_splits=splits)


def _run_cosine(mod, dtype, K, B, d, variant=""):
    torch = _torch()
    z_row, z_col = torch.randn(K, B, d, dtype=dtype), torch.randn(K, B, d, dtype=dtype)
    valid = torch.ones(B, dtype=torch.bool) if variant == "valid" else None
    offset, col_lse = (B // 2, False) if variant == "gathered" else (0, True)
    mod.cosine_lse_fwd(z_row, z_col, valid, valid, 0.07, offset, col_lse)
    g, lse = torch.ones(K, B), torch.zeros(K, B)
    mod.cosine_lse_bwd(g, g, g, z_row, z_col, valid, valid, lse, lse, 0.07, offset, col_lse)


def _run_adapter(mod, dtype, N, La, Lv, r):
    torch = _torch()
    h_a, h_v = torch.randn(N, La, r, dtype=dtype), torch.randn(N, Lv, r, dtype=dtype)
    gate = torch.zeros(1).expand(N)  # avfast.ops: a (1,) parameter expanded to N frames
    mod.av_adapter_attention_fwd(h_a, h_v, gate, gate, r ** -0.5)
    o_a, o_v = torch.zeros(N, La, r), torch.zeros(N, Lv, r)
    l_a, l_v = torch.zeros(N, La), torch.zeros(N, Lv)
    mod.av_adapter_attention_bwd(torch.randn_like(h_a), torch.randn_like(h_v), h_a, h_v, gate, gate,
                                 o_a, o_v, l_a, l_v, r ** -0.5)


def cases() -> list[StaticCase]:
    out = []
    for B, F, H, Na, Nv, D, masked, name in (
        (64, 16, 12, 96, 196, 16, False, "DeepAVFusion B64 F16 H12 Na96 Nv196 D16"),
        (64, 16, 12, 96, 196, 64, False, "B64 F16 H12 Na96 Nv196 D64"),
        (128, 16, 12, 19, 49, 16, False, "B128 F16 H12 Na19 Nv49 D16"),
        (8, 16, 12, 96, 196, 16, True, "masks + key splits B8"),
    ):
        dims = {"B": B, "F": F, "H": H, "Na": Na, "Nv": Nv, "D": D, "masked": masked}
        fl = 2 * B * H * F * (Na + Nv) * 2 * D
        out.append(StaticCase("av_pair_attention", name, dims, _run_pair, (fl, 2.5 * fl), fills=B >= 64))
    for K, B, d, variant, name, ratio in (
        (12, 256, 512, "", "MA-AVT K12 B256 d512", None),
        (12, 256, 768, "", "MA-AVT K12 B256 d768", None),
        (1, 65536, 768, "", "K1 B65536 d768", 1.5),
        (12, 256, 512, "valid", "valid masks K12 B256 d512", None),
        (12, 256, 512, "gathered", "gathered rows (no column lse) K12 B256 d512", None),
    ):
        fl = 2 * K * B * B * d
        out.append(StaticCase("cosine_lse", name, {"K": K, "B": B, "d": d, "variant": variant}, _run_cosine,
                              (fl, 3 * fl), max_floor_ratio=ratio))
    for N, La, Lv, r in ((20, 49, 197, 48), (40, 49, 197, 48), (160, 49, 197, 48), (640, 49, 197, 48),
                         (20, 64, 257, 64), (640, 64, 257, 64), (64, 257, 64, 64)):
        fl = 2 * 3 * N * La * Lv * r
        name = f"STG-CMA N{N} La{La} Lv{Lv} r{r}" if r == 48 else f"N{N} La{La} Lv{Lv} r{r}"
        out.append(StaticCase("av_adapter_attention", name, {"N": N, "La": La, "Lv": Lv, "r": r}, _run_adapter,
                              (fl, 7 / 3 * fl)))
    return out


def _kernel_module(op: str):
    import importlib

    return importlib.import_module(f"avfast.kernels.triton.{op.replace('cosine_lse', 'blockwise_infonce')}")


# ---------------------------------------------------------------------------------------
# Work of one launch: executed GEMM FLOPs (tiles padded), exps, HBM and L2 bytes
# ---------------------------------------------------------------------------------------
def _up(n: int, b: int) -> int:
    return -(-n // b) * b


def _esize(t) -> int:
    return t.element_size() if hasattr(t, "element_size") else 4


def _gemm_tiles(M, N, R, bm, bn, bk, es):
    """(padded FLOPs, L2 operand bytes) of an M x N x R GEMM in bm x bn tiles, bk steps."""
    tiles = -(-M // bm) * -(-N // bn)
    return 2 * _up(M, bm) * _up(N, bn) * _up(R, bk), tiles * (bm + bn) * _up(R, bk) * es


def work(kernel: str, a: dict, grid: tuple) -> dict:
    """{flops, exps, hbm, l2} of one launch from its bound arguments ``a``."""
    c = {k: v for k, v in a.items() if k.isupper()}
    if kernel in ("_cosine_lse_fwd_kernel", "_cosine_dscore_kernel"):
        es = _esize(a["x_ptr"])
        rows = a["Bx"] if "rows" not in a else a["rows"]
        K = grid[0]
        fl, l2 = _gemm_tiles(rows, a["By"], a["D"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], es)
        hbm = es * K * (rows + a["By"]) * a["D"]
        two_sided = c.get("WITH_COL", False) or c.get("HAS_Y_TERM", False)
        if "ds_ptr" in a:
            hbm += _esize(a["ds_ptr"]) * K * rows * a["By"]
        return {"flops": K * fl, "exps": K * rows * a["By"] * (2 if two_sided else 1), "hbm": hbm, "l2": K * l2}
    if kernel == "_panel_matmul_kernel":
        K, M, N, R = a["K"], a["M"], a["N"], a["R"]  # grid[0] is K x split-K splits
        es = _esize(a["a_ptr"])
        fl, l2 = _gemm_tiles(M, N, R, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], es)
        hbm = K * (es * M * R + _esize(a["b_ptr"]) * R * N + 4 * M * N * (2 if c["ACCUMULATE"] else 1))
        return {"flops": K * fl, "exps": 0, "hbm": hbm, "l2": K * l2}
    if kernel.startswith("_av_pair_attention"):
        H, F, Na, Nv, Dq, Dv = (a[k] for k in ("H", "F", "Na", "Nv", "Dq", "Dv"))
        B = grid[0] // H
        es = _esize(a["q_ptr"])
        bn, bf = c["BLOCK_N"], c["BLOCK_F"]
        dq, dv = c["BLOCK_DQ"], c["BLOCK_DV"]
        keys = _up(Na, bn) + _up(Nv, bn)
        per_key = (dq + dv) if "fwd" in kernel else (3 * dq + 2 * dv)
        rows = B * H * _up(F, bf)
        kv = es * B * (Na + Nv) * H * (Dq + Dv)
        passes = 1 if "fwd" in kernel else 2
        hbm = passes * (es * B * F * H * (Dq + Dv) + kv) + 4 * B * F * H * 2 * (Dv + 1) * a["num_splits"]
        l2 = grid[0] * grid[1] * (Na + Nv) * (Dq + Dv) * es * passes
        return {"flops": 2 * rows * keys * per_key, "exps": B * H * F * (Na + Nv), "hbm": hbm, "l2": l2}
    if kernel.startswith("_av_adapter"):
        Lx, Ly, R = a["Lx"], a["Ly"], a["R"]
        N = a["N"] if "N" in a else grid[0]
        es = _esize(a["x_ptr"])
        bx, by, br = c["BLOCK_X"], c["BLOCK_Y"], c["BLOCK_R"]
        x_tiles = -(-Lx // bx)
        y_rows = _up(Ly, by)
        mm = 3 if "fwd" in kernel else 7
        tok = N * (Lx + Ly)
        hbm = (es * tok * R * (2 if "fwd" in kernel else 3)) + 4 * tok * (R + 1) * (2 if "fwd" in kernel else 1)
        programs = math.prod(grid)
        l2 = programs * (bx + y_rows * (2 if "bwd" in kernel else 1)) * br * es
        return {"flops": 2 * mm * N * x_tiles * bx * y_rows * br, "exps": 2 * N * Lx * Ly, "hbm": hbm, "l2": l2}
    raise KeyError(f"no work model for kernel {kernel}")


# ---------------------------------------------------------------------------------------
# Recording, compiling, analysing
# ---------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,), args, kwargs))

        return launch


@contextlib.contextmanager
def recorded_launches(module):
    from triton.runtime.jit import JITFunction

    sink, swapped = [], []
    for name, obj in list(vars(module).items()):
        if name.endswith("_kernel"):
            if not isinstance(obj, JITFunction):
                raise RuntimeError(f"{module.__name__}.{name} is {type(obj).__name__}, not a JITFunction: "
                                   "run the static gate without TRITON_INTERPRET=1")
            swapped.append((name, obj))
            setattr(module, name, _Recorder(obj, sink))
    try:
        yield sink
    finally:
        for name, obj in swapped:
            setattr(module, name, obj)


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    if cuda.exists():
        return str(cuda)
    raise FileNotFoundError(f"{name} not found in triton's bundle or CUDA_HOME/bin")


def _bind(fn, args, kwargs, backend):
    """The launch as the JIT sees it: (ASTSource, options, named argument values)."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    named = dict(zip(fn.arg_names, args))
    named.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    return ASTSource(fn, signature, constexprs, attrs), options, named


def ptxas_usage(log: str) -> dict:
    """Registers, spills, stack of the first entry in a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
                "stack": int(spill.group(1)) if spill else 0,
                "spill_stores": int(spill.group(2)) if spill else 0,
                "spill_loads": int(spill.group(3)) if spill else 0}


def sass_counts(sass: str) -> dict[str, dict[str, int]]:
    """Instruction counts per function of a ``cuobjdump -sass`` listing."""
    out: dict[str, collections.Counter] = {}
    current = None
    for line in sass.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = out.setdefault(head.group(1), collections.Counter())
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line)
        if ins is None or current is None:
            continue
        op = ins.group(1)
        current["total"] += 1
        for key in SASS_OPS:
            if op == key or op.startswith(key + "."):
                current[key] += 1
    return {k: dict(v) for k, v in out.items()}


def occupancy(regs: int, warps: int, smem: int, gpu: GPUModel) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {
        "regs": REGS_PER_SM // regs_per_warp // warps,
        "smem": gpu.smem_per_sm // (smem + SMEM_PER_CTA_RESERVED),
        "warps": MAX_WARPS_PER_SM // warps,
        "ctas": MAX_CTAS_PER_SM,
    }
    key = min(limits, key=limits.get)
    return limits[key], key


def compile_for(src, options, target: str, workdir: Path) -> dict:
    """Compile one bound launch for ``target``; its PTX through ptxas -v and SASS counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    capability, arch = TARGETS[target]
    started = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    seconds = time.time() - started
    stem = workdir / f"{compiled.metadata.name}_{compiled.hash[:12]}_{target}"
    stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
    stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
    ptxas = subprocess.run([_tool("ptxas"), "-v", f"-arch={arch}", str(stem.with_suffix(".ptx")),
                            "-o", str(stem) + ".ptxas.cubin"], capture_output=True, text=True, check=False)
    if ptxas.returncode:
        raise RuntimeError(f"ptxas failed: {ptxas.stderr.strip()[-800:]}")
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(stem.with_suffix(".cubin"))],
                          capture_output=True, text=True, check=True).stdout
    counts = next(iter(sass_counts(sass).values()), {})
    md = compiled.metadata
    return dict(num_warps=md.num_warps, num_stages=md.num_stages, smem=md.shared, compile_s=round(seconds, 2),
                sass=counts, **ptxas_usage(ptxas.stdout + ptxas.stderr))


def _tensor_core(sass: dict, dtype: str) -> str:
    tf32 = ".tf32" if dtype != "bf16" else ""
    if sass.get("HGMMA"):
        return "HGMMA" + tf32
    if sass.get("HMMA"):
        return "HMMA" + tf32
    return "FFMA"


def analyse(row: dict, target: str) -> None:
    """Occupancy, waves and the roofline bound of a compiled launch (row updated)."""
    gpu = GPUS[target]
    c = row[target]
    ctas, limit = occupancy(c["regs"] or 255, c["num_warps"], c["smem"], gpu)
    slots = gpu.sms * max(ctas, 1)
    programs = row["programs"]
    fill = programs / (math.ceil(programs / slots) * slots)
    tc = _tensor_core(c["sass"], row["dtype"])
    rate = gpu.tensor.get(tc, gpu.tensor.get(tc.replace("HGMMA", "HMMA"), gpu.fma)) if tc != "FFMA" else gpu.fma
    w = row["work"]
    t = {"hbm": w["hbm"] / gpu.hbm, "l2": w["l2"] / gpu.l2, "math": w["flops"] / rate, "exp": w["exps"] / gpu.exp}
    t = {k: v / fill for k, v in t.items()}
    bound = max(t, key=t.get)
    c.update(tensor_core=tc, ctas_per_sm=ctas, occupancy_limit=limit, sm_waves=round(programs / gpu.sms, 2),
             occupancy_waves=round(programs / slots, 2), fill=round(fill, 3),
             t_us={k: round(v * 1e6, 2) for k, v in t.items()}, bound=bound, bound_us=round(t[bound] * 1e6, 2))


def _record(case: StaticCase, dtype: str) -> list[tuple]:
    """The launches of one case in one dtype: [(fn, grid, args, kwargs)]."""
    torch = _torch()
    module = _kernel_module(case.op)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        with recorded_launches(module) as sink:
            case.run(module, _dtype(dtype), **case.dims)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return sink


@functools.lru_cache(maxsize=2)
def _recorded(case_name: str, dtype: str) -> list[tuple]:
    """A worker's recording of one case, kept for the next launches of that case (a worker
    gets many launches of one case in a row)."""
    return _record(next(c for c in cases() if c.name == case_name), dtype)


def _compile_job(job):
    """Worker: record the case again and compile its launch ``index`` for every target."""
    key, case_name, dtype, index, workdir = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    fn, _, args, kwargs = _recorded(case_name, dtype)[index]
    out = {}
    for target, (capability, _) in TARGETS.items():
        try:
            src, options, _ = _bind(fn, args, kwargs, make_backend(GPUTarget("cuda", capability, 32)))
            out[target] = compile_for(src, options, target, Path(workdir))
        except Exception as err:  # noqa: BLE001  (any compile error is a gate failure, reported per launch)
            out[target] = {"error": f"{type(err).__name__}: {err}"[:1500]}
    return key, out


def triton_report(selected: Sequence[StaticCase], jobs: int, workdir: Path,
                  dtypes: Sequence[str] = DTYPES) -> list[dict]:
    """One row per recorded launch (each case in each of ``dtypes``) with its compile results
    on every target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend90 = make_backend(GPUTarget("cuda", 90, 32))
    rows, unique = [], {}
    for case in selected:
        for dtype in dtypes:
            try:
                launches = _record(case, dtype)
            except Exception as err:  # noqa: BLE001  (a launcher that refuses a case fails the gate)
                rows.append({"op": case.op, "case": case.name, "dtype": dtype, "kernel": "(launcher)",
                                 "error": f"{type(err).__name__}: {err}"})
                continue
            for index, (fn, grid, args, kwargs) in enumerate(launches):
                src, options, named = _bind(fn, args, kwargs, backend90)
                key = f"{fn.__name__}:{src.hash()}:{options.hash()}"
                unique.setdefault(key, (key, case.name, dtype, index, str(workdir)))
                rows.append({"op": case.op, "case": case.name, "dtype": dtype, "kernel": fn.__name__, "grid": list(grid),
                                 "programs": math.prod(grid), "key": key,
                                 "constexprs": {k: v for k, v in named.items() if k.isupper()},
                                 "work": work(fn.__name__, named, grid)})
    compiled = {}
    spawn = multiprocessing.get_context("spawn")  # fork after torch's thread pools can deadlock
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        for key, result in pool.map(_compile_job, unique.values()):
            compiled[key] = result
    for row in rows:
        if "key" not in row:
            continue
        for target in TARGETS:
            row[target] = dict(compiled[row["key"]][target])
            if "error" not in row[target]:
                analyse(row, target)
        del row["key"]
    return rows


def case_summaries(selected: Sequence[StaticCase], rows: list[dict]) -> list[dict]:
    """Per case and dtype: summed sm_90 bounds against the GEMM floor (fwd, bwd)."""
    out = []
    for case in selected:
        for dtype in DTYPES:
            mine = [r for r in rows if r["case"] == case.name and r["dtype"] == dtype and "sm_90" in r]
            if not mine or any("error" in r["sm_90"] for r in mine):
                continue
            peak = GPUS["sm_90"].tensor["HGMMA" if dtype == "bf16" else "HGMMA.tf32"] if dtype != "fp32" \
                else GPUS["sm_90"].fma
            floor_us = sum(case.flops) / peak * 1e6
            bound_us = sum(r["sm_90"]["bound_us"] for r in mine)
            out.append({"op": case.op, "case": case.name, "dtype": dtype, "launches": len(mine),
                            "bound_us": round(bound_us, 1), "gemm_floor_us": round(floor_us, 1),
                            "floor_ratio": round(bound_us / floor_us, 2), "max_floor_ratio": case.max_floor_ratio})
    return out


# ---------------------------------------------------------------------------------------
# CUDA C++ kernels of csrc/
# ---------------------------------------------------------------------------------------
def cuda_report(workdir: Path) -> dict:
    """Per CUDA kernel: registers, spills, SASS mix (sm_90), or why it was not built."""
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.exists():
        return {"skipped": f"no nvcc at {nvcc} (set CUDA_HOME)"}
    from torch.utils.cpp_extension import include_paths

    site = Path(_torch().__file__).parent.parent
    includes = [REPO_ROOT / "csrc", *map(Path, include_paths()), cuda_home / "include", site / "nvidia" / "cu13" / "include"]
    flags = ["-O3", "-std=c++17", "-lineinfo", "-DAVFAST_WITH_CUDA", '-DAVFAST_CUDA_ARCH_LIST="9.0"',
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", "-gencode=arch=compute_90,code=sm_90",
             "-Xptxas", "-v", "-cubin"]
    kernels = {}
    sources = sorted(glob.glob(str(REPO_ROOT / "csrc" / "**" / "*.cu"), recursive=True))
    for cu in sources:
        cubin = workdir / (Path(cu).stem + ".cubin")
        res = subprocess.run([str(nvcc), *flags, *[f"-I{p}" for p in includes], cu, "-o", str(cubin)],
                             capture_output=True, text=True, check=False)
        if res.returncode:
            kernels[Path(cu).name] = {"error": res.stderr.strip()[-1500:]}
            continue
        usage, current = {}, None
        for line in (res.stdout + res.stderr).splitlines():
            entry = re.search(r"Compiling entry function '(\S+)'", line)
            if entry:
                current = entry.group(1)
            elif current and ("Used" in line or "spill" in line):
                usage.setdefault(current, []).append(line)
        sass = sass_counts(subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                          text=True, check=True).stdout)
        for mangled, lines in usage.items():
            name = re.search(r"(av_[a-z]+_(?:fwd|bwd)_kernel)", mangled)
            dtype = "bf16" if "BFloat16" in mangled else "fp16" if "Half" in mangled else "fp32"
            smem = re.search(r"(\d+) bytes smem", "\n".join(lines))
            kernels[f"{name.group(1) if name else mangled} {dtype}"] = dict(
                source=str(Path(cu).relative_to(REPO_ROOT)), dtype=dtype, static_smem=int(smem.group(1)) if smem else 0,
                sass=sass.get(mangled, {}), tensor_core=_tensor_core(sass.get(mangled, {}), dtype),
                **ptxas_usage("\n".join(lines)))
    return kernels


# ---------------------------------------------------------------------------------------
# The gate and the report
# ---------------------------------------------------------------------------------------
def gate(selected: Sequence[StaticCase], rows: list[dict], summaries: list[dict], cuda: dict) -> list[str]:
    """Every violated condition, as a sentence naming the kernel, case and value."""
    by_name = {c.name: c for c in selected}
    failures = []
    for r in rows:
        where = f"{r['kernel']} [{r['op']} {r['case']}, {r['dtype']}]"
        if "error" in r:
            failures.append(f"{where}: launcher failed: {r['error']}")
            continue
        for target in TARGETS:
            if "error" in r[target]:
                failures.append(f"{where}: compile for {target} failed: {r[target]['error'][:300]}")
        c = r["sm_90"]
        if "error" in c:
            continue
        if r["dtype"] == "bf16" and c["spill_stores"]:
            failures.append(f"{where}: spills {c['spill_stores']} B/thread on sm_90 (expected 0)")
        if by_name[r["case"]].fills and r["programs"] < GPUS["sm_90"].sms:
            failures.append(f"{where}: {r['programs']} programs on {GPUS['sm_90'].sms} SMs "
                            f"({c['sm_waves']} waves, expected >= 1)")
    for s in summaries:
        if s["max_floor_ratio"] and s["dtype"] == "bf16" and s["floor_ratio"] > s["max_floor_ratio"]:
            failures.append(f"{s['op']} [{s['case']}, bf16]: static bound {s['bound_us']} us is {s['floor_ratio']}x "
                            f"the GEMM floor {s['gemm_floor_us']} us (expected <= {s['max_floor_ratio']}x)")
    for name, k in cuda.items():
        if isinstance(k, dict) and "error" in k:
            failures.append(f"CUDA C++ {name}: nvcc failed: {k['error'][:300]}")
    return list(dict.fromkeys(failures))  # one line per distinct failure (panels repeat launches)


def _blocks(cx: dict) -> str:
    return ",".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cx.items() if k.startswith("BLOCK"))


def markdown(rows, summaries, cuda, failures, meta) -> str:
    lines = [f"# Static GPU fitness ({meta['triton']}, {meta['torch']})", "",
             ("Compiled without a GPU by `avfast bench static` (avfast/bench/static.py): grids and "
              "constexprs are the launchers' own; registers and spills from ptxas -v; tensor cores from "
              "the SASS. Bounds: max(HBM, L2, math, exp) over the model rates, divided by the last "
              "wave's fill; rates in `GPUS` (assumptions, not measurements)."), "",
             f"Gate: {'PASS' if not failures else 'FAIL'}", ""]
    lines += [f"- {f}" for f in failures]
    lines += ["", "## Case bounds against the GEMM floor (sm_90, H100 model)", "",
              "op | case | dtype | launches | bound (us) | GEMM floor (us) | ratio | gate",
              "--- | --- | --- | --- | --- | --- | --- | ---"]
    for s in summaries:
        lines.append(" | ".join(str(x) for x in (s["op"], s["case"], s["dtype"], s["launches"], s["bound_us"],
                                                 s["gemm_floor_us"], s["floor_ratio"], s["max_floor_ratio"] or "")))
    for target in TARGETS:
        gpu = GPUS[target]
        lines += ["", f"## Triton launches, {target} ({gpu.name} model, {gpu.sms} SMs)", "",
                  ("op | case | dtype | kernel | blocks | warps/stages | smem | regs | spill st/ld | tensor cores "
                   "(SASS) | programs | CTA/SM | SM waves | bound (us)"),
                  " | ".join(["---"] * 14)]
        for r in rows:
            c = r.get(target)
            if c is None or "error" in c:
                lines.append(f"{r['op']} | {r['case']} | {r['dtype']} | {r['kernel']} | FAILED: "
                             f"{(c or r).get('error', '')[:120]} |||||||||")
                continue
            tc = c["tensor_core"] + (f" {c['sass'].get(c['tensor_core'].split('.')[0], 0)}"
                                     if c["tensor_core"] != "FFMA" else f" (FFMA {c['sass'].get('FFMA', 0)})")
            lines.append(" | ".join(str(x) for x in (
                r["op"], r["case"], r["dtype"], r["kernel"].removeprefix("_").removesuffix("_kernel"),
                _blocks(r["constexprs"]), f"{c['num_warps']}/{c['num_stages']}", c["smem"], c["regs"],
                f"{c['spill_stores']}/{c['spill_loads']}", tc, r["programs"],
                f"{c['ctas_per_sm']} ({c['occupancy_limit']})", c["sm_waves"], f"{c['bound']} {c['bound_us']}")))
    lines += ["", "## CUDA C++ kernels (csrc/, nvcc sm_90)", ""]
    if "skipped" in cuda:
        lines.append(f"skipped: {cuda['skipped']}")
    else:
        lines += ["kernel | source | regs | spill st/ld | static smem | tensor cores (SASS) | FFMA",
                  " | ".join(["---"] * 7)]
        for name, k in cuda.items():
            if "error" in k:
                lines.append(f"{name} | FAILED | {k['error'][:120]} ||||")
                continue
            lines.append(" | ".join(str(x) for x in (
                name, k["source"], k["regs"], f"{k['spill_stores']}/{k['spill_loads']}", k["static_smem"],
                k["tensor_core"], k["sass"].get("FFMA", 0))))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avfast bench static", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for static.json / static.md "
                    f"(default {DEFAULT_OUT.relative_to(REPO_ROOT)}[-quick])")
    ap.add_argument("--only", default=None, help="only the ops whose name contains this")
    ap.add_argument("--case", default=None, help="only the cases whose name contains this")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="compile processes")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels (nvcc)")
    ap.add_argument("--keep", type=Path, default=None, help="keep PTX/cubin/SASS here")
    ap.add_argument("--quick", action="store_true", help="the first case of each op, bf16 only, no CUDA C++")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-quick") if args.quick else DEFAULT_OUT
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("avfast bench static compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import torch
    import triton

    selected = [c for c in cases() if (args.only is None or args.only in c.op)
                and (args.case is None or args.case in c.name)]
    if args.quick:
        selected = [c for i, c in enumerate(selected) if c.op not in {d.op for d in selected[:i]}]
    dtypes = ("bf16",) if args.quick else DTYPES
    started = time.time()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="avfast-static-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", str(workdir / "triton-cache"))
    try:
        rows = triton_report(selected, args.jobs, workdir, dtypes)
        summaries = case_summaries(selected, rows)
        skip = "--no-cuda" if args.no_cuda else "--quick" if args.quick else None
        cuda = {"skipped": skip} if skip else cuda_report(workdir)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failures = gate(selected, rows, summaries, cuda)
    meta = {"triton": f"triton {triton.__version__}", "torch": f"torch {torch.__version__}",
                "gpus": {k: dataclasses.asdict(v) for k, v in GPUS.items()}, "seconds": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "static.json").write_text(json.dumps(
        {"meta": meta, "failures": failures, "cases": summaries, "launches": rows, "cuda": cuda}, indent=1, default=str))
    (args.out / "static.md").write_text(markdown(rows, summaries, cuda, failures, meta))
    print(markdown(rows, summaries, cuda, failures, meta).split("\n## Triton")[0])
    print(f"wrote {args.out}/static.json and static.md in {meta['seconds']} s")
    return 1 if failures else 0
