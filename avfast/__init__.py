"""avfast: fused kernels and drop-in modules for parameter-efficient and early-fusion
audio-visual transformers (DeepAVFusion, MA-AVT, STG-CMA, DG-SCT)."""

from avfast import nn, ops

__version__ = "0.1.0"
__all__ = ["nn", "ops", "__version__"]
