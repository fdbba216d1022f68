"""Hostile inputs of every public op: each bad argument gets an error naming the argument,
what was expected and what was received; non-finite values propagate as documented
(avfast/ops/__init__.py; README, "Bad input and non-finite values"), on every backend."""

from __future__ import annotations

import pytest
import torch

from avfast import _backend
from avfast.ops import av_adapter_attention, av_pair_attention, blockwise_infonce, cosine_lse, pair_attention_map
from avfast.reference import av_adapter_attention as adapter_ref
from avfast.reference import av_pair_attention as pair_ref
from avfast.reference import blockwise_infonce as infonce_ref
from seeding import fresh_seed
from test_fuzz_ops import joint_softmax

NAN, INF = float("nan"), float("inf")
# the Triton interpreter (numpy) warns on the NaN and Inf the non-finite tests feed it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BACKENDS = ["reference", "triton", pytest.param("cuda", id="cuda_host")]


def pair_args():
    return dict(q=torch.randn(2, 3, 4, 16), k_a=torch.randn(2, 5, 4, 16), v_a=torch.randn(2, 5, 4, 8),
                k_v=torch.randn(2, 6, 4, 16), v_v=torch.randn(2, 6, 4, 8), scale=0.25)


def call_pair(args):
    return av_pair_attention(args.pop("q"), args.pop("k_a"), args.pop("v_a"), args.pop("k_v"), args.pop("v_v"),
                             **args)


PAIR_BAD = [
    ("q", torch.randn(2, 3, 16), ValueError, r"av_pair_attention: q must be a non-empty \(B, F, H, Dq\), got \(2, 3, 16\)"),
    ("q", [[1.0]], TypeError, r"av_pair_attention: q must be a Tensor \(B, F, H, Dq\), got list"),
    ("q", torch.zeros(2, 3, 4, 16, dtype=torch.int64), TypeError,
     r"q must be float32, float16, bfloat16 or float64, got torch.int64"),
    ("q", torch.zeros(2, 3, 4, 16, dtype=torch.bool), TypeError, r"q must be float32, .* got torch.bool"),
    ("q", torch.randn(2, 0, 4, 16), ValueError, r"q must be a non-empty \(B, F, H, Dq\), got \(2, 0, 4, 16\)"),
    ("k_a", torch.randn(2, 5, 4), ValueError, r"k_a must be \(B, Na, H, Dq\) = \(2, \*, 4, 16\), got \(2, 5, 4\)"),
    ("k_a", torch.randn(2, 5, 3, 16), ValueError, r"k_a must be \(B, Na, H, Dq\) = \(2, \*, 4, 16\), got \(2, 5, 3, 16\)"),
    ("k_a", torch.randn(2, 0, 4, 16), ValueError, r"k_a must be non-empty \(B, Na, H, Dq\), got \(2, 0, 4, 16\)"),
    ("k_a", torch.zeros(2, 5, 4, 16, dtype=torch.int32), TypeError, r"k_a must have q's dtype torch.float32, got torch.int32"),
    ("v_a", torch.randn(2, 4, 4, 8), ValueError, r"v_a must be \(B, Na, H, Dv\) = \(2, 5, 4, 8\), got \(2, 4, 4, 8\)"),
    ("k_v", torch.randn(3, 6, 4, 16), ValueError, r"k_v must be \(B, Nv, H, Dq\) = \(2, \*, 4, 16\), got \(3, 6, 4, 16\)"),
    ("v_v", torch.zeros(2, 6, 4, 8, dtype=torch.bool), TypeError, r"v_v must have q's dtype torch.float32, got torch.bool"),
    ("v_v", torch.randn(2, 6, 4, 9), ValueError, r"v_v must be \(B, Nv, H, Dv\) = \(2, 6, 4, 8\), got \(2, 6, 4, 9\)"),
    ("v_bias", torch.randn(8), ValueError, r"v_bias must be \(H, Dv\) = \(4, 8\), got \(8,\)"),
    ("scale", NAN, ValueError, r"scale must be a finite float, got nan"),
    ("scale", INF, ValueError, r"scale must be a finite float, got inf"),
    ("scale", None, ValueError, r"scale must be a finite float, got None"),
    ("key_padding_mask_a", torch.zeros(2, 5), TypeError,
     r"key_padding_mask_a must be a bool Tensor \(B, Na\) \(True = padded key\), got dtype torch.float32"),
    ("key_padding_mask_a", torch.zeros(2, 5, 1, dtype=torch.bool), ValueError,
     r"key_padding_mask_a must be \(B, Na\) = \(2, 5\), got \(2, 5, 1\)"),
    ("key_padding_mask_v", torch.zeros(2, 5, dtype=torch.bool), ValueError,
     r"key_padding_mask_v must be \(B, Nv\) = \(2, 6\), got \(2, 5\)"),
    ("key_padding_mask_v", torch.zeros(2, 6, dtype=torch.uint8), TypeError,
     r"key_padding_mask_v must be a bool Tensor .* got dtype torch.uint8"),
]


