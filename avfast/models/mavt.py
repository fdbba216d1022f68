"""MA-AVT (Mahmud et al., CVPRW'24; papers/ma-avt.txt, UPSTREAM.md §2): one frozen ViT shared
by both modalities, learnable unimodal and shared tokens refined by local self-attention
(LSA), foreground / background class tokens and a block-wise contrastive loss.

Per stream (visual frame, audio log-spectrogram) the frozen ViT sees L tokens:

    [CLS, N patches, BG-CLS, n_uni unimodal tokens, n_shared shared tokens]   (L = 208 for ViT-B/16, 224 px)

The two streams never attend to each other, so they run as ONE batch of 2B sequences through
the frozen blocks (rows 0..B-1 visual, B..2B-1 audio), which is upstream's two sequential
passes. The spectrogram (B, 1, F, T) is repeated to 3 channels for the shared RGB patch embed;
a spectrogram whose size is not (img_size, img_size) is first resized bilinearly (only the
small test configs need this: upstream's spectrogram is 224 x 224 like its frames). LSA runs
once per step on the token parameters (they do not depend on the input), not on B copies.

After block k the shared tokens of each stream are mean-pooled, giving s_v^k, s_a^k (B, D),
for the contrastive loss. Heads on the final-LayerNorm outputs: ``fg_class`` on concat(CLS_v,
CLS_a) -> (B, C) logits, ``bg_class`` on concat(BG-CLS_v, BG-CLS_a) -> (B,) background logit.

    loss = CE_fg (foreground samples) + BCE_bg (target = batch["background"])
           + mean_k InfoNCE(s_v^k, s_a^k) (foreground samples, per-block Linear(D, 512) projections, tau 0.07)

Trainable as upstream: everything outside the frozen ViT, plus the ViT's ``cls_token``.
Dims: B batch, S frame side, N patches, D width, K blocks, C classes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from avfast.models.base import AVModel, freeze, read_checkpoint, sized_config, strip_prefixes, with_pretrained
from avfast.nn import BlockwiseContrastiveLoss

# Upstream checkpoint entries with no counterpart here: the per-block ``logit_scale``
# parameters (created, never used: the temperature is fixed) and the frozen ViT's own
# classifier (``ViT.v.head``; ``pre_logits`` in older timm in21k models).
DROPPED_UPSTREAM_KEYS = (
    re.compile(r"logit_scale(\.\d+)?"),
    re.compile(r"ViT\.v\.(head|pre_logits)\..+"),
)
# Upstream names kept as they are (module or parameter name = first key component).
_SAME_NAME = frozenset({"audio_tokens", "visual_tokens", "shared_tokens", "bg_cls_token", "audio_attn",
                        "visual_attn", "shared_attn", "fg_class", "bg_class"})


@dataclass
class MAVTConfig:
    """MA-AVT hyper-parameters; defaults = the released VGGSound run (README command).

    Backbone: a timm ``VisionTransformer`` (``vit_base_patch16_224`` architecture; upstream
    loads ``vit_base_patch16_224_in21k``), frozen; ``backbone_weights`` = a local timm ViT
    state dict file (.pth / .bin / .safetensors; nothing is downloaded). Without it the ViT
    keeps timm's random init.

    Args:
        img_size: frame side S (frames (B, 1, 3, S, S)); the spectrogram is resized to S x S
            when it differs.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the ViT (D = embed_dim, K = depth).
        num_classes: C foreground classes (309 for VGGSound).
        n_audio_tokens, n_visual_tokens, n_shared_tokens: learnable tokens per set (5 each);
            audio and visual counts must match (both streams share one batch).
        lsa_heads: heads of each LSA module (8).
        proj_dim: width of the per-block contrastive projections (512).
        tau: fixed contrastive temperature (0.07).
        backbone_weights: path of the ViT weights, or None.
        upstream_quirks: True reproduces the released code; False follows the paper where
            the two differ:
            * token init: ``audio_tokens``, ``visual_tokens``, ``shared_tokens`` and
              ``bg_cls_token`` ~ N(0, 1) (``torch.randn``); False: truncated N(0, 0.02), the
              ViT's own token init (the paper states none).
            * position embedding: the (1, N+1, D) table (CLS + patches) is linearly
              interpolated along the token index (align_corners False) to N+2 entries for
              [CLS, patches, BG-CLS], which shifts every patch's entry; False: CLS and patches
              keep their pretrained entries and BG-CLS gets none (the paper interpolates only
              when the patch count differs; a learnable token needs no fixed offset).
            * LSA: tokens <- MHA(tokens), no residual; False: tokens + MHA(tokens) (Eq. 1).
            Not switched, as both agree: the spectrogram's channel is repeated 3 times for
            the RGB patch embed (paper §4.2 does the same). Also kept in both: the mean over
            blocks of the contrastive loss (Eq. 10 writes a sum; the reported runs use the
            mean) and BCE on every sample (Eq. 9 would weight it by y_b).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 309
    n_audio_tokens: int = 5
    n_visual_tokens: int = 5
    n_shared_tokens: int = 5
    lsa_heads: int = 8
    proj_dim: int = 512
    tau: float = 0.07
    backbone_weights: str | None = None
    upstream_quirks: bool = True

    def __post_init__(self):
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes",
                     "n_audio_tokens", "n_visual_tokens", "n_shared_tokens", "lsa_heads", "proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MAVTConfig: {name} must be an int >= 1, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"MAVTConfig: img_size must be a multiple of patch_size={self.patch_size}, "
                             f"got {self.img_size}")
        for name in ("num_heads", "lsa_heads"):
            if self.embed_dim % getattr(self, name):
                raise ValueError(f"MAVTConfig: embed_dim must be divisible by {name}={getattr(self, name)}, "
                                 f"got {self.embed_dim}")
        if self.n_audio_tokens != self.n_visual_tokens:
            raise ValueError(f"MAVTConfig: n_audio_tokens must equal n_visual_tokens={self.n_visual_tokens} "
                             f"(both streams run as one batch), got {self.n_audio_tokens}")
        if not isinstance(self.tau, (int, float)) or not 0.003 <= self.tau < float("inf"):
            raise ValueError(f"MAVTConfig: tau must be a finite float >= 0.003, got {self.tau!r}")

    @classmethod
    def base(cls) -> MAVTConfig:
        """ViT-B/16 at 224 px, 5 + 5 + 5 tokens, VGGSound's 309 classes."""
        return cls()

    @classmethod
    def tiny(cls) -> MAVTConfig:
        """Width 64, 2 blocks, 64 px frames (16 patches of 16 px); for tests and demos."""
        return cls(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10, lsa_heads=4, proj_dim=32)


