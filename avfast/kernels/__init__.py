"""Kernels: Triton in ``avfast.kernels.triton`` (CUDA C++ lives in csrc/, built as avfast._C)."""
