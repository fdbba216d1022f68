"""STG-CMA the way the released code computes it (UPSTREAM.md §3, ``MM_CLIP_AVE`` in its
"fusion" mode), in its own layout and names, on our model's parameters.

What upstream does per step, tokens sequence-first (L, B*T, D), frame n = b*T + t:

* embedding: conv patches, CLS as ``class_embedding + zeros(...)``, position table, then the
  temporal embedding added through a '(b t) n d -> (b n) t d' rearrangement and back, ln_pre,
  and a permute to (L, B*T, D);
* per block and per modality, the frozen ``nn.MultiheadAttention`` (CLIP's ``attn`` with
  ``need_weights=False``) is run three times: the T-Adapter's temporal attention over
  't (b n) d' sequences (a permuted copy of the tokens each way), then the spatial attention;
  the temporal update gets DropPath, which on these (L, B*T, D) tensors masks token positions;
* the AV-Adapter cross-attention per frame as ``bmm`` + softmax (no 1/sqrt(r) scale) on
  (B*T, L, r) permuted copies of the bottlenecks, both directions, after the spatial attention
  and again after the frozen MLP (QuickGELU), with the block's two scalar gates;
* ln_post on the two CLS tokens, [audio CLS ; visual CLS] -> mlp_head, one prediction per
  second, cross-entropy with one-hot targets over the B*T seconds.

Costly parts against ``avfast.models.stgcma.STGCMA`` (same FLOPs): the layout changes
('n (b t) d' <-> 't (b n) d', (L, N, D) <-> (N, L, D) for the bmm) materialise copies of
every token tensor several times per block and are kept for backward; ``nn.MultiheadAttention``
re-packs q/k/v for each of its calls; the cross-attention is unfused (bmm, softmax, bmm, its
(B*T, Lv, La) score matrices stored), and so are QuickGELU, the adapters and the gates.

    up = UpstreamSTGCMA(model)          # upstream-named modules around model's own Parameters
    out = up(frames, audio)             # {"logits": (B, T, C), "features": (B, T, 2D)}
    loss, metrics = up.loss(out, batch)

``UpstreamSTGCMANet(cfg)`` is the same computation with parameters of its own under upstream's
state-dict names (what an upstream checkpoint holds); the tests build checkpoints from it.
Upstream's frozen embeddings (sum-over-RGB audio kernel, freq-major audio position table) are
the model's parameters, so they follow ``upstream_quirks`` as the model does; the DropPath
mask is always upstream's (token positions).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as nnf
from timm.layers import DropPath
from torch import Tensor, nn

from avfast.bench.upstream._common import share_parameters
from avfast.models.stgcma import STGCMA, STGCMAConfig

ADAPTERS = ("T_Adapter", "T_Adapter_Audio", "S_Adapter", "S_Adapter_Audio", "MLP_Adapter", "MLP_Adapter_Audio")


class QuickGELU(nn.Module):
    """CLIP's activation x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class UpstreamAdapter(nn.Module):
    """The bottleneck: ``D_fc1`` Linear(D, r), ``act`` GELU, ``D_fc2`` Linear(r, D)."""

    def __init__(self, D: int, r: int):
        super().__init__()
        self.act = nn.GELU()
        self.D_fc1, self.D_fc2 = nn.Linear(D, r), nn.Linear(r, D)


