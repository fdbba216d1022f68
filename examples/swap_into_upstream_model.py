"""Drop avfast modules into an existing upstream model instance, keeping its weights and keys.

1. DeepAVFusion: every fusion block of an upstream-style encoder is replaced in place by
   ``DenseAVFusionBlock.from_upstream`` / ``FactorizedAVFusionBlock.from_upstream``. The
   outputs stay equal and ``model.state_dict()`` keeps the same keys and values, so the
   model's own checkpoints still load and save as before.
2. STG-CMA: the adapters of upstream's CLIP blocks (``transformer.resblocks.{i}.T_Adapter``,
   ``S_Adapter``, ``MLP_Adapter`` (+ ``_Audio``), ``gate_v``, ``gate_a``) run on
   ``STGCMABlockAdapters``: upstream-named adapter keys load strictly into it, and a block
   rebuilt around it keeps upstream's keys and outputs.

The "upstream models" here are stand-ins with upstream's parameter names and its literal
computation (``avfast.reference.fusion_blocks`` for the fusion blocks, the restated CLIP
block from ``avfast.bench.upstream.stgcma`` for STG-CMA); with upstream's code installed, pass its instances instead.
Runs on CPU in a few seconds (float64, so "equal" means to ~1e-15):

    python examples/swap_into_upstream_model.py
    python examples/swap_into_upstream_model.py --dim 768 --heads 12 --depth 2   # real widths
"""

import argparse

import torch
from torch import nn

from avfast.bench.upstream.stgcma import ADAPTERS, UpstreamBlock  # upstream's STG-CMA block, literally
from avfast.nn import DenseAVFusionBlock, FactorizedAVFusionBlock, STGCMABlockAdapters, frozen_attention
from avfast.reference.fusion_blocks import UpstreamDenseFusionBlock, UpstreamFactorizedFusionBlock

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dim", type=int, default=64, help="token width D")
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--depth", type=int, default=2, help="blocks per model")
parser.add_argument("--batch", type=int, default=2)
args = parser.parse_args()
D, H, DEPTH, B = args.dim, args.heads, args.depth, args.batch
torch.manual_seed(0)


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (zero-initialised adapters and gates would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if name.endswith(("ln_1.weight", "ln_2.weight")) else 0.2 * noise)
    return model


def max_diff(xs, ys) -> float:
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


# ---------------------------------------------------------------------- 1. DeepAVFusion fusion blocks

class UpstreamStyleFusionEncoder(nn.Module):
    """The fusion stream of an upstream-style DeepAVFusion encoder (image/audio trunks left out):
    ``fusion_tokens``, ``fusion_blocks.{i}``, ``fusion_norm``, as upstream names them."""

    def __init__(self, arch: str, num_fusion_tkns=(8, 4, 4)):
        super().__init__()
        self.fusion_tokens = nn.Parameter(0.02 * torch.randn(1, sum(num_fusion_tkns), D))
        if arch == "dense":
            make = lambda: UpstreamDenseFusionBlock(D, H, attn_ratio=0.25, mlp_ratio=1.0)  # noqa: E731
        else:
            make = lambda: UpstreamFactorizedFusionBlock(D, H, num_fusion_tkns=num_fusion_tkns)  # noqa: E731
        self.fusion_blocks = nn.ModuleList(make() for _ in range(DEPTH))
        self.fusion_norm = nn.LayerNorm(D)

    def forward(self, x_image, x_audio):
        x = self.fusion_tokens.expand(x_image.shape[0], -1, -1)
        for blk in self.fusion_blocks:
            x = blk(x, x_image, x_audio)  # upstream's call; avfast's blocks take the same
        return self.fusion_norm(x)


def swap_fusion_blocks(model: nn.Module) -> int:
    """Replace, in place, every upstream fusion block inside ``model`` by avfast's (same weights,
    device, dtype and train/eval mode). Returns how many were swapped."""
    converters = {UpstreamDenseFusionBlock: DenseAVFusionBlock,            # with upstream installed:
                  UpstreamFactorizedFusionBlock: FactorizedAVFusionBlock}  # its classes here
    swapped = 0
    for name, module in list(model.named_modules()):
        ours = next((new for old, new in converters.items() if isinstance(module, old)), None)
        if ours is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ours.from_upstream(module))
            swapped += 1
    return swapped


