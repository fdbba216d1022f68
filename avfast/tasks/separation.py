"""Sound-source separation by mix-and-separate on DeepAVFusion's fused encoder (the paper's
"AVSrcSep"): the data format, a synthetic set, the head, the loss, the inverse STFT and
SDR / SIR / SAR.

Training (Sound of Pixels' recipe, as DeepAVFusion runs it): two solo clips of different
classes; their audio windows (the preset's 3 s at 16 kHz) are mixed as their mean. For
each clip k the encoder sees k's frame and the mixture's log-mel (1, 128, 192), and the
head predicts one logit per (mel, time) cell of the mixture: the mask of k's sound.

- Encoder: ``DeepAVFusion.audio_dense_features``: the audio tokens of 4 layers spread
  from the last to the first (each attended to the fusion tokens, so they carry the
  image), guided by the mean of the final image tokens; upstream reads 5 layers.
- Decoder: ``avfast.nn.GuidedDecoder`` on the audio token grid (8 x 12), 4 levels
  doubling to 64 x 96, then 2x to the 128 x 192 feature grid (upstream ``AVSrcSepUNet``:
  5 levels to x16 with its own double convs).
- Targets, as upstream: binary ``P_k > P_mix`` (P: mel power, 10 ** log-mel, of clip k's
  window and of the mixture), or the ratio ``P_k/2 / (P_1/2 + P_2/2)``, our choice for
  ratio masks (upstream's ratio divides by P_k + P_mix). Loss: BCE with logits weighted by
  ``clamp(log1p(P_mix), 1e-3, 10)`` (upstream's weighted_loss).
- Waveforms: the mel mask is carried to the STFT's linear bins through the mel
  filterbank (each bin takes the filter-weighted mean of the masks of the bands covering
  it; bins no band covers take the nearest band's), multiplied onto the mixture's complex
  STFT (the features' n_fft 800, hop 250, periodic Hann, centred) and inverted with
  ``torch.istft``. Binary masks are thresholded at 0.5, ratio masks used as they are.

Metrics: BSS Eval v4 SDR, SIR and SAR (512-tap distortion filters) from the
``fast_bss_eval`` package (its torch backend: its numpy backend fails under numpy 2), each
estimate scored against the clip's contribution to the mixture (half its window), the
two sources of a mixture together; the SDR improvement is the estimate's SDR minus the
mixture's (the mixture taken as the estimate of each source).

Format (``read_music``): MUSIC's ``MUSIC_solo_videos.json``, ``{"videos": {instrument:
[video id, ...]}}``, with the videos at ``<root>/<instrument>/<id>.<mp4|mkv|webm>``
(root: the json's folder by default); ``make_music`` writes a synthetic one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avfast.data.manifest import BadRow, Clip, Manifest, report_bad_row
from avfast.data.presets import Preset, get_preset
from avfast.data.sampling import sample_rng
from avfast.data.transforms import normalize_frames
from avfast.nn.decoders import DECODER_SIZES, GuidedDecoder

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
SOURCES = 2  # clips per mixture
WEIGHT_RANGE = (1e-3, 10.0)  # upstream's clamp of the loss weight log1p(P_mix)
BSS_FILTER = 512  # BSS Eval v4's distortion filter length (fast_bss_eval's default)


# ---------------------------------------------------------------------- format


def read_music(path, root=None, bad: list[BadRow] | None = None) -> Manifest:
    """The solo clips of a MUSIC-style json (``{"videos": {instrument: [id, ...]}}``) as a
    Manifest, one class per instrument (in the file's order). A video found under none of
    the suffixes raises naming the file and entry (its 1-based position over all ids), or
    goes to ``bad`` ('missing file') when it is a list; an id with a path separator is an
    'escapes root' row."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_music: expected a MUSIC json file, got no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            videos = json.load(f)["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"read_music: {path} must hold {{\"videos\": {{instrument: [id, ...]}}}}, "
                         f"got {type(err).__name__}: {err}") from err
    if not isinstance(videos, dict) or not all(isinstance(ids, list) for ids in videos.values()):
        raise ValueError(f"read_music: {path}: 'videos' must map each instrument to a list of ids, "
                         f"got {type(videos).__name__}")
    root = os.path.dirname(os.path.abspath(path)) if root is None else os.fspath(root)
    classes, clips, entry = list(videos), [], 0
    for k, (instrument, ids) in enumerate(videos.items()):
        for vid in ids:
            entry += 1
            names = (str(instrument), str(vid))
            if any("/" in n or os.sep in n or n in ("", ".", "..") for n in names):
                report_bad_row("read_music", bad, BadRow(path, entry, f"{instrument}/{vid}", "escapes root",
                                                         f"instrument and id must be plain names, got {names}"))
                continue
            found = [os.path.join(instrument, vid + s) for s in VIDEO_SUFFIXES
                     if os.path.isfile(os.path.join(root, instrument, vid + s))]
            if not found:
                report_bad_row("read_music", bad, BadRow(path, entry, os.path.join(root, instrument, vid),
                                                         "missing file", f"none of {VIDEO_SUFFIXES}"))
                continue
            clips.append(Clip(path=found[0], labels=(k,), origin=(path, entry)))
    return Manifest(clips, classes, root)