class UpstreamBlock(nn.Module):
    """One CLIP residual block with upstream's adapters; tokens v (Lv, B*T, D), a (La, B*T, D)."""

    def __init__(self, D: int, heads: int, r: int, T: int, drop_path: float = 0.0):
        super().__init__()
        self.T = T
        self.attn = nn.MultiheadAttention(D, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(D, 4 * D))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * D, D))
        for name in ADAPTERS:
            self.add_module(name, UpstreamAdapter(D, r))
        self.gate_v = nn.Parameter(torch.zeros(1))
        self.gate_a = nn.Parameter(torch.zeros(1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attention(self, x: Tensor) -> Tensor:  # (seq, batch, D)
        return self.attn(x, x, x, need_weights=False)[0]

    def temporal(self, x: Tensor, adapter: UpstreamAdapter) -> Tensor:
        """'n (b t) d -> t (b n) d', frozen attention, adapter (no skip), back."""
        n, bt, d = x.shape
        b = bt // self.T
        xt = x.reshape(n, b, self.T, d).permute(2, 1, 0, 3).reshape(self.T, b * n, d)
        xt = adapter.D_fc2(adapter.act(adapter.D_fc1(self.attention(self.ln_1(xt)))))
        return xt.reshape(self.T, b, n, d).permute(2, 1, 0, 3).reshape(n, bt, d)

    def fuse(self, hv: Tensor, ha: Tensor) -> tuple[Tensor, Tensor]:
        """Per frame: h_v + g_v softmax(h_v h_a^T) h_a and the reverse; inputs (L, BT, r)."""
        v_f, a_f = hv.permute(1, 0, 2), ha.permute(1, 0, 2)
        a2v = torch.bmm(nnf.softmax(torch.bmm(v_f, a_f.permute(0, 2, 1)), dim=-1), a_f).permute(1, 0, 2)
        v2a = torch.bmm(nnf.softmax(torch.bmm(a_f, v_f.permute(0, 2, 1)), dim=-1), v_f).permute(1, 0, 2)
        return hv + self.gate_v * a2v, ha + self.gate_a * v2a

    def forward(self, v: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        v = v + self.drop_path(self.temporal(v, self.T_Adapter))
        a = a + self.drop_path(self.temporal(a, self.T_Adapter_Audio))
        vs, as_ = self.attention(self.ln_1(v)), self.attention(self.ln_1(a))
        hv, ha = self.fuse(self.S_Adapter.act(self.S_Adapter.D_fc1(vs)),
                           self.S_Adapter_Audio.act(self.S_Adapter_Audio.D_fc1(as_)))
        v = v + vs + self.S_Adapter.D_fc2(hv)
        a = a + as_ + self.S_Adapter_Audio.D_fc2(ha)
        vn, an = self.mlp(self.ln_2(v)), self.mlp(self.ln_2(a))
        hv, ha = self.fuse(self.MLP_Adapter.act(self.MLP_Adapter.D_fc1(vn)),
                           self.MLP_Adapter_Audio.act(self.MLP_Adapter_Audio.D_fc1(an)))
        return v + vn + self.MLP_Adapter.D_fc2(hv), a + an + self.MLP_Adapter_Audio.D_fc2(ha)


class UpstreamTransformer(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class UpstreamSTGCMANet(nn.Module):
    """Upstream's MM_CLIP_AVE ("fusion" mode) with its state-dict names, parameters of its own.

    cfg: the STGCMAConfig whose sizes it takes; heads: attention heads (default cfg.heads).
    The class embedding may be (D,) (upstream) or (1, 1, D) and the position tables (L, D) or
    (1, L, D) (ours): the forward reshapes, so our parameters can stand in (UpstreamSTGCMA).
    """

    def __init__(self, cfg: STGCMAConfig, heads: int | None = None):
        super().__init__()
        D, p, self.T = cfg.embed_dim, cfg.patch_size, cfg.num_frames
        r = int(D * cfg.adapter_ratio)
        g, (t, f) = cfg.img_size // p, cfg.audio_grid
        self.conv1 = nn.Conv2d(3, D, p, p, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + g * g, D))
        self.ln_pre = nn.LayerNorm(D)
        self.conv1_audio = nn.Conv2d(1, D, p, p, bias=False)
        self.positional_embedding_audio = nn.Parameter(torch.zeros(1 + t * f, D))
        self.temporal_embedding = nn.Parameter(torch.zeros(1, self.T, D))
        self.temporal_embedding_audio = nn.Parameter(torch.zeros(1, self.T, D))
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.transformer = UpstreamTransformer(
            UpstreamBlock(D, heads or cfg.heads, r, self.T, rate) for rate in rates)
        self.ln_post = nn.LayerNorm(D)
        self.mlp_head = nn.Sequential(nn.Linear(2 * D, cfg.head_hidden), nn.Dropout(cfg.head_dropout),
                                      nn.Linear(cfg.head_hidden, cfg.num_classes))

    def embed(self, x: Tensor, conv: nn.Conv2d, pos: Tensor, temporal: Tensor) -> Tensor:
        """x ((b t), c, h, w) -> (L, (b t), D) after ln_pre, as upstream."""
        x = conv(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        D = x.shape[-1]
        cls = self.class_embedding.reshape(D).to(x.dtype) + torch.zeros(
            x.shape[0], 1, D, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + pos.reshape(-1, D).to(x.dtype)
        bt, n, d = x.shape
        x = x.reshape(bt // self.T, self.T, n, d).permute(0, 2, 1, 3).reshape(-1, self.T, d)  # (b n) t d
        x = x + temporal
        x = x.reshape(bt // self.T, n, self.T, d).permute(0, 2, 1, 3).reshape(bt, n, d)
        return self.ln_pre(x).permute(1, 0, 2)

    def forward_features(self, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """a (B, T, Ft, M), v (B, 3, T, H, W) (upstream's input layouts) -> tokens (L, BT, D)."""
        Bv, C, Tv, H, W = v.shape
        v = self.embed(v.permute(0, 2, 1, 3, 4).reshape(Bv * Tv, C, H, W), self.conv1,
                       self.positional_embedding, self.temporal_embedding)
        a = a.unsqueeze(1)
        a = self.embed(a.permute(0, 2, 1, 3, 4).reshape(-1, 1, *a.shape[-2:]), self.conv1_audio,
                       self.positional_embedding_audio, self.temporal_embedding_audio)
        for block in self.transformer.resblocks:
            v, a = block(v, a)
        return v, a

    def forward_head(self, v: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Final tokens (L, BT, D) -> logits (BT, C), features (BT, 2D) = [audio CLS ; visual CLS]."""
        v, a = self.ln_post(v.permute(1, 0, 2)), self.ln_post(a.permute(1, 0, 2))
        features = torch.cat([a[:, 0], v[:, 0]], dim=-1)
        return self.mlp_head(features), features

    def forward(self, a: Tensor, v: Tensor) -> Tensor:
        """a (B, T, Ft, M), v (B, 3, T, H, W) -> logits (BT, C)."""
        return self.forward_head(*self.forward_features(a, v))[0]


class UpstreamSTGCMA(nn.Module):
    """Upstream STG-CMA's formulation over ``model``'s parameters: ``net`` is an
    ``UpstreamSTGCMANet`` whose every Parameter is the model's (matched through
    ``model.upstream_key_map``), so nothing is copied and ``requires_grad`` is upstream's
    trainable set. ``model`` is registered too (``state_dict`` lists each tensor under both names).

    forward(frames (B, T, 3, S, S), audio (B, T, Ft, M)) -> {"logits": (B, T, C),
    "features": (B, T, 2D)}; loss(out, batch) -> (loss, {"loss", "acc"}).
    """

    def __init__(self, model: STGCMA):
        super().__init__()
        if not isinstance(model, STGCMA):
            raise TypeError(f"UpstreamSTGCMA: model must be an avfast.models.stgcma.STGCMA, "
                            f"got {type(model).__name__}")
        self.model = model
        with torch.device("meta"):
            net = UpstreamSTGCMANet(model.config)
        names = [n for n, _ in net.named_parameters()]
        mapping = model.upstream_key_map(names)
        ours = dict(model.named_parameters())
        self.net = share_parameters(net, {n: ours[mapping[n]] for n in names if n in mapping}, "UpstreamSTGCMA")
        self.net.train(model.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        self.model._check_inputs(frames, audio)
        if self.net.training != self.model.training:  # model.train()/eval() called on the model alone
            self.net.train(self.model.training)
        B, T = frames.shape[:2]
        logits, features = self.net.forward_head(*self.net.forward_features(audio, frames.permute(0, 2, 1, 3, 4)))
        return {"logits": logits.unflatten(0, (B, T)), "features": features.unflatten(0, (B, T))}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Upstream's loss: cross-entropy of the (B*T, C) logits against one-hot (B*T, C)
        targets, from batch["segment_labels"] (B, T), else batch["label"] (B,) for every second."""
        logits = out["logits"]
        B, T, C = logits.shape
        target = batch["segment_labels"] if "segment_labels" in batch else batch["label"][:, None].expand(B, T)
        if tuple(target.shape) != (B, T) or target.is_floating_point():
            raise ValueError(f"UpstreamSTGCMA.loss: targets must be integer (B, T) = ({B}, {T}), "
                             f"got {tuple(target.shape)} {target.dtype}")
        onehot = nnf.one_hot(target.to(logits.device, torch.long).reshape(B * T), C).to(logits.dtype)
        output = logits.reshape(B * T, C)
        loss = nnf.cross_entropy(output, onehot)
        acc = (output.argmax(-1) == onehot.argmax(-1)).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]


__all__ = ["UpstreamSTGCMA", "UpstreamSTGCMANet"]
