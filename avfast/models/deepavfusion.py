"""DeepAVFusion (Mo & Morgado, CVPR'24): an image ViT and an audio ViT fused at every layer
through learnable fusion tokens, pre-trained as an audio-visual MAE.

Per layer l, with fusion tokens F (B, nF, D), image tokens V (B, Nv, D), audio tokens A (B, Na, D):

    V' = ImageBlock_l([F ; V])[:, nF:]      A' = AudioBlock_l([F ; A])[:, nF:]
    F' = FusionBlock_l(F, V, A)             (pre-update V and A: the three updates are independent)

then LayerNorms on the three streams. The modality blocks are timm ViT blocks whose modality
rows also attend to the fusion rows; we compute the fusion rows' keys and values only (their
queries, projection and MLP rows, which upstream computes and discards, are skipped, exactly).
Fusion blocks are ``avfast.nn.FactorizedAVFusionBlock`` (the released checkpoints) or
``DenseAVFusionBlock`` (exact dense interactions without the pair tensor).

    model = build("base", num_classes=310, pretrained="checkpoint_latest.pth")  # fine-tuning
    out = model(frames, audio)   # frames (B, 1, 3, 224, 224), audio (B, 1, 128, 192) log-mel
    mae = build_mae("base")      # AV-MAE pre-training: loss, metrics = mae.pretrain_loss(frames, audio)

State-dict names follow upstream (``encoder.image.blocks.k.*``, ``encoder.fusion_blocks.k.*``,
``image_head``, ``image_decoder_*``, ...), so upstream checkpoints load without renaming.
Dims: B batch, nF fusion tokens, Nv/Na image/audio tokens, D width, C classes, P patch values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from functools import partial

import torch
import torch.nn.functional as nnf
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from avfast.models.base import (AVModel, read_checkpoint, sized_config, spread_layers, strip_prefixes,
                                with_pretrained)
from avfast.nn import DenseAVFusionBlock, FactorizedAVFusionBlock

FUSION_ARCHS = ("factorized", "dense")
_HEADS = ("image_head.", "audio_head.", "fusion_head.")
_DECODER_PREFIXES = ("image_decoder_", "audio_decoder_")


@dataclasses.dataclass
class _EncoderConfig:
    """Fields of the early-fusion encoder, shared by DeepAVFusionConfig and DeepAVFusionMAEConfig."""

    img_size: int = 224                          # frame side S; image grid S/patch_size squared
    patch_size: int = 16
    audio_size: tuple[int, int] = (128, 192)     # log-mel (mels, frames); grid 8 x 12 = 96 tokens
    audio_patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vit_norm_eps: float = 1e-6
    fusion_arch: str = "factorized"              # "factorized" (released ckpts) or "dense"
    num_fusion_tkns: tuple[int, int, int] = (16, 8, 8)  # (fusion, image aggr., audio aggr.)
    fusion_num_heads: int = 12
    fusion_attn_ratio: float = 0.25
    fusion_mlp_ratio: float = 1.0
    fusion_norm_eps: float = 1e-5
    drop_path: float = 0.0                       # constant for every layer (no depth rule)
    image_weights: str | None = None             # MAE-style ViT checkpoint for the image blocks
    audio_weights: str | None = None             # AudioMAE-style ViT checkpoint (in_chans 1)
    upstream_quirks: bool = True

    def __post_init__(self):
        self.audio_size = tuple(self.audio_size)
        self.num_fusion_tkns = tuple(self.num_fusion_tkns)
        if self.fusion_arch not in FUSION_ARCHS:
            raise ValueError(f"fusion_arch: expected one of {FUSION_ARCHS}, got {self.fusion_arch!r}")
        if len(self.num_fusion_tkns) != 3 or min(self.num_fusion_tkns) < 1:
            raise ValueError(f"num_fusion_tkns: expected 3 positive counts, got {self.num_fusion_tkns}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size: expected a multiple of patch_size={self.patch_size}, got {self.img_size}")
        if len(self.audio_size) != 2 or any(s % self.audio_patch_size for s in self.audio_size):
            raise ValueError(f"audio_size: expected (mels, frames), multiples of audio_patch_size="
                             f"{self.audio_patch_size}, got {self.audio_size}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim: expected a multiple of 4 (2-D sin-cos embedding), got {self.embed_dim}")

    @property
    def image_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def audio_tokens(self) -> int:
        return (self.audio_size[0] // self.audio_patch_size) * (self.audio_size[1] // self.audio_patch_size)


_TINY_ENCODER = dict(img_size=32, embed_dim=64, depth=2, num_heads=2, num_fusion_tkns=(4, 2, 2),
                     fusion_num_heads=2)


@dataclasses.dataclass
class DeepAVFusionConfig(_EncoderConfig):
    """Fine-tuning (eval_finetune): three linear heads on mean-pooled image / audio / fusion
    tokens, cross-entropy with label smoothing on the average of the three logits. Defaults:
    the released VGGSound model (ViT-B/16 image 224 + audio 128x192, factorized fusion, tokens
    (16, 8, 8), attn_ratio 0.25, fusion MLP ratio 1) and its fine-tuning recipe (drop_path 0.2
    in every layer, smoothing 0.1, upstream's 310 VGGSound classes).

    Quirks of the public code reproduced when ``upstream_quirks`` is True (False = the paper):
      * fusion attention softmax scale (D/heads)^-1/2 although q/k are projected to
        D*fusion_attn_ratio (paper: the projected head width, 16 -> scale 1/4 instead of 1/8);
      * (AV-MAE) the decoders' sin-cos position embeddings are trainable parameters
        (upstream never freezes them; MAE's recipe keeps them fixed).
    Always as upstream (its checkpoints depend on them): fusion residual added to the
    normalised fusion tokens, LayerNorm eps 1e-5 in fusion blocks and 1e-6 in ViT blocks,
    pair order [audio ; image] (dense) / [image ; audio] (factorized), MAE pos-embed layout.
    """

    num_classes: int = 310
    label_smoothing: float = 0.1
    drop_path: float = 0.2

    @classmethod
    def base(cls) -> DeepAVFusionConfig:
        return cls()

    @classmethod
    def tiny(cls) -> DeepAVFusionConfig:
        """Cheap test/demo model; takes (B, 1, 3, 32, 32) frames and the real (B, 1, 128, 192) audio."""
        return cls(**_TINY_ENCODER, num_classes=10)


@dataclasses.dataclass
class DeepAVFusionMAEConfig(_EncoderConfig):
    """AV-MAE pre-training: random masking of 75% image / 80% audio patches before the first
    block (fusion tokens never masked), one plain ViT decoder per modality with the embedded
    fusion tokens prepended, norm-pix MSE on the masked patches; loss = L_image + L_audio.
    Encoder fields and quirks as DeepAVFusionConfig; no stochastic depth in pre-training."""

    image_mask_ratio: float = 0.75
    audio_mask_ratio: float = 0.8
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name, tokens in (("image_mask_ratio", self.image_tokens), ("audio_mask_ratio", self.audio_tokens)):
            ratio = getattr(self, name)
            if not 0.0 <= ratio < 1.0 or int(tokens * (1 - ratio)) < 1:
                raise ValueError(f"{name}: expected a ratio in [0, 1) keeping at least one of {tokens} "
                                 f"patches, got {ratio}")
        if self.decoder_depth < 1 or self.decoder_dim % 4:
            raise ValueError(f"decoder_depth, decoder_dim: expected >= 1 and a multiple of 4, "
                             f"got {self.decoder_depth}, {self.decoder_dim}")

    @classmethod
    def base(cls) -> DeepAVFusionMAEConfig:
        return cls()

    @classmethod
    def tiny(cls) -> DeepAVFusionMAEConfig:
        return cls(**_TINY_ENCODER, decoder_dim=32, decoder_depth=2, decoder_num_heads=2)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE layout), float64 (gh*gw, dim): row-major
    tokens; the first dim/2 channels encode the column, the last dim/2 the row, each as
    [sin(pos w), cos(pos w)] with w = 10000^(-k/(dim/4)), k < dim/4."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: Tensor) -> Tensor:
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def block_rows(block: Block, prefix: Tensor, x: Tensor) -> Tensor:
    """``block(cat([prefix, x], 1))[:, P:]`` of a timm ViT block, exactly, without the prefix
    rows' queries, attention output, projection and MLP: the prefix only adds keys and values.

    prefix (B, P, D), x (B, N, D) -> (B, N, D).
    """
    attn = block.attn
    B, N, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    x_h, p_h = block.norm1(x), block.norm1(prefix)  # LayerNorm acts row by row
    q, k, v = attn.qkv(x_h).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    w_kv = attn.qkv.weight[H * d:]
    b_kv = attn.qkv.bias[H * d:] if attn.qkv.bias is not None else None
    k_p, v_p = nnf.linear(p_h, w_kv, b_kv).view(B, -1, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(torch.cat([k_p, k], dim=2))
    o = nnf.scaled_dot_product_attention(
        q, k, torch.cat([v_p, v], dim=2), dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, N, H * d))))
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def random_masking(batch: int, length: int, mask_ratio: float, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random subset of int(length * (1 - mask_ratio)) kept tokens (argsort of
    ``torch.rand(batch, length)``). Returns ids_keep (B, keep), mask (B, L) 1 = masked,
    ids_restore (B, L) (shuffled position of each token)."""
    ids_shuffle = torch.argsort(torch.rand(batch, length, device=device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = int(length * (1 - mask_ratio))
    mask = torch.ones(batch, length, device=device, dtype=dtype)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), row-major patches, values ordered (row, col, channel)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTTrunk(nn.Module):
    """Upstream's ViT without class token: ``patch_embed.proj``, fixed ``pos_embed`` buffer
    (1, N, D) for the actual grid, timm ``blocks``, final ``norm`` (applied by the encoder)."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, in_chans: int, cfg: _EncoderConfig):
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(input_size, patch_size, in_chans, D)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.patch_embed.grid_size)[None].float())
        norm = partial(nn.LayerNorm, eps=cfg.vit_norm_eps)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=cfg.drop_path)
            for _ in range(cfg.depth)
        )
        self.norm = norm(D)
        self.apply(_xavier_init)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def embed(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> patch tokens + position (B, N, D); ids_keep (B, K) keeps K of them."""
        x = self.patch_embed(x) + self.pos_embed
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        return x

    def load_backbone(self, path: str, field: str) -> None:
        """Blocks, patch embedding and norm from an MAE/AudioMAE/timm ViT checkpoint (class
        token, position embedding, MAE decoder and classifier head are not used)."""
        state = strip_prefixes(read_checkpoint(path))
        skip = ("decoder", "mask_token", "cls_token", "pos_embed", "head.")
        state = {k: v for k, v in state.items() if not k.startswith(skip)}
        try:
            self.load_state_dict({**state, "pos_embed": self.pos_embed}, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{field}: expected a ViT checkpoint matching this trunk, got {path!r}: {err}") from None


class DeepAVFusionEncoder(nn.Module):
    """Image and audio ViT trunks fused at every layer through ``fusion_tokens`` (1, nF, D),
    ``fusion_blocks`` and ``fusion_norm`` (upstream's ``DeepAVFusion`` module, same names)."""

    def __init__(self, cfg: _EncoderConfig):
        super().__init__()
        D = cfg.embed_dim
        self.image = ViTTrunk((cfg.img_size, cfg.img_size), cfg.patch_size, 3, cfg)
        self.audio = ViTTrunk(cfg.audio_size, cfg.audio_patch_size, 1, cfg)
        self.fusion_tokens = nn.Parameter(torch.zeros(1, sum(cfg.num_fusion_tkns), D))
        common = dict(attn_ratio=cfg.fusion_attn_ratio, mlp_ratio=cfg.fusion_mlp_ratio, qkv_bias=True,
                      drop_path=cfg.drop_path, norm_eps=cfg.fusion_norm_eps,
                      attn_scale="upstream" if cfg.upstream_quirks else "head")
        if cfg.fusion_arch == "factorized":
            make = partial(FactorizedAVFusionBlock, D, cfg.fusion_num_heads,
                           num_fusion_tkns=cfg.num_fusion_tkns, **common)
        else:
            make = partial(DenseAVFusionBlock, D, cfg.fusion_num_heads, **common)
        self.fusion_blocks = nn.ModuleList(make() for _ in range(cfg.depth))
        self.fusion_norm = nn.LayerNorm(D, eps=cfg.fusion_norm_eps)
        nn.init.normal_(self.fusion_tokens, std=0.02)
        self.fusion_blocks.apply(_xavier_init)
        if cfg.image_weights:
            self.image.load_backbone(cfg.image_weights, "image_weights")
        if cfg.audio_weights:
            self.audio.load_backbone(cfg.audio_weights, "audio_weights")

    def forward(
        self, image: Tensor, audio: Tensor, image_ids_keep: Tensor | None = None, audio_ids_keep: Tensor | None = None,
        return_layers: bool = False,
    ) -> tuple:
        """image (B, 3, S, S), audio (B, 1, mels, frames); ids_keep (B, K): visible patches.
        Returns normalised image (B, Nv, D), audio (B, Na, D) and fusion (B, nF, D) tokens;
        with ``return_layers`` also a list, per layer, of its (image, audio, fusion) output
        tokens before any norm (the dense-task heads read them)."""
        x_image = self.image.embed(image, image_ids_keep)
        x_audio = self.audio.embed(audio, audio_ids_keep)
        x_fusion = self.fusion_tokens.expand(image.shape[0], -1, -1)
        layers = []
        for blk_image, blk_audio, blk_fusion in zip(self.image.blocks, self.audio.blocks, self.fusion_blocks):
            new_image = block_rows(blk_image, x_fusion, x_image)
            new_audio = block_rows(blk_audio, x_fusion, x_audio)
            x_fusion = blk_fusion(x_fusion, x_image, x_audio)
            x_image, x_audio = new_image, new_audio
            if return_layers:
                layers.append((x_image, x_audio, x_fusion))
        out = (self.image.norm(x_image), self.audio.norm(x_audio), self.fusion_norm(x_fusion))
        return (*out, layers) if return_layers else out


def _check_inputs(name: str, cfg: _EncoderConfig, frames, audio) -> tuple[Tensor, Tensor]:
    """frames (B, 1, 3, S, S), audio (B, 1, mels, frames) -> image (B, 3, S, S), audio."""
    S = cfg.img_size
    if not isinstance(frames, Tensor) or frames.dim() != 5 or tuple(frames.shape[1:]) != (1, 3, S, S):
        got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"{name}: frames must be (B, 1, 3, {S}, {S}), got {got}")
    expected = (frames.shape[0], 1, *cfg.audio_size)
    if not isinstance(audio, Tensor) or tuple(audio.shape) != expected:
        got = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
        raise ValueError(f"{name}: audio must be (B, 1, mels, frames) = {expected}, got {got}")
    return frames[:, 0], audio


class DeepAVFusion(AVModel):
    """Fine-tuning model: ``encoder`` + ``image_head``/``audio_head``/``fusion_head``
    Linear(D, C) on mean-pooled tokens (upstream's AVClassifier names). Everything trains."""

    preset = "deepavfusion"

    def __init__(self, config: DeepAVFusionConfig | None = None):
        super().__init__()
        self.config = cfg = config or DeepAVFusionConfig.base()
        self.encoder = DeepAVFusionEncoder(cfg)
        self.image_head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.audio_head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.fusion_head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        for head in (self.image_head, self.audio_head, self.fusion_head):
            _xavier_init(head)

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """frames (B, 1, 3, S, S), audio (B, 1, 128, 192) -> "logits" (B, C) (mean of the three
        heads), "logits_image", "logits_audio", "logits_fusion" (B, C)."""
        image, audio = _check_inputs("DeepAVFusion", self.config, frames, audio)
        x_image, x_audio, x_fusion = self.encoder(image, audio)
        out = {
            "logits_image": self.image_head(x_image.mean(1)),
            "logits_audio": self.audio_head(x_audio.mean(1)),
            "logits_fusion": self.fusion_head(x_fusion.mean(1)),
        }
        out["logits"] = (out["logits_image"] + out["logits_audio"] + out["logits_fusion"]) / 3
        return out

    @property
    def dense_unused(self) -> tuple[str, ...]:
        """The modules ``dense_features`` does not use: the heads, the image norm, the last
        fusion block (its tokens reach no image or audio token) and the fusion norm."""
        last = f"encoder.fusion_blocks.{len(self.encoder.fusion_blocks) - 1}"
        return (*(h.rstrip(".") for h in _HEADS), "encoder.image.norm", last, "encoder.fusion_norm")

    def dense_shapes(self, levels: int = 4) -> tuple[list[tuple[int, tuple[int, int]]], int]:
        """What ``dense_features`` returns: (channels, grid) of each level, the audio width."""
        g, D = self.config.img_size // self.config.patch_size, self.config.embed_dim
        return [(D, (g, g))] * levels, D

    def dense_features(self, frames: Tensor, audio: Tensor, levels: int = 4) -> tuple[list[Tensor], Tensor]:
        """frames (N, 1, 3, S, S), audio (N, 1, mels, frames) -> (maps, audio): the image tokens
        (before norm) of ``levels`` layers spread evenly from the first to the last, each
        (N, D, g, g), shallowest first (upstream AVSegmSimple's order: the first is the decoder's
        top), and the mean of the last layer's normalised audio tokens (N, D)."""
        image, audio = _check_inputs("DeepAVFusion", self.config, frames, audio)
        _, x_audio, _, layers = self.encoder(image, audio, return_layers=True)
        g = self.config.img_size // self.config.patch_size
        maps = [layers[i][0].transpose(1, 2).unflatten(2, (g, g)) for i in spread_layers(len(layers), levels)]
        return maps, x_audio.mean(1)

    @property
    def audio_dense_unused(self) -> tuple[str, ...]:
        """The modules ``audio_dense_features`` does not use (as ``dense_unused``, with the
        audio norm in place of the image norm)."""
        last = f"encoder.fusion_blocks.{len(self.encoder.fusion_blocks) - 1}"
        return (*(h.rstrip(".") for h in _HEADS), "encoder.audio.norm", last, "encoder.fusion_norm")

    def audio_dense_shapes(self, levels: int = 4) -> tuple[list[tuple[int, tuple[int, int]]], int]:
        """What ``audio_dense_features`` returns: (channels, grid) of each level, the image width."""
        cfg = self.config
        grid = (cfg.audio_size[0] // cfg.audio_patch_size, cfg.audio_size[1] // cfg.audio_patch_size)
        return [(cfg.embed_dim, grid)] * levels, cfg.embed_dim

    def audio_dense_features(self, frames: Tensor, audio: Tensor, levels: int = 4) -> tuple[list[Tensor], Tensor]:
        """frames (N, 1, 3, S, S), audio (N, 1, mels, frames) -> (maps, image): the audio tokens
        (before norm) of ``levels`` layers spread evenly, deepest first (upstream
        AVSrcSepUNet's order), each (N, D, mels/p, frames/p), and the mean of the final
        normalised image tokens (N, D), the separation head's inputs."""
        image, audio = _check_inputs("DeepAVFusion", self.config, frames, audio)
        x_image, _, _, layers = self.encoder(image, audio, return_layers=True)
        [(_, grid)], _ = self.audio_dense_shapes(1)
        picks = spread_layers(len(layers), levels)[::-1]
        return [layers[i][1].transpose(1, 2).unflatten(2, grid) for i in picks], x_image.mean(1)

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the averaged logits: batch["label"] (B,) int64 with label smoothing,
        or (B, C) float soft targets (mixup output, smoothing already applied, as upstream)."""
        logits, label = out["logits"], batch["label"]
        B, C = logits.shape
        if label.dtype == torch.int64 and tuple(label.shape) == (B,):
            loss = nnf.cross_entropy(logits, label, label_smoothing=self.config.label_smoothing)
            hard = label
        elif label.is_floating_point() and tuple(label.shape) == (B, C):
            loss = -(label * logits.log_softmax(-1)).sum(-1).mean()
            hard = label.argmax(-1)
        else:
            raise ValueError(f"DeepAVFusion.loss: batch['label'] must be (B,) int64 or (B, C) float = ({B},) or "
                             f"({B}, {C}), got {tuple(label.shape)} {label.dtype}")
        acc = (logits.argmax(-1) == hard).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    @torch.no_grad()
    def init_head_bias(self, class_freq: Tensor) -> None:
        """Upstream's head bias init: log prior odds log((p + 1e-3) / (1 - p + 1e-3)), class_freq (C,)."""
        C = self.config.num_classes
        if not isinstance(class_freq, Tensor) or tuple(class_freq.shape) != (C,):
            got = tuple(class_freq.shape) if isinstance(class_freq, Tensor) else type(class_freq).__name__
            raise ValueError(f"init_head_bias: class_freq must be (C,) = ({C},), got {got}")
        bias = torch.log((class_freq + 1e-3) / (1 - class_freq + 1e-3))
        for head in (self.image_head, self.audio_head, self.fusion_head):
            head.bias.copy_(bias)

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream AVClassifier keys map to themselves; bare encoder keys (``image.*``,
        ``fusion_blocks.*``, ...) gain ``encoder.``. Decoder keys have no place here."""
        ours = set(self.state_dict())
        mapping = {}
        for key in keys:
            name = key if key.startswith(("encoder.", *_HEADS)) else "encoder." + key
            if name in ours:
                mapping[key] = name
        return mapping

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Loads an upstream fine-tuned classifier, an AV-MAE checkpoint (its decoders dropped,
        our heads kept) or a bare encoder state dict; strict on everything else."""
        state = {k: v for k, v in strip_prefixes(state_dict).items() if not k.startswith(_DECODER_PREFIXES)}
        if not any(k.startswith(_HEADS) for k in state):
            state.update({k: v for k, v in self.state_dict().items() if k.startswith(_HEADS)})
        return super().load_upstream_state_dict(state, strict=strict)


class DeepAVFusionMAE(AVModel):
    """AV-MAE pre-training model (upstream's AVMAE): ``encoder`` + per modality m in
    {image, audio}: ``m_decoder_embed`` Linear(D, Dd), ``m_decoder_mask_token`` (1, 1, Dd),
    ``m_decoder_pos_embed`` (1, N, Dd) sin-cos, ``m_decoder_blocks`` (timm, LN eps 1e-5),
    ``m_decoder_norm``, ``m_decoder_pred`` Linear(Dd, p*p*C)."""

    preset = "deepavfusion"

    def __init__(self, config: DeepAVFusionMAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or DeepAVFusionMAEConfig.base()
        self.encoder = DeepAVFusionEncoder(cfg)
        Dd = cfg.decoder_dim
        norm = partial(nn.LayerNorm, eps=1e-5)
        for m, trunk, chans in (("image", self.encoder.image, 3), ("audio", self.encoder.audio, 1)):
            patch = trunk.patch_embed.patch_size
            setattr(self, f"{m}_decoder_embed", nn.Linear(cfg.embed_dim, Dd))
            setattr(self, f"{m}_decoder_mask_token", nn.Parameter(torch.randn(1, 1, Dd) * 0.02))
            pos = sincos_pos_embed_2d(Dd, trunk.patch_embed.grid_size)[None].float()
            setattr(self, f"{m}_decoder_pos_embed", nn.Parameter(pos, requires_grad=cfg.upstream_quirks))
            setattr(self, f"{m}_decoder_blocks", nn.ModuleList(
                Block(Dd, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, qkv_bias=True, norm_layer=norm)
                for _ in range(cfg.decoder_depth)
            ))
            setattr(self, f"{m}_decoder_norm", norm(Dd))
            setattr(self, f"{m}_decoder_pred", nn.Linear(Dd, patch[0] * patch[1] * chans))
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_xavier_init)

    def _decode(self, m: str, x: Tensor, x_fusion: Tensor, ids_restore: Tensor) -> Tensor:
        """Visible tokens x (B, K, D), fusion (B, nF, D), ids_restore (B, L) -> patches (B, L, P)."""
        embed = getattr(self, f"{m}_decoder_embed")
        x, x_fusion = embed(x), embed(x_fusion)
        B, K, Dd = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, getattr(self, f"{m}_decoder_mask_token").expand(B, L - K, Dd).to(x.dtype)], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, Dd)) + getattr(self, f"{m}_decoder_pos_embed")
        *blocks, last = getattr(self, f"{m}_decoder_blocks")
        h = torch.cat([x_fusion, x], dim=1)
        for blk in blocks:
            h = blk(h)
        x_fusion, x = h.split((x_fusion.shape[1], L), dim=1)
        x = block_rows(last, x_fusion, x)  # the fusion rows' last outputs are never read
        return getattr(self, f"{m}_decoder_pred")(getattr(self, f"{m}_decoder_norm")(x))

    def _patch_loss(self, target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE; target normalised per patch (norm-pix)."""
        if self.config.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """frames (B, 1, 3, S, S), audio (B, 1, 128, 192) -> "loss", "loss_image", "loss_audio",
        "pred_image" (B, Nv, p*p*3), "pred_audio" (B, Na, p*p), "mask_image" (B, Nv),
        "mask_audio" (B, Na) (1 = masked). Masks draw torch.rand: image first, then audio."""
        image, audio = _check_inputs("DeepAVFusionMAE", self.config, frames, audio)
        cfg, B = self.config, image.shape[0]
        keep_i, mask_i, restore_i = random_masking(B, cfg.image_tokens, cfg.image_mask_ratio, image.device, image.dtype)
        keep_a, mask_a, restore_a = random_masking(B, cfg.audio_tokens, cfg.audio_mask_ratio, audio.device, audio.dtype)
        x_image, x_audio, x_fusion = self.encoder(image, audio, keep_i, keep_a)
        pred_i = self._decode("image", x_image, x_fusion, restore_i)
        pred_a = self._decode("audio", x_audio, x_fusion, restore_a)
        loss_i = self._patch_loss(patchify(image, cfg.patch_size), pred_i, mask_i)
        loss_a = self._patch_loss(patchify(audio, cfg.audio_patch_size), pred_a, mask_a)
        return {"loss": loss_i + loss_a, "loss_image": loss_i, "loss_audio": loss_a,
                "pred_image": pred_i, "pred_audio": pred_a, "mask_image": mask_i, "mask_audio": mask_a}

    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor] | None = None
             ) -> tuple[Tensor, dict[str, float]]:
        """The AV-MAE loss of ``forward``'s output (labels are not used)."""
        return out["loss"], {k: out[k].item() for k in ("loss", "loss_image", "loss_audio")}

    def pretrain_loss(self, frames: Tensor, audio: Tensor) -> tuple[Tensor, dict[str, float]]:
        """One pre-training step's loss L_image + L_audio and its parts as floats."""
        return self.loss(self(frames, audio))

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        raise TypeError("DeepAVFusionMAE.predict: a pre-training model has no logits; "
                        "fine-tune it with DeepAVFusion (build(..., pretrained=<AV-MAE checkpoint>))")

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream AVMAE keys are ours unchanged."""
        ours = set(self.state_dict())
        return {k: k for k in keys if k in ours}


def _sizes(cls) -> dict:
    return {"tiny": cls.tiny, "base": cls.base}


def build(size: str = "base", num_classes: int | None = None, pretrained: str | None = None,
          **overrides) -> DeepAVFusion:
    """Fine-tuning model at ``size`` ("tiny" | "base"); ``pretrained``: local upstream
    checkpoint (AV-MAE pre-training or fine-tuned classifier), loaded strictly."""
    config = sized_config(DeepAVFusionConfig, _sizes(DeepAVFusionConfig), size, overrides, num_classes)
    return with_pretrained(DeepAVFusion(config), pretrained)


def build_mae(size: str = "base", pretrained: str | None = None, **overrides) -> DeepAVFusionMAE:
    """AV-MAE pre-training model at ``size``; ``pretrained``: upstream AV-MAE checkpoint to resume."""
    config = sized_config(DeepAVFusionMAEConfig, _sizes(DeepAVFusionMAEConfig), size, overrides)
    return with_pretrained(DeepAVFusionMAE(config), pretrained)


__all__ = [
    "DeepAVFusion",
    "DeepAVFusionConfig",
    "DeepAVFusionEncoder",
    "DeepAVFusionMAE",
    "DeepAVFusionMAEConfig",
    "block_rows",
    "build",
    "build_mae",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
]
