"""avfast: fused kernels and drop-in modules for parameter-efficient and early-fusion
audio-visual transformers (DeepAVFusion, MA-AVT, STG-CMA, DG-SCT).

``avfast.ops`` and ``avfast.nn`` load on first use, so that the ``avfast`` command can
choose the Triton mode (interpreter on CPU) before any kernel is defined.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["nn", "ops", "__version__"]


def __getattr__(name: str):
    if name in ("nn", "ops"):
        return importlib.import_module(f"avfast.{name}")
    raise AttributeError(f"module 'avfast' has no attribute {name!r}")
