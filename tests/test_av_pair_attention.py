"""av_pair_attention: every backend against the literal pair-tensor reference."""

from __future__ import annotations

import math

import pytest
import torch

import avfast
from avfast import _backend
from avfast.ops import av_pair_attention, pair_attention_map
from avfast.reference import av_pair_attention as ref
from seeding import fresh_seed
from tolerances import recompute_term, score_bound

OP = "av_pair_attention"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, F, H, Dq, Dv, Na, Nv): B=1/F=1/Na=1, pretraining sizes with Dq != Dv, odd head
# widths with keys beyond one key block, F beyond one query block.
SHAPES = [
    (1, 1, 1, 16, 16, 1, 7),
    (2, 16, 3, 16, 64, 19, 49),
    (3, 7, 2, 7, 5, 70, 9),
    (1, 70, 2, 16, 8, 3, 66),
]



def backend_reason(backend: str, device: str, dtype: torch.dtype) -> str | None:
    return _backend.unavailable_reason(backend, OP, torch.device(device), dtype)


@pytest.fixture(params=["reference", "triton", "cuda"])
def backend(request, monkeypatch):
    """Forces one backend for the test (cuda on CPU tensors = host execution of the kernels)."""
    monkeypatch.setenv("AVFAST_BACKEND", request.param)
    return request.param


def skip_unless_available(backend: str, device: str, dtype: torch.dtype) -> None:
    reason = backend_reason(backend, device, dtype)
    if reason is not None:
        pytest.skip(reason)


def make_inputs(shape, dtype, device, *, strided: bool, bias: bool = True, masks: bool = False):
    """Random inputs; strided: q as a transposed view, k/v as slices of one projection."""
    B, F, H, Dq, Dv, Na, Nv = shape
    kw = dict(device=device, dtype=dtype)
    if strided:
        q = torch.randn(B, H, F, Dq, **kw).transpose(1, 2)
        kv_a = torch.randn(B, Na, H, Dq + Dv + 3, **kw)
        kv_v = torch.randn(B, Nv, H, Dq + Dv + 3, **kw)
        k_a, v_a = kv_a[..., :Dq], kv_a[..., Dq + 3:]
        k_v, v_v = kv_v[..., :Dq], kv_v[..., Dq + 3:]
    else:
        q = torch.randn(B, F, H, Dq, **kw)
        k_a, v_a = torch.randn(B, Na, H, Dq, **kw), torch.randn(B, Na, H, Dv, **kw)
        k_v, v_v = torch.randn(B, Nv, H, Dq, **kw), torch.randn(B, Nv, H, Dv, **kw)
    extra = {"scale": 1.5 / math.sqrt(Dq)}
    if bias:
        extra["v_bias"] = torch.randn(H, Dv, **kw)
    if masks:
        mask_a = torch.rand(B, Na, device=device) < 0.3
        mask_v = torch.rand(B, Nv, device=device) < 0.3
        mask_a[0] = True  # sample 0 has no valid audio key: no valid pair
        if B > 1:
            mask_a[1] = False
            mask_a[1, 0] = True
        extra["key_padding_mask_a"] = mask_a
        extra["key_padding_mask_v"] = mask_v
    return (q, k_a, v_a, k_v, v_v), extra


def as_float64(inputs, extra):
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in extra.items()}
    return [t.double() for t in inputs], kw


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def tolerance(low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's rule: twice the error of plain torch in the same dtype, plus a few
    roundings of the result's magnitude in that dtype (summation orders differ)."""
    floor = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())
    return 2 * max_err(low, exact) + 8 * floor


def run_with_grads(fn, inputs, extra):
    leaves = [t.detach().requires_grad_() for t in inputs]
    kw = dict(extra)
    if "v_bias" in kw:
        kw["v_bias"] = kw["v_bias"].detach().requires_grad_()
    out = fn(*leaves, **kw)
    return out, leaves, kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("masks", [False, True])
