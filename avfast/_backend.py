"""Backend selection for avfast ops: triton, cuda (avfast._C) or reference.

The choice is made inside each op at call time from the tensors' device, dtype and (for
limits of a kernel) sizes. On a CUDA GPU the order to try comes from ``GPU_DISPATCH``,
one table per op and dtype; on other devices the reference serves.
``AVFAST_BACKEND=cuda|triton|reference`` forces one; a forced backend that cannot run
raises and says why, while the automatic choice falls back silently.

- ``cuda``: the CUDA C++ kernels in avfast._C. On CPU tensors (only when forced) the
  same kernel code runs serially on the host, which is how CI tests it without a GPU.
- ``triton``: the Triton kernels; on CPU tensors (only when forced) through the Triton
  interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is imported.
- ``reference``: plain PyTorch (avfast.reference); serves every device and float64.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import torch

from avfast.kernels.triton import ADAPTER_MAX_WIDTH, has_triton

BACKENDS = ("cuda", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Default order on a CUDA GPU, per op and dtype: the first backend that can run is used.
# Triton first everywhere: its kernels use tensor cores (HGMMA on sm_90, TF32 for fp32
# where torch allows), while the CUDA C++ kernels are FFMA-only and their pair kernels
# spill (benchmarks/results/static-sm_90/static.md). Update from the GPU benchmarks
# (benchmarks/results/<device>/) when a backend measures faster.
_TRITON_FIRST = ("triton", "cuda", "reference")
GPU_DISPATCH: dict[str, dict[str, tuple[str, ...]]] = {
    "av_pair_attention": {"bfloat16": _TRITON_FIRST, "float16": _TRITON_FIRST, "float32": _TRITON_FIRST},
    "cosine_lse": {"bfloat16": _TRITON_FIRST, "float16": _TRITON_FIRST, "float32": _TRITON_FIRST},
    "av_adapter_attention": {"bfloat16": _TRITON_FIRST, "float16": _TRITON_FIRST, "float32": _TRITON_FIRST},
}
# Sizes a kernel backend does not take: {backend: {op: (size name, largest)}}
SIZE_LIMITS = {"triton": {"av_adapter_attention": ("r", ADAPTER_MAX_WIDTH)}}

try:
    from avfast import _C  # registers torch.ops.avfast_C

    _C_ERROR = None
except ImportError as err:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"avfast._C not importable ({err})"
    logging.getLogger("avfast").info("CUDA C++ kernels unavailable: %s", _C_ERROR)


def _has_c_op(op: str) -> bool:
    return _C is not None and hasattr(torch.ops.avfast_C, f"{op}_fwd")


@functools.cache
def _built_for(device: torch.device) -> bool:
    """Whether avfast._C holds code for this GPU (an exact sm, or PTX of an older one)."""
    have = torch.cuda.get_device_capability(device)
    for arch in re.split(r"[;, ]+", _C.cuda_arch_list().strip()):
        found = re.match(r"(\d+)\.(\d+)", arch)
        if found is None:
            continue
        built = (int(found.group(1)), int(found.group(2)))
        if built == have or (arch.endswith("+PTX") and built <= have):
            return True
    return False


def unavailable_reason(
    backend: str, op: str, device: torch.device, dtype: torch.dtype, **sizes: int
) -> str | None:
    """Why ``backend`` cannot run ``op`` on (device, dtype) at ``sizes``; None when it can."""
    if backend == "reference":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"{backend} kernels take float32/float16/bfloat16, got {dtype} (use the reference)"
    name, largest = SIZE_LIMITS.get(backend, {}).get(op, (None, None))
    if name in sizes and sizes[name] > largest:
        return f"{backend} kernels of {op} take {name} <= {largest}, got {name}={sizes[name]}"
    if backend == "cuda":
        if _C is None:
            return _C_ERROR
        if not _has_c_op(op):
            return f"avfast._C has no kernel for {op}"
        if device.type == "cuda" and not _C.built_with_cuda():
            return "avfast._C was built without CUDA"
        if device.type == "cuda" and not _built_for(device):
            major, minor = torch.cuda.get_device_capability(device)
            return (f"avfast._C was built for sm {_C.cuda_arch_list()}, not this GPU's {major}.{minor} "
                    "(rebuild with TORCH_CUDA_ARCH_LIST)")
        if device.type not in ("cuda", "cpu"):
            return f"no cuda kernel for device {device}"
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "triton runs on CPU tensors only with TRITON_INTERPRET=1"
            return None
        return f"no triton kernel for device {device}"
    raise ValueError(f"AVFAST_BACKEND must be one of {BACKENDS}, got {backend!r}")


def gpu_order(op: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The backends to try, in order, for ``op`` on a CUDA GPU (GPU_DISPATCH)."""
    return GPU_DISPATCH.get(op, {}).get(str(dtype).removeprefix("torch."), ("reference",))


def select(op: str, device: torch.device, dtype: torch.dtype, **sizes: int) -> str:
    """Backend name for ``op`` on tensors of (device, dtype) at ``sizes``."""
    forced = os.environ.get("AVFAST_BACKEND")
    if forced:
        reason = unavailable_reason(forced, op, device, dtype, **sizes)
        if reason is not None:
            raise RuntimeError(f"{op}: AVFAST_BACKEND={forced} cannot run on {device} {dtype}: {reason}")
        return forced
    if device.type != "cuda":
        return "reference"
    for backend in gpu_order(op, dtype):
        if unavailable_reason(backend, op, device, dtype, **sizes) is None:
            return backend
    return "reference"


def no_autocast(device: torch.device):
    """Backends compute in their inputs' dtypes: autocast (still on inside a custom op's
    implementation) would recast their internal float32 math."""
    return torch.autocast(device.type, enabled=False)
