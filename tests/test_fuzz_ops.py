"""Randomized differential fuzzing of every public op against its float64 reference.

Each test draws ``AVFAST_FUZZ_CASES`` cases (default 200, the count CI runs) from a seeded
generator: sizes of 1 and off every tile edge, each kernel dtype, transposed / expanded /
sliced views, masks none / some / all / all-but-one, scales and temperatures at their
limits. Every case runs forward and backward on one forced backend (the Triton
interpreter, or the CUDA kernels executed on the host) and is compared with the float64
reference within twice plain torch's error in the case's dtype (see ``tolerance``).
A failure lists each failing case with its index, description and the seed that replays
the run (``AVFAST_TEST_SEED=<seed>``; ``AVFAST_FUZZ_CASE=<index>`` replays one case). The bad inputs of every op are at the end.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from avfast import _backend
from avfast.ops import av_adapter_attention, av_pair_attention, blockwise_infonce, cosine_lse, pair_attention_map
from avfast.reference import av_adapter_attention as adapter_ref
from avfast.reference import av_pair_attention as pair_ref
from avfast.reference import blockwise_infonce as infonce_ref
from seeding import fresh_seed
from tolerances import EPS32, recompute_term, score_bound

CASES = int(os.environ.get("AVFAST_FUZZ_CASES", "200"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# around the kernels' tile edges (16, 32, 64 and 128) and 1
SIZES = (1, 1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 65)
WIDTHS = (1, 2, 3, 5, 8, 16, 17, 24, 33, 64)
LAYOUTS = ("contiguous", "transposed", "expanded", "sliced")
MASKS = ("none", "some", "all", "all_but_one")
# the kernel backends that run on CPU tensors ("cuda" = the CUDA kernels executed on the host;
# its id avoids the "cuda" marker that skips GPU tests)
BACKENDS = ["triton", pytest.param("cuda", id="cuda_host")]


# ---------------------------------------------------------------- helpers


def tensor(shape, dtype, layout: str) -> torch.Tensor:
    """randn of ``shape`` in ``dtype`` as a view of the given layout: ``transposed`` (dims 1
    and 2 swapped in memory), ``expanded`` (stride 0 along dim 0), ``sliced`` (a window of
    a wider last dim) or ``contiguous``."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 3:
        swapped = (shape[0], shape[2], shape[1], *shape[3:])
        return torch.randn(swapped, dtype=dtype).transpose(1, 2)
    if layout == "expanded":
        return torch.randn((1, *shape[1:]), dtype=dtype).expand(shape)
    if layout == "sliced":
        return torch.randn((*shape[:-1], shape[-1] + 3), dtype=dtype)[..., 2:shape[-1] + 2]
    return torch.randn(shape, dtype=dtype)


def key_mask(B: int, N: int, kind: str, rng: random.Random) -> torch.Tensor | None:
    """(B, N) bool, True = padded: ``none`` -> None, ``some`` (about a third), ``all``,
    ``all_but_one`` (one valid key per sample, at a random place)."""
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(B, N, dtype=torch.bool)
    if kind == "all_but_one":
        mask = torch.ones(B, N, dtype=torch.bool)
        for b in range(B):
            mask[b, rng.randrange(N)] = False
        return mask
    return torch.rand(B, N) < 0.33


def valid_flags(B: int, kind: str, rng: random.Random) -> torch.Tensor | None:
    """(B,) bool, False = dropped sample: the complement of ``key_mask``'s kinds."""
    mask = key_mask(1, B, kind, rng)
    return None if mask is None else ~mask[0]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def tolerance(plain: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, score_max: float) -> float:
    """Twice plain torch's error in ``dtype``, plus a few roundings of the magnitude in
    ``dtype``, plus the kernels' recompute term (fp32 scores up to ``score_max`` carry a
    relative rounding of eps32 * score_max into exp(S - lse))."""
    magnitude = max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    return 2 * max_err(plain, exact) + 8 * torch.finfo(dtype).eps * magnitude + recompute_term(score_max, exact)