def test_forward_backward_match_literal(backend, device, dtype, shape, strided, masks):
    skip_unless_available(backend, device, dtype)
    seed = fresh_seed()
    inputs, extra = make_inputs(shape, dtype, device, strided=strided, masks=masks)
    inputs64, extra64 = as_float64(inputs, extra)

    out64, leaves64, kw64 = run_with_grads(ref.av_pair_attention_literal, inputs64, extra64)
    out_pt, leaves_pt, kw_pt = run_with_grads(ref.av_pair_attention_literal, inputs, extra)
    out, leaves, kw = run_with_grads(av_pair_attention, inputs, extra)
    assert out.dtype == dtype and out.shape == out64.shape
    # kernels recompute exp(S - lse) in fp32: that rounding adds to plain torch's error
    smax = score_bound(inputs[0], (inputs[1], inputs[3]), extra["scale"])
    tol = tolerance(out_pt, out64, dtype) + recompute_term(smax, out64)
    assert max_err(out, out64) <= tol, f"seed {seed}: out err {max_err(out, out64)} > {tol}"

    dout = torch.randn_like(out64)
    out64.backward(dout)
    out_pt.backward(dout.to(dtype))
    out.backward(dout.to(dtype))
    names = ["q", "k_a", "v_a", "k_v", "v_v"]
    pairs = list(zip(names, leaves, leaves_pt, leaves64))
    pairs.append(("v_bias", kw["v_bias"], kw_pt["v_bias"], kw64["v_bias"]))
    for name, x, x_pt, x64 in pairs:
        assert x.grad is not None and x.grad.dtype == dtype, name
        tol = tolerance(x_pt.grad, x64.grad, dtype) + recompute_term(smax, x64.grad)
        err = max_err(x.grad, x64.grad)
        assert err <= tol, f"seed {seed}: grad {name} err {err} > {tol}"


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_valid_pair_are_zero(backend, device):
    skip_unless_available(backend, device, torch.float32)
    inputs, extra = make_inputs(SHAPES[1], torch.float32, device, strided=False, masks=True)
    out, leaves, kw = run_with_grads(av_pair_attention, inputs, extra)
    assert torch.all(out[0] == 0), "sample 0 has no valid audio key: its rows must be zero"
    assert out[1].abs().sum() > 0
    out.sum().backward()
    assert torch.all(leaves[1].grad[0] == 0) and torch.all(leaves[3].grad[0] == 0)
    assert torch.all(leaves[0].grad[0] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [2, 3])
