"""av_adapter_attention: every backend against the literal two-attention reference."""

from __future__ import annotations


import pytest
import torch

from avfast import _backend
from avfast.ops import av_adapter_attention
from avfast.reference import av_adapter_attention as ref
from seeding import fresh_seed

OP = "av_adapter_attention"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, La, Lv, r): ViT-B/16, ViT-L/14, Swin windows with r = D/2 and D/16, L=1, r=8, r=80
SHAPES = [(2, 49, 197, 48), (1, 64, 257, 64), (2, 49, 49, 384), (3, 49, 49, 8), (3, 1, 1, 8), (2, 7, 13, 80)]



@pytest.fixture(params=["reference", "triton", "cuda"])
def backend(request, monkeypatch):
    """Forces one backend (cuda on CPU tensors = host execution of the CUDA kernels)."""
    monkeypatch.setenv("AVFAST_BACKEND", request.param)
    return request.param


def skip_unless_available(backend: str, device: str, dtype: torch.dtype) -> None:
    reason = _backend.unavailable_reason(backend, OP, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(reason)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def tolerance(low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, score_max: float = 0.0) -> float:
    """Twice plain torch's error in the same dtype, plus a few roundings of the magnitude,
    plus the backward's recompute term: exp(S - lse) carries the fp32 rounding of scores
    up to score_max as a relative error (as in FlashAttention)."""
    magnitude = max(1.0, exact.abs().max().item())
    recompute = 4 * torch.finfo(torch.float32).eps * score_max * magnitude
    return 2 * max_err(low, exact) + 8 * torch.finfo(dtype).eps * magnitude + recompute


def make_inputs(shape, dtype, device, gates: str):
    N, La, Lv, r = shape
    h_a = torch.randn(N, La, r + 3, device=device, dtype=dtype)[..., 2:r + 2]  # non-contiguous
    h_v = torch.randn(N, r, Lv, device=device, dtype=dtype).transpose(1, 2)  # non-contiguous
    if gates == "scalar":
        g_a, g_v = torch.randn((), device=device), torch.randn(1, device=device)
    elif gates == "zero":  # upstream's initial value
        g_a, g_v = torch.zeros(1, device=device), torch.zeros(1, device=device)
    else:
        g_a, g_v = torch.randn(N, device=device), torch.randn(N, device=device)
    return h_a, h_v, g_a, g_v


def run(fn, h_a, h_v, g_a, g_v, scale, douts=None):
    leaves = [t.detach().requires_grad_() for t in (h_a, h_v, g_a, g_v)]
    outs = fn(*leaves, scale=scale)
    if douts is None:
        douts = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(douts, outs)])
    return outs, grads, douts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gates, scale", [("frame", None), ("scalar", 0.125), ("zero", None)])
