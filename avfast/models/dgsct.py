"""DG-SCT (Duan et al., NeurIPS'23, "Cross-modal Prompts"): a frozen Swin-V2 (frames) and a
frozen HTS-AT (audio) run side by side; in every paired block a dual-guided adapter per
modality and placement adds a cross-modal update; a temporal module and the CMBS head give
per-second AVE predictions.

    model = build("base", visual_weights="swinv2_large_192_22k.pth", audio_weights="HTSAT_AudioSet_Saved_1.ckpt")
    out = model(frames, audio)             # frames (B, T, 3, 192, 192), audio (B, T, 32000) 32 kHz seconds
    loss, metrics = model.loss(out, batch)
    model.predict(out)                     # (B, T, C) per-second logits, C = events + background (last)

Paired block (visual block j of stage s with audio block k; x = visual, a = audio tokens):

    r_a1 = A1(a; x), r_v1 = V1(x; a)                      adapters p1 read the block inputs
    x = x + norm1(attn(x)) + r_v1                          Swin-V2 res-post-norm attention half
    a = HTSATblock(a) + r_a1                               upstream: the whole audio block here
    r_a2 = A2(a; x), r_v2 = V2(x; a)                       adapters p2 read the updated states
    x = x + norm2(mlp(x)) + r_v2;  a = a + r_a2

(upstream_quirks=False: the paper's Eq. 2 on both sides, a = a + attn(norm1(a)) + r_a1, then
a = a + mlp(norm2(a)) + r_a2.)

Stage pairing: stage s has Dv visual and Da audio blocks, q = Dv / Da; audio block k runs with
visual block q*k + q - 1 (stage 3 of the base model: HTS-AT k <-> Swin 3k+2); the other visual
blocks run alone. After the last stage: f_v = sum_l m_v[l] norm(x)[l], f_a = sum_l m_a[l] a[l]
with m the spatial maps of the last V2 / A2 adapters. Then TemporalGuidance and CMBSHead.

Dims: B clips, T = 10 seconds (frame t pairs with second t), N = B*T, Nx/Ny tokens and Cx/Cy
widths of the adapted/guiding modality, m latent tokens, d temporal width, E = C - 1 events.
Adapters work on (N, tokens, C) rows (upstream: (N, C, tokens, 1) with 1x1 convolutions).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn
from torch import Tensor, nn

from avfast.models.base import (AVModel, check_frames, freeze, read_checkpoint, sized_config, strip_prefixes,
                                with_pretrained)
from avfast.models.htsat import HTSAT

LOSS_TYPES = ("upstream", "segment_ce")


@dataclass
class DGSCTConfig:
    """DG-SCT on AVE (defaults: upstream's released AVE setup, ``AVE/train.sh``).

    Fields:
        img_size: frame side S (192). num_frames: T seconds per clip. num_classes: C per-second
            classes, the last one background (AVE: 28 events + background).
        visual_*: timm ``swinv2_large_window12_192`` (patch 4, dims 192..1536, depths 2/2/18/2,
            heads 6..48, window 12); frozen. visual_weights: a local timm or original Swin-V2
            checkpoint (timm's ``checkpoint_filter_fn`` converts the old layout).
        audio_*: HTS-AT (``avfast.models.htsat``): 32 kHz, STFT 1024/320, 64 mel 50-14000 Hz,
            256 x 256 image (freq_ratio 4), patch 4, dims 96..768, depths 2/2/6/2, window 8;
            frozen. audio_clip_samples: the waveform length HTS-AT sees per second (10 s).
            audio_weights: a local HTS-AT checkpoint (``sed_model.*`` keys).
        *_drop_path_rate: the backbones' stochastic depth; acts only with backbone_train_mode.
        num_latent_tokens: LAVISH latent tokens per adapter (m = 32). adapter_reduction,
            adapter_groups: bottleneck Cx -> Cx/8 with grouped (2) projections.
        guide_alpha, guide_beta: weights of the channel and spatial maps in the guidance factor
            (0.3, 0.05; hard-coded upstream).
        temporal_*: TemporalGuidance (fc 512/128, LSTMs, d 256, ff 1024, 4 heads, 2 encoder
            layers, dropout 0.1 / 0.2 after video_fc, gamma 0.1). head_topk, head_gamma: CMBS
            (top-4 mean over time, gamma 0.3).
        loss_type: "upstream" = BCE(is_event) + BCE(av gate) + CE(event) + CE(av score)
            (targets derived from the per-second labels); "segment_ce" = CE of ``logits`` per second.
        upstream_quirks: reproduce the released code where it departs from the paper:
            1. every one-second waveform is tiled to audio_clip_samples (10 copies; HTS-AT is
               fed a 10-s clip per second: 10x the audio compute); False zero-pads it instead
               (same cost, the HTS-AT geometry is fixed);
            2. guidance factor alpha*M_c + beta*M_s + 1 - alpha (paper Eq. 6: ... + 1);
            3. the audio stream of a paired block runs the WHOLE HTS-AT block, then adds the
               p1 update, then the p2 update; False follows Eq. 2 (attention half + p1, MLP half
               + p2, p2 computed from the post-attention state, as on the visual side);
            4. the audio features skip HTS-AT's final LayerNorm (False applies it);
            5. the av-gate loss is BCE-with-logits on a product of sigmoids (a probability);
               False uses BCE on the probability.
            Not reproduced: mixup (computed, never applied upstream), the random crop for
            spectrograms longer than the image (rejected by the config instead).
        backbone_train_mode: upstream never puts its frozen backbones in eval mode, so during
            training bn0 uses batch statistics (and its running stats drift), SpecAugment zeroes
            stripes and stochastic depth drops frozen blocks. That is a bug: by default the
            backbones stay in eval mode; True reproduces upstream.
    """

    img_size: int = 192
    num_frames: int = 10
    num_classes: int = 29
    visual_patch_size: int = 4
    visual_embed_dim: int = 192
    visual_depths: tuple[int, ...] = (2, 2, 18, 2)
    visual_num_heads: tuple[int, ...] = (6, 12, 24, 48)
    visual_window_size: int = 12
    visual_drop_path_rate: float = 0.1
    visual_weights: str | None = None
    sample_rate: int = 32000
    audio_clip_samples: int = 320000
    audio_n_fft: int = 1024
    audio_hop_length: int = 320
    audio_n_mels: int = 64
    audio_fmin: float = 50.0
    audio_fmax: float = 14000.0
    audio_spec_size: int = 256
    audio_patch_size: int = 4
    audio_embed_dim: int = 96
    audio_depths: tuple[int, ...] = (2, 2, 6, 2)
    audio_num_heads: tuple[int, ...] = (4, 8, 16, 32)
    audio_window_size: int = 8
    audio_drop_path_rate: float = 0.1
    audio_weights: str | None = None
    num_latent_tokens: int = 32
    adapter_reduction: int = 8
    adapter_groups: int = 2
    guide_alpha: float = 0.3
    guide_beta: float = 0.05
    temporal_video_dim: int = 512
    temporal_audio_dim: int = 128
    temporal_d_model: int = 256
    temporal_ff_dim: int = 1024
    temporal_heads: int = 4
    temporal_layers: int = 2
    temporal_dropout: float = 0.1
    temporal_fc_dropout: float = 0.2
    temporal_gamma: float = 0.1
    head_topk: int = 4
    head_gamma: float = 0.3
    loss_type: str = "upstream"
    upstream_quirks: bool = True
    backbone_train_mode: bool = False

    def __post_init__(self):
        for name in ("img_size", "num_frames", "visual_patch_size", "visual_embed_dim", "visual_window_size",
                     "sample_rate", "audio_clip_samples", "audio_n_fft", "audio_hop_length", "audio_n_mels",
                     "audio_spec_size", "audio_patch_size", "audio_embed_dim", "audio_window_size",
                     "num_latent_tokens", "adapter_reduction", "adapter_groups", "temporal_video_dim",
                     "temporal_audio_dim", "temporal_d_model", "temporal_ff_dim", "temporal_heads",
                     "temporal_layers", "head_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DGSCTConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"DGSCTConfig: num_classes must be an int >= 2 (events + background), "
                             f"got {self.num_classes!r}")
        stages = len(self.visual_depths)
        for name in ("visual_num_heads", "audio_depths", "audio_num_heads"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"DGSCTConfig: {name} must have {stages} entries (one per stage, as "
                                 f"visual_depths), got {tuple(getattr(self, name))}")
        for s, (dv, da) in enumerate(zip(self.visual_depths, self.audio_depths)):
            if da < 1 or dv < da or dv % da:
                raise ValueError(f"DGSCTConfig: visual_depths[{s}] must be a multiple of audio_depths[{s}] >= 1 "
                                 f"(blocks are paired), got {dv} and {da}")
        for name, side, patch in (("img_size", self.img_size, self.visual_patch_size),
                                  ("audio_spec_size", self.audio_spec_size, self.audio_patch_size)):
            if side % (patch * 2 ** (stages - 1)):
                raise ValueError(f"DGSCTConfig: {name} must be a multiple of patch * 2^(stages - 1) = "
                                 f"{patch * 2 ** (stages - 1)}, got {side}")
        if self.audio_spec_size % self.audio_n_mels:
            raise ValueError(f"DGSCTConfig: audio_spec_size must be a multiple of audio_n_mels = "
                             f"{self.audio_n_mels}, got {self.audio_spec_size}")
        frames = self.audio_clip_samples // self.audio_hop_length + 1
        limit = self.audio_spec_size ** 2 // self.audio_n_mels
        if frames > limit:
            raise ValueError(f"DGSCTConfig: audio_clip_samples must give at most spec_size * freq_ratio = {limit} "
                             f"STFT frames, got {self.audio_clip_samples} samples = {frames} frames")
        unit = math.lcm(2, self.adapter_reduction * self.adapter_groups)
        for s in range(stages):
            for name, width in (("visual_embed_dim", self.visual_dim(s)), ("audio_embed_dim", self.audio_dim(s))):
                if width % unit:
                    raise ValueError(f"DGSCTConfig: every stage width must be even and a multiple of adapter_reduction "
                                     f"* adapter_groups (i.e. of {unit}), got {name} stage {s} width {width}")
        d = self.temporal_d_model
        if d % 2 or d % self.temporal_heads:
            raise ValueError(f"DGSCTConfig: temporal_d_model must be even and divisible by temporal_heads = "
                             f"{self.temporal_heads}, got {d}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DGSCTConfig: loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("visual_drop_path_rate", "audio_drop_path_rate", "temporal_dropout", "temporal_fc_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DGSCTConfig: {name} must be in [0, 1), got {getattr(self, name)!r}")

    def visual_dim(self, stage: int) -> int:
        return self.visual_embed_dim * 2 ** stage

    def audio_dim(self, stage: int) -> int:
        return self.audio_embed_dim * 2 ** stage

    def visual_tokens(self, stage: int) -> int:
        return (self.img_size // self.visual_patch_size // 2 ** stage) ** 2

    def audio_tokens(self, stage: int) -> int:
        return (self.audio_spec_size // self.audio_patch_size // 2 ** stage) ** 2

    @property
    def block_pairs(self) -> list[tuple[int, int, int]]:
        """(stage, visual block, audio block) of every paired block, in execution order."""
        pairs = []
        for s, (dv, da) in enumerate(zip(self.visual_depths, self.audio_depths)):
            q = dv // da
            pairs += [(s, q * k + q - 1, k) for k in range(da)]
        return pairs

    @classmethod
    def base(cls, **overrides) -> DGSCTConfig:
        """Swin-V2-L (192) + HTS-AT (AudioSet), upstream's AVE model."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> DGSCTConfig:
        """Test/demo size: 32 px frames, Swin (32, depths 1/1/3/1, window 4), HTS-AT with 8 mel
        bins on a 32 x 32 image and one-second clips (no tiling), small temporal module. Takes
        the same (B, 10, 32000) audio."""
        return cls(**{**dict(
            img_size=32, visual_embed_dim=32, visual_depths=(1, 1, 3, 1), visual_num_heads=(1, 2, 4, 8),
            visual_window_size=4, audio_clip_samples=32000, audio_n_mels=8, audio_spec_size=32, audio_embed_dim=16,
            audio_depths=(1, 1, 1, 1), audio_num_heads=(1, 2, 4, 8), audio_window_size=4, num_latent_tokens=4,
            temporal_video_dim=32, temporal_audio_dim=16, temporal_d_model=16, temporal_ff_dim=32, temporal_heads=2),
            **overrides})


# ---------------------------------------------------------------------- adapter


def _grouped_linear(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """A grouped 1x1 convolution on channel-last rows: x (..., Cin), weight (Cout, Cin/g), no bias."""
    cout, cin_g = weight.shape
    y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (groups, cin_g)), weight.view(groups, cout // groups, cin_g))
    return y.flatten(-2)


class DualGuidedAdapter(nn.Module):
    """One DG-SCT adapter: the update of the target modality x guided by the other modality y.

    Upstream's ``VisualAdapter`` (bottleneck, multimodal), per row n of the N = B*T frames:

        y' = P(W y + b)  (Ny -> Nx tokens by the 1x1 conv W, b; Cy -> Cx channels by Linear P)
        L  = tokens + softmax_Nx(tokens y'^T) y';   x = x + gate_latent softmax_m(x L^T) L
        g  = mean_tokens(y');  M_c = sigmoid(up(ReLU(down(ReLU(G_c g) * mean_tokens(ReLU(T_c x))))))
        s  = score(ReLU(T_s (x (M_c + 1))) * ReLU(G_s g));  M_s = sigmoid(s);  map = softmax_Nx(tanh(s))
        x  = x (alpha M_c + beta M_s + 1 - alpha)          (paper: ... + 1)
        out = gate * LN_post(BN2(U ReLU(BN1(D LN_before(x)))))   D, U grouped, no bias

    y' is computed exactly in the cheaper order: the channel projection first when
    Ny Cy Cx + Nx Ny Cx <= Nx Ny Cy + Nx Cy Cx (then the conv bias folds into
    b[:, None] * P.weight.sum(1) + P.bias), else upstream's order. The mean over tokens of
    ReLU(G_c g) * ReLU(T_c x) is taken as ReLU(G_c g) * mean(ReLU(T_c x)) (equal).

    Args:
        dim, tokens: Cx, Nx of the target. guide_dim, guide_tokens: Cy, Ny of the guide.
        num_latents: m. reduction, groups: bottleneck Cx -> Cx/reduction, grouped projections.
        alpha, beta: guidance weights. upstream_scale: use the 1 - alpha constant (else 1).

    Parameters (upstream name): guide_mix_weight (Nx, Ny) / guide_mix_bias (Nx) (conv_adapter),
    guide_proj (fc), latent_tokens (my_tokens, U[0,1)), gate_latent (gate_av, 0),
    channel_guide / channel_target / channel_down / channel_up (fc_affine_audio_1 / video_1 /
    bottleneck / v_c_att), spatial_target / spatial_guide / spatial_score (fc_affine_video_2 /
    audio_2 / v_s_att), ln_before, down_weight (Cx/r, Cx/g) (down_sampler), bn1, up_weight
    (Cx, Cx/(r g)) (up_sampler), bn2, ln_post, gate (0).
    """

    def __init__(self, dim: int, tokens: int, guide_dim: int, guide_tokens: int, num_latents: int = 32,
                 reduction: int = 8, groups: int = 2, alpha: float = 0.3, beta: float = 0.05,
                 upstream_scale: bool = True):
        super().__init__()
        hidden = dim // reduction
        if dim % 2 or hidden < 1 or dim % groups or hidden % groups:
            raise ValueError(f"DualGuidedAdapter: dim must be even and dim, dim // reduction divisible by groups, "
                             f"got dim={dim}, reduction={reduction}, groups={groups}")
        self.dim, self.tokens, self.guide_dim, self.guide_tokens = dim, tokens, guide_dim, guide_tokens
        self.groups, self.alpha, self.beta = groups, alpha, beta
        self.offset = 1.0 - alpha if upstream_scale else 1.0
        self.project_first = (guide_tokens * guide_dim * dim + tokens * guide_tokens * dim
                              <= tokens * guide_tokens * guide_dim + tokens * guide_dim * dim)
        self.guide_mix_weight = nn.Parameter(torch.empty(tokens, guide_tokens))
        self.guide_mix_bias = nn.Parameter(torch.empty(tokens))
        self.guide_proj = nn.Linear(guide_dim, dim)
        self.latent_tokens = nn.Parameter(torch.rand(num_latents, dim))
        self.gate_latent = nn.Parameter(torch.zeros(1))
        self.channel_guide = nn.Linear(dim, dim)
        self.channel_target = nn.Linear(dim, dim)
        self.channel_down = nn.Linear(dim, dim // 2)
        self.channel_up = nn.Linear(dim // 2, dim)
        self.spatial_target = nn.Linear(dim, dim // 2)
        self.spatial_guide = nn.Linear(dim, dim // 2)
        self.spatial_score = nn.Linear(dim // 2, 1)
        self.ln_before = nn.LayerNorm(dim)
        self.down_weight = nn.Parameter(torch.empty(hidden, dim // groups))
        self.bn1 = nn.BatchNorm1d(hidden)
        self.up_weight = nn.Parameter(torch.empty(dim, hidden // groups))
        self.bn2 = nn.BatchNorm1d(dim)
        self.ln_post = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(1))
        for w in (self.guide_mix_weight, self.down_weight, self.up_weight):  # Conv2d's default init
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(guide_tokens)
        nn.init.uniform_(self.guide_mix_bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, tokens={self.tokens}, guide_dim={self.guide_dim}, guide_tokens={self.guide_tokens}, "
                f"alpha={self.alpha}, beta={self.beta}, offset={self.offset}, project_first={self.project_first}")

    def guide(self, y: Tensor) -> Tensor:
        """y (N, Ny, Cy) -> y' (N, Nx, Cx) = P(W y + b)."""
        w, b, proj = self.guide_mix_weight, self.guide_mix_bias, self.guide_proj
        if self.project_first:
            z = torch.einsum("nm,bmc->bnc", w, F.linear(y, proj.weight))
            return z + (b[:, None] * proj.weight.sum(1) + proj.bias)
        return proj(torch.einsum("nm,bmc->bnc", w, y) + b[:, None])

    def _bottleneck(self, x: Tensor) -> Tensor:
        z = _grouped_linear(self.ln_before(x), self.down_weight, self.groups)
        z = F.relu(self.bn1(z.flatten(0, 1)).view_as(z))  # BatchNorm over the N * Nx rows
        z = _grouped_linear(z, self.up_weight, self.groups)
        return self.gate * self.ln_post(self.bn2(z.flatten(0, 1)).view_as(z))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, Nx, Cx) target tokens, y (N, Ny, Cy) guide tokens -> (update (N, Nx, Cx),
        spatial map (N, Nx), softmax over tokens)."""
        where = type(self).__name__
        if x.dim() != 3 or x.shape[1:] != (self.tokens, self.dim):
            raise ValueError(f"{where}: x must be (N, Nx, Cx) = (N, {self.tokens}, {self.dim}), got {tuple(x.shape)}")
        if y.dim() != 3 or y.shape[0] != x.shape[0] or y.shape[1:] != (self.guide_tokens, self.guide_dim):
            raise ValueError(f"{where}: y must be (N, Ny, Cy) = ({x.shape[0]}, {self.guide_tokens}, "
                             f"{self.guide_dim}), got {tuple(y.shape)}")
        y = self.guide(y)
        latents = self.latent_tokens
        lat = latents + torch.softmax(torch.einsum("mc,bnc->bmn", latents, y), dim=-1) @ y  # (N, m, Cx)
        x = x + self.gate_latent * (torch.softmax(x @ lat.transpose(1, 2), dim=-1) @ lat)
        g = y.mean(1)  # (N, Cx)
        mix = F.relu(self.channel_guide(g)) * F.relu(self.channel_target(x)).mean(1)
        channel = torch.sigmoid(self.channel_up(F.relu(self.channel_down(mix))))[:, None]  # (N, 1, Cx)
        query = F.relu(self.spatial_target(x * (channel + 1))) * F.relu(self.spatial_guide(g))[:, None]
        score = self.spatial_score(query)  # (N, Nx, 1)
        spatial_map = torch.softmax(torch.tanh(score.squeeze(-1)), dim=-1)
        x = x * (self.alpha * channel + self.beta * torch.sigmoid(score) + self.offset)
        return self._bottleneck(x), spatial_map


class DGSCTBlockAdapters(nn.Module):
    """The four adapters of one paired block: ``audio_p1``/``visual_p1`` (read the block
    inputs) and ``audio_p2``/``visual_p2`` (read the states after the first half)."""

    def __init__(self, visual: tuple[int, int], audio: tuple[int, int], **kwargs):
        super().__init__()
        (cv, nv), (ca, na) = visual, audio
        self.audio_p1 = DualGuidedAdapter(ca, na, cv, nv, **kwargs)
        self.visual_p1 = DualGuidedAdapter(cv, nv, ca, na, **kwargs)
        self.audio_p2 = DualGuidedAdapter(ca, na, cv, nv, **kwargs)
        self.visual_p2 = DualGuidedAdapter(cv, nv, ca, na, **kwargs)


# ---------------------------------------------------------------------- temporal module and head


class _TemporalEncoder(nn.Module):
    """Linear(in, d) then post-norm transformer encoder layers (upstream InternalTemporalRelationModule)."""

    def __init__(self, in_dim: int, d: int, heads: int, ff: int, layers: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.proj(x))


class _CrossModalLayer(nn.Module):
    """Post-norm layer whose queries attend over [memory; queries] (CMRA), then an FFN."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        memory = torch.cat([memory, x], dim=1)
        x = self.norm1(x + self.dropout1(self.multihead_attn(x, memory, memory, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class _CrossModalDecoder(nn.Module):
    """Linear(in, d) then one CMRA layer (upstream CrossModalRelationAttModule)."""

    def __init__(self, in_dim: int, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, d)
        self.layer = _CrossModalLayer(d, heads, ff, dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return self.layer(self.proj(x), memory)


class TemporalGuidance(nn.Module):
    """The released code's temporal-gated attention (upstream ``TemporalAttention``), batch first.

        a = audio_fc(f_a);  v = Dropout(ReLU(video_fc(f_v)))             (B, T, 128), (B, T, 512)
        a = BiLSTM_a(a) (d);  v = BiLSTM_v(v) (2d)
        kv_v = Enc_v(v);  q_a = Dec_a(a, kv_v);  kv_a = Enc_a(a);  q_v = Dec_v(v, kv_a)
        G_a = sigmoid(audio_gate(kv_a));  G_v = sigmoid(video_gate(kv_v))
        v_out = q_v + gamma G_a q_v;  a_out = q_a + gamma G_v q_a;  av_gate = G_a G_v

    forward(f_v (B, T, Cv), f_a (B, T, Ca)) -> (v_out (B, T, d), a_out (B, T, d), av_gate (B, T)).
    The LSTMs have one layer (upstream passes dropout 0.2, which a one-layer LSTM ignores).
    """

    def __init__(self, visual_dim: int, audio_dim: int, video_fc: int = 512, audio_fc: int = 128, d_model: int = 256,
                 ff_dim: int = 1024, heads: int = 4, layers: int = 2, dropout: float = 0.1, fc_dropout: float = 0.2,
                 gamma: float = 0.1):
        super().__init__()
        d = d_model
        self.gamma = gamma
        self.video_fc, self.audio_fc = nn.Linear(visual_dim, video_fc), nn.Linear(audio_dim, audio_fc)
        self.fc_dropout = nn.Dropout(fc_dropout)
        self.audio_rnn = nn.LSTM(audio_fc, d // 2, batch_first=True, bidirectional=True)
        self.video_rnn = nn.LSTM(video_fc, d, batch_first=True, bidirectional=True)
        self.video_encoder = _TemporalEncoder(2 * d, d, heads, ff_dim, layers, dropout)
        self.audio_encoder = _TemporalEncoder(d, d, heads, ff_dim, layers, dropout)
        self.video_decoder = _CrossModalDecoder(2 * d, d, heads, ff_dim, dropout)
        self.audio_decoder = _CrossModalDecoder(d, d, heads, ff_dim, dropout)
        self.audio_gate, self.video_gate = nn.Linear(d, 1), nn.Linear(d, 1)

    def forward(self, f_v: Tensor, f_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.audio_fc(f_a)
        v = self.fc_dropout(F.relu(self.video_fc(f_v)))
        a, v = self.audio_rnn(a)[0], self.video_rnn(v)[0]
        kv_v = self.video_encoder(v)
        q_a = self.audio_decoder(a, kv_v)
        kv_a = self.audio_encoder(a)
        q_v = self.video_decoder(v, kv_a)
        g_a, g_v = torch.sigmoid(self.audio_gate(kv_a)), torch.sigmoid(self.video_gate(kv_v))
        return q_v + g_a * q_v * self.gamma, q_a + g_v * q_a * self.gamma, (g_a * g_v).squeeze(-1)


class CMBSHead(nn.Module):
    """The CMBS head as DG-SCT uses it (its AV/VA interaction branches are computed and
    discarded upstream, so they are left out):

        av_score = (topk_mean_T(video_cas(v)) + topk_mean_T(audio_cas(a))) / 2      (B, E)
        is_event = is_event((v + a) / 2)                                            (B, T)
        event = event(max_T((v + a) / 2)) + gamma av_score                           (B, E)

    forward(v (B, T, d), a (B, T, d)) -> (is_event logits, event logits, av_score).
    """

    def __init__(self, d_model: int, num_events: int, topk: int = 4, gamma: float = 0.3):
        super().__init__()
        self.topk, self.gamma = topk, gamma
        self.video_cas, self.audio_cas = nn.Linear(d_model, num_events), nn.Linear(d_model, num_events)
        self.is_event, self.event = nn.Linear(d_model, 1), nn.Linear(d_model, num_events)

    def forward(self, v: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = min(self.topk, v.shape[1])
        score_v = self.video_cas(v).topk(k, dim=1).values.mean(1)
        score_a = self.audio_cas(a).topk(k, dim=1).values.mean(1)
        av_score = (score_v + score_a) / 2
        fused = (v + a) / 2
        event = self.event(fused.amax(1)) + self.gamma * av_score
        return self.is_event(fused).squeeze(-1), event, av_score


# ---------------------------------------------------------------------- upstream keys

_ADAPTER_KEY = re.compile(r"(audio|vis)_adapter_blocks_p([12])\.(\d+)\.(.+)")
_ADAPTER_EXACT = {
    "conv_adapter.weight": "guide_mix_weight", "conv_adapter.bias": "guide_mix_bias",
    "down_sampler.weight": "down_weight", "up_sampler.weight": "up_weight",
    "my_tokens": "latent_tokens", "gate_av": "gate_latent", "gate": "gate",
}
_ADAPTER_MODULES = {
    "fc": "guide_proj", "fc_affine_audio_1": "channel_guide", "fc_affine_video_1": "channel_target",
    "fc_affine_bottleneck": "channel_down", "fc_affine_v_c_att": "channel_up",
    "fc_affine_video_2": "spatial_target", "fc_affine_audio_2": "spatial_guide", "fc_affine_v_s_att": "spatial_score",
    "ln_before": "ln_before", "bn1": "bn1", "bn2": "bn2", "ln_post": "ln_post",
}
_CONV_1X1 = ("conv_adapter.weight", "down_sampler.weight", "up_sampler.weight")
_TEMPORAL_RULES = [(re.compile(p), r) for p, r in (
    (r"v_fc\.(.+)", r"video_fc.\1"),
    (r"a_fc\.(.+)", r"audio_fc.\1"),
    (r"audio_visual_rnn_layer\.audio_rnn\.(.+)", r"audio_rnn.\1"),
    (r"audio_visual_rnn_layer\.visual_rnn\.(.+)", r"video_rnn.\1"),
    (r"(video|audio)_(encoder|decoder)\.affine_matrix\.(.+)", r"\1_\2.proj.\3"),
    (r"(video|audio)_encoder\.encoder\.(layers\.\d+\..+)", r"\1_encoder.encoder.\2"),
    (r"(video|audio)_decoder\.decoder\.layers\.0\.((?:multihead_attn|linear[12]|norm[12])\..+)",
     r"\1_decoder.layer.\2"),
    (r"(audio|video)_gated\.0\.(.+)", r"\1_gate.\2"),
)]
_HEAD_RULES = {"video_cas.": "video_cas.", "audio_cas.": "audio_cas.",
               "localize_module.classifier.": "is_event.", "localize_module.event_classifier.": "event."}
_DROPPED = re.compile(
    r"adapter_token_downsampler\..*"                       # built, never used
    r"|(?:audio|vis)_adapter_blocks_p[12]\.\d+\.gate_tk"    # never used
    r"|swin\.(?:.*\.(?:relative_position_index|relative_coords_table|attn_mask|k_bias)|head\..*)"  # buffers, 22k head
    r"|temporal_attn\.(?:video|audio)_decoder\.decoder\.layers\.\d+\.self_attn\..*"  # never used
    r"|CMBS\.(?:AVInter|VAInter|video_norm|audio_norm)\..*")  # outputs discarded / never used


def _swin_name(key: str) -> str:
    """timm <= 0.6 / original Swin-V2 key -> timm 1.0 (patch merging moved to the next stage's start)."""
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)


def _read_weights(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: expected a local weights file, got {os.fspath(path)!r} "
                                "(nothing is downloaded; fetch the file first)")
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(os.fspath(path))
    return read_checkpoint(path)


# ---------------------------------------------------------------------- model


class DGSCT(AVModel):
    """DG-SCT for per-second audio-visual event localisation (AVE).

    Modules: ``visual`` (timm SwinTransformerV2, frozen), ``audio`` (HTSAT, frozen),
    ``adapters`` (a ``DGSCTBlockAdapters`` per paired block), ``temporal`` (TemporalGuidance),
    ``head`` (CMBSHead). Trainable: adapters, temporal, head (upstream's filter).

    forward(frames (B, T, 3, S, S), audio (B, T, L) 32 kHz) -> {
        "logits": (B, T, C) per-second logits whose argmax is upstream's decision (event class
            where sigmoid(is_event) > 0.5, else background C - 1; ties at exactly 0.5 aside):
            [is_event + event_e - max(event), ..., 0 (background)],
        "is_event": (B, T) logits, "event_logits": (B, E), "av_score": (B, E),
        "av_gate": (B, T) probabilities, "visual_features": (B, T, Cv), "audio_features": (B, T, Ca)
        (the pooled backbone features)}.
    """

    preset = "dgsct"

    def __init__(self, config: DGSCTConfig | None = None):
        super().__init__()
        cfg = DGSCTConfig() if config is None else config
        if not isinstance(cfg, DGSCTConfig):
            raise TypeError(f"DGSCT: config must be a DGSCTConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.visual = SwinTransformerV2(
            img_size=cfg.img_size, patch_size=cfg.visual_patch_size, embed_dim=cfg.visual_embed_dim,
            depths=cfg.visual_depths, num_heads=cfg.visual_num_heads, window_size=cfg.visual_window_size,
            num_classes=0, drop_path_rate=cfg.visual_drop_path_rate)
        self.audio = HTSAT(
            sample_rate=cfg.sample_rate, n_fft=cfg.audio_n_fft, hop_length=cfg.audio_hop_length,
            n_mels=cfg.audio_n_mels, fmin=cfg.audio_fmin, fmax=cfg.audio_fmax, spec_size=cfg.audio_spec_size,
            patch_size=cfg.audio_patch_size, embed_dim=cfg.audio_embed_dim, depths=cfg.audio_depths,
            num_heads=cfg.audio_num_heads, window_size=cfg.audio_window_size, drop_path_rate=cfg.audio_drop_path_rate)
        kwargs = dict(num_latents=cfg.num_latent_tokens, reduction=cfg.adapter_reduction, groups=cfg.adapter_groups,
                      alpha=cfg.guide_alpha, beta=cfg.guide_beta, upstream_scale=cfg.upstream_quirks)
        self.adapters = nn.ModuleList(
            DGSCTBlockAdapters((cfg.visual_dim(s), cfg.visual_tokens(s)), (cfg.audio_dim(s), cfg.audio_tokens(s)),
                               **kwargs)
            for s, _, _ in cfg.block_pairs)
        stages = len(cfg.visual_depths)
        self._partners: list[dict[int, tuple[int, int]]] = [{} for _ in range(stages)]
        for i, (s, j, k) in enumerate(cfg.block_pairs):
            self._partners[s][j] = (k, i)
        self.temporal = TemporalGuidance(
            cfg.visual_dim(stages - 1), cfg.audio_dim(stages - 1), cfg.temporal_video_dim, cfg.temporal_audio_dim,
            cfg.temporal_d_model, cfg.temporal_ff_dim, cfg.temporal_heads, cfg.temporal_layers, cfg.temporal_dropout,
            cfg.temporal_fc_dropout, cfg.temporal_gamma)
        self.head = CMBSHead(cfg.temporal_d_model, cfg.num_classes - 1, cfg.head_topk, cfg.head_gamma)
        freeze(self.visual)
        freeze(self.audio)
        if cfg.visual_weights is not None:
            self.load_visual_weights(cfg.visual_weights)
        if cfg.audio_weights is not None:
            self.load_audio_weights(cfg.audio_weights)

    def train(self, mode: bool = True) -> DGSCT:
        """As nn.Module.train; the frozen backbones stay in eval mode unless backbone_train_mode."""
        super().train(mode)
        if not self.config.backbone_train_mode:
            self.visual.eval()
            self.audio.eval()
        return self

    # ------------------------------------------------------------------ weights

    def load_visual_weights(self, path: str | os.PathLike) -> None:
        """Load a local Swin-V2 checkpoint (timm 1.x, or the original/timm 0.6 layout) into ``visual``."""
        state = checkpoint_filter_fn(strip_prefixes(_read_weights(path, "visual_weights")), self.visual)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            self.visual.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"visual_weights: {os.fspath(path)!r} does not fit the configured Swin-V2 "
                             f"(embed_dim={self.config.visual_embed_dim}, depths={self.config.visual_depths}): {err}"
                             ) from None

    def load_audio_weights(self, path: str | os.PathLike) -> None:
        """Load a local HTS-AT checkpoint (Lightning ``sed_model.*`` keys or bare) into ``audio``."""
        try:
            self.audio.load_upstream_state_dict(_read_weights(path, "audio_weights"))
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"audio_weights: {os.fspath(path)!r} does not fit the configured HTS-AT "
                             f"(embed_dim={self.config.audio_embed_dim}, depths={self.config.audio_depths}): {err}"
                             ) from None

    @staticmethod
    def is_dropped_upstream_key(key: str) -> bool:
        """True for upstream keys that are known to have no place here (unused upstream)."""
        if key.startswith("htsat."):
            return HTSAT.is_dropped_upstream_key(key[len("htsat."):])
        return _DROPPED.fullmatch(key) is not None

    def _upstream_name(self, key: str) -> str | None:
        if key.startswith("swin."):
            return "visual." + _swin_name(key[len("swin."):])
        if key.startswith("htsat."):
            rest = key[len("htsat."):]
            return "audio." + self.audio.upstream_key_map([rest]).get(rest, rest)
        if key.startswith("CMBS."):
            rest = key[len("CMBS."):]
            for old, new in _HEAD_RULES.items():
                if rest.startswith(old):
                    return "head." + new + rest[len(old):]
            return None
        if key.startswith("temporal_attn."):
            rest = key[len("temporal_attn."):]
            for pattern, repl in _TEMPORAL_RULES:
                if pattern.fullmatch(rest):
                    return "temporal." + pattern.sub(repl, rest)
            return None
        m = _ADAPTER_KEY.fullmatch(key)
        if m is None:
            return None
        modality, place, i, rest = m.groups()
        prefix = f"adapters.{i}.{'audio' if modality == 'audio' else 'visual'}_p{place}."
        if rest in _ADAPTER_EXACT:
            return prefix + _ADAPTER_EXACT[rest]
        module, _, param = rest.partition(".")
        return prefix + _ADAPTER_MODULES[module] + "." + param if module in _ADAPTER_MODULES and param else None

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream DG-SCT (AVE ``MMIL_Net``) keys -> ours:
        ``swin.*`` -> ``visual.*`` (``layers.i.downsample`` -> ``layers.{i+1}.downsample``);
        ``htsat.*`` -> ``audio.*`` (``logmel_extractor.melW`` -> ``melW``);
        ``{audio,vis}_adapter_blocks_p{1,2}.i.*`` -> ``adapters.i.{audio,visual}_p{1,2}.*`` (names in
        ``DualGuidedAdapter``); ``temporal_attn.*`` -> ``temporal.*`` (v_fc/a_fc -> video_fc/audio_fc,
        audio_visual_rnn_layer.{audio,visual}_rnn -> {audio,video}_rnn, affine_matrix -> proj,
        decoder.layers.0 -> layer, {audio,video}_gated.0 -> {audio,video}_gate);
        ``CMBS.{video_cas,audio_cas,localize_module.classifier,localize_module.event_classifier}``
        -> ``head.{video_cas,audio_cas,is_event,event}``. Known-unused keys (``is_dropped_upstream_key``)
        are not mapped."""
        ours = self.state_dict().keys()
        return {k: n for k in keys
                if not self.is_dropped_upstream_key(k) and (n := self._upstream_name(k)) is not None and n in ours}

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """As ``AVModel.load_upstream_state_dict``, after dropping the known-unused upstream keys and
        flattening the 1x1 convolution kernels (o, i, 1, 1) of the adapters to (o, i)."""
        state = {}
        for k, v in strip_prefixes(state_dict).items():
            if self.is_dropped_upstream_key(k):
                continue
            if k.endswith(_CONV_1X1) and _ADAPTER_KEY.fullmatch(k) and v.dim() == 4 and v.shape[2:] == (1, 1):
                v = v.flatten(1)
            state[k] = v
        return super().load_upstream_state_dict(state, strict=strict)

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, frames, audio) -> None:
        cfg = self.config
        check_frames("DGSCT", frames, cfg.num_frames, cfg.img_size)
        if not isinstance(audio, Tensor) or not audio.is_floating_point():
            raise TypeError(f"DGSCT: audio must be a float Tensor (B, T, L) of 32 kHz waveforms, got "
                            f"{audio.dtype if isinstance(audio, Tensor) else type(audio).__name__}")
        min_samples = cfg.audio_n_fft // 2 + 1
        if audio.dim() != 3 or audio.shape[:2] != frames.shape[:2] or audio.shape[2] < min_samples:
            raise ValueError(f"DGSCT: audio must be (B, T, L) = ({frames.shape[0]}, {cfg.num_frames}, L >= "
                             f"{min_samples}) one-second waveforms, got {tuple(audio.shape)}")

    def fit_audio(self, wave: Tensor) -> Tensor:
        """(N, L) one-second waveforms -> (N, audio_clip_samples): tiled (upstream) or zero-padded;
        longer inputs are cut."""
        clip, L = self.config.audio_clip_samples, wave.shape[-1]
        if L < clip:
            wave = wave.repeat(1, -(-clip // L)) if self.config.upstream_quirks else F.pad(wave, (0, clip - L))
        return wave[:, :clip]

    def _paired_block(self, vblk: nn.Module, ablk: nn.Module, ad: DGSCTBlockAdapters, x: Tensor, a: Tensor):
        """One paired block on channel-last tokens x (N, Hv, Wv, Cv), a (N, Ha, Wa, Ca); returns
        (x, a, spatial maps of visual_p2 (N, Nv) and audio_p2 (N, Na))."""
        quirks = self.config.upstream_quirks
        r_a, _ = ad.audio_p1(a.flatten(1, 2), x.flatten(1, 2))
        r_v, _ = ad.visual_p1(x.flatten(1, 2), a.flatten(1, 2))
        x = x + vblk.drop_path1(vblk.norm1(vblk._attn(x))) + r_v.view_as(x)
        if quirks:
            a = ablk(a) + r_a.view_as(a)
        else:
            a = a + ablk.drop_path1(ablk._attn(ablk.norm1(a))) + r_a.view_as(a)
        r_a, map_a = ad.audio_p2(a.flatten(1, 2), x.flatten(1, 2))
        r_v, map_v = ad.visual_p2(x.flatten(1, 2), a.flatten(1, 2))
        x = x + vblk.drop_path2(vblk.norm2(vblk.mlp(x))) + r_v.view_as(x)
        a = a + r_a.view_as(a) if quirks else a + ablk.drop_path2(ablk.mlp(ablk.norm2(a))) + r_a.view_as(a)
        return x, a, map_v, map_a

    def forward_features(self, frames: Tensor, audio: Tensor, stages: bool = False) -> tuple:
        """frames (B, T, 3, S, S), audio (B, T, L) -> pooled features f_v (B, T, Cv), f_a (B, T, Ca);
        with ``stages`` also the list of each visual stage's output (N, H_s, W_s, C_s), N = B*T
        (the last one after the final norm)."""
        self._check_inputs(frames, audio)
        B, T = frames.shape[:2]
        x = self.visual.patch_embed(frames.flatten(0, 1))  # (N, Hv, Wv, Cv)
        a = self.audio.patch_embed(self.audio.front_end(self.fit_audio(audio.flatten(0, 1))).to(x.dtype))
        map_v = map_a = None
        outputs = []
        for vstage, astage, partners in zip(self.visual.layers, self.audio.layers, self._partners):
            x = vstage.downsample(x)
            for j, vblk in enumerate(vstage.blocks):
                if j in partners:
                    k, i = partners[j]
                    x, a, map_v, map_a = self._paired_block(vblk, astage.blocks[k], self.adapters[i], x, a)
                else:
                    x = vblk(x)
            outputs.append(x)
            if astage.downsample is not None:
                a = astage.downsample(a)
        x = outputs[-1] = self.visual.norm(x)
        if not self.config.upstream_quirks:
            a = self.audio.norm(a)
        f_v = torch.einsum("nl,nlc->nc", map_v, x.flatten(1, 2))
        f_a = torch.einsum("nl,nlc->nc", map_a, a.flatten(1, 2))
        pooled = f_v.unflatten(0, (B, T)), f_a.unflatten(0, (B, T))
        return (*pooled, outputs) if stages else pooled

    dense_unused = ("temporal", "head")  # modules dense_features does not use

    def dense_shapes(self) -> tuple[list[tuple[int, tuple[int, int]]], int]:
        """What ``dense_features`` returns: (channels, grid) of each level, the audio width."""
        cfg, stages = self.config, len(self.config.visual_depths)
        grid = lambda s: cfg.img_size // cfg.visual_patch_size // 2 ** s  # noqa: E731
        return [(cfg.visual_dim(s), (grid(s), grid(s))) for s in reversed(range(stages))], cfg.audio_dim(stages - 1)

    def dense_features(self, frames: Tensor, audio: Tensor) -> tuple[list[Tensor], Tensor]:
        """frames (B, T, 3, S, S), audio (B, T, L) -> (maps, audio): the Swin stages' outputs,
        deepest (coarsest) first, each (N, C_s, H_s, W_s), and the audio features pooled by the
        last adapter's map (N, Ca)."""
        _, f_a, outputs = self.forward_features(frames, audio, stages=True)
        return [x.permute(0, 3, 1, 2) for x in reversed(outputs)], f_a.flatten(0, 1)

    def forward_head(self, f_v: Tensor, f_a: Tensor) -> dict[str, Tensor]:
        """Pooled features (B, T, Cv), (B, T, Ca) -> the output dict (see the class docstring)."""
        v, a, av_gate = self.temporal(f_v, f_a)
        is_event, event, av_score = self.head(v, a)
        foreground = is_event[..., None] + (event - event.amax(-1, keepdim=True))[:, None, :]  # (B, T, E)
        logits = torch.cat([foreground, torch.zeros_like(is_event)[..., None]], dim=-1)
        return {"logits": logits, "is_event": is_event, "event_logits": event, "av_score": av_score,
                "av_gate": av_gate, "visual_features": f_v, "audio_features": f_a}

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """frames (B, T, 3, S, S) normalised, audio (B, T, L) 32 kHz -> output dict (class docstring)."""
        return self.forward_head(*self.forward_features(frames, audio))

    # ------------------------------------------------------------------ training

    def segment_targets(self, batch: Mapping[str, Tensor], B: int, T: int) -> Tensor:
        """(B, T) int64 per-second classes: batch["segment_labels"], else batch["label"] for every second."""
        C = self.config.num_classes
        if "segment_labels" in batch:
            name, target, want = "segment_labels", batch["segment_labels"], (B, T)
        elif "label" in batch:
            name, target, want = "label", batch["label"], (B,)
        else:
            raise KeyError(f"DGSCT.loss: batch must hold 'segment_labels' (B, T) or 'label' (B,), got {sorted(batch)}")
        if not isinstance(target, Tensor) or tuple(target.shape) != want or target.is_floating_point():
            raise ValueError(f"DGSCT.loss: batch[{name!r}] must be an integer tensor {want}, got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"DGSCT.loss: batch[{name!r}] must be class ids in [0, {C}) (background = {C - 1}), "
                             f"got values in [{lo}, {hi}]")
        target = target.long()
        return target[:, None].expand(B, T) if target.dim() == 1 else target

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """loss_type "upstream": BCE(is_event, foreground) + BCE(av_gate, foreground) +
        CE(event_logits, event) + CE(av_score, event), with foreground = (second's class !=
        background) and event = the largest foreground class of the clip (0 for an all-background
        clip), as upstream derives them from its one-hot labels; "segment_ce": CE of the
        per-second logits. Metrics: loss, its terms, acc (per-second accuracy of ``predict``)."""
        logits = out["logits"]
        B, T, C = logits.shape
        target = self.segment_targets(batch, B, T).to(logits.device)
        acc = float((logits.detach().argmax(-1) == target).float().mean())
        if self.config.loss_type == "segment_ce":
            loss = F.cross_entropy(logits.reshape(B * T, C), target.reshape(B * T))
            return loss, {"loss": float(loss.detach()), "acc": acc}
        foreground = target != C - 1
        event = torch.where(foreground, target, 0).amax(1)
        fg = foreground.to(logits.dtype)
        terms = {
            "loss_is_event": F.binary_cross_entropy_with_logits(out["is_event"], fg),
            "loss_av_gate": (F.binary_cross_entropy_with_logits(out["av_gate"], fg) if self.config.upstream_quirks
                             else _probability_bce(out["av_gate"], fg)),
            "loss_event": F.cross_entropy(out["event_logits"], event),
            "loss_av_score": F.cross_entropy(out["av_score"], event),
        }
        loss = sum(terms.values())
        metrics = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}, "acc": acc}
        return loss, metrics


def _probability_bce(p: Tensor, target: Tensor) -> Tensor:
    """BCE on probabilities in float32 outside autocast (CUDA autocast refuses it in bf16)."""
    with torch.autocast(p.device.type, enabled=False):
        return F.binary_cross_entropy(p.float(), target.float())


_SIZES: dict[str, Callable[..., DGSCTConfig]] = {"tiny": DGSCTConfig.tiny, "base": DGSCTConfig.base}


def build(size: str = "base", num_classes: int | None = None, pretrained: str | None = None, **overrides) -> DGSCT:
    """DG-SCT at ``size`` ("tiny", "base" = Swin-V2-L + HTS-AT) with config ``overrides``;
    ``pretrained``: a local upstream DG-SCT checkpoint (whole model, backbones included), loaded strictly."""
    return with_pretrained(DGSCT(sized_config(DGSCTConfig, _SIZES, size, overrides, num_classes)), pretrained)


__all__ = ["CMBSHead", "DGSCT", "DGSCTBlockAdapters", "DGSCTConfig", "DualGuidedAdapter", "TemporalGuidance", "build"]