def make_music(root, instruments: int = 4, clips_per_instrument: int = 6, *, duration: float = 3.0,
               fps: int = 8, size: int = 32, seed: int = 0) -> str:
    """A synthetic MUSIC-style set under ``root``: ``MUSIC_solo_videos.json`` and per
    instrument k (``instrument_k``) solo clips ``<root>/instrument_k/solo_<j>.mkv`` whose
    picture is class k's colour and whose sound its tone (``avfast.data.synthetic``), so the
    sources of any two-clip mixture are known. Returns the json's path."""
    from avfast.data.synthetic import write_clip

    if isinstance(instruments, bool) or not isinstance(instruments, int) or instruments < SOURCES:
        raise ValueError(f"instruments: expected an integer >= {SOURCES}, got {instruments!r}")
    if isinstance(clips_per_instrument, bool) or not isinstance(clips_per_instrument, int) or clips_per_instrument < 1:
        raise ValueError(f"clips_per_instrument: expected an integer >= 1, got {clips_per_instrument!r}")
    videos = {}
    for k in range(instruments):
        name = f"instrument_{k}"
        videos[name] = [f"solo_{j:03d}" for j in range(clips_per_instrument)]
        for j, vid in enumerate(videos[name]):
            write_clip(Path(root) / name / f"{vid}.mkv", k, instruments, duration=duration, fps=fps, size=size,
                       seed=seed * 1_000_003 + k * clips_per_instrument + j)
    path = Path(root) / "MUSIC_solo_videos.json"
    path.write_text(json.dumps({"videos": videos}, indent=1))
    return os.fspath(path)


# ---------------------------------------------------------------------- data


class SeparationDataset(torch.utils.data.Dataset):
    """Two-clip mixtures of ``manifest``'s solo clips, decoded on the CPU (PyAV) with the
    DeepAVFusion preset's sampling: item i mixes clip i with a partner of another class,
    drawn from (seed, epoch, i) when training and from (seed, 0, i) when evaluating (fixed
    pairs). ``load(i)`` -> {"frames" (2, 3, S, S) normalised, "audio" the mixture's
    features (1, mels, frames), "source_mels" (2, mels, frames) log-mel of each clip's
    window, "sources" (2, L) each clip's contribution to the mixture (half its window),
    "mixture" (L,), "labels" (2,)}; a clip that cannot be decoded raises MediaError."""

    def __init__(self, manifest: Manifest, preset: str | Preset, *, train: bool, seed: int = 0):
        from avfast.data.cpu import ClipDataset

        labels = [c.labels[0] if c.labels else None for c in manifest.clips]
        if any(label is None for label in labels):
            raise ValueError("manifest: expected every solo clip to have a label (its instrument), got an "
                             f"unlabelled clip {manifest.clips[labels.index(None)].path!r}")
        if len(set(labels)) < SOURCES:
            raise ValueError(f"manifest: expected clips of >= {SOURCES} classes to mix, got {len(set(labels))}")
        self.preset = get_preset(preset)
        if self.preset.audio.frontend is None or not hasattr(self.preset.audio.frontend, "filterbank"):
            raise ValueError(f"preset: expected a log-mel preset (deepavfusion), got {self.preset.name!r}")
        self.clips = ClipDataset(manifest, self.preset, train=train, seed=seed, features=False)
        self.labels, self.train, self.seed, self.epoch = np.array(labels), train, seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.clips.set_epoch(epoch)

    def partner(self, index: int) -> int:
        others = np.flatnonzero(self.labels != self.labels[index])
        rng = sample_rng(self.seed + 1, self.epoch if self.train else 0, index)
        return int(others[rng.integers(len(others))])

    def load(self, index: int) -> dict:
        pair = (index, self.partner(index))
        frames, waves = [], []
        for i in pair:
            _, frame, windows = self.clips.load(i)
            frames.append(normalize_frames(frame, self.preset.video.mean, self.preset.video.std)[0])
            waves.append(windows[0])
        sources = torch.stack(waves) / SOURCES
        mixture = sources.sum(0)
        frontend = self.preset.audio.frontend
        return {"frames": torch.stack(frames), "audio": frontend(mixture[None])[0],
                "source_mels": frontend(torch.stack(waves))[:, 0], "sources": sources, "mixture": mixture,
                "labels": torch.tensor([int(self.labels[i]) for i in pair])}


