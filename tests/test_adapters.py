"""STG-CMA adapters (avfast.nn.adapters) against a plain restatement of upstream's block."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from avfast import _backend
from avfast.nn.adapters import AVAdapter, Adapter, STGCMABlockAdapters, TemporalAdapter, frozen_attention
from avfast.reference.av_adapter_attention import av_adapter_attention_literal
from seeding import fresh_seed

ADAPTERS = ("T_Adapter", "T_Adapter_Audio", "S_Adapter", "S_Adapter_Audio", "MLP_Adapter", "MLP_Adapter_Audio")
FROZEN = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
          "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
          "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")



# ------------------------------------------------------------------ upstream, restated


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class FrozenCLIPBlock(nn.Module):
    """The frozen part of a CLIP ResidualAttentionBlock (sequence-first MHA, LN1, LN2, MLP),
    random weights, float64."""

    def __init__(self, D: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(D, 4 * D))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * D, D))
        self.double()
        with torch.no_grad():  # O(1) activations: weights ~ fan_in^-1/2
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
                else:
                    p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
        self.requires_grad_(False)

    def attention(self, x):  # x (seq, batch, D): upstream's self.attention(self.ln_1(x))
        return self.attn(*(self.ln_1(x),) * 3, need_weights=False)[0]

    def mlp_ln(self, x):
        return self.mlp(self.ln_2(x))


def upstream_params(D: int, r: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random upstream-named adapter parameters of one block, float64, weights ~ scale *
    fan_in^-1/2 (attention logits O(r)), gates non-zero."""
    p = {}
    for name in ADAPTERS:
        p[f"{name}.D_fc1.weight"] = torch.randn(r, D, dtype=torch.float64) * scale * D ** -0.5
        p[f"{name}.D_fc1.bias"] = torch.randn(r, dtype=torch.float64) * 0.1
        p[f"{name}.D_fc2.weight"] = torch.randn(D, r, dtype=torch.float64) * scale * r ** -0.5
        p[f"{name}.D_fc2.bias"] = torch.randn(D, dtype=torch.float64) * 0.1
    p["gate_v"] = torch.randn(1, dtype=torch.float64)
    p["gate_a"] = torch.randn(1, dtype=torch.float64)
    return p


def up_adapter(p, name, x, skip=False):
    out = nnf.linear(nnf.gelu(nnf.linear(x, p[f"{name}.D_fc1.weight"], p[f"{name}.D_fc1.bias"])),
                     p[f"{name}.D_fc2.weight"], p[f"{name}.D_fc2.bias"])
    return x + out if skip else out


def up_temporal(p, name, x, attention, T):
    """x (n, (b t), d): 'n (b t) d -> t (b n) d', attention, T-Adapter, back; by explicit slicing."""
    n, bt, d = x.shape
    B = bt // T
    seqs = [x[i, b * T:(b + 1) * T] for b in range(B) for i in range(n)]  # batch index (b n)
    xt = up_adapter(p, name, attention(torch.stack(seqs, dim=1)))  # (T, B*n, d)
    out = x.new_zeros(n, bt, d)
    for b in range(B):
        for i in range(n):
            out[i, b * T:(b + 1) * T] = xt[:, b * n + i]
    return out


def up_fusion(p, prefix, x_v, x_a):
    """Upstream's hidden two-way attention of one placement, tokens (n, bt, d)."""
    hv = nnf.gelu(nnf.linear(x_v, p[f"{prefix}.D_fc1.weight"], p[f"{prefix}.D_fc1.bias"]))
    ha = nnf.gelu(nnf.linear(x_a, p[f"{prefix}_Audio.D_fc1.weight"], p[f"{prefix}_Audio.D_fc1.bias"]))
    ha2, hv2 = av_adapter_attention_literal(ha.transpose(0, 1), hv.transpose(0, 1), p["gate_a"], p["gate_v"])
    out_v = nnf.linear(hv2.transpose(0, 1), p[f"{prefix}.D_fc2.weight"], p[f"{prefix}.D_fc2.bias"])
    out_a = nnf.linear(ha2.transpose(0, 1), p[f"{prefix}_Audio.D_fc2.weight"], p[f"{prefix}_Audio.D_fc2.bias"])
    return out_v, out_a