def test_triton_key_splits_match_contract(device, num_splits):
    """The split-keys path (taken on the GPU when B*H is small) against the reference
    backend contract: out, residuals and gradients."""
    skip_unless_available("triton", device, torch.float32)
    from avfast.kernels.triton import av_pair_attention as tri

    seed = fresh_seed()
    (q, k_a, v_a, k_v, v_v), extra = make_inputs((2, 5, 2, 16, 8, 150, 70), torch.float32, device,
                                                 strided=True, masks=True)
    args = (q, k_a, v_a, k_v, v_v, extra["v_bias"], extra["key_padding_mask_a"], extra["key_padding_mask_v"],
            extra["scale"])
    expected = ref.av_pair_attention_fwd(*args)
    got = tri.av_pair_attention_fwd(*args, num_splits=num_splits)
    for name, a, b in zip(["out", "o_half", "lse"], got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True), f"seed {seed}: {name}"
    dout = torch.randn_like(expected[0])
    bwd_args = (dout, q, k_a, v_a, k_v, v_v, extra["key_padding_mask_a"], extra["key_padding_mask_v"],
                expected[1], expected[2], extra["scale"])
    for name, a, b in zip(["dq", "dk_a", "dv_a", "dk_v", "dv_v"],
                          tri.av_pair_attention_bwd(*bwd_args, num_splits=num_splits),
                          ref.av_pair_attention_bwd(*bwd_args)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"seed {seed}: {name}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_automatic_backend_and_key_splits(dtype):
    """B*H = 2 programs: the automatic choice splits the keys over programs."""
    seed = fresh_seed()
    inputs, extra = make_inputs((1, 16, 2, 16, 64, 300, 500), dtype, "cuda", strided=True, masks=False)
    inputs64, extra64 = as_float64(inputs, extra)
    expected = next(b for b in _backend.gpu_order(OP, dtype) if backend_reason(b, "cuda", dtype) is None)
    assert _backend.select(OP, torch.device("cuda"), dtype) == expected
    out = av_pair_attention(*inputs, **extra)
    exact = ref.av_pair_attention_literal(*inputs64, **extra64)
    tol = tolerance(ref.av_pair_attention_literal(*inputs, **extra), exact, dtype)
    assert max_err(out, exact) <= tol, f"seed {seed}"


def test_two_attention_form_equals_literal_float64():
    seed = fresh_seed()
    inputs, extra = make_inputs((2, 5, 3, 8, 12, 9, 13), torch.float64, "cpu", strided=True, masks=True)
    err = max_err(ref.av_pair_attention_two_attention(*inputs, **extra), ref.av_pair_attention_literal(*inputs, **extra))
    assert err <= 1e-12, f"seed {seed}: {err}"


def test_gradcheck_float64():
    fresh_seed()
    inputs, extra = make_inputs((2, 3, 2, 4, 5, 3, 4), torch.float64, "cpu", strided=False, masks=True)
    extra["key_padding_mask_a"][0] = False  # gradcheck needs every row differentiable

    def fn(q, k_a, v_a, k_v, v_v, v_bias):
        return av_pair_attention(q, k_a, v_a, k_v, v_v, scale=extra["scale"], v_bias=v_bias,
                                 key_padding_mask_a=extra["key_padding_mask_a"],
                                 key_padding_mask_v=extra["key_padding_mask_v"])

    args = [t.detach().requires_grad_() for t in (*inputs, extra["v_bias"])]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    skip_unless_available(backend, device, dtype)
    fresh_seed()
    inputs, extra = make_inputs((2, 3, 2, 16, 16, 5, 6), dtype, device, strided=True, masks=True)
    inputs = [t.requires_grad_() for t in inputs]
    args = (*inputs, extra["v_bias"].requires_grad_(), extra["key_padding_mask_a"],
            extra["key_padding_mask_v"], extra["scale"])
    torch.library.opcheck(torch.ops.avfast.av_pair_attention.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(backend, device):
    skip_unless_available(backend, device, torch.float32)
    fresh_seed()
    inputs, extra = make_inputs((2, 4, 2, 16, 8, 5, 9), torch.float32, device, strided=True, masks=True)

    def step(q, k_a, v_a, k_v, v_v):
        return (av_pair_attention(q, k_a, v_a, k_v, v_v, **extra) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_leaves = [t.detach().requires_grad_() for t in inputs]
    comp_leaves = [t.detach().requires_grad_() for t in inputs]
    step(*eager_leaves).backward()
    compiled(*comp_leaves).backward()
    for a, b in zip(eager_leaves, comp_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_pair_attention_map_is_the_joint_softmax():
    seed = fresh_seed()
    (q, k_a, v_a, k_v, v_v), extra = make_inputs((2, 3, 2, 8, 4, 5, 7), torch.float64, "cpu",
                                                 strided=False, masks=True)
    masks = {k: extra[k] for k in ("key_padding_mask_a", "key_padding_mask_v")}
    joint = pair_attention_map(q, k_a, k_v, scale=extra["scale"], **masks)  # (B, H, F, Na*Nv)
    assert joint.shape == (2, 2, 3, 35)
    assert torch.all(joint[0] == 0)  # sample 0: no valid pair
    assert torch.allclose(joint[1].sum(-1), torch.ones(2, 3, dtype=torch.float64))
    v_pair = (v_a[:, :, None] + v_v[:, None, :] + extra["v_bias"]).reshape(2, 35, 2, 4)
    out = torch.einsum("bhfp,bphd->bfhd", joint, v_pair)
    err = max_err(out, ref.av_pair_attention_literal(q, k_a, v_a, k_v, v_v, **extra))
    assert err <= 1e-12, f"seed {seed}: {err}"


def good_inputs():
    inputs, extra = make_inputs((2, 3, 4, 16, 8, 5, 6), torch.float32, "cpu", strided=False, masks=True)
    return dict(zip(["q", "k_a", "v_a", "k_v", "v_v"], inputs)) | extra


@pytest.mark.parametrize(
    "name, bad, error, match",
    [
        ("q", torch.randn(2, 3, 16), ValueError, r"q must be a non-empty \(B, F, H, Dq\)"),
        ("k_a", torch.randn(2, 5, 4, 8), ValueError, r"k_a must be \(B, Na, H, Dq\) = \(2, \*, 4, 16\), got \(2, 5, 4, 8\)"),
        ("k_v", torch.randn(3, 6, 4, 16), ValueError, r"k_v must be \(B, Nv, H, Dq\) = \(2, \*, 4, 16\), got \(3, 6, 4, 16\)"),
        ("v_a", torch.randn(2, 4, 4, 8), ValueError, r"v_a must be \(B, Na, H, Dv\) = \(2, 5, 4, 8\), got \(2, 4, 4, 8\)"),
        ("v_v", torch.randn(2, 6, 4, 9), ValueError, r"v_v must be \(B, Nv, H, Dv\) = \(2, 6, 4, 8\), got \(2, 6, 4, 9\)"),
        ("v_bias", torch.randn(4, 16), ValueError, r"v_bias must be \(H, Dv\) = \(4, 8\), got \(4, 16\)"),
        ("k_a", torch.randn(2, 0, 4, 16), ValueError, r"k_a must be non-empty"),
        ("v_a", torch.randn(2, 5, 4, 8, dtype=torch.float64), TypeError, r"v_a must have q's dtype torch.float32, got torch.float64"),
        ("k_v", torch.randn(2, 6, 4, 16, device="meta"), ValueError, r"k_v must be on q's device cpu, got meta"),
        ("key_padding_mask_a", torch.zeros(2, 5), TypeError, r"key_padding_mask_a must be a bool Tensor .* got dtype torch.float32"),
        ("key_padding_mask_v", torch.zeros(2, 5, dtype=torch.bool), ValueError, r"key_padding_mask_v must be \(B, Nv\) = \(2, 6\), got \(2, 5\)"),
        ("scale", float("nan"), ValueError, r"scale must be a finite float"),
        ("q", torch.randn(2, 3, 4, 16, dtype=torch.complex64), TypeError, r"q must be float32"),
    ],
)
def test_bad_inputs_name_the_argument(name, bad, error, match):
    args = good_inputs()
    args[name] = bad
    with pytest.raises(error, match=match):
        av_pair_attention(args.pop("q"), args.pop("k_a"), args.pop("v_a"), args.pop("k_v"), args.pop("v_v"), **args)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    args = good_inputs()
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    q64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
    with pytest.raises(RuntimeError, match=r"AVFAST_BACKEND=triton cannot run on cpu torch.float64"):
        av_pair_attention(q64.pop("q"), q64.pop("k_a"), q64.pop("v_a"), q64.pop("k_v"), q64.pop("v_v"), **q64)
    monkeypatch.setenv("AVFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"AVFAST_BACKEND must be one of"):
        av_pair_attention(args.pop("q"), args.pop("k_a"), args.pop("v_a"), args.pop("k_v"), args.pop("v_v"), **args)


def test_automatic_choice():
    cpu = torch.device("cpu")
    assert _backend.select(OP, cpu, torch.float32) == "reference"
    assert _backend.select(OP, torch.device("cuda"), torch.float64) == "reference"
    assert avfast.ops.av_pair_attention is av_pair_attention


def test_cuda_kernels_host_execution_is_race_free(monkeypatch):
    """The host execution runs each block's threads in order; reversed, a phase that read
    what another thread wrote in the same phase (a race on the GPU) would change results."""
    skip_unless_available("cuda", "cpu", torch.float32)
    fresh_seed()
    inputs, extra = make_inputs((2, 70, 3, 24, 40, 70, 130), torch.float32, "cpu", strided=True, masks=True)
    args = (*inputs, extra["v_bias"], extra["key_padding_mask_a"], extra["key_padding_mask_v"], extra["scale"])
    results = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("AVFAST_HOST_THREAD_ORDER", order)
        out, o_half, lse = torch.ops.avfast_C.av_pair_attention_fwd(*args)
        grads = torch.ops.avfast_C.av_pair_attention_bwd(
            torch.ones_like(out), *inputs, extra["key_padding_mask_a"], extra["key_padding_mask_v"],
            o_half, lse, extra["scale"])
        results.append((out, o_half, lse, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tf32", [False, True])
def test_triton_fp32_with_and_without_tf32(device, tf32, monkeypatch):
    """fp32 inputs on IEEE fp32 dots, or on TF32 when torch allows it: the fp32 bound, or
    (TF32) that bound plus 10-bit-mantissa roundings of the operands, which the softmax
    turns into a relative error growing with the largest score."""
    skip_unless_available("triton", device, torch.float32)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    seed = fresh_seed()
    inputs, extra = make_inputs(SHAPES[1], torch.float32, device, strided=True, masks=True)
    inputs64, extra64 = as_float64(inputs, extra)
    out64, leaves64, _ = run_with_grads(ref.av_pair_attention_literal, inputs64, extra64)
    out_pt, leaves_pt, _ = run_with_grads(ref.av_pair_attention_literal, inputs, extra)
    out, leaves, _ = run_with_grads(av_pair_attention, inputs, extra)
    q, k_a, _, k_v, _ = inputs64
    score_max = extra["scale"] * max(torch.einsum("bfhd,bnhd->bhfn", q, k).abs().max().item() for k in (k_a, k_v))
    dout = torch.randn_like(out64)
    for o, d in ((out64, dout), (out_pt, dout.float()), (out, dout.float())):
        o.backward(d)
    checks = [("out", out, out_pt, out64)] + [(f"grad {n}", x.grad, x_pt.grad, x64.grad) for n, x, x_pt, x64 in
                                              zip(["q", "k_a", "v_a", "k_v", "v_v"], leaves, leaves_pt, leaves64)]
    for name, got, plain, exact in checks:
        tol = tolerance(plain, exact, torch.float32)
        if tf32:
            tol += 8 * 2.0 ** -10 * (1 + score_max) * max(1.0, exact.abs().max().item())
        assert max_err(got, exact) <= tol, f"seed {seed}: {name} err {max_err(got, exact):.3g} > {tol:.3g}"