def separation_loader(manifest: Manifest, preset: str | Preset, *, train: bool, seed: int = 0, **kwargs):
    """An ``avfast.data.cpu.IndexedLoader`` of ``SeparationDataset``; ``kwargs`` go to the loader."""
    from avfast.data.cpu import IndexedLoader

    return IndexedLoader(SeparationDataset(manifest, preset, train=train, seed=seed), train=train, seed=seed,
                         **kwargs)


# ---------------------------------------------------------------------- masks and waveforms


def mask_targets(source_mels: Tensor, mix_mel: Tensor, binary: bool = True) -> Tensor:
    """Targets of each source's mask: source_mels (B, 2, M, F), mix_mel (B, M, F) log10 mel
    power -> (B, 2, M, F): binary P_k > P_mix (upstream), or the ratio of k's contribution."""
    power, mix = 10.0 ** source_mels.double(), 10.0 ** mix_mel.double()[:, None]
    if binary:
        return (power > mix).to(source_mels.dtype)
    half = power / SOURCES ** 2  # the contribution s_k / 2 has a quarter of the power
    return (half / half.sum(1, keepdim=True).clamp_min(1e-30)).to(source_mels.dtype)


def mask_weights(mix_mel: Tensor) -> Tensor:
    """Upstream's loss weight clamp(log1p(P_mix), 1e-3, 10): (B, M, F) -> (B, 1, M, F)."""
    return torch.log1p(10.0 ** mix_mel.float()).clamp(*WEIGHT_RANGE)[:, None]


def linear_mask(mask: Tensor, filterbank: Tensor, frames: int) -> Tensor:
    """A mel mask (B, M, F) on the STFT's linear bins: (B, n_freq, frames); each bin the
    filterbank-weighted mean over the bands covering it (uncovered bins: the nearest band),
    the time axis padded by repeating the last frame (features drop the last STFT frame)."""
    bank = filterbank.to(mask.device, mask.dtype)  # (M, n_freq)
    cover = bank.sum(0)
    nearest = torch.nn.functional.one_hot(bank.argmax(0), bank.shape[0]).T.to(mask.dtype)  # (M, n_freq)
    bank = torch.where(cover > 0, bank / cover.clamp_min(1e-12), nearest)
    lin = torch.einsum("mf,bmt->bft", bank, mask)
    if lin.shape[-1] < frames:
        lin = torch.cat([lin, lin[..., -1:].expand(*lin.shape[:-1], frames - lin.shape[-1])], dim=-1)
    return lin[..., :frames]


def separate(mask: Tensor, mixture: Tensor, frontend) -> Tensor:
    """Waveforms of masked mixtures: mask (B, M, F) in [0, 1] on the feature grid, mixture
    (B, L) -> (B, L), through the mixture's STFT with the features' window and hop."""
    window = torch.hann_window(frontend.n_fft, periodic=True, dtype=mixture.dtype, device=mixture.device)
    spec = torch.stft(mixture, frontend.n_fft, frontend.hop_length, window=window, center=True,
                      pad_mode=frontend.pad_mode, return_complex=True)
    masked = spec * linear_mask(mask.to(mixture.dtype), frontend.filterbank(), spec.shape[-1])
    return torch.istft(masked, frontend.n_fft, frontend.hop_length, window=window, center=True,
                       length=mixture.shape[-1])