def upstream_block(p, frozen: FrozenCLIPBlock, v, a, T):
    """UPSTREAM.md §3.1, tokens in (L, B*T, D), DropPath = identity."""
    v = v + up_temporal(p, "T_Adapter", v, frozen.attention, T)
    a = a + up_temporal(p, "T_Adapter_Audio", a, frozen.attention, T)
    sv, sa = frozen.attention(v), frozen.attention(a)
    fv, fa = up_fusion(p, "S_Adapter", sv, sa)
    v, a = v + sv + fv, a + sa + fa
    mv, ma = frozen.mlp_ln(v), frozen.mlp_ln(a)
    fv, fa = up_fusion(p, "MLP_Adapter", mv, ma)
    return v + mv + fv, a + ma + fa


def ours_from(p, D, mlp_ratio, batch_first=True, **kw) -> STGCMABlockAdapters:
    block = STGCMABlockAdapters(D, mlp_ratio, batch_first=batch_first, **kw).double()
    block.load_state_dict(p, strict=True)
    return block


def tokens(N, Lv, La, D, batch_first=True):
    v, a = torch.randn(Lv, N, D, dtype=torch.float64), torch.randn(La, N, D, dtype=torch.float64)  # upstream layout
    return (v, a) if not batch_first else (v.transpose(0, 1).contiguous(), a.transpose(0, 1).contiguous())


def max_err(xs, ys) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(xs, ys))


# (B, T, Lv, La, D, mlp_ratio, heads): ViT-B/16 (r=48), ViT-L/14 widths are covered by the key test
SHAPES = [
    pytest.param(1, 2, 197, 49, 768, 0.0625, 12, id="vitb-N2"),
    pytest.param(2, 3, 7, 5, 40, 0.125, 4, id="odd-D40-r5"),
    pytest.param(3, 1, 1, 3, 24, 1 / 24, 2, id="T1-Lv1-r1"),
    pytest.param(1, 5, 11, 1, 36, 0.25, 3, id="La1"),
]


