"""Helpers shared by the Triton kernel files: the dot product policy and block sizes."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from avfast.kernels.triton import has_triton

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a, b, DOT_PRECISION: tl.constexpr):
        """a @ b with fp32 accumulation. DOT_PRECISION (from dot_precision): "native" for
        16-bit operands, "tf32" for fp32 operands on TF32 tensor cores, "ieee" for full fp32
        (operands upcast)."""
        if DOT_PRECISION == "ieee":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if DOT_PRECISION == "tf32":
            return tl.dot(a, b, input_precision="tf32")
        return tl.dot(a, b)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32: ``torch.backends.cuda.matmul.allow_tf32``,
    ``fp32_precision == "tf32"`` or ``torch.set_float32_matmul_precision("high"|"medium")``."""
    matmul = torch.backends.cuda.matmul
    return bool(matmul.allow_tf32) or matmul.fp32_precision == "tf32" or torch.get_float32_matmul_precision() != "highest"


def dot_precision(t: Tensor) -> str:
    """The DOT_PRECISION of kernels on inputs like t: fp32 takes TF32 where torch allows it
    and IEEE fp32 otherwise; bf16 under the interpreter goes through fp32 (its bf16 tl.dot
    returns garbage in triton 3.6); other 16-bit inputs use their native tensor-core dot."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and t.device.type == "cpu"
    if t.dtype == torch.float32:
        return "tf32" if tf32_allowed() else "ieee"
    if interpreted and t.dtype == torch.bfloat16:
        return "ieee"
    return "native"


def pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor) (tl.arange and tl.dot need them)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


H100_SMS = 132  # the SM count launchers plan for off-GPU (interpreter, static gate)


def sm_count(t: Tensor) -> int:
    """Streaming multiprocessors of t's GPU (H100_SMS for CPU tensors)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return H100_SMS


def on_device(t: Tensor):
    """Context that makes t's GPU current: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
