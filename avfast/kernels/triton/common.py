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
    def dot(a, b, FP32_DOT: tl.constexpr):
        """a @ b with fp32 accumulation; FP32_DOT: in full fp32 (no TF32), operands upcast."""
        if FP32_DOT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)


def use_fp32_dot(t: Tensor) -> bool:
    """Dots in full fp32 for fp32 inputs, and for bf16 under the interpreter (whose bf16
    tl.dot returns garbage in triton 3.6)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and t.device.type == "cpu"
    return t.dtype == torch.float32 or (interpreted and t.dtype == torch.bfloat16)


def pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor) (tl.arange and tl.dot need them)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def on_device(t: Tensor):
    """Context that makes t's GPU current: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
