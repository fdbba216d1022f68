"""Swap DeepAVFusion's dense fusion block for avfast's, keeping the weights.

``UpstreamDenseFusionBlock`` stands in for upstream's class here (same parameter names,
same literal pair-tensor computation); with upstream's code installed, pass its block
instance instead. Runs on CPU or GPU:

    python examples/drop_in_fusion_block.py
"""

import time

import torch

from avfast.nn import DenseAVFusionBlock
from avfast.reference.fusion_blocks import UpstreamDenseFusionBlock

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
B, F, Nv, Na, D = 8, 16, 196, 96, 768  # DeepAVFusion fine-tuning sizes, 8 clips

upstream = UpstreamDenseFusionBlock(D, num_heads=12, attn_ratio=0.25, mlp_ratio=1.0).to(device, dtype)
ours = DenseAVFusionBlock.from_upstream(upstream)  # same weights; strict state_dict load

x_fusion = torch.randn(B, F, D, device=device, dtype=dtype)
x_image = torch.randn(B, Nv, D, device=device, dtype=dtype)
x_audio = torch.randn(B, Na, D, device=device, dtype=dtype)


def timed(block):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = block(x_fusion, x_image, x_audio)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


with torch.no_grad():
    timed(upstream), timed(ours)  # warm up
    ref, t_up = timed(upstream)
    out, t_ours = timed(ours)
err = (out.float() - ref.float()).abs().max().item()
print(f"{device} {dtype}: upstream pair tensor {t_up:.1f} ms, avfast {t_ours:.1f} ms, max |diff| {err:.2e}")

# Inside a model: replace each fusion block in place, e.g.
#   model.fusion_blocks[i] = DenseAVFusionBlock.from_upstream(model.fusion_blocks[i])
# and torch.compile(model) as usual: the op is a torch.library custom op.
compiled = torch.compile(ours, fullgraph=True)
with torch.no_grad():
    print("compiled max |diff|:", (compiled(x_fusion, x_image, x_audio).float() - out.float()).abs().max().item())
