"""Drop-in nn.Modules built on avfast.ops."""

from avfast.nn.fusion import DenseAVFusionBlock, FactorizedAVFusionBlock

__all__ = ["DenseAVFusionBlock", "FactorizedAVFusionBlock"]