x_image = torch.randn(B, 49, D, dtype=torch.float64)  # 7 x 7 image patches
x_audio = torch.randn(B, 24, D, dtype=torch.float64)  # 4 x 6 audio patches
for arch in ("dense", "factorized"):
    model = UpstreamStyleFusionEncoder(arch).double().eval()
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x_image, x_audio)
        n = swap_fusion_blocks(model)
        after = model(x_image, x_audio)
    state = model.state_dict()
    assert list(state) == list(keys_before), "state_dict keys changed"
    assert all(torch.equal(state[k], v) for k, v in keys_before.items()), "weights changed"
    err = (after - before).abs().max().item()
    assert err < 1e-10, err
    print(f"DeepAVFusion {arch}: swapped {n} blocks -> {type(model.fusion_blocks[0]).__name__}; "
          f"state_dict keys unchanged ({len(state)}); max |out diff| {err:.1e}")


# ---------------------------------------------------------------------- 2. STG-CMA adapters

class Transformer(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)

    def forward(self, v, a):
        for blk in self.resblocks:
            v, a = blk(v, a)
        return v, a


class AVFastSTGCMABlock(STGCMABlockAdapters):
    """Upstream's block with its adapters on avfast's fused op. The frozen modules are the
    upstream block's own, under their own names, so the block's keys stay upstream's."""

    def __init__(self, upstream: UpstreamBlock):
        dim, hidden = upstream.ln_1.normalized_shape[0], upstream.S_Adapter.D_fc1.out_features
        super().__init__(dim, mlp_ratio=hidden / dim, batch_first=False)  # upstream's (L, N, D) layout
        self.attn, self.ln_1, self.mlp, self.ln_2 = upstream.attn, upstream.ln_1, upstream.mlp, upstream.ln_2
        self.T = upstream.T
        self.to(upstream.gate_v)  # device and dtype
        self.load_state_dict(upstream.state_dict(), strict=True)

    def forward(self, v, a):
        attn = frozen_attention(self.attn, self.ln_1, batch_first=False)
        return super().forward(v, a, attn, lambda x: self.mlp(self.ln_2(x)), self.T)


T, Lv, La, R = 4, 17, 13, max(1, D // 16)  # frames per clip, visual / audio tokens, bottleneck width
model = nn.Module()
model.transformer = Transformer(UpstreamBlock(D, H, R, T) for _ in range(DEPTH))
model = randomize(model).double().eval()
v = torch.randn(Lv, B * T, D, dtype=torch.float64)  # upstream's (L, B*T, D), frame n = b*T + t
a = torch.randn(La, B * T, D, dtype=torch.float64)
upstream_state = {k: t.clone() for k, t in model.state_dict().items()}

# (a) an upstream-named adapter state dict -> a ModuleList of STGCMABlockAdapters, strictly
prefix = "transformer.resblocks."
adapter_keys = (*ADAPTERS, "gate_v", "gate_a")
adapter_state = {k[len(prefix):]: t for k, t in upstream_state.items()
                 if k.startswith(prefix) and k[len(prefix):].split(".")[1] in adapter_keys}
adapters = nn.ModuleList(STGCMABlockAdapters(D, mlp_ratio=R / D, batch_first=False) for _ in range(DEPTH))
adapters.double().load_state_dict(adapter_state, strict=True)
print(f"STG-CMA: {len(adapter_state)} upstream adapter tensors ({prefix}0.T_Adapter.D_fc1.weight, ...) "
      f"loaded strictly into {DEPTH} x STGCMABlockAdapters")

# (b) the same, in place: each upstream block rebuilt around STGCMABlockAdapters
with torch.no_grad():
    ref_v, ref_a = model.transformer(v, a)
    for i, blk in enumerate(model.transformer.resblocks):
        model.transformer.resblocks[i] = AVFastSTGCMABlock(blk)
    out_v, out_a = model.transformer(v, a)
state = model.state_dict()
assert set(state) == set(upstream_state), "state_dict keys changed"  # (registration order differs)
assert all(torch.equal(state[k], t) for k, t in upstream_state.items()), "weights changed"
err = max_diff((out_v, out_a), (ref_v, ref_a))
assert err < 1e-10, err
print(f"STG-CMA: swapped {DEPTH} blocks -> AVFastSTGCMABlock; state_dict keys unchanged ({len(state)}); "
      f"max |out diff| {err:.1e}")
