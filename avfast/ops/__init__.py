"""Public ops: torch.library custom ops (``torch.ops.avfast.*``) with fake impls and autograd.

Arguments are checked before any kernel runs; a bad one raises naming the argument, the
expected and the received value. Values are not scanned: a NaN in an input makes NaN
exactly the outputs whose reference value depends on it, and leaves every other output,
and the gradients of the other samples (batch entries, frames, blocks), as they would be
without it, on every backend. An Inf moves only its own sample's results. Padded keys and
invalid samples should hold finite values.
"""

from avfast.ops.av_adapter_attention import av_adapter_attention
from avfast.ops.av_pair_attention import av_pair_attention, pair_attention_map
from avfast.ops.blockwise_infonce import blockwise_infonce, cosine_lse

OPS = ("av_pair_attention", "cosine_lse", "av_adapter_attention")  # op families with kernels (avfast._backend)

__all__ = ["OPS", "av_adapter_attention", "av_pair_attention", "blockwise_infonce", "cosine_lse",
           "pair_attention_map"]
