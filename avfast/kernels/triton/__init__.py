"""Triton kernels, one file per op family. No autograd, no torch.nn here."""

import importlib.util


def has_triton() -> bool:
    """Whether triton is installed (kernel files define their kernels only then)."""
    return importlib.util.find_spec("triton") is not None

ADAPTER_MAX_WIDTH = 128  # widest r of the adapter kernels (Swin's wider adapters exceed shared memory)