def test_forward_backward_match_literal(backend, device, dtype, shape, gates, scale):
    skip_unless_available(backend, device, dtype)
    seed = fresh_seed()
    h_a, h_v, g_a, g_v = make_inputs(shape, dtype, device, gates)
    if backend == "triton" and shape[3] > 128:  # Swin's widest adapters: cuda or reference only
        with pytest.raises(RuntimeError, match=r"AVFAST_BACKEND=triton cannot run .*: triton kernels of "
                                               r"av_adapter_attention take r <= 128, got r=384"):
            av_adapter_attention(h_a, h_v, g_a, g_v, scale=scale)
        return
    # output gradients representable in the dtype, so that every run sees the same ones
    douts = [torch.randn(h.shape, device=device).to(dtype).double() for h in (h_a, h_v)]
    exact, exact_grads, _ = run(ref.av_adapter_attention_literal, h_a.double(), h_v.double(),
                                g_a.double(), g_v.double(), scale, douts)
    # plain torch entirely in the inputs' dtype (fp32 gates would promote its outputs)
    plain, plain_grads, _ = run(ref.av_adapter_attention_literal, h_a, h_v, g_a.to(dtype), g_v.to(dtype), scale, douts)
    got, grads, _ = run(av_adapter_attention, h_a, h_v, g_a, g_v, scale, douts)
    # scores of magnitude score_max carry an fp32 rounding that the softmax turns into a
    # relative error, whatever the order of the sums
    score_max = (h_v.double() @ h_a.double().transpose(1, 2)).abs().max().item() * (scale or 1.0)
    for name, o, p, e in zip(["h_a'", "h_v'"], got, plain, exact):
        assert o.dtype == dtype and o.shape == e.shape
        assert max_err(o, e) <= tolerance(p, e, dtype, score_max), f"seed {seed}: {name} err {max_err(o, e)}"
    # a gate's gradient sums dout * o over a frame: each term may carry a few roundings
    o_a, o_v = ref.av_adapter_attention_fwd(h_a.double(), h_v.double(), g_a.double().expand(shape[0]),
                                            g_v.double().expand(shape[0]), scale or 1.0)[2:4]
    term_sums = [(d * o).abs().sum().item() for d, o in zip(douts, (o_a, o_v))]
    for name, g, p, e in zip(["h_a", "h_v", "gate_a", "gate_v"], grads, plain_grads, exact_grads):
        assert g.shape == e.shape, name
        tol = tolerance(p, e, dtype, score_max)
        if name.startswith("gate"):
            tol += 4 * torch.finfo(dtype).eps * term_sums[name == "gate_v"]
        assert max_err(g, e) <= tol, f"seed {seed}: grad {name} err {max_err(g, e)} > {tol}"


