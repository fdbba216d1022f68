"""Public ops: torch.library custom ops (``torch.ops.avfast.*``) with fake impls and autograd."""

from avfast.ops.av_pair_attention import av_pair_attention, pair_attention_map
from avfast.ops.blockwise_infonce import blockwise_infonce, cosine_lse

OPS = ("av_pair_attention", "cosine_lse")  # op families with kernels, as named in avfast._backend

__all__ = ["OPS", "av_pair_attention", "blockwise_infonce", "cosine_lse", "pair_attention_map"]