@pytest.mark.parametrize("name, bad, error, match", PAIR_BAD)
def test_av_pair_attention_bad_inputs(name, bad, error, match):
    args = pair_args()
    args[name] = bad
    with pytest.raises(error, match=match):
        call_pair(args)


@pytest.mark.parametrize("name, bad, error, match",
                         [case for case in PAIR_BAD if case[0] in ("q", "k_a", "k_v", "scale")
                          or case[0].startswith("key_padding")])
def test_pair_attention_map_bad_inputs(name, bad, error, match):
    args = pair_args()
    args[name] = bad
    args.pop("v_a"), args.pop("v_v")
    with pytest.raises(error, match=match):
        pair_attention_map(args.pop("q"), args.pop("k_a"), args.pop("k_v"), **args)


COSINE_BAD = [
    (dict(z_row=torch.randn(5, 8)), ValueError, r"cosine_lse: z_row must be \(K, B, d\) with K, B, d >= 1, got \(5, 8\)"),
    (dict(z_row=[1.0]), TypeError, r"cosine_lse: z_row must be a Tensor \(K, B, d\), got list"),
    (dict(z_row=torch.zeros(2, 5, 8, dtype=torch.bool)), TypeError,
     r"z_row must be float32, float16, bfloat16 or float64, got torch.bool"),
    (dict(z_col=torch.zeros(2, 6, 8, dtype=torch.int64)), TypeError,
     r"z_col must be float32, float16, bfloat16 or float64, got torch.int64"),
    (dict(z_col=torch.randn(2, 0, 8)), ValueError, r"z_col must be \(K, B, d\) with K, B, d >= 1, got \(2, 0, 8\)"),
    (dict(z_col=torch.randn(3, 6, 8)), ValueError, r"z_col must be \(K, Bc, d\) = \(2, \*, 8\), got \(3, 6, 8\)"),
    (dict(z_col=torch.randn(2, 6, 8).half()), TypeError, r"z_col must have z_row's dtype torch.float32, got torch.float16"),
    (dict(tau=0.0), ValueError, r"tau must be a finite float >= 0.003, got 0.0"),
    (dict(tau=-0.07), ValueError, r"tau must be a finite float >= 0.003, got -0.07"),
    (dict(tau=NAN), ValueError, r"tau must be a finite float >= 0.003, got nan"),
    (dict(tau=INF), ValueError, r"tau must be a finite float >= 0.003, got inf"),
    (dict(tau="0.07"), ValueError, r"tau must be a finite float >= 0.003, got '0.07'"),
    (dict(valid_row=torch.ones(5, dtype=torch.int32)), TypeError,
     r"valid_row must be a bool Tensor \(B,\) \(False = background sample\), got torch.int32"),
    (dict(valid_col=torch.ones(5, dtype=torch.bool)), ValueError, r"valid_col must be \(B,\) = \(6,\), got \(5,\)"),
    (dict(valid_col=torch.ones(6, 1, dtype=torch.bool)), ValueError, r"valid_col must be \(B,\) = \(6,\), got \(6, 1\)"),
    (dict(row_offset=1.5), TypeError, r"row_offset must be an int, got 1.5"),
]


