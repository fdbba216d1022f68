"""Drop-in nn.Modules built on avfast.ops."""

from avfast.nn.adapters import Adapter, AVAdapter, STGCMABlockAdapters, TemporalAdapter, frozen_attention
from avfast.nn.contrastive import BlockwiseContrastiveLoss, gathered_blockwise_infonce, local_negatives
from avfast.nn.decoders import GuidedDecoder
from avfast.nn.fusion import DenseAVFusionBlock, FactorizedAVFusionBlock

__all__ = [
    "AVAdapter",
    "Adapter",
    "BlockwiseContrastiveLoss",
    "DenseAVFusionBlock",
    "FactorizedAVFusionBlock",
    "GuidedDecoder",
    "STGCMABlockAdapters",
    "TemporalAdapter",
    "frozen_attention",
    "gathered_blockwise_infonce",
    "local_negatives",
]
