"""Public ops: torch.library custom ops (``torch.ops.avfast.*``) with fake impls and autograd."""

from avfast.ops.av_pair_attention import av_pair_attention, pair_attention_map

__all__ = ["av_pair_attention", "pair_attention_map"]
