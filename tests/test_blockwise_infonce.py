"""blockwise_infonce and its fused primitive cosine_lse, against the plain-PyTorch reference."""

from __future__ import annotations


import pytest
import torch

from avfast import _backend
from avfast.ops import blockwise_infonce, cosine_lse
from avfast.reference import blockwise_infonce as ref
from seeding import fresh_seed

OP = "cosine_lse"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]



@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("AVFAST_BACKEND", request.param)
    return request.param


def skip_unless_available(backend: str, device: str, dtype: torch.dtype) -> None:
    reason = _backend.unavailable_reason(backend, OP, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(reason)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def tolerance(low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, tau: float) -> float:
    """Twice plain torch's error in the same dtype, plus a few roundings of the magnitude,
    plus the kernels' recompute term: logits S up to 1/tau carry an fp32 rounding of
    eps32/tau, which the backward's exp(S - lse) turns into that relative error."""
    magnitude = max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    eps32 = torch.finfo(torch.float32).eps
    return 2 * max_err(low, exact) + 8 * torch.finfo(dtype).eps * magnitude + 4 * eps32 / tau * magnitude


def make_valid(B: int, kind: str, device: str) -> torch.Tensor | None:
    if kind == "all":
        return None
    valid = torch.rand(B, device=device) < 0.7
    if kind == "none":
        valid[:] = False
    elif kind == "one":
        valid[:] = False
        valid[B // 2] = True
    elif kind == "all_but_one":
        valid[:] = True
        valid[B // 3] = False
    return valid


def features(K: int, B: int, d: int, dtype, device, strided: bool) -> torch.Tensor:
    if strided:  # (B, K, d + 3) sliced and transposed: no unit strides but d's
        return torch.randn(B, K, d + 3, device=device, dtype=dtype)[..., 1:d + 1].transpose(0, 1)
    return torch.randn(K, B, d, device=device, dtype=dtype)


def loss_and_grads(fn, z_a, z_v, **kw):
    z_a, z_v = z_a.detach().requires_grad_(), z_v.detach().requires_grad_()
    loss = fn(z_a, z_v, **kw)
    grads = torch.autograd.grad(loss.sum(), (z_a, z_v), allow_unused=True, materialize_grads=True)
    return loss, grads


# (K, B, d): B=1, B not a multiple of the tile, d from 16 to 1024, all 12 blocks
LOSS_SHAPES = [(1, 1, 16), (3, 37, 24), (2, 70, 1024), (12, 19, 48)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("valid_kind", ["all", "some", "one", "all_but_one", "none"])
@pytest.mark.parametrize("tau", [0.07, 0.01])
def test_loss_and_grads_match_literal(backend, device, dtype, shape, valid_kind, tau):
    skip_unless_available(backend, device, dtype)
    seed = fresh_seed()
    K, B, d = shape
    z_a = features(K, B, d, dtype, device, strided=True)
    z_v = features(K, B, d, dtype, device, strided=False)
    valid = make_valid(B, valid_kind, device)
    kw = dict(valid=valid, tau=tau, reduction="none")
    exact, exact_grads = loss_and_grads(ref.blockwise_infonce, z_a.double(), z_v.double(), **kw)
    plain, plain_grads = loss_and_grads(ref.blockwise_infonce, z_a, z_v, **kw)
    loss, grads = loss_and_grads(blockwise_infonce, z_a, z_v, **kw)
    assert loss.shape == (K,) and loss.dtype == torch.float32
    assert max_err(loss, exact) <= tolerance(plain, exact, dtype, tau), \
        f"seed {seed}: loss err {max_err(loss, exact)}"
    for name, g, g_plain, g_exact in zip(["z_a", "z_v"], grads, plain_grads, exact_grads):
        assert g.dtype == dtype
        tol = tolerance(g_plain, g_exact, dtype, tau)
        assert max_err(g, g_exact) <= tol, f"seed {seed}: grad {name} err {max_err(g, g_exact)} > {tol}"
    if valid_kind == "none":
        assert torch.all(loss == 0) and all(torch.all(g == 0) for g in grads)


def check_cosine_lse(z_row, z_col, kw, dtype, seed, extra=0.0):
    """cosine_lse and its gradients (random upstream gradients on all three outputs) within
    tolerance() of the float64 reference, plus ``extra`` x the output's magnitude."""
    device = z_row.device

    def run(fn, zr, zc):
        zr, zc = zr.detach().requires_grad_(), zc.detach().requires_grad_()
        outs = fn(zr, zc, **kw)
        torch.manual_seed(seed)
        g_out = [torch.randn(o.shape, dtype=torch.float64, device=device) for o in outs]
        used = [(o, g) for o, g in zip(outs, g_out) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in used], (zr, zc), [g.to(o.dtype) for o, g in used],
                                    allow_unused=True, materialize_grads=True)
        return outs, grads

    exact, exact_grads = run(ref.cosine_lse, z_row.double(), z_col.double())
    plain, plain_grads = run(ref.cosine_lse, z_row, z_col)
    got, grads = run(cosine_lse, z_row, z_col)
    names = ["lse_row", "lse_col", "diag", "grad z_row", "grad z_col"]
    for name, a, p, e in zip(names, [*got, *grads], [*plain, *plain_grads], [*exact, *exact_grads]):
        magnitude = max(1.0, e.abs().max().item() if e.numel() else 0.0)
        tol = tolerance(p, e, dtype, kw["tau"]) + extra * magnitude
        assert max_err(a, e) <= tol, f"seed {seed}: {name} err {max_err(a, e):.3g} > {tol:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_offset", [0, 6, -4])
@pytest.mark.parametrize("col_lse", [True, False])
def test_cosine_lse_rows_against_other_columns(backend, device, dtype, row_offset, col_lse):
    """Br != Bc with a row offset: one rank's rows against the gathered batch."""
    skip_unless_available(backend, device, dtype)
    seed = fresh_seed()
    z_row = features(2, 21, 40, dtype, device, strided=True)
    z_col = features(2, 45, 40, dtype, device, strided=False)
    valid_row, valid_col = make_valid(21, "some", device), make_valid(45, "some", device)
    kw = dict(tau=0.05, valid_row=valid_row, valid_col=valid_col, row_offset=row_offset, col_lse=col_lse)
    check_cosine_lse(z_row, z_col, kw, dtype, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("col_lse", [True, False])
def test_triton_backward_in_several_row_panels(device, col_lse, monkeypatch):
    """A dS budget of one element forces row panels of 64 rows (150 rows: 64 + 64 + 22), with
    the columns' gradient accumulated over panels, masks and a row offset."""
    from avfast.kernels.triton import blockwise_infonce as kernels

    skip_unless_available("triton", device, torch.bfloat16)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "PANEL_ELEMENTS", 1)
    assert kernels._panel_rows(2, 150, 131, 40, 64) == 64
    seed = fresh_seed()
    z_row = features(2, 150, 40, torch.bfloat16, device, strided=True)
    z_col = features(2, 131, 40, torch.bfloat16, device, strided=False)
    kw = dict(tau=0.07, valid_row=make_valid(150, "some", device), valid_col=make_valid(131, "some", device),
              row_offset=-3, col_lse=col_lse)
    check_cosine_lse(z_row, z_col, kw, torch.bfloat16, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_split_k_panel_gemm(device, monkeypatch):
    """Split-K of the rows' gradient GEMM (a reduction over 131 columns in 64-column splits
    summed in fixed order), with panels so that the columns' GEMM accumulates as well."""
    from avfast.kernels.triton import blockwise_infonce as kernels

    skip_unless_available("triton", device, torch.float32)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "SPLIT_K_MIN", 16)
    monkeypatch.setattr(kernels, "MIN_PROGRAMS", 3)  # one output tile: split it into >= 3 programs
    monkeypatch.setattr(kernels, "PANEL_ELEMENTS", 1)
    calls = []
    real = kernels._panel_matmul_kernel
    monkeypatch.setattr(kernels, "_panel_matmul_kernel", _GridSpy(real, calls))
    seed = fresh_seed()
    z_row = features(1, 70, 24, torch.float32, device, strided=True)
    z_col = features(1, 131, 24, torch.float32, device, strided=False)
    kw = dict(tau=0.1, valid_row=None, valid_col=make_valid(131, "some", device), row_offset=2, col_lse=True)
    check_cosine_lse(z_row, z_col, kw, torch.float32, seed)
    assert any(grid[0] > 1 for grid in calls), f"no split-K launch among grids {calls}"


class _GridSpy:
    """Wraps a JIT kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.025, 0.0249])
def test_triton_scores_at_the_far_end_of_their_range(device, tau, monkeypatch):
    """All rows parallel and all columns anti-parallel to them: every score is -1/tau, the
    far end of the span 2/tau, where tau = 0.025 takes the bound-relative fp32 path
    (exp(-80) is still normal) and 0.0249 the running maxima; both give the reference."""
    from avfast.kernels.triton import blockwise_infonce as kernels

    skip_unless_available("triton", device, torch.float32)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    assert (2 / tau <= kernels.BOUND_REF_RANGE) == (tau == 0.025)
    seed = fresh_seed()
    direction = torch.randn(1, 1, 16, device=device)
    z_row = direction + 1e-4 * torch.randn(1, 20, 16, device=device)
    z_col = -direction + 1e-4 * torch.randn(1, 23, 16, device=device)
    kw = dict(tau=tau, valid_row=None, valid_col=None, row_offset=0, col_lse=True)
    check_cosine_lse(z_row, z_col, kw, torch.float32, seed)


def test_dot_precision_follows_torch_tf32_setting(monkeypatch):
    """fp32 inputs: TF32 exactly when torch allows it (allow_tf32, fp32_precision or
    float32_matmul_precision), IEEE otherwise; 16-bit inputs use the native dot."""
    from avfast.kernels.triton.common import dot_precision

    x32, x16 = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(setting)
        try:
            assert dot_precision(x32) == want, setting
        finally:
            torch.set_float32_matmul_precision(previous)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert dot_precision(x32) == "tf32"
    assert dot_precision(x16) == "native"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tf32", [False, True])
def test_triton_fp32_with_and_without_tf32(device, tf32, monkeypatch):
    """fp32 under TF32 is within TF32's operand rounding (2^-11 relative per operand, so
    2^-10 on each cosine, scaled by 1/tau into S and the gradients) of the reference;
    without it, within IEEE fp32's tolerance."""
    skip_unless_available("triton", device, torch.float32)
    monkeypatch.setenv("AVFAST_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    seed = fresh_seed()
    z_row = features(3, 70, 200, torch.float32, device, strided=True)
    z_col = features(3, 70, 200, torch.float32, device, strided=False)
    kw = dict(tau=0.07, valid_row=None, valid_col=None, row_offset=0, col_lse=True)
    check_cosine_lse(z_row, z_col, kw, torch.float32, seed, extra=4 * 2.0**-10 / kw["tau"] if tf32 else 0.0)


def test_reference_backward_is_the_gradient_of_the_reference_forward():
    seed = fresh_seed()
    z_row = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    z_col = torch.randn(2, 11, 7, dtype=torch.float64, requires_grad=True)
    valid_row, valid_col = make_valid(9, "some", "cpu"), make_valid(11, "some", "cpu")
    outs = ref.cosine_lse(z_row, z_col, tau=0.2, valid_row=valid_row, valid_col=valid_col, row_offset=2)
    g_out = [torch.randn_like(o) for o in outs]
    expected = torch.autograd.grad(outs, (z_row, z_col), g_out)
    got = ref.cosine_lse_bwd(*g_out, z_row.detach(), z_col.detach(), valid_row, valid_col, outs[0].detach(),
                             outs[1].detach(), 0.2, 2, True)
    for a, b in zip(got, expected):
        assert max_err(a, b) <= 1e-12, f"seed {seed}"


def test_gradcheck_float64():
    fresh_seed()
    z_a = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    z_v = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda a, v: blockwise_infonce(a, v, valid=valid, tau=0.3, reduction="none"),
                                    (z_a, z_v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    skip_unless_available(backend, device, dtype)
    fresh_seed()
    z_row = features(2, 6, 16, dtype, device, strided=True).requires_grad_()
    z_col = features(2, 7, 16, dtype, device, strided=False).requires_grad_()
    args = (z_row, z_col, make_valid(6, "some", device), make_valid(7, "some", device), 0.1, 1, True)
    torch.library.opcheck(torch.ops.avfast.cosine_lse.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(backend, device):
    skip_unless_available(backend, device, torch.float32)
    fresh_seed()
    z_a, z_v = features(3, 10, 16, torch.float32, device, False), features(3, 10, 16, torch.float32, device, True)
    valid = make_valid(10, "some", device)

    def step(a, v):
        return blockwise_infonce(a, v, valid=valid, tau=0.07)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_loss, eager_grads = loss_and_grads(step, z_a, z_v)
    comp_loss, comp_grads = loss_and_grads(compiled, z_a, z_v)
    assert torch.allclose(eager_loss, comp_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_grads, comp_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reductions():
    fresh_seed()
    z_a, z_v = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    per_block = blockwise_infonce(z_a, z_v, reduction="none")
    assert per_block.shape == (4,)
    assert torch.allclose(blockwise_infonce(z_a, z_v), per_block.mean())
    assert torch.allclose(blockwise_infonce(z_a, z_v, reduction="sum"), per_block.sum())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(z_a=torch.randn(3, 8)), ValueError, r"blockwise_infonce: z_a must be \(K, B, d\) with K, B, d >= 1, got \(3, 8\)"),
        (dict(z_v=torch.randn(2, 8, 16)), ValueError, r"z_v must be \(K, B, d\) = \(3, 8, 16\) like z_a, got \(2, 8, 16\)"),
        (dict(z_v=torch.randn(3, 8, 16, dtype=torch.float64)), TypeError, r"blockwise_infonce: z_v must have z_a's dtype torch.float32, got torch.float64"),
        (dict(z_a=torch.randint(0, 3, (3, 8, 16))), TypeError, r"z_a must be float32, float16, bfloat16 or float64, got torch.int64"),
        (dict(valid=torch.ones(8)), TypeError, r"valid must be a bool Tensor \(B,\) .* got torch.float32"),
        (dict(valid=torch.ones(7, dtype=torch.bool)), ValueError, r"valid must be \(B,\) = \(8,\), got \(7,\)"),
        (dict(tau=0.001), ValueError, r"tau must be a finite float >= 0.003, got 0.001"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    args = dict(z_a=torch.randn(3, 8, 16), z_v=torch.randn(3, 8, 16))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        blockwise_infonce(args.pop("z_a"), args.pop("z_v"), **args)


def test_cosine_lse_bad_inputs():
    z = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"cosine_lse: z_col must be \(K, Bc, d\) = \(2, \*, 8\), got \(2, 5, 9\)"):
        cosine_lse(z, torch.randn(2, 5, 9), tau=0.1)
    with pytest.raises(ValueError, match=r"cosine_lse: z_col must be \(K, B, d\) with K, B, d >= 1, got \(2, 0, 8\)"):
        cosine_lse(z, torch.randn(2, 0, 8), tau=0.1)
    with pytest.raises(ValueError, match=r"cosine_lse: valid_col must be \(B,\) = \(6,\), got \(5,\)"):
        cosine_lse(z, torch.randn(2, 6, 8), tau=0.1, valid_col=torch.ones(5, dtype=torch.bool))