@pytest.mark.parametrize("kwargs, error, match", COSINE_BAD)
def test_cosine_lse_bad_inputs(kwargs, error, match):
    args = dict(z_row=torch.randn(2, 5, 8), z_col=torch.randn(2, 6, 8), tau=0.07) | kwargs
    with pytest.raises(error, match=match):
        cosine_lse(args.pop("z_row"), args.pop("z_col"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(z_a=torch.randn(3, 8)), ValueError, r"blockwise_infonce: z_a must be \(K, B, d\) with K, B, d >= 1, got \(3, 8\)"),
    (dict(z_a=torch.zeros(3, 8, 16, dtype=torch.int64)), TypeError, r"blockwise_infonce: z_a must be float32, .* got torch.int64"),
    (dict(z_v=torch.zeros(3, 8, 16, dtype=torch.bool)), TypeError, r"blockwise_infonce: z_v must be float32, .* got torch.bool"),
    (dict(z_v=torch.randn(3, 0, 16)), ValueError, r"blockwise_infonce: z_v must be \(K, B, d\) with K, B, d >= 1, got \(3, 0, 16\)"),
    (dict(z_v=torch.randn(3, 7, 16)), ValueError, r"blockwise_infonce: z_v must be \(K, B, d\) = \(3, 8, 16\) like z_a, got \(3, 7, 16\)"),
    (dict(z_v=torch.randn(3, 8, 16).bfloat16()), TypeError,
     r"blockwise_infonce: z_v must have z_a's dtype torch.float32, got torch.bfloat16"),
    (dict(tau=0.0), ValueError, r"blockwise_infonce: tau must be a finite float >= 0.003, got 0.0"),
    (dict(tau=-1.0), ValueError, r"blockwise_infonce: tau must be a finite float >= 0.003, got -1.0"),
    (dict(tau=NAN), ValueError, r"blockwise_infonce: tau must be a finite float >= 0.003, got nan"),
    (dict(valid=torch.ones(8)), TypeError, r"blockwise_infonce: valid must be a bool Tensor \(B,\) .* got torch.float32"),
    (dict(valid=torch.ones(7, dtype=torch.bool)), ValueError, r"blockwise_infonce: valid must be \(B,\) = \(8,\), got \(7,\)"),
    (dict(reduction="avg"), ValueError, r"blockwise_infonce: reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
])
def test_blockwise_infonce_bad_inputs(kwargs, error, match):
    args = dict(z_a=torch.randn(3, 8, 16), z_v=torch.randn(3, 8, 16)) | kwargs
    with pytest.raises(error, match=match):
        blockwise_infonce(args.pop("z_a"), args.pop("z_v"), **args)


@pytest.mark.parametrize("name, bad, error, match", [
    ("h_a", torch.randn(4, 9), ValueError, r"h_a must be a non-empty \(N, La, r\) = \(\*, \*, \*\), got \(4, 9\)"),
    ("h_a", torch.randn(1, 4, 9, 16), ValueError, r"h_a must be a non-empty \(N, La, r\) = \(\*, \*, \*\), got \(1, 4, 9, 16\)"),
    ("h_a", (1.0,), TypeError, r"h_a must be a Tensor \(N, La, r\), got tuple"),
    ("h_a", torch.zeros(4, 9, 16, dtype=torch.int32), TypeError, r"h_a must be float32, float16, bfloat16 or float64, got torch.int32"),
    ("h_a", torch.randn(0, 9, 16), ValueError, r"h_a must be a non-empty \(N, La, r\) = \(\*, \*, \*\), got \(0, 9, 16\)"),
    ("h_v", torch.zeros(4, 21, 16, dtype=torch.bool), TypeError, r"h_v must be float32, .* got torch.bool"),
    ("h_v", torch.randn(4, 0, 16), ValueError, r"h_v must be a non-empty \(N, Lv, r\) = \(4, \*, 16\), got \(4, 0, 16\)"),
    ("h_v", torch.randn(3, 21, 16), ValueError, r"h_v must be a non-empty \(N, Lv, r\) = \(4, \*, 16\), got \(3, 21, 16\)"),
    ("h_v", torch.randn(4, 21, 8), ValueError, r"h_v must be a non-empty \(N, Lv, r\) = \(4, \*, 16\), got \(4, 21, 8\)"),
    ("h_v", torch.randn(4, 21, 16).half(), TypeError, r"h_v must have h_a's dtype torch.float32, got torch.float16"),
    ("gate_a", torch.zeros(3), ValueError, r"gate_a must have shape \(\), \(1,\) or \(N,\) = \(4,\), got \(3,\)"),
    ("gate_a", torch.zeros(4, 1), ValueError, r"gate_a must have shape \(\), \(1,\) or \(N,\) = \(4,\), got \(4, 1\)"),
    ("gate_v", torch.zeros(1, dtype=torch.bool), TypeError, r"gate_v must be a float tensor, got torch.bool"),
    ("gate_v", 0.5, TypeError, r"gate_v must be a Tensor of shape \(\), \(1,\) or \(N,\) = \(4,\), got float"),
    ("scale", NAN, ValueError, r"scale must be a finite float or None, got nan"),
    ("scale", -INF, ValueError, r"scale must be a finite float or None, got -inf"),
])
def test_av_adapter_attention_bad_inputs(name, bad, error, match):
    args = dict(h_a=torch.randn(4, 9, 16), h_v=torch.randn(4, 21, 16), gate_a=torch.zeros(1), gate_v=torch.zeros(1))
    args[name] = bad
    with pytest.raises(error, match=match):
        av_adapter_attention(args.pop("h_a"), args.pop("h_v"), args.pop("gate_a"), args.pop("gate_v"), **args)


# ---------------------------------------------------------------- non-finite values


