"""Drop-in nn.Modules built on avfast.ops."""

from avfast.nn.contrastive import BlockwiseContrastiveLoss, gathered_blockwise_infonce
from avfast.nn.fusion import DenseAVFusionBlock, FactorizedAVFusionBlock

__all__ = ["BlockwiseContrastiveLoss", "DenseAVFusionBlock", "FactorizedAVFusionBlock", "gathered_blockwise_infonce"]