# ------------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("D, r, heads", [(768, 48, 12), (1024, 64, 16)])
def test_upstream_checkpoint_loads_strictly(D, r, heads):
    """A synthetic STG-CMA checkpoint (DataParallel 'module.' prefix, frozen keys included)."""
    layers = 2
    ckpt = {"module.conv1.weight": torch.zeros(D, 3, 16, 16), "module.gate_not_in_block": torch.zeros(1)}
    for i in range(layers):
        pre = f"module.transformer.resblocks.{i}."
        for k in FROZEN:
            ckpt[pre + k] = torch.zeros(1)
        for name, t in upstream_params(D, r).items():
            ckpt[pre + name] = t.float() + i
    blocks = nn.ModuleList(STGCMABlockAdapters(D) for _ in range(layers))
    assert blocks[0].hidden == r
    prefix = "module.transformer."
    adapter_keys = {k[len(prefix):]: v for k, v in ckpt.items()
                    if k.startswith(prefix) and ("Adapter" in k or ".gate_" in k)}
    adapter_keys = {k.removeprefix("resblocks."): v for k, v in adapter_keys.items()}
    result = blocks.load_state_dict(adapter_keys, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(blocks.state_dict()) == set(adapter_keys)
    assert torch.equal(blocks[1].MLP_Adapter_Audio.D_fc2.weight, adapter_keys["1.MLP_Adapter_Audio.D_fc2.weight"])
    assert torch.equal(blocks[1].gate_a, adapter_keys["1.gate_a"])
    assert blocks[0].gate_v.shape == (1,) and blocks[0].S_Adapter.D_fc1.weight.shape == (r, D)


def test_key_names_are_upstreams():
    keys = set(STGCMABlockAdapters(64).state_dict())
    want = {f"{a}.{fc}.{p}" for a in ADAPTERS for fc in ("D_fc1", "D_fc2") for p in ("weight", "bias")}
    assert keys == want | {"gate_v", "gate_a"}
    assert set(Adapter(8, 2).state_dict()) == {"D_fc1.weight", "D_fc1.bias", "D_fc2.weight", "D_fc2.bias"}


# ------------------------------------------------------------------------------ init


def test_zero_init_is_the_frozen_block():
    fresh_seed()
    D, T, B = 48, 2, 2
    block = STGCMABlockAdapters(D).double()
    for name in ADAPTERS:
        fc2 = getattr(block, name).D_fc2
        assert torch.count_nonzero(fc2.weight) == 0 and torch.count_nonzero(fc2.bias) == 0
        assert torch.count_nonzero(getattr(block, name).D_fc1.bias) == 0
        assert 0 < getattr(block, name).D_fc1.weight.std() < 0.03
    assert block.gate_v.item() == 0 and block.gate_a.item() == 0
    frozen = FrozenCLIPBlock(D, 4)
    v, a = tokens(B * T, 9, 4, D)
    attn = frozen_attention(frozen.attn, frozen.ln_1)
    out_v, out_a = block(v, a, attn, frozen.mlp_ln, T)
    for x, out in ((v, out_v), (a, out_a)):
        x1 = x + attn(x)
        torch.testing.assert_close(out, x1 + frozen.mlp_ln(x1), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    assert torch.equal(Adapter(D, 3).double()(x), x)
    assert torch.count_nonzero(Adapter(D, 3, skip=False).double()(x)) == 0


def test_gradients_at_init_reach_only_fc2():
    """Upstream's zero init: D_fc2 and nothing behind it gets a gradient in the first step."""
    fresh_seed()
    D, T = 32, 2
    block = STGCMABlockAdapters(D, 0.125).double()
    frozen = FrozenCLIPBlock(D, 4)
    v, a = tokens(2 * T, 5, 3, D)
    out_v, out_a = block(v, a, frozen_attention(frozen.attn, frozen.ln_1), frozen.mlp_ln, T)
    (out_v.square().sum() + out_a.square().sum()).backward()
    for name, prm in block.named_parameters():
        nonzero = bool(torch.count_nonzero(prm.grad))
        assert nonzero == (".D_fc2." in name), name


# ------------------------------------------------------------------- vs upstream math


@pytest.mark.parametrize("B, T, Lv, La, D, mlp_ratio, heads", SHAPES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_block_equals_upstream_float64(B, T, Lv, La, D, mlp_ratio, heads, batch_first):
    """Whole block (temporal, spatial, MLP stages with shared gates): outputs and gradients
    of the tokens, every adapter parameter and both gates."""
    seed = fresh_seed()
    r = int(D * mlp_ratio)
    p = upstream_params(D, r)
    frozen = FrozenCLIPBlock(D, heads)
    ours = ours_from(p, D, mlp_ratio, batch_first)
    v, a = tokens(B * T, Lv, La, D, batch_first=False)
    v.requires_grad_(), a.requires_grad_()
    leaves_up = {k: t.clone().requires_grad_() for k, t in p.items()}
    want = upstream_block(leaves_up, frozen, v, a, T)
    dout = [torch.randn_like(t) for t in want]
    want_grads = torch.autograd.grad(want, [v, a, *leaves_up.values()], dout)

    attn = frozen_attention(frozen.attn, frozen.ln_1, batch_first=batch_first)
    if batch_first:
        vb, ab = (x.detach().transpose(0, 1).contiguous().requires_grad_() for x in (v, a))
        got = ours(vb, ab, attn, frozen.mlp_ln, T)
        got_t = [g.transpose(0, 1) for g in got]
        grads = torch.autograd.grad(got, [vb, ab, *ours.state_dict(keep_vars=True).values()],
                                    [d.transpose(0, 1) for d in dout])
        grads = [grads[0].transpose(0, 1), grads[1].transpose(0, 1), *grads[2:]]
    else:
        vs, as_ = v.detach().requires_grad_(), a.detach().requires_grad_()
        got_t = ours(vs, as_, attn, frozen.mlp_ln, T)
        grads = torch.autograd.grad(got_t, [vs, as_, *ours.state_dict(keep_vars=True).values()], dout)
    order = list(ours.state_dict())
    want_by_key = dict(zip(p, want_grads[2:]))
    err_out = max_err(got_t, want)
    err_in = max_err(grads[:2], want_grads[:2])
    err_prm = max_err(grads[2:], [want_by_key[k] for k in order])
    mags = [max(float(t.detach().abs().max()) for t in ts) for ts in (want, want_grads[:2], want_grads[2:])]
    assert err_out <= 1e-10 and err_in <= 1e-10 and err_prm <= 1e-10, (seed, err_out, err_in, err_prm, mags)
    for k, g in zip(order, grads[2:]):
        assert torch.count_nonzero(g) > 0, (seed, k)  # gates and every adapter parameter learn


@pytest.mark.parametrize("B, T, Lv, La, D, mlp_ratio, heads", SHAPES)
def test_stages_equal_upstream_float64(B, T, Lv, La, D, mlp_ratio, heads):
    """Each stage alone, with upstream's tensors in (L, N, D) and ours batch-first."""
    seed = fresh_seed()
    p = upstream_params(D, int(D * mlp_ratio))
    frozen = FrozenCLIPBlock(D, heads)
    ours = ours_from(p, D, mlp_ratio)
    v, a = tokens(B * T, Lv, La, D, batch_first=False)
    bf = lambda x: x.transpose(0, 1)  # noqa: E731  (either way)

    for prefix, stage in (("S_Adapter", ours.spatial_fusion), ("MLP_Adapter", ours.mlp_fusion)):
        got = stage(bf(v), bf(a))
        want = up_fusion(p, prefix, v, a)
        assert max_err([bf(g) for g in got], want) <= 1e-10, (seed, prefix)

    attn_bf = frozen_attention(frozen.attn, frozen.ln_1)
    got = ours.temporal_adapt(bf(v), bf(a), attn_bf, T)
    want = (up_temporal(p, "T_Adapter", v, frozen.attention, T),
            up_temporal(p, "T_Adapter_Audio", a, frozen.attention, T))
    assert max_err([bf(g) for g in got], want) <= 1e-10, seed
    # the module directly (no LayerNorm) is called as self-attention in either layout
    bare = lambda x: frozen.attn(x, x, x, need_weights=False)[0]  # noqa: E731
    t_v = ours.T_Adapter(bf(v), frozen.attn, T)
    assert max_err([bf(t_v)], [up_temporal(p, "T_Adapter", v, bare, T)]) <= 1e-10, seed


def test_av_adapter_module_and_per_frame_gates():
    seed = fresh_seed()
    D, r, N, Lv, La = 40, 6, 5, 9, 4
    module = AVAdapter(D, r).double()
    with torch.no_grad():
        for prm in module.parameters():
            prm.normal_(0, 0.3)
    s_v, s_a = torch.randn(N, Lv, D, dtype=torch.float64), torch.randn(N, La, D, dtype=torch.float64)
    p = {f"S_Adapter.{k}": t for k, t in module.visual.state_dict().items()}
    p |= {f"S_Adapter_Audio.{k}": t for k, t in module.audio.state_dict().items()}
    for gates in ((torch.randn(1, dtype=torch.float64), torch.randn(1, dtype=torch.float64)),
                  (torch.randn(N, dtype=torch.float64), torch.randn((), dtype=torch.float64))):
        p["gate_v"], p["gate_a"] = gates
        got = module(s_v, s_a, *gates)
        want = up_fusion(p, "S_Adapter", s_v.transpose(0, 1), s_a.transpose(0, 1))
        assert max_err(got, [w.transpose(0, 1) for w in want]) <= 1e-10, seed
    # scale is passed through to the op
    scaled = AVAdapter(D, r, scale=r ** -0.5).double()
    scaled.load_state_dict(module.state_dict())
    g = torch.full((1,), 0.7, dtype=torch.float64)
    h_a, h_v = nnf.gelu(module.audio.D_fc1(s_a)), nnf.gelu(module.visual.D_fc1(s_v))
    ha2, hv2 = av_adapter_attention_literal(h_a, h_v, g, g, scale=r ** -0.5)
    got = scaled(s_v, s_a, g, g)
    assert max_err(got, [module.visual.D_fc2(hv2), module.audio.D_fc2(ha2)]) <= 1e-10, seed


def test_seq_first_matches_batch_first():
    fresh_seed()
    D, N, Lv, La = 24, 6, 7, 3
    bf = AVAdapter(D, 4).double()
    with torch.no_grad():
        for prm in bf.parameters():
            prm.normal_(0, 0.3)
    sf = AVAdapter(D, 4, batch_first=False).double()
    sf.load_state_dict(bf.state_dict())
    s_v, s_a = torch.randn(N, Lv, D, dtype=torch.float64), torch.randn(N, La, D, dtype=torch.float64)
    g_v, g_a = torch.tensor([0.4], dtype=torch.float64), torch.tensor([-1.3], dtype=torch.float64)
    got = sf(s_v.transpose(0, 1), s_a.transpose(0, 1), g_v, g_a)
    want = bf(s_v, s_a, g_v, g_a)
    assert got[0].shape == (Lv, N, D) and got[1].shape == (La, N, D)
    assert max_err([g.transpose(0, 1) for g in got], want) <= 1e-12


# -------------------------------------------------------------------- kernel backends


def _backend_skip(backend: str, device: torch.device) -> str | None:
    reason = _backend.unavailable_reason(backend, "av_adapter_attention", device, torch.float32)
    if reason is None and backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "TRITON_INTERPRET is not 1"
    return reason


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_block_on_kernel_backends_float32(backend, batch_first, monkeypatch):
    """float32 through the forced backend (CPU: the Triton interpreter / the CUDA kernels'
    host build) against the float64 restatement; seq-first passes strided tokens to the op."""
    reason = _backend_skip(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    seed = fresh_seed()
    B, T, Lv, La, D, mlp_ratio = 2, 2, 9, 5, 32, 0.25
    p = upstream_params(D, int(D * mlp_ratio))
    frozen = FrozenCLIPBlock(D, 4)
    v, a = tokens(B * T, Lv, La, D, batch_first=False)
    want = upstream_block(p, frozen, v, a, T)
    ours = ours_from(p, D, mlp_ratio, batch_first).float()
    frozen32 = FrozenCLIPBlock(D, 4)
    frozen32.load_state_dict(frozen.state_dict())
    frozen32.float()
    attn = frozen_attention(frozen32.attn, frozen32.ln_1, batch_first=batch_first)
    x_v, x_a = (v.float(), a.float()) if not batch_first else (v.float().transpose(0, 1), a.float().transpose(0, 1))
    monkeypatch.setenv("AVFAST_BACKEND", backend)
    got = ours(x_v, x_a, attn, frozen32.mlp_ln, T)
    got = got if not batch_first else [g.transpose(0, 1) for g in got]
    assert max_err(got, want) <= 1e-4 * max(1.0, max(float(w.abs().max()) for w in want)), seed


@pytest.mark.cuda
def test_block_on_gpu_matches_cpu_float64():
    seed = fresh_seed()
    B, T, Lv, La, D, mlp_ratio = 2, 3, 197, 49, 768, 0.0625
    p = upstream_params(D, int(D * mlp_ratio))
    frozen = FrozenCLIPBlock(D, 12)
    v, a = tokens(B * T, Lv, La, D, batch_first=False)
    want = upstream_block(p, frozen, v, a, T)
    ours = ours_from(p, D, mlp_ratio, batch_first=False).float().cuda()
    frozen32 = FrozenCLIPBlock(D, 12)
    frozen32.load_state_dict(frozen.state_dict())
    frozen32.float().cuda()
    got = ours(v.float().cuda(), a.float().cuda(), frozen32.attention, frozen32.mlp_ln, T)
    scale = max(float(w.abs().max()) for w in want)
    assert max_err([g.double().cpu() for g in got], want) <= 1e-3 * scale, seed


# ----------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph():
    fresh_seed()
    D, T, B = 32, 2, 2
    p = upstream_params(D, 4)
    frozen = FrozenCLIPBlock(D, 4)
    ours = ours_from(p, D, 0.125)
    attn = frozen_attention(frozen.attn, frozen.ln_1)
    v, a = tokens(B * T, 7, 3, D)

    def step(v, a):
        return ours(v, a, attn, frozen.mlp_ln, T)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    vl, al = v.clone().requires_grad_(), a.clone().requires_grad_()
    got = compiled(vl, al)
    want = step(v, a)
    assert max_err(got, want) <= 1e-12
    (got[0].sum() + got[1].square().sum()).backward()
    assert ours.gate_v.grad is not None and torch.count_nonzero(ours.gate_v.grad) == 1
    assert vl.grad is not None and al.grad is not None
    av = AVAdapter(D, 4).double()
    comp_av = torch.compile(av, backend="aot_eager", fullgraph=True)
    g = torch.zeros(1, dtype=torch.float64)
    assert max_err(comp_av(v, a, g, g), av(v, a, g, g)) == 0


# ------------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    block = STGCMABlockAdapters(16, 0.25).double()
    frozen = FrozenCLIPBlock(16, 2)
    attn = frozen_attention(frozen.attn, frozen.ln_1)
    v, a = torch.randn(4, 5, 16, dtype=torch.float64), torch.randn(4, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"spatial_fusion: s_a must be a non-empty \(N, La, D\) = \(4, \*, 16\)"):
        block.spatial_fusion(v, a[..., :8])
    with pytest.raises(ValueError, match=r"mlp_fusion: s_a must be .*\(4, \*, 16\), got \(3, 3, 16\)"):
        block.mlp_fusion(v, a[:3])
    with pytest.raises(ValueError, match=r"s_v must be a non-empty \(N, Lv, D\)"):
        block.spatial_fusion(v[0], a)
    with pytest.raises(TypeError, match="s_v must be a Tensor"):
        block.spatial_fusion(None, a)
    with pytest.raises(ValueError, match="num_frames = 3"):
        block.temporal_adapt(v, a, attn, 3)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        block.T_Adapter(v, attn, 0)
    with pytest.raises(ValueError, match=r"STGCMABlockAdapters: a must be .*\(4, \*, 16\)"):
        block(v, a[:2], attn, frozen.mlp_ln, 2)
    with pytest.raises(ValueError, match=r"STGCMABlockAdapters: v must be"):
        block(v[..., :4], a, attn, frozen.mlp_ln, 2)
    seq_first = STGCMABlockAdapters(16, 0.25, batch_first=False).double()
    with pytest.raises(ValueError, match=r"s_a must be a non-empty \(La, N, D\) = \(\*, 5, 16\)"):
        seq_first.spatial_fusion(v, a)  # (4, 5, 16) read as (Lv=4, N=5)
    with pytest.raises(ValueError, match="gate_v"):
        AVAdapter(16, 4).double()(v, a, torch.zeros(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="int\\(dim \\* mlp_ratio\\)"):
        STGCMABlockAdapters(8, 0.0625)
    with pytest.raises(ValueError, match="TemporalAdapter: x must be"):
        TemporalAdapter(16, 2).double()(v[..., :8], attn, 2)