def fuzz_forced(backend: str, op: str, draw, check, monkeypatch) -> None:
    """fuzz() with ``backend`` forced for ``op`` (skipped where it cannot run on CPU)."""
    for dtype in DTYPES:
        reason = _backend.unavailable_reason(backend, op, torch.device("cpu"), dtype)
        if reason is not None:
            pytest.skip(reason)
    monkeypatch.setenv("AVFAST_BACKEND", backend)
    fuzz(draw, check, fresh_seed())


def run_with_grads(fn, tensors: dict, douts_seed: int, **kw):
    """fn(**tensors, **kw) and the gradients of every tensor of ``tensors`` for random
    upstream gradients drawn (in float64) from ``douts_seed``."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    outs = fn(**leaves, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(douts_seed)
    douts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    used = [(o, d) for o, d in zip(outs, douts) if o.requires_grad]  # lse_col without col_lse is not
    grads = torch.autograd.grad([o for o, _ in used], list(leaves.values()), [d for _, d in used],
                                allow_unused=True, materialize_grads=True)
    return outs, dict(zip(leaves, grads))


def compare(name, got, plain, exact, dtype, score_max, problems: list[str], extra=0.0) -> None:
    """Appends to ``problems`` unless |got - exact| <= tolerance(...) + ``extra`` (a float,
    or a tensor broadcasting to got: a bound per element)."""
    if got.shape != exact.shape:
        problems.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}")
        return
    beyond = exact.abs() > torch.finfo(got.dtype).max  # overflows the result's dtype: must be +-inf
    if not torch.equal(got[beyond].double(), exact[beyond].sign() * torch.inf):
        problems.append(f"{name}: {int(beyond.sum())} values beyond the {got.dtype} range are not +-inf")
    extra = torch.as_tensor(extra, dtype=torch.float64).expand(got.shape)[~beyond]
    got, plain, exact = got[~beyond], plain[~beyond], exact[~beyond]
    if not torch.isfinite(got).all():
        problems.append(f"{name}: not finite")
        return
    err = (got.double() - exact.double()).abs()
    tol = tolerance(plain, exact, dtype, score_max) + extra
    if not (err <= tol).all():
        worst = int((err - tol).argmax())
        problems.append(f"{name}: err {err[worst].item():.3g} > tol {tol[worst].item():.3g}")


def fuzz(draw, check, seed: int) -> None:
    """Runs CASES cases: draw(rng) -> (description, case); check(case, case_seed) -> problems."""
    failures = []
    only = os.environ.get("AVFAST_FUZZ_CASE")
    for i in [int(only)] if only else range(CASES):
        rng = random.Random(seed * 1_000_003 + i)
        torch.manual_seed(rng.getrandbits(31))
        description, case = draw(rng)
        try:
            problems = check(case, rng.getrandbits(31))
        except Exception as err:  # noqa: BLE001 - a crash is a failing case
            problems = [f"raised {type(err).__name__}: {str(err)[:300]}"]
        if problems:
            failures.append(f"case {i} [{description}]: " + "; ".join(problems))
    assert not failures, (f"AVFAST_TEST_SEED={seed}: {len(failures)} of {CASES} cases failed:\n"
                          + "\n".join(failures[:10]))


def sized(rng: random.Random, choices, budget: int, *others: int) -> int:
    """A size from ``choices`` keeping the product with ``others`` within ``budget``."""
    for _ in range(20):
        value = rng.choice(choices)
        if value * math.prod(others) <= budget:
            return value
    return 1


# ---------------------------------------------------------------- av_pair_attention


def draw_pair(rng: random.Random, dtype=None):
    B, H = rng.choice((1, 1, 2, 3)), rng.choice((1, 2, 3))
    F = sized(rng, SIZES + (70,), 160, B * H)
    Na, Nv = sized(rng, SIZES + (70,), 140, B * H), sized(rng, SIZES + (70,), 140, B * H)
    Dq, Dv = rng.choice(WIDTHS), rng.choice(WIDTHS)
    dtype = dtype or rng.choice(DTYPES)
    scale = rng.choice((Dq ** -0.5, Dq ** -0.5, 0.0, 1e-6, -(Dq ** -0.5), 6.0 * Dq ** -0.5))
    layouts = [rng.choice(LAYOUTS) for _ in range(5)]
    tensors = dict(q=tensor((B, F, H, Dq), dtype, layouts[0]), k_a=tensor((B, Na, H, Dq), dtype, layouts[1]),
                   v_a=tensor((B, Na, H, Dv), dtype, layouts[2]), k_v=tensor((B, Nv, H, Dq), dtype, layouts[3]),
                   v_v=tensor((B, Nv, H, Dv), dtype, layouts[4]))
    bias = rng.random() < 0.5
    if bias:
        tensors["v_bias"] = torch.randn(H, Dv, dtype=dtype)
    kinds = rng.choice(MASKS), rng.choice(MASKS)
    masks = dict(key_padding_mask_a=key_mask(B, Na, kinds[0], rng), key_padding_mask_v=key_mask(B, Nv, kinds[1], rng))
    description = (f"B{B} F{F} H{H} Dq{Dq} Dv{Dv} Na{Na} Nv{Nv} {str(dtype)[6:]} scale {scale:.3g} "
                   f"layouts {layouts} bias {bias} masks {kinds}")
    return description, (tensors, masks, scale, dtype)


def check_pair(case, seed: int) -> list[str]:
    tensors, masks, scale, dtype = case
    kw = dict(scale=scale, **masks)
    exact, exact_g = run_with_grads(pair_ref.av_pair_attention_literal,
                                    {k: v.double() for k, v in tensors.items()}, seed, **kw)
    plain, plain_g = run_with_grads(pair_ref.av_pair_attention_literal, tensors, seed, **kw)
    got, got_g = run_with_grads(av_pair_attention, tensors, seed, **kw)
    smax = score_bound(tensors["q"], (tensors["k_a"], tensors["k_v"]), scale)
    problems: list[str] = []
    if got[0].dtype != dtype:
        problems.append(f"out dtype {got[0].dtype}, expected {dtype}")
    compare("out", got[0], plain[0], exact[0], dtype, smax, problems)
    cancel = score_grad_term(tensors, scale)
    for name in tensors:
        compare(f"grad {name}", got_g[name], plain_g[name], exact_g[name], dtype, smax, problems,
                cancel if name in ("q", "k_a", "k_v") else 0.0)
    return problems


def score_grad_term(tensors: dict, scale: float) -> float:
    """The cancellation term of the score-side gradients (q, k_a, k_v): dS = P (dP - delta)
    is exactly 0 with one valid key, but dP and delta = rowsum(dout * o) round apart by
    about eps32 |dout| |v| per row, which dq / dk gather over up to max(F, Na, Nv) rows
    times |scale| |q or k| (|dout| <= 5, 5 sigma of the randn upstream gradients)."""
    norm = lambda t: t.double().norm(dim=-1).max().item()  # noqa: E731
    rows = max(tensors["q"].shape[1], tensors["k_a"].shape[1], tensors["k_v"].shape[1])
    v = norm(tensors["v_a"]) + norm(tensors["v_v"]) + (norm(tensors["v_bias"]) if "v_bias" in tensors else 0.0)
    qk = max(norm(tensors["q"]), norm(tensors["k_a"]), norm(tensors["k_v"]))
    return 4 * EPS32 * abs(scale) * math.sqrt(rows) * qk * 5.0 * v


@pytest.mark.parametrize("backend", BACKENDS)
def test_av_pair_attention_fuzz(backend, monkeypatch):
    fuzz_forced(backend, "av_pair_attention", draw_pair, check_pair, monkeypatch)


# ---------------------------------------------------------------- pair_attention_map


def joint_softmax(q, k_a, k_v, *, scale, key_padding_mask_a=None, key_padding_mask_v=None):
    """The pair map by its definition: one softmax over all Na x Nv pair keys
    k_a[i] + k_v[j] (pair p = i * Nv + j), in float32 or float64; rows with no valid pair 0."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k_a, k_v = q.to(acc), k_a.to(acc), k_v.to(acc)
    B, Na, Nv = q.shape[0], k_a.shape[1], k_v.shape[1]
    keys = (k_a[:, :, None] + k_v[:, None, :]).flatten(1, 2)  # (B, Na*Nv, H, Dq)
    s = torch.einsum("bfhd,bphd->bhfp", q, keys) * scale
    padded = torch.zeros(B, Na, Nv, dtype=torch.bool)
    if key_padding_mask_a is not None:
        padded |= key_padding_mask_a[:, :, None]
    if key_padding_mask_v is not None:
        padded |= key_padding_mask_v[:, None, :]
    padded = padded.flatten(1)[:, None, None, :]
    s = s.masked_fill(padded, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(padded.all(dim=-1, keepdim=True), torch.zeros_like(p), p)


def draw_map(rng: random.Random):
    description, (tensors, masks, scale, dtype) = draw_pair(rng)
    return description, ({k: tensors[k] for k in ("q", "k_a", "k_v")}, masks, scale, dtype)


def check_map(case, seed: int) -> list[str]:
    tensors, masks, scale, dtype = case
    kw = dict(scale=scale, **masks)
    exact, exact_g = run_with_grads(joint_softmax, {k: v.double() for k, v in tensors.items()}, seed, **kw)
    plain, plain_g = run_with_grads(joint_softmax, tensors, seed, **kw)
    got, got_g = run_with_grads(pair_attention_map, tensors, seed, **kw)
    smax = score_bound(tensors["q"], (tensors["k_a"], tensors["k_v"]), scale)
    problems: list[str] = []
    if got[0].dtype != torch.float32:
        problems.append(f"map dtype {got[0].dtype}, expected float32")
    compare("map", got[0], plain[0], exact[0], torch.float32, smax, problems)
    for name in tensors:
        compare(f"grad {name}", got_g[name], plain_g[name], exact_g[name], torch.float32, smax, problems)
    return problems


def test_pair_attention_map_fuzz():
    """pair_attention_map (no kernel backend: it serves visualization) against the joint
    softmax over the materialized pair keys."""
    fuzz(draw_map, check_map, fresh_seed())


# ---------------------------------------------------------------- cosine_lse / blockwise_infonce

TAUS = (0.003, 0.01, 0.0249, 0.025, 0.07, 0.07, 1.0, 10.0)
VALID = ("none", "none", "some", "all", "all_but_one")


def features(K: int, B: int, d: int, dtype, rng: random.Random) -> torch.Tensor:
    z = tensor((K, B, d), dtype, rng.choice(LAYOUTS))
    # a zero row (normalization's eps); not in float16, where its gradient (1/eps = 1e12) overflows
    if dtype != torch.float16 and rng.random() < 0.1:
        z = z.clone()
        z[:, rng.randrange(B)] = 0
    return z


def draw_cosine_lse(rng: random.Random):
    K = rng.choice((1, 1, 2, 3, 12))
    Br, Bc = sized(rng, SIZES + (129,), 300, K), sized(rng, SIZES + (129,), 300, K)
    d = rng.choice(WIDTHS + (100,))
    dtype, tau = rng.choice(DTYPES), rng.choice(TAUS)
    kinds = rng.choice(VALID), rng.choice(VALID)
    kw = dict(tau=tau, valid_row=valid_flags(Br, kinds[0], rng), valid_col=valid_flags(Bc, kinds[1], rng),
              row_offset=rng.randint(-Br, Bc), col_lse=rng.random() < 0.8)
    tensors = dict(z_row=features(K, Br, d, dtype, rng), z_col=features(K, Bc, d, dtype, rng))
    description = (f"K{K} Br{Br} Bc{Bc} d{d} {str(dtype)[6:]} tau {tau} valid {kinds} "
                   f"row_offset {kw['row_offset']} col_lse {kw['col_lse']}")
    return description, (tensors, kw, dtype)


def check_cosine_lse(case, seed: int) -> list[str]:
    tensors, kw, dtype = case
    exact, exact_g = run_with_grads(infonce_ref.cosine_lse, {k: v.double() for k, v in tensors.items()}, seed, **kw)
    plain, plain_g = run_with_grads(infonce_ref.cosine_lse, tensors, seed, **kw)
    got, got_g = run_with_grads(cosine_lse, tensors, seed, **kw)
    problems: list[str] = []
    for name, a, p, e in zip(("lse_row", "lse_col", "diag"), got, plain, exact):
        compare(name, a, p, e, dtype, 1 / kw["tau"], problems)
    g = torch.Generator().manual_seed(seed)  # run_with_grads's upstream gradients, drawn again
    g_row, g_col, g_diag = (torch.randn(o.shape, generator=g, dtype=torch.float64) for o in exact)
    storage = storage_term(tensors["z_row"], tensors["z_col"], g_row, g_col if kw["col_lse"] else 0 * g_col,
                           g_diag, kw, dtype)
    for name, term in zip(tensors, storage):
        compare(f"grad {name}", got_g[name], plain_g[name], exact_g[name], dtype, 1 / kw["tau"], problems,
                cosine_grad_term(tensors[name], kw["tau"], 5.0) + term)
    return problems


def cosine_grad_term(z: torch.Tensor, tau: float, g_max: float) -> torch.Tensor:
    """The recompute term of a cosine-score gradient, per row of z (K, B, 1): p = exp(S -
    lse) carries a relative error of about eps32 / tau, and dS -> dz multiplies it by
    |dS/dz| <= 1 / (tau max(|z|, eps)) per unit upstream gradient (g_max bounds those: 5
    sigma of the randn ones). An exact gradient can vanish by cancellation (one valid
    sample), so the term is absolute; a zero row (normalization's eps 1e-12) amplifies the
    noise by 1e12, as F.normalize's own gradient does."""
    norms = z.double().norm(dim=-1, keepdim=True).clamp_min(infonce_ref.NORM_EPS)
    return 8 * EPS32 * g_max / (tau * tau * norms)


def storage_term(z_row, z_col, g_row, g_col, g_diag, kw, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' storage term of the cosine-score gradients, per row of z_row (K, Br, 1)
    and of z_col (K, Bc, 1), for upstream gradients g_row, g_col (0 without col_lse), g_diag
    of lse_row, lse_col, diag. The backward stores dS and the unit rows in the inputs' dtype
    for its tensor-core matmuls (a relative rounding of eps/2 each), so d zhat_col[j] errs
    by up to eps sum_i |dS_ij| |zhat_row_i| / tau (rows alike); normalize's backward projects
    that error (norm <= 1) and divides it by |z|. It shows where d zhat is nearly radial (few
    dimensions): the gradient, its tangential part, is then far smaller than d zhat, whose
    rounding it keeps (seed 2460850135: d 2, a radial part 170 times the tangential one)."""
    tau, eps = kw["tau"], torch.finfo(dtype).eps
    zr, zc = z_row.double(), z_col.double()
    nr, nc = (z.norm(dim=-1).clamp_min(infonce_ref.NORM_EPS) for z in (zr, zc))
    ur, uc = zr / nr[..., None], zc / nc[..., None]
    lse_row, lse_col, _ = infonce_ref.cosine_lse(zr, zc, **kw)
    s = ur @ uc.transpose(1, 2) / tau
    K, Br, Bc = s.shape
    vr = kw["valid_row"] if kw.get("valid_row") is not None else torch.ones(Br, dtype=torch.bool)
    vc = kw["valid_col"] if kw.get("valid_col") is not None else torch.ones(Bc, dtype=torch.bool)
    pair = vr[:, None] & vc[None, :]
    ds = g_row.abs()[..., None] * torch.exp(torch.where(pair, s - lse_row[..., None], -torch.inf))
    ds = ds + g_col.abs()[:, None, :] * torch.exp(torch.where(pair, s - lse_col[:, None, :], -torch.inf))
    on_diag = torch.arange(Bc)[None, :] == torch.arange(Br)[:, None] + kw.get("row_offset", 0)
    ds = ds + torch.where(on_diag & pair, g_diag.abs()[..., None], 0.0)
    unit_r, unit_c = ur.norm(dim=-1), uc.norm(dim=-1)  # 1, or 0 for a zero row
    term_row = 2 * eps / tau * (ds * unit_c[:, None, :]).sum(-1) / nr
    term_col = 2 * eps / tau * (ds * unit_r[..., None]).sum(-2) / nc
    return term_row[..., None], term_col[..., None]


def test_cosine_lse_fuzz(monkeypatch):
    fuzz_forced("triton", "cosine_lse", draw_cosine_lse, check_cosine_lse, monkeypatch)


def draw_infonce(rng: random.Random):
    K = rng.choice((1, 1, 2, 3, 12))
    B = sized(rng, SIZES + (129,), 300, K)
    d = rng.choice(WIDTHS + (100,))
    dtype, tau = rng.choice(DTYPES), rng.choice(TAUS)
    kind, reduction = rng.choice(VALID + ("one",)), rng.choice(("mean", "sum", "none"))
    kw = dict(tau=tau, valid=valid_flags(B, kind, rng) if kind != "one" else torch.arange(B) == rng.randrange(B),
              reduction=reduction)
    tensors = dict(z_a=features(K, B, d, dtype, rng), z_v=features(K, B, d, dtype, rng))
    return f"K{K} B{B} d{d} {str(dtype)[6:]} tau {tau} valid {kind} {reduction}", (tensors, kw, dtype)


def check_infonce(case, seed: int) -> list[str]:
    tensors, kw, dtype = case
    exact, exact_g = run_with_grads(infonce_ref.blockwise_infonce, {k: v.double() for k, v in tensors.items()},
                                    seed, **kw)
    plain, plain_g = run_with_grads(infonce_ref.blockwise_infonce, tensors, seed, **kw)
    got, got_g = run_with_grads(blockwise_infonce, tensors, seed, **kw)
    problems: list[str] = []
    if got[0].dtype != torch.float32:
        problems.append(f"loss dtype {got[0].dtype}, expected float32")
    # a sum adds 2 K n_valid row losses lse - s_pos, each of magnitude up to 1/tau however small
    # the difference: their recompute roundings add up beyond the sum's own magnitude
    n_valid = tensors["z_a"].shape[1] if kw["valid"] is None else int(kw["valid"].sum())
    terms = 2 * tensors["z_a"].shape[0] * n_valid if kw["reduction"] == "sum" else 0
    compare("loss", got[0], plain[0], exact[0], dtype, 1 / kw["tau"], problems, 4 * EPS32 / kw["tau"] * terms)
    # the loss is cosine_lse(z_v, z_a) with lse weights w / (2 n_valid) per valid row and
    # positives -2 w / (2 n_valid), w the block's upstream gradient (over K for a mean)
    K, B = tensors["z_a"].shape[:2]
    g0 = torch.randn(exact[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = (g0 / K if kw["reduction"] == "mean" else g0).expand(K)[:, None] / (2 * max(n_valid, 1))
    rows = torch.ones(B, dtype=torch.bool) if kw["valid"] is None else kw["valid"]
    g_lse = (w * rows).expand(K, B)
    term_v, term_a = storage_term(tensors["z_v"], tensors["z_a"], g_lse, g_lse, -2 * g_lse,
                                  dict(tau=kw["tau"], valid_row=kw["valid"], valid_col=kw["valid"]), dtype)
    for name, term in (("z_a", term_a), ("z_v", term_v)):
        compare(f"grad {name}", got_g[name], plain_g[name], exact_g[name], dtype, 1 / kw["tau"], problems,
                cosine_grad_term(tensors[name], kw["tau"], 5.0) + term)
    return problems


def test_blockwise_infonce_fuzz(monkeypatch):
    fuzz_forced("triton", "cosine_lse", draw_infonce, check_infonce, monkeypatch)


# ---------------------------------------------------------------- av_adapter_attention


def draw_adapter(rng: random.Random):
    N = rng.choice((1, 1, 2, 3, 5))
    La, Lv = sized(rng, SIZES + (70,), 200, N), sized(rng, SIZES + (197,), 400, N)
    r = rng.choice(WIDTHS + (48, 80, 128))
    dtype = rng.choice(DTYPES)
    scale = rng.choice((None, None, r ** -0.5, 0.0, -(r ** -0.5), 4.0 * r ** -0.5))
    gate_kind = rng.choice(("()", "(1,)", "(N,)", "zero"))
    gate_dtype = rng.choice((torch.float32, torch.float32, torch.bfloat16, torch.float64))
    gate_shape = {"()": (), "(1,)": (1,), "(N,)": (N,), "zero": (1,)}[gate_kind]
    gates = [torch.randn(gate_shape, dtype=gate_dtype) * (gate_kind != "zero") for _ in range(2)]
    layouts = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    tensors = dict(h_a=tensor((N, La, r), dtype, layouts[0]), h_v=tensor((N, Lv, r), dtype, layouts[1]),
                   gate_a=gates[0], gate_v=gates[1])
    description = (f"N{N} La{La} Lv{Lv} r{r} {str(dtype)[6:]} scale {scale} gates {gate_kind} "
                   f"{str(gate_dtype)[6:]} layouts {layouts}")
    return description, (tensors, scale, dtype)


def check_adapter(case, seed: int) -> list[str]:
    tensors, scale, dtype = case

    def literal(h_a, h_v, gate_a, gate_v, scale):  # plain torch in the tokens' dtype, gates included
        return adapter_ref.av_adapter_attention_literal(h_a, h_v, gate_a.to(h_a.dtype), gate_v.to(h_a.dtype),
                                                        scale=scale)

    exact, exact_g = run_with_grads(literal, {k: v.double() for k, v in tensors.items()}, seed, scale=scale)
    plain, plain_g = run_with_grads(literal, tensors, seed, scale=scale)
    got, got_g = run_with_grads(av_adapter_attention, tensors, seed, scale=scale)
    s = 1.0 if scale is None else scale
    smax = abs(s) * tensors["h_a"].double().norm(dim=-1).max().item() * tensors["h_v"].double().norm(dim=-1).max().item()
    problems: list[str] = []
    for name, a, p, e in zip(("out_a", "out_v"), got, plain, exact):
        if a.dtype != dtype:
            problems.append(f"{name} dtype {a.dtype}, expected {dtype}")
        compare(name, a, p, e, dtype, smax, problems)
    sums = gate_sum_terms(tensors, scale, seed)
    for name in tensors:
        compare(f"grad {name}", got_g[name], plain_g[name], exact_g[name], dtype, smax, problems,
                sums.get(name, 0.0))
    return problems


def gate_sum_terms(tensors: dict, scale, seed: int) -> dict[str, float]:
    """The summation term of each gate's gradient: dgate = sum over its frames' L x r
    entries of dout * attention output, a float32 sum of n terms, within
    4 eps32 sqrt(n) sum |dout * attention| (upstream gradients regenerated from ``seed``)."""
    h_a, h_v = tensors["h_a"].double(), tensors["h_v"].double()
    N = h_a.shape[0]
    ones = torch.ones(N, dtype=torch.float64)
    attn_a, attn_v = (o - h for o, h in zip(adapter_ref.av_adapter_attention_literal(h_a, h_v, ones, ones,
                                                                                        scale=scale), (h_a, h_v)))
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (h_a, h_v)]
    terms = {}
    for name, attn, dout in (("gate_a", attn_a, douts[0]), ("gate_v", attn_v, douts[1])):
        per_frame = (dout * attn).abs().flatten(1)
        n = per_frame.numel() if tensors[name].numel() == 1 else per_frame.shape[1]
        terms[name] = 4 * EPS32 * math.sqrt(n) * per_frame.sum().item()
    return terms


@pytest.mark.parametrize("backend", BACKENDS)
def test_av_adapter_attention_fuzz(backend, monkeypatch):
    fuzz_forced(backend, "av_adapter_attention", draw_adapter, check_adapter, monkeypatch)
