"""avfast.nn BlockwiseContrastiveLoss (single process): upstream's parameter names, the
batched projection, and the loss against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avfast.nn.contrastive import BlockwiseContrastiveLoss, gathered_blockwise_infonce
from avfast.ops.blockwise_infonce import blockwise_infonce
from avfast.reference.blockwise_infonce import blockwise_infonce as ref_infonce

K, B, D_IN, D_OUT = 3, 7, 20, 12


class UpstreamProjections(nn.Module):
    """Upstream's layout: one Linear per block and modality."""

    def __init__(self, dim_in: int, dim_out: int, num_blocks: int):
        super().__init__()
        self.audio_proj = nn.ModuleList([nn.Linear(dim_in, dim_out) for _ in range(num_blocks)])
        self.vis_proj = nn.ModuleList([nn.Linear(dim_in, dim_out) for _ in range(num_blocks)])


def _feats(k: int = K, b: int = B, d: int = D_IN, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, b, d, generator=g, dtype=dtype), torch.randn(k, b, d, generator=g, dtype=dtype))


def test_state_dict_keys_are_upstreams():
    loss = BlockwiseContrastiveLoss(768)
    want = {f"{m}.{k}.{p}" for m in ("audio_proj", "vis_proj") for k in range(12) for p in ("weight", "bias")}
    assert set(loss.state_dict()) == want
    assert "audio_proj.0.weight" in want and "vis_proj.11.bias" in want
    assert loss.state_dict()["audio_proj.3.weight"].shape == (512, 768)
    assert loss.state_dict()["vis_proj.11.bias"].shape == (512,)


def test_strict_load_of_upstream_state_dict_and_batched_gemm():
    torch.manual_seed(0)
    upstream = UpstreamProjections(D_IN, D_OUT, K).double()
    ours = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K).double()
    result = ours.load_state_dict(upstream.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    audio, visual = _feats()
    z_a, z_v = ours.project(audio, visual)
    want_a = torch.stack([upstream.audio_proj[k](audio[k]) for k in range(K)])
    want_v = torch.stack([upstream.vis_proj[k](visual[k]) for k in range(K)])
    torch.testing.assert_close(z_a, want_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_v, want_v, rtol=1e-12, atol=1e-12)
    # and back: ours -> upstream, strictly
    UpstreamProjections(D_IN, D_OUT, K).double().load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_valid", [False, True])
def test_loss_and_grads_equal_reference(reduction, with_valid):
    torch.manual_seed(1)
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K, tau=0.1, reduction=reduction).double()
    audio, visual = (t.requires_grad_() for t in _feats(seed=2))
    valid = torch.tensor([True, False, True, True, False, True, True]) if with_valid else None
    got = module(audio, visual, valid)
    params = list(module.parameters())
    got_grads = torch.autograd.grad(got.sum(), [audio, visual, *params])

    # the explicit form: per-block Linear, then the reference loss
    z_a = torch.stack([module.audio_proj[k](audio[k]) for k in range(K)])
    z_v = torch.stack([module.vis_proj[k](visual[k]) for k in range(K)])
    want = ref_infonce(z_a, z_v, valid=valid, tau=0.1, reduction=reduction)
    want_grads = torch.autograd.grad(want.sum(), [audio, visual, *params])
    assert got.shape == want.shape == ((K,) if reduction == "none" else ())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_list_input_float32_and_default_reduction():
    torch.manual_seed(3)
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K)
    audio, visual = _feats(dtype=torch.float32, seed=4)
    stacked = module(audio, visual)
    listed = module(list(audio.unbind(0)), list(visual.unbind(0)))
    assert stacked.dtype == torch.float32 and stacked.shape == ()
    torch.testing.assert_close(listed, stacked)
    z_a, z_v = module.project(audio, visual)
    torch.testing.assert_close(stacked, ref_infonce(z_a, z_v, tau=0.07), rtol=1e-5, atol=1e-6)


def test_function_without_process_group_is_the_op():
    assert not torch.distributed.is_initialized()
    z_a, z_v = _feats(d=16, seed=5)
    valid = torch.tensor([True, True, False, True, True, True, False])
    for reduction in ("mean", "none"):
        torch.testing.assert_close(gathered_blockwise_infonce(z_a, z_v, valid, 0.2, reduction),
                                   blockwise_infonce(z_a, z_v, valid=valid, tau=0.2, reduction=reduction))


def test_all_background_gives_zero_loss_and_zero_grads():
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K).double()
    audio, visual = (t.requires_grad_() for t in _feats(seed=6))
    loss = module(audio, visual, torch.zeros(B, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert not audio.grad.any() and not visual.grad.any()
    assert all(not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("audio_shape, visual_shape, valid_shape, match", [
    ((K + 1, B, D_IN), (K, B, D_IN), (B,), "audio_feats"),
    ((K, B, D_IN), (K, B, D_IN + 1), (B,), "visual_feats"),
    ((K, B, D_IN), (K, B + 1, D_IN), (B,), "visual_feats"),
    ((B, D_IN), (K, B, D_IN), (B,), "audio_feats"),
    ((K, B, D_IN), (K, B, D_IN), (B + 1,), "valid"),
])
def test_bad_shapes_name_the_argument(audio_shape, visual_shape, valid_shape, match):
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K)
    with pytest.raises(ValueError, match=match):
        module(torch.randn(audio_shape), torch.randn(visual_shape), torch.ones(valid_shape, dtype=torch.bool))


def test_bad_arguments():
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K)
    audio, visual = _feats(dtype=torch.float32)
    with pytest.raises(ValueError, match="audio_feats"):
        module(list(audio.unbind(0))[:-1], visual)
    with pytest.raises(TypeError, match="valid"):
        module(audio, visual, torch.ones(B, dtype=torch.uint8))
    with pytest.raises(ValueError, match="reduction"):
        BlockwiseContrastiveLoss(D_IN, reduction="max")
    with pytest.raises(ValueError, match="z_v"):
        gathered_blockwise_infonce(audio, visual[:, :-1])
    with pytest.raises(ValueError, match="valid"):
        gathered_blockwise_infonce(audio, visual, torch.ones(B + 1, dtype=torch.bool))


def test_compile_fullgraph_single_process():
    torch.manual_seed(7)
    module = BlockwiseContrastiveLoss(D_IN, D_OUT, num_blocks=K)
    audio, visual = _feats(dtype=torch.float32, seed=8)
    valid = torch.tensor([True, False, True, True, True, True, False])
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # the op file tests inductor
    got = compiled(audio, visual, valid)
    got_grads = torch.autograd.grad(got, list(module.parameters()))
    want = module(audio, visual, valid)
    want_grads = torch.autograd.grad(want, list(module.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
