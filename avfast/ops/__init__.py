"""Public ops: torch.library custom ops (``torch.ops.avfast.*``) with fake impls and autograd."""

from avfast.ops.av_adapter_attention import av_adapter_attention
from avfast.ops.av_pair_attention import av_pair_attention, pair_attention_map
from avfast.ops.blockwise_infonce import blockwise_infonce, cosine_lse

OPS = ("av_pair_attention", "cosine_lse", "av_adapter_attention")  # op families with kernels (avfast._backend)

__all__ = ["OPS", "av_adapter_attention", "av_pair_attention", "blockwise_infonce", "cosine_lse",
           "pair_attention_map"]