def bss_eval(estimates: Tensor, references: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(SDR, SIR, SAR) in dB of each estimate (S, L) against references (S, L), estimate s
    for reference s (no permutation search), from fast_bss_eval (BSS Eval v4, 512 taps)."""
    try:
        import fast_bss_eval
    except ImportError as err:
        raise ImportError("bss_eval: the separation metrics need the fast_bss_eval package "
                          "(pip install fast_bss_eval)") from err
    if estimates.shape != references.shape or estimates.dim() != 2:
        raise ValueError(f"estimates: expected the (S, L) shape of references {tuple(references.shape)}, "
                         f"got {tuple(estimates.shape)}")
    # one intra-op thread: its batched LU solves otherwise nest MKL's OpenMP inside torch's
    # parallel_for, which spun for minutes in a long-lived process (the test suite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sdr, sir, sar = fast_bss_eval.bss_eval_sources(references.double().cpu(), estimates.double().cpu(),
                                                       filter_length=BSS_FILTER, compute_permutation=False)
    finally:
        torch.set_num_threads(threads)
    return sdr, sir, sar


class SeparationMetrics:
    """SDR, SIR, SAR and the mixture's SDR summed over sources: ``update(estimates,
    references, mixture)`` per mixture ((S, L), (S, L), (L,)), ``compute()`` -> means and
    ``sdri`` (SDR improvement over the mixture). ``to_tensor`` / ``from_tensor`` add up
    parts (batches, ranks)."""

    def __init__(self):
        self.sums = torch.zeros(5, dtype=torch.float64)  # sdr, sir, sar, sdr of the mixture, sources

    def update(self, estimates: Tensor, references: Tensor, mixture: Tensor) -> None:
        sdr, sir, sar = bss_eval(estimates, references)
        sdr_mix, _, _ = bss_eval(mixture[None].expand_as(references), references)
        self.sums += torch.stack([sdr.sum(), sir.sum(), sar.sum(), sdr_mix.sum(),
                                  torch.tensor(float(len(sdr)), dtype=torch.float64)])

    def to_tensor(self) -> Tensor:
        return self.sums.clone()

    @classmethod
    def from_tensor(cls, sums: Tensor) -> SeparationMetrics:
        metrics = cls()
        metrics.sums = sums.double().cpu().clone()
        return metrics

    def compute(self) -> dict[str, float]:
        n = float(self.sums[4])
        if not n:
            raise ValueError("SeparationMetrics.compute: expected at least one update, got none")
        sdr, sir, sar, mix = (float(v) / n for v in self.sums[:4])
        return {"sdr": sdr, "sir": sir, "sar": sar, "sdr_mixture": mix, "sdri": sdr - mix, "sources": int(n)}


# ---------------------------------------------------------------------- model


class SeparationModel(nn.Module):
    """DeepAVFusion with the separation head.

    forward(frames (B, 2, 3, S, S), audio (B, 1, mels, frames) the mixture's log-mel) ->
    {"logits": (B, 2, mels, frames)}: for each source, the mask logits from the encoder run
    on its frame and the mixture. ``loss``: weighted BCE against ``mask_targets``
    (``binary``). ``masks(out)``: the masks applied to the mixture (binary: > 0.5).
    """

    def __init__(self, backbone: nn.Module, binary: bool = True, **decoder_kwargs):
        super().__init__()
        if not hasattr(backbone, "audio_dense_features"):
            raise ValueError(f"backbone: expected DeepAVFusion (the method the papers evaluate on separation), "
                             f"got {type(backbone).__name__}")
        self.backbone, self.binary = backbone, bool(binary)
        self.preset, self.config = backbone.preset, backbone.config
        for name in backbone.audio_dense_unused:
            for p in backbone.get_submodule(name).parameters():
                p.requires_grad_(False)
        levels, guide_dim = backbone.audio_dense_shapes()
        self.decoder = GuidedDecoder(levels, guide_dim, tuple(backbone.config.audio_size), **decoder_kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[1] != SOURCES:
            got = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"frames: expected (B, {SOURCES}, 3, S, S), one frame per source, got {got}")
        B = frames.shape[0]
        mix = audio[:, None].expand(B, SOURCES, *audio.shape[1:]).flatten(0, 1)
        maps, guide = self.backbone.audio_dense_features(frames.flatten(0, 1)[:, None], mix)
        return {"logits": self.decoder(maps, guide).unflatten(0, (B, SOURCES))}

    def loss(self, out: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, float]]:
        logits = out["logits"].float()
        target = mask_targets(batch["source_mels"].float(), batch["audio"][:, 0].float(), self.binary)
        weight = mask_weights(batch["audio"][:, 0]).expand_as(logits)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, weight)
        return loss, {"loss": loss.item()}

    def masks(self, out: dict[str, Tensor]) -> Tensor:
        prob = torch.sigmoid(out["logits"].detach().float())
        return (prob > 0.5).float() if self.binary else prob


def build_separation_model(method: str = "deepavfusion", size: str = "base", pretrained: str | None = None,
                           decoder: dict | None = None, binary: bool = True, **overrides) -> SeparationModel:
    """A ``SeparationModel`` on DeepAVFusion at ``size`` (``overrides``, a local upstream
    checkpoint ``pretrained``), its decoder ``DECODER_SIZES[size]`` updated by ``decoder``."""
    from avfast.models import build_model

    if method != "deepavfusion":
        raise ValueError(f"method: expected 'deepavfusion' (the method the papers evaluate on separation), "
                         f"got {method!r}")
    backbone = build_model(method, size, num_classes=2, pretrained=pretrained, **overrides)
    return SeparationModel(backbone, binary, **{**DECODER_SIZES.get(size, {}), **(decoder or {})})