def force(backend: str, op: str, monkeypatch) -> None:
    reason = _backend.unavailable_reason(backend, op, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("AVFAST_BACKEND", backend)


def outputs_and_grads(fn, tensors: dict, **kw):
    """Outputs and gradients (for all-ones upstream gradients) of every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    outs = fn(**leaves, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, list(leaves.values()), [torch.ones_like(o) for o in outs],
                                materialize_grads=True)
    return outs, dict(zip(leaves, grads))


def check_poisoned_sample(fn, reference_fn, tensors, poison, **kw):
    """poison(tensors) writes NaN or Inf into sample 0 (dim 0) of one input. With NaN the
    outputs must be NaN exactly where the float64 reference's are and equal the clean
    run's bit for bit everywhere else; with Inf, samples 1: of the outputs must equal the
    clean run's (Inf may legitimately move sample 0's finite values: a weight of 1 or 0).
    The gradients of samples 1: must equal the clean run's (sample 0's are unspecified)."""
    clean, clean_g = outputs_and_grads(fn, tensors, **kw)
    poisoned = {k: v.clone() for k, v in tensors.items()}
    poison(poisoned)
    outs, grads = outputs_and_grads(fn, poisoned, **kw)
    expected, _ = outputs_and_grads(reference_fn, {k: v.double() for k, v in poisoned.items()}, **kw)
    for i, (o, c, e) in enumerate(zip(outs, clean, expected)):
        if poisoned_with_nan(poisoned):
            assert torch.equal(torch.isnan(o), torch.isnan(e)), \
                f"output {i}: {int(torch.isnan(o).sum())} NaN where the reference has {int(torch.isnan(e).sum())}"
            assert torch.equal(o[~torch.isnan(o)], c[~torch.isnan(o)]), f"output {i}: a value the NaN cannot reach changed"
        elif o.dim() and o.shape[0] > 1:
            assert torch.equal(o[1:], c[1:]), f"output {i}: samples 1: changed"
    for name, g in grads.items():
        c = clean_g[name]
        if g.dim() and g.shape[0] > 1:
            assert torch.equal(g[1:], c[1:]), f"grad {name}: samples 1: changed"


def poisoned_with_nan(tensors) -> bool:
    return any(torch.isnan(t).any() for t in tensors.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value", [("k_a", NAN), ("q", NAN), ("v_v", NAN), ("k_v", INF), ("v_a", -INF)])
def test_av_pair_attention_non_finite_values_stay_in_their_sample(backend, where, value, monkeypatch):
    force(backend, "av_pair_attention", monkeypatch)
    fresh_seed()
    tensors = {k: v for k, v in pair_args().items() if k != "scale"}

    def poison(t):
        t[where][0, 1] = value

    check_poisoned_sample(av_pair_attention, pair_ref.av_pair_attention_literal, tensors, poison, scale=0.25)


@pytest.mark.parametrize("where, value", [("k_a", NAN), ("q", NAN), ("k_v", INF)])
def test_pair_attention_map_non_finite_values_stay_in_their_sample(where, value):
    fresh_seed()
    tensors = {k: v for k, v in pair_args().items() if k in ("q", "k_a", "k_v")}

    def poison(t):
        t[where][0, 1] = value

    check_poisoned_sample(pair_attention_map, joint_softmax, tensors, poison, scale=0.25)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("where, value", [("z_a", NAN), ("z_v", NAN), ("z_a", INF)])
def test_blockwise_infonce_non_finite_values_stay_in_their_block(backend, where, value, monkeypatch):
    """Blocks are the independent samples of the loss (every sample of a block meets every other)."""
    force(backend, "cosine_lse", monkeypatch)
    fresh_seed()
    tensors = dict(z_a=torch.randn(3, 9, 16), z_v=torch.randn(3, 9, 16))

    def poison(t):
        t[where][0, 4, 3] = value

    check_poisoned_sample(blockwise_infonce, infonce_ref.blockwise_infonce, tensors, poison, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value", [("h_a", NAN), ("h_v", NAN), ("h_v", INF), ("h_a", -INF)])
def test_av_adapter_attention_non_finite_values_stay_in_their_frame(backend, where, value, monkeypatch):
    force(backend, "av_adapter_attention", monkeypatch)
    fresh_seed()
    tensors = dict(h_a=torch.randn(3, 9, 16), h_v=torch.randn(3, 21, 16), gate_a=torch.randn(3), gate_v=torch.randn(3))

    def poison(t):
        t[where][0, 2, 5] = value

    check_poisoned_sample(av_adapter_attention, adapter_ref.av_adapter_attention_literal, tensors, poison,
                          scale=0.25)