class TokenSelfAttention(nn.Module):
    """LSA over one set of learnable tokens: multi-head self-attention with ``qkv``
    Linear(D, 3D) and ``proj`` Linear(D, D) (upstream's keys), softmax(q k^T / sqrt(D / heads)),
    no norm; ``residual`` adds the input (the paper's Eq. 1; upstream has none).

    x: (G, n, D) -> (G, n, D).
    """

    def __init__(self, dim: int, num_heads: int = 8, residual: bool = False):
        super().__init__()
        self.num_heads, self.residual = num_heads, residual
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        G, n, D = x.shape
        q, k, v = self.qkv(x).view(G, n, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(G, n, D))
        return x + y if self.residual else y


def load_backbone_weights(vit: VisionTransformer, path: str | os.PathLike) -> None:
    """Fill ``vit`` from a local timm ViT state dict file (its classifier head is ignored;
    a position table of another grid is resampled by timm's checkpoint filter)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights: expected a local timm ViT weights file, got {os.fspath(path)!r} "
                                "(nothing is downloaded)")
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(os.fspath(path))
    else:
        state = read_checkpoint(path)
    state = checkpoint_filter_fn(strip_prefixes(state), vit)
    vit.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


class MAVT(AVModel):
    """MA-AVT on a frozen timm ViT (see the module docstring).

    forward(frames (B, 1, 3, S, S), audio (B, 1, F, T)) -> dict:
        "logits" (B, C) foreground class logits, "bg_logit" (B,) background logit,
        "shared_visual", "shared_audio" (K, B, D) mean-pooled shared tokens after each block.
    loss(out, batch) uses batch["label"] (B,) and batch["background"] (B,) bool (absent = all
    foreground); predict(out) -> (B, C).
    """

    preset = "mavt"

    def __init__(self, config: MAVTConfig):
        super().__init__()
        if not isinstance(config, MAVTConfig):
            raise TypeError(f"MAVT: config must be a MAVTConfig, got {type(config).__name__}")
        self.config = c = config
        D = c.embed_dim
        self.vit = VisionTransformer(img_size=c.img_size, patch_size=c.patch_size, embed_dim=D, depth=c.depth,
                                     num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, num_classes=0)
        if c.backbone_weights is not None:
            load_backbone_weights(self.vit, c.backbone_weights)
        freeze(self.vit)
        self.vit.cls_token.requires_grad_(True)  # upstream trains the ViT's CLS token (the FG class token)
        self.num_patches = self.vit.patch_embed.num_patches

        self.audio_tokens = nn.Parameter(torch.empty(c.n_audio_tokens, D))
        self.visual_tokens = nn.Parameter(torch.empty(c.n_visual_tokens, D))
        self.shared_tokens = nn.Parameter(torch.empty(c.n_shared_tokens, D))
        self.bg_cls_token = nn.Parameter(torch.empty(1, D))
        for token in (self.audio_tokens, self.visual_tokens, self.shared_tokens, self.bg_cls_token):
            if c.upstream_quirks:
                nn.init.normal_(token, std=1.0)
            else:
                nn.init.trunc_normal_(token, std=0.02)
        residual = not c.upstream_quirks
        self.audio_attn = TokenSelfAttention(D, c.lsa_heads, residual)
        self.visual_attn = TokenSelfAttention(D, c.lsa_heads, residual)
        self.shared_attn = TokenSelfAttention(D, c.lsa_heads, residual)
        self.contrastive = BlockwiseContrastiveLoss(D, c.proj_dim, c.depth, tau=float(c.tau), reduction="mean")
        self.fg_class = nn.Linear(2 * D, c.num_classes)
        self.bg_class = nn.Linear(2 * D, 1)
        self._pos_key: tuple | None = None
        self._pos_value: Tensor | None = None

    @property
    def seq_len(self) -> int:
        """Tokens per stream: CLS, patches, BG-CLS, unimodal, shared."""
        return self.num_patches + 2 + self.config.n_visual_tokens + self.config.n_shared_tokens

    def _expand_pos(self, pos: Tensor) -> Tensor:
        """(1, N+1, D) table -> (1, N+2, D) for [CLS, patches, BG-CLS]."""
        if self.config.upstream_quirks:
            return F.interpolate(pos.transpose(1, 2), size=pos.shape[1] + 1, mode="linear",
                                 align_corners=False).transpose(1, 2)
        return torch.cat([pos, pos.new_zeros(1, 1, pos.shape[2])], dim=1)

    def position_embedding(self) -> Tensor:
        """(1, N+2, D) position embedding of [CLS, patches, BG-CLS]; cached while the frozen
        table is unchanged (same tensor, version, dtype and device)."""
        pos = self.vit.pos_embed
        if pos.requires_grad or torch.compiler.is_compiling():
            return self._expand_pos(pos)
        key = (id(pos), pos.data_ptr(), pos._version, pos.dtype, pos.device)
        if key != self._pos_key:
            with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, usable when training later
                self._pos_value = self._expand_pos(pos)
            self._pos_key = key
        return self._pos_value

    def learned_tokens(self) -> tuple[Tensor, Tensor]:
        """LSA'd tokens appended to each stream, once per step: visual (n_uni + n_shared, D)
        = [LSA_v(visual), LSA_s(shared)], audio likewise with LSA_a(audio)."""
        shared = self.shared_attn(self.shared_tokens[None])[0]
        visual = torch.cat([self.visual_attn(self.visual_tokens[None])[0], shared])
        audio = torch.cat([self.audio_attn(self.audio_tokens[None])[0], shared])
        return visual, audio

    def _check_inputs(self, frames, audio) -> int:
        S = self.config.img_size
        if not (isinstance(frames, Tensor) and frames.is_floating_point() and frames.dim() == 5
                and frames.shape[1:] == (1, 3, S, S) and frames.shape[0] > 0):
            raise ValueError(f"MAVT.forward: frames must be a float (B, T, 3, S, S) = (B, 1, 3, {S}, {S}) tensor, "
                             f"got {_describe(frames)}")
        B = frames.shape[0]
        if not (isinstance(audio, Tensor) and audio.is_floating_point() and audio.dim() == 4
                and audio.shape[:2] == (B, 1)):
            raise ValueError(f"MAVT.forward: audio must be a float (B, 1, F, T) = ({B}, 1, 224, 224) "
                             f"log-spectrogram tensor, got {_describe(audio)}")
        return B

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        B = self._check_inputs(frames, audio)
        S, N, ns = self.config.img_size, self.num_patches, self.config.n_shared_tokens
        if audio.shape[-2:] != (S, S):
            audio = F.interpolate(audio, size=(S, S), mode="bilinear", align_corners=False)
        # one channel repeated for the RGB patch embed; both streams in one (2B, 3, S, S) batch
        images = torch.cat([frames[:, 0], audio.to(frames.dtype).expand(-1, 3, -1, -1)])
        x = self.vit.patch_embed(images)  # (2B, N, D)
        x = torch.cat([self.vit.cls_token.expand(2 * B, -1, -1), x,
                       self.bg_cls_token.expand(2 * B, 1, -1)], dim=1) + self.position_embedding()
        visual, audio_tokens = self.learned_tokens()
        x = torch.cat([x, torch.cat([visual.expand(B, -1, -1), audio_tokens.expand(B, -1, -1)])], dim=1)

        shared = []
        for blk in self.vit.blocks:
            x = blk(x)
            shared.append(x[:, -ns:].mean(dim=1))
        shared = torch.stack(shared)  # (K, 2B, D)

        heads = self.vit.norm(x[:, [0, N + 1]])  # (2B, 2, D): final-LN CLS and BG-CLS
        logits = self.fg_class(torch.cat([heads[:B, 0], heads[B:, 0]], dim=-1))
        bg_logit = self.bg_class(torch.cat([heads[:B, 1], heads[B:, 1]], dim=-1)).squeeze(-1)
        return {"logits": logits, "bg_logit": bg_logit, "shared_visual": shared[:, :B], "shared_audio": shared[:, B:]}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """CE_fg + BCE_bg + mean-over-blocks contrastive loss; background samples leave the CE
        and the contrastive batch and are the BG head's positives. The contrastive term spans
        the global batch under torch.distributed (see avfast.nn.BlockwiseContrastiveLoss)."""
        logits = out["logits"]
        B = logits.shape[0]
        label = batch.get("label")
        if not isinstance(label, Tensor) or label.shape != (B,) or label.dtype != torch.int64:
            raise ValueError(f"MAVT.loss: batch['label'] must be an int64 (B,) = ({B},) tensor, got {_describe(label)}")
        background = batch.get("background")
        if background is None:
            background = torch.zeros(B, dtype=torch.bool, device=logits.device)
        elif not isinstance(background, Tensor) or background.shape != (B,) or background.dtype != torch.bool:
            raise ValueError(f"MAVT.loss: batch['background'] must be a bool (B,) = ({B},) tensor, "
                             f"got {_describe(background)}")
        label, background = label.to(logits.device), background.to(logits.device)
        fg = ~background
        per_sample = F.cross_entropy(logits, torch.where(fg, label, 0), reduction="none")
        ce_fg = (per_sample * fg).sum() / fg.sum().clamp(min=1)
        bce_bg = F.binary_cross_entropy_with_logits(out["bg_logit"], background.to(out["bg_logit"].dtype))
        cnt = self.contrastive(out["shared_audio"], out["shared_visual"], valid=fg)
        total = ce_fg + bce_bg + cnt
        values = torch.stack([total, ce_fg, bce_bg, cnt]).detach().double().tolist()
        return total, dict(zip(("loss", "ce_fg", "bce_bg", "contrastive"), values))

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """``ViT.v.*`` -> ``vit.*``; ``audio_proj.k``/``vis_proj.k`` -> ``contrastive.*``; tokens,
        LSA modules and heads keep their names. Keys of DROPPED_UPSTREAM_KEYS are left out."""
        mapping = {}
        for key in keys:
            if key.startswith("ViT.v."):
                mapping[key] = "vit." + key[len("ViT.v."):]
            elif key.startswith(("audio_proj.", "vis_proj.")):
                mapping[key] = "contrastive." + key
            elif key.split(".", 1)[0] in _SAME_NAME:
                mapping[key] = key
        return {k: v for k, v in mapping.items() if not _is_dropped(k)}

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an upstream MA-AVT checkpoint (``module.`` removed); the known-unused entries
        (DROPPED_UPSTREAM_KEYS) are skipped, any other unknown or missing key fails when strict."""
        state = {k: v for k, v in strip_prefixes(state_dict).items() if not _is_dropped(k)}
        return super().load_upstream_state_dict(state, strict=strict)


def _is_dropped(key: str) -> bool:
    return any(p.fullmatch(key) for p in DROPPED_UPSTREAM_KEYS)


_SIZES = {"tiny": MAVTConfig.tiny, "base": MAVTConfig.base}


def build(size: str = "base", num_classes: int | None = None, pretrained: str | None = None, **overrides) -> MAVT:
    """MA-AVT at ``size`` ("tiny" | "base"); ``overrides`` replace MAVTConfig fields;
    ``pretrained``: a local upstream checkpoint, loaded strictly."""
    return with_pretrained(MAVT(sized_config(MAVTConfig, _SIZES, size, overrides, num_classes)), pretrained)
