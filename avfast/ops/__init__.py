"""Public ops: torch.library custom ops (``torch.ops.avfast.*``) with fake impls and autograd."""

from avfast.ops.av_pair_attention import av_pair_attention, pair_attention_map

OPS = ("av_pair_attention",)  # op families with kernels, as named in avfast._backend

__all__ = ["OPS", "av_pair_attention", "pair_attention_map"]