def test_gradcheck_float64():
    fresh_seed()
    h_a, h_v, g_a, g_v = make_inputs((2, 3, 5, 4), torch.float64, "cpu", "frame")
    args = [t.double().requires_grad_() for t in (h_a, h_v, g_a, g_v)]
    assert torch.autograd.gradcheck(lambda a, v, ga, gv: av_adapter_attention(a, v, ga, gv, scale=0.5), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    skip_unless_available(backend, device, dtype)
    fresh_seed()
    h_a, h_v, g_a, g_v = make_inputs((3, 5, 18, 16), dtype, device, "frame")
    args = (h_a.requires_grad_(), h_v.requires_grad_(), g_a.to(h_a.dtype).requires_grad_(),
            g_v.to(h_a.dtype).requires_grad_(), 0.5)
    torch.library.opcheck(torch.ops.avfast.av_adapter_attention.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(backend, device):
    skip_unless_available(backend, device, torch.float32)
    fresh_seed()
    inputs = make_inputs((3, 5, 18, 16), torch.float32, device, "scalar")

    def step(h_a, h_v, g_a, g_v):
        out_a, out_v = av_adapter_attention(h_a, h_v, g_a, g_v)
        return out_a.square().sum() + out_v.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager = [t.detach().requires_grad_() for t in inputs]
    comp = [t.detach().requires_grad_() for t in inputs]
    step(*eager).backward()
    compiled(*comp).backward()
    for a, b in zip(eager, comp):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, bad, error, match",
    [
        ("h_a", torch.randn(4, 9), ValueError, r"h_a must be a non-empty \(N, La, r\) = \(\*, \*, \*\), got \(4, 9\)"),
        ("h_v", torch.randn(4, 21, 8), ValueError, r"h_v must be a non-empty \(N, Lv, r\) = \(4, \*, 16\), got \(4, 21, 8\)"),
        ("h_v", torch.randn(3, 21, 16), ValueError, r"h_v must be a non-empty \(N, Lv, r\) = \(4, \*, 16\), got \(3, 21, 16\)"),
        ("h_v", torch.randn(4, 21, 16, dtype=torch.float64), TypeError, r"h_v must have h_a's dtype torch.float32"),
        ("gate_a", torch.zeros(3), ValueError, r"gate_a must have shape \(\), \(1,\) or \(N,\) = \(4,\), got \(3,\)"),
        ("gate_v", 0.5, TypeError, r"gate_v must be a Tensor"),
        ("gate_v", torch.zeros(1, dtype=torch.int64), TypeError, r"gate_v must be a float tensor"),
    ],
)
def test_bad_inputs_name_the_argument(name, bad, error, match):
    args = dict(h_a=torch.randn(4, 9, 16), h_v=torch.randn(4, 21, 16), gate_a=torch.zeros(1), gate_v=torch.zeros(1))
    args[name] = bad
    with pytest.raises(error, match=match):
        av_adapter_attention(args["h_a"], args["h_v"], args["gate_a"], args["gate_v"])


def test_cuda_kernels_host_execution_is_race_free(monkeypatch):
    """Reversing the emulated threads' order leaves results bit-identical (no phase reads
    what another thread writes in the same phase)."""
    skip_unless_available("cuda", "cpu", torch.float32)
    fresh_seed()
    h_a, h_v, g_a, g_v = make_inputs((3, 49, 197, 48), torch.float32, "cpu", "frame")
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("AVFAST_HOST_THREAD_ORDER", order)
        fwd = torch.ops.avfast_C.av_adapter_attention_fwd(h_a, h_v, g_a, g_v, 0.5)
        bwd = torch.ops.avfast_C.av_adapter_attention_bwd(torch.ones_like(fwd[0]), torch.ones_like(fwd[1]),
                                                          h_a, h_v, g_a, g_v, *fwd[2:], 0.5)
        results.append((*fwd, *bwd))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_triton_plan_splits_the_streamed_tokens_for_few_frames():
    """STG-CMA's 20 frames (La49 Lv197 r48) split the visual tokens until the launch covers
    an H100's 132 SMs; 640 frames need no split. The kernel tests above run both paths:
    shapes with Ly > 32 split (on CPU the plan assumes 132 SMs), Ly <= 32 do not."""
    from avfast.kernels.triton import av_adapter_attention as kernels

    *_, splits, per_split = kernels._plan(20, 49, 197, 48, 2, 132)
    assert 20 * splits >= 132 and per_split % 32 == 0 and (splits - 1) * per_split < 197
    assert kernels._plan(640, 49, 197, 48, 2, 132)[4] == 1
    assert kernels._plan(2, 49, 197, 48, 4, 132)[4] > 1 and kernels._plan(3, 1, 1, 8, 4, 132)[4] == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tf32", [False, True])
def test_triton_fp32_with_and_without_tf32(device, tf32, monkeypatch):
    """fp32 inputs on IEEE fp32 dots, or on TF32 when torch allows it: within the fp32
    bound, or (TF32) the same bound with a 10-bit mantissa on the dot operands."""
    skip_unless_available("triton", device, torch.float32)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    seed = fresh_seed()
    h_a, h_v, g_a, g_v = make_inputs((2, 49, 197, 48), torch.float32, device, "frame")
    douts = [torch.randn(h.shape, device=device, dtype=torch.float64) for h in (h_a, h_v)]
    exact, exact_grads, _ = run(ref.av_adapter_attention_literal, h_a.double(), h_v.double(),
                                g_a.double(), g_v.double(), None, douts)
    plain, plain_grads, _ = run(ref.av_adapter_attention_literal, h_a, h_v, g_a, g_v, None, douts)
    got, grads, _ = run(av_adapter_attention, h_a, h_v, g_a, g_v, None, douts)
    score_max = (h_v.double() @ h_a.double().transpose(1, 2)).abs().max().item() * 48 ** -0.5
    tf32_eps = 2.0 ** -10
    for name, o, p, e in zip(["h_a'", "h_v'", "dh_a", "dh_v"], [*got, *grads[:2]], [*plain, *plain_grads[:2]],
                             [*exact, *exact_grads[:2]]):
        tol = tolerance(p, e, torch.float32, score_max)
        if tf32:
            tol += 8 * tf32_eps * (1 + score_max) * max(1.0, e.abs().max().item())
        assert max_err(o, e) <= tol, f"seed {seed}: {name} err {max_err(o, e):.3g} > {tol:.3g}"
