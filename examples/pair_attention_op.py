"""The op on its own: fusion queries over every audio-visual pair, without the pair tensor.

    python examples/pair_attention_op.py
"""

import torch

from avfast.ops import av_pair_attention, pair_attention_map
from avfast.reference.av_pair_attention import av_pair_attention_literal

B, F, H, Dq, Dv, Na, Nv = 2, 16, 12, 16, 64, 96, 196
q = torch.randn(B, F, H, Dq)
k_a, v_a = torch.randn(B, Na, H, Dq), torch.randn(B, Na, H, Dv)
k_v, v_v = torch.randn(B, Nv, H, Dq), torch.randn(B, Nv, H, Dv)
v_bias = torch.randn(H, Dv)
audio_pad = torch.zeros(B, Na, dtype=torch.bool)
audio_pad[1, 60:] = True  # the second clip has only 60 audio tokens

out = av_pair_attention(q, k_a, v_a, k_v, v_v, scale=Dq**-0.5, v_bias=v_bias, key_padding_mask_a=audio_pad)
literal = av_pair_attention_literal(q, k_a, v_a, k_v, v_v, scale=Dq**-0.5, v_bias=v_bias,
                                    key_padding_mask_a=audio_pad)  # builds B x 18,816 pair tokens
print("out", tuple(out.shape), "max |out - literal|", (out - literal).abs().max().item())

joint = pair_attention_map(q, k_a, k_v, scale=Dq**-0.5, key_padding_mask_a=audio_pad)
print("joint map", tuple(joint.shape), "rows sum to", joint.sum(-1).mean().item())
