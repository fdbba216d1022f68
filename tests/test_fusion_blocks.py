"""DeepAVFusion fusion blocks against the literal upstream computation."""

from __future__ import annotations


import pytest
import torch

from avfast.nn import DenseAVFusionBlock, FactorizedAVFusionBlock
from avfast.reference.fusion_blocks import UpstreamDenseFusionBlock, UpstreamFactorizedFusionBlock
from seeding import fresh_seed

D, H = 96, 6
DENSE_KEYS = {
    "norm1_mm.weight", "norm1_mm.bias", "norm1_aud.weight", "norm1_aud.bias",
    "norm1_img.weight", "norm1_img.bias", "norm2.weight", "norm2.bias",
    "attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}
FACTORIZED_ATTN_KEYS = {
    f"attn.{name}.{p}" for name in ("attn_v.q", "attn_v.kv", "attn_v.proj", "attn_a.q", "attn_a.kv",
                                    "attn_a.proj", "q", "k", "v", "proj") for p in ("weight", "bias")
}



def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (LayerNorm affine and biases too), float64."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def tokens(B: int, F: int, Nv: int, Na: int):
    return (torch.randn(B, F, D, dtype=torch.float64), torch.randn(B, Nv, D, dtype=torch.float64),
            torch.randn(B, Na, D, dtype=torch.float64))


def masks(B: int, Nv: int, Na: int):
    image = torch.rand(B, Nv) < 0.3
    audio = torch.rand(B, Na) < 0.3
    image[:, 0] = False  # every sample keeps one token of each modality
    audio[:, 0] = False
    return {"image_padding_mask": image, "audio_padding_mask": audio}


@pytest.mark.parametrize("attn_ratio, mlp_ratio", [(0.25, 1.0), (1.0, 4.0)])
@pytest.mark.parametrize("with_masks", [False, True])
def test_dense_block_equals_literal_upstream_float64(attn_ratio, mlp_ratio, with_masks):
    seed = fresh_seed()
    upstream = randomize(UpstreamDenseFusionBlock(D, H, attn_ratio, mlp_ratio))
    ours = DenseAVFusionBlock.from_upstream(upstream)
    x_fusion, x_image, x_audio = tokens(3, 5, 11, 7)
    kw = masks(3, 11, 7) if with_masks else {}
    err = (ours(x_fusion, x_image, x_audio, **kw) - upstream(x_fusion, x_image, x_audio, **kw)).abs().max().item()
    assert err <= 1e-10, f"seed {seed}: {err}"


@pytest.mark.parametrize("attn_ratio, mlp_ratio", [(0.25, 1.0), (1.0, 4.0)])
@pytest.mark.parametrize("with_masks", [False, True])
def test_factorized_block_equals_literal_upstream_float64(attn_ratio, mlp_ratio, with_masks):
    seed = fresh_seed()
    upstream = randomize(UpstreamFactorizedFusionBlock(D, H, attn_ratio, mlp_ratio, num_fusion_tkns=(4, 3, 2)))
    ours = FactorizedAVFusionBlock.from_upstream(upstream)
    x_fusion, x_image, x_audio = tokens(3, 9, 11, 7)
    kw = masks(3, 11, 7) if with_masks else {}
    err = (ours(x_fusion, x_image, x_audio, **kw) - upstream(x_fusion, x_image, x_audio, **kw)).abs().max().item()
    assert err <= 1e-10, f"seed {seed}: {err}"


@pytest.mark.parametrize("block_cls, upstream_cls, F", [
    (DenseAVFusionBlock, UpstreamDenseFusionBlock, 5),
    (FactorizedAVFusionBlock, UpstreamFactorizedFusionBlock, 9),
])
def test_gradients_equal_literal_upstream_float64(block_cls, upstream_cls, F):
    seed = fresh_seed()
    extra = {"num_fusion_tkns": (4, 3, 2)} if F == 9 else {}
    upstream = randomize(upstream_cls(D, H, 0.25, 1.0, **extra))
    ours = block_cls.from_upstream(upstream)
    inputs = tokens(2, F, 11, 7)
    grads = []
    for module in (upstream, ours):
        leaves = [t.clone().requires_grad_() for t in inputs]
        module.zero_grad()
        (module(*leaves) ** 2).sum().backward()
        # the key bias cancels in the softmax: ours never reads it (grad None), upstream's grad is ~0
        grads.append([t.grad for t in leaves]
                     + [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item()), f"seed {seed}"


def test_upstream_state_dict_loads_strictly_with_upstream_names():
    upstream = UpstreamDenseFusionBlock(768, 12, attn_ratio=0.25, mlp_ratio=1.0)
    ours = DenseAVFusionBlock(768, 12, attn_ratio=0.25, mlp_ratio=1.0, qkv_bias=True)
    assert set(ours.state_dict()) == DENSE_KEYS
    assert ours.attn.kv.weight.shape == (384, 1536) and ours.attn.proj.weight.shape == (768, 192)
    ours.load_state_dict(upstream.state_dict(), strict=True)

    upstream_f = UpstreamFactorizedFusionBlock(768, 12, attn_ratio=0.25, mlp_ratio=1.0, num_fusion_tkns=(16, 8, 8))
    ours_f = FactorizedAVFusionBlock(768, 12, attn_ratio=0.25, mlp_ratio=1.0, num_fusion_tkns=(16, 8, 8))
    expected = (DENSE_KEYS - {k for k in DENSE_KEYS if k.startswith("attn.")}) | FACTORIZED_ATTN_KEYS
    assert set(ours_f.state_dict()) == expected
    assert ours_f.attn.k.weight.shape == (192, 1536) and ours_f.attn.v.weight.shape == (768, 1536)
    ours_f.load_state_dict(upstream_f.state_dict(), strict=True)


def test_head_scale_switch():
    fresh_seed()
    upstream = randomize(UpstreamDenseFusionBlock(D, H, 0.25, 1.0))
    x = tokens(2, 3, 5, 4)
    default = DenseAVFusionBlock.from_upstream(upstream)
    paper = DenseAVFusionBlock.from_upstream(upstream, attn_scale="head")
    assert default.attn.scale == (D / H) ** -0.5
    assert paper.attn.scale == (D * 0.25 / H) ** -0.5
    upstream.attn.scale = paper.attn.scale  # the literal computation at the paper's scale
    assert (paper(*x) - upstream(*x)).abs().max().item() <= 1e-10
    assert (default(*x) - upstream(*x)).abs().max().item() > 1e-6


def test_half_precision_block_runs_and_is_close():
    fresh_seed()
    upstream = randomize(UpstreamDenseFusionBlock(D, H, 0.25, 1.0))
    x = tokens(2, 4, 9, 6)
    exact = upstream(*x)
    ours = DenseAVFusionBlock.from_upstream(upstream).to(torch.bfloat16)
    out = ours(*(t.to(torch.bfloat16) for t in x))
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max().item() <= 0.05 * exact.abs().max().item()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attn_scale must be 'upstream' or 'head', got 'paper'"):
        DenseAVFusionBlock(D, H, attn_scale="paper")
    with pytest.raises(ValueError, match="divisible by num_heads=7"):
        DenseAVFusionBlock(D, 7)
    with pytest.raises(ValueError, match="num_fusion_tkns must be 3 positive counts"):
        FactorizedAVFusionBlock(D, H, num_fusion_tkns=(4, 0, 2))
    block = FactorizedAVFusionBlock(D, H, num_fusion_tkns=(4, 3, 2)).double()
    x_fusion, x_image, x_audio = tokens(2, 8, 5, 4)
    with pytest.raises(ValueError, match=r"x_fusion must hold sum\(num_fusion_tkns\) = 9 tokens"):
        block(x_fusion, x_image, x_audio)
    dense = DenseAVFusionBlock(D, H).double()
    with pytest.raises(ValueError, match=r"x_fusion, x_image, x_audio must be"):
        dense(x_fusion[0], x_image, x_audio)
    with pytest.raises(TypeError, match=r"from_upstream: module has no 'norm1_mm'"):
        DenseAVFusionBlock.from_upstream(torch.nn.Linear(2, 2))
    upstream = UpstreamDenseFusionBlock(D, H)
    del upstream.attn.num_heads
    with pytest.raises(ValueError, match=r"from_upstream: pass num_heads"):
        DenseAVFusionBlock.from_upstream(upstream)


@pytest.mark.parametrize("block_cls, F", [(DenseAVFusionBlock, 5), (FactorizedAVFusionBlock, 9)])
def test_blocks_run_under_autocast(block_cls, F):
    """bf16 activations with fp32 parameters (the value bias is cast to the activations')."""
    fresh_seed()
    extra = {"num_fusion_tkns": (4, 3, 2)} if F == 9 else {}
    block = block_cls(D, H, **extra)
    x = [t.float().requires_grad_() for t in tokens(2, F, 11, 7)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(*x)
    out.float().sum().backward()
    assert out.shape == (2, F, D) and torch.isfinite(out.float()).all()
    assert block.attn.proj.weight.grad is not None and x[0].grad is not None
