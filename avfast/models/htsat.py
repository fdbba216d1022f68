"""HTS-AT (Chen et al., ICASSP'22), the audio encoder of DG-SCT, assembled from timm Swin parts.

    wave (B, L) 32 kHz -> |STFT|^2 (n_fft 1024, hop 320, periodic Hann, reflect-centred)
      -> mel (Slaney scale and area norm, 64 bins, 50-14000 Hz) -> 10 log10(max(., 1e-10))
      -> bn0 (BatchNorm over the mel bins) -> [SpecAugment, training only]
      -> reshape_wav2img: the (T, M) log-mel, time stretched (bicubic, align_corners) to
         R*S frames, folded into an S x S image whose row block r holds frames [r*S, (r+1)*S)
      -> patch 4 (+LayerNorm) -> Swin stages (pre-norm v1 blocks; window 8; patch merging at
         the END of every stage but the last) -> norm.

Dims: B clips, L samples, T STFT frames = L // hop + 1, M mel bins, S = spec_size (256),
R = freq_ratio = S // M (4), H x W tokens per stage (64^2, 32^2, 16^2, 8^2), C width
(96, 192, 384, 768). Tokens are channel-last (B, H, W, C) as in timm.

Key names follow the upstream module (``sed_model.*`` in HTS-AT's Lightning checkpoints, the
first 10 characters that DG-SCT strips): ``bn0``, ``patch_embed.{proj,norm}``,
``layers.i.blocks.j.{norm1,attn.{qkv,proj,relative_position_bias_table},norm2,mlp.fc1,mlp.fc2}``,
``layers.i.downsample.{norm,reduction}``, ``norm``, and ``logmel_extractor.melW`` -> ``melW``.
Dropped when loading (recomputed or unused by DG-SCT): the torchlibrosa STFT kernels
``spectrogram_extractor.stft.conv_{real,imag}.weight`` (torch.stft computes the same DFT),
the buffers ``relative_position_index`` and ``attn_mask``, and the AudioSet head
``tscam_conv.*``/``head.*``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor, nn

from avfast.models.base import strip_prefixes

_DROPPED = re.compile(r"spectrogram_extractor\..*|tscam_conv\..*|head\..*|.*\.relative_position_index|.*\.attn_mask")
_RENAMED = {"logmel_extractor.melW": "melW"}


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> Tensor:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) (Slaney mel scale, Slaney area
    normalisation), transposed as torchlibrosa stores it: (n_fft // 2 + 1, n_mels), float64."""
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def to_mel(hz: float) -> float:
        return min_log_mel + math.log(hz / min_log_hz) / logstep if hz >= min_log_hz else hz / f_sp

    def to_hz(mel: Tensor) -> Tensor:
        return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    cpu = dict(dtype=torch.float64, device="cpu")  # a table, built on the CPU whatever the default device
    fft_hz = torch.arange(n_fft // 2 + 1, **cpu) * (sample_rate / n_fft)
    hz = to_hz(torch.linspace(to_mel(float(fmin)), to_mel(float(fmax)), n_mels + 2, **cpu))  # (M + 2,)
    width = hz[1:] - hz[:-1]
    ramps = hz[:, None] - fft_hz[None, :]  # (M + 2, n_freq)
    rise, fall = -ramps[:-2] / width[:-1, None], ramps[2:] / width[1:, None]
    weights = torch.clamp(torch.minimum(rise, fall), min=0.0) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.T.contiguous()


def _drop_stripes(x: Tensor, dim: int, width: int, stripes: int) -> Tensor:
    """torchlibrosa's DropStripes: per sample, ``stripes`` times, zero ``d ~ U{0..width-1}``
    consecutive rows of ``dim`` starting at ``s ~ U{0..size-d-1}``. x: (B, 1, T, M)."""
    B, size = x.shape[0], x.shape[dim]
    length = torch.randint(0, width, (B, stripes), device=x.device)
    start = (torch.rand(B, stripes, device=x.device) * (size - length)).long()
    pos = torch.arange(size, device=x.device)
    hit = ((pos >= start[..., None]) & (pos < (start + length)[..., None])).any(1)  # (B, size)
    shape = [B, 1, 1, 1]
    shape[dim] = size
    return x.masked_fill(hit.view(shape), 0.0)


class HTSATStage(nn.Module):
    """One HTS-AT stage: timm Swin v1 blocks (shift window//2 on odd blocks), then patch
    merging (``downsample``, None in the last stage). forward: (B, H, W, C) -> (B, H', W', C')."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, drop_path: Sequence[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, (resolution, resolution), num_heads=num_heads, window_size=window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 drop_path=drop_path[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class HTSAT(nn.Module):
    """HTS-AT encoder (AudioSet config by default). See the module docstring for the pipeline.

    Args:
        sample_rate, n_fft, hop_length: the STFT (window = n_fft, periodic Hann).
        n_mels, fmin, fmax: the Slaney mel filterbank.
        spec_size: S, the side of the spectrogram image; freq_ratio = S // n_mels.
        patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio: the Swin stages.
        drop_path_rate: stochastic depth, linear from 0 over all blocks (acts in train mode only).
        spec_augment: (time width, time stripes, freq width, freq stripes) of the SpecAugment
            applied in train mode (upstream (64, 2, 8, 2)); None disables it.

    Buffers: ``melW`` (n_fft // 2 + 1, n_mels), persistent so that a checkpoint's filterbank
    is used as is; ``window`` (n_fft,) Hann.
    """

    def __init__(self, sample_rate: int = 32000, n_fft: int = 1024, hop_length: int = 320, n_mels: int = 64,
                 fmin: float = 50.0, fmax: float = 14000.0, spec_size: int = 256, patch_size: int = 4,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_size: int = 8, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 spec_augment: tuple[int, int, int, int] | None = (64, 2, 8, 2)):
        super().__init__()
        if n_mels < 1 or spec_size % n_mels:
            raise ValueError(f"HTSAT: spec_size must be a multiple of n_mels, got spec_size={spec_size}, "
                             f"n_mels={n_mels}")
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"HTSAT: depths and num_heads must be non-empty and of equal length, got "
                             f"{tuple(depths)} and {tuple(num_heads)}")
        grid = spec_size // patch_size
        if spec_size % patch_size or grid % 2 ** (len(depths) - 1):
            raise ValueError(f"HTSAT: spec_size / patch_size must be an integer divisible by 2^(stages - 1) = "
                             f"{2 ** (len(depths) - 1)}, got spec_size={spec_size}, patch_size={patch_size}")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.spec_size, self.freq_ratio = spec_size, spec_size // n_mels
        self.spec_augment = spec_augment
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer("melW", slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).float())
        self.bn0 = nn.BatchNorm2d(n_mels)
        self.patch_embed = PatchEmbed(spec_size, patch_size, in_chans=1, embed_dim=embed_dim,
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC")
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:i])
            self.layers.append(HTSATStage(embed_dim * 2 ** i, grid // 2 ** i, depth, heads, window_size, mlp_ratio,
                                          rates[first:first + depth], downsample=i < len(depths) - 1))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    @property
    def max_frames(self) -> int:
        """The most STFT frames the image holds: spec_size * freq_ratio."""
        return self.spec_size * self.freq_ratio

    def num_frames(self, num_samples: int) -> int:
        """STFT frames of a centred transform of ``num_samples`` samples."""
        return num_samples // self.hop_length + 1

    def log_mel(self, wave: Tensor) -> Tensor:
        """wave (B, L) float -> 10 log10 mel power (B, 1, T, M), T = L // hop + 1."""
        if not isinstance(wave, Tensor) or wave.dim() != 2 or not wave.is_floating_point():
            raise ValueError(f"HTSAT: wave must be a float (B, L) tensor, got "
                             f"{tuple(wave.shape) if isinstance(wave, Tensor) else type(wave).__name__}")
        wave = wave if wave.dtype in (torch.float32, torch.float64) else wave.float()  # the FFT needs fp32/64
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self.window.to(wave.dtype), center=True,
                          pad_mode="reflect", return_complex=True)  # (B, n_freq, T)
        power = spec.real.square() + spec.imag.square()
        mel = power.transpose(1, 2) @ self.melW.to(wave.dtype)  # (B, T, M)
        return (10.0 * torch.log10(mel.clamp(min=1e-10))).unsqueeze(1)

    def wav2img(self, x: Tensor) -> Tensor:
        """Upstream ``reshape_wav2img``: (B, 1, T, M) with T <= R*S, M = S/R -> (B, 1, S, S)."""
        B, _, T, M = x.shape
        if T > self.max_frames or M != self.n_mels:
            raise ValueError(f"HTSAT: the log-mel must be (B, 1, T <= {self.max_frames}, {self.n_mels}), "
                             f"got {tuple(x.shape)}")
        if T < self.max_frames:
            x = F.interpolate(x, (self.max_frames, M), mode="bicubic", align_corners=True)
        x = x.transpose(2, 3).reshape(B, 1, M, self.freq_ratio, self.spec_size)  # (B, 1, M, R, S) time split
        return x.transpose(2, 3).reshape(B, 1, self.spec_size, self.spec_size)

    def front_end(self, wave: Tensor) -> Tensor:
        """wave (B, L) -> the spectrogram image (B, 1, S, S): log-mel, bn0, SpecAugment (train
        mode), wav2img."""
        x = self.log_mel(wave).to(self.bn0.weight.dtype)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel bins
        if self.training and self.spec_augment is not None:
            t_width, t_stripes, f_width, f_stripes = self.spec_augment
            x = _drop_stripes(_drop_stripes(x, 2, t_width, t_stripes), 3, f_width, f_stripes)
        return self.wav2img(x)

    def forward_features(self, wave: Tensor) -> Tensor:
        """wave (B, L) -> final tokens (B, H, W, C) after ``norm``."""
        x = self.patch_embed(self.front_end(wave))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, wave: Tensor) -> Tensor:
        """wave (B, L) -> final tokens (B, H, W, C)."""
        return self.forward_features(wave)

    # ------------------------------------------------------------------ upstream weights

    @staticmethod
    def is_dropped_upstream_key(key: str) -> bool:
        """True for upstream HTS-AT keys that have no place here (see the module docstring)."""
        return _DROPPED.fullmatch(key) is not None

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream HTS-AT key (wrapper prefix removed) -> ours, for the keys we keep."""
        ours = self.state_dict().keys()
        return {k: n for k in keys if (n := _RENAMED.get(k, k)) in ours and not self.is_dropped_upstream_key(k)}

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an HTS-AT checkpoint's state dict (``sed_model.`` prefix removed by the caller or
        here): dropped keys are skipped, any other unknown key raises when strict."""
        state = {k: v for k, v in strip_prefixes(state_dict).items() if not self.is_dropped_upstream_key(k)}
        mapping = self.upstream_key_map(state)
        unknown = sorted(set(state) - set(mapping))
        if strict and unknown:
            raise KeyError(f"HTSAT: upstream keys without a place in HTSAT: {unknown[:8]}"
                           f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)} keys)")
        return self.load_state_dict({mapping[k]: v for k, v in state.items() if k in mapping}, strict=strict)


__all__ = ["HTSAT", "HTSATStage", "slaney_mel_filterbank"]
