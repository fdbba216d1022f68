"""What the four method classes share: the training interface, freezing, upstream loading.

A method model takes the loaders' batch tensors and returns a dict of outputs:

    out = model(frames, audio)          # frames (B, T, 3, S, S) float, audio: the preset's features
    loss, metrics = model.loss(out, batch)   # batch: the loader's dict (label, segment_labels, background)
    logits = model.predict(out)         # (B, C), or (B, T, C) for per-second methods

The methods evaluated on dense tasks (STG-CMA, DG-SCT, DeepAVFusion) also give
``dense_features(frames, audio) -> (maps, audio)``: visual maps (N, C_i, h_i, w_i), N = B*T,
in the order a top-down decoder reads them (the first is its top), and one audio vector
(N, Da) per frame; ``dense_shapes()`` says their (C_i, (h_i, w_i)) and Da without running.

``preset`` names the ``avfast.data`` preset whose samples the model reads.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

UPSTREAM_WRAPPER_PREFIXES = ("module.", "model.", "sed_model.", "encoder.")


class AVModel(nn.Module, abc.ABC):
    """Base class: subclasses set ``preset`` and implement forward and loss (predict and
    ``upstream_key_map`` have defaults: the ``logits`` output; upstream names equal ours)."""

    preset: str = ""

    @abc.abstractmethod
    def loss(self, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The method's training loss of ``out`` on ``batch`` and its metrics (floats)."""

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def upstream_key_map(self, keys: Iterable[str]) -> dict[str, str]:
        """Upstream checkpoint key -> our state_dict key, for every key of ``keys`` that we
        keep (keys of upstream-only parts, e.g. unused parameters, are left out). By default
        upstream's names are ours: every key we have maps to itself."""
        ours = set(self.state_dict())
        return {k: k for k in keys if k in ours}

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an upstream checkpoint's state dict (wrapper prefixes such as ``module.``
        removed) through ``upstream_key_map``; strict: every key of ours is filled and
        every upstream key is used or known to be dropped."""
        state = strip_prefixes(state_dict)
        mapping = self.upstream_key_map(state.keys())
        ours = {mapping[k]: v for k, v in state.items() if k in mapping}
        if strict:
            unused = sorted(set(state) - set(mapping))
            if unused:
                raise KeyError(f"state_dict: upstream keys without a place in {type(self).__name__}: "
                               f"{unused[:8]}{' ...' if len(unused) > 8 else ''} ({len(unused)} keys)")
        return self.load_state_dict(ours, strict=strict)


def strip_prefixes(state_dict: Mapping[str, Tensor], prefixes=UPSTREAM_WRAPPER_PREFIXES) -> dict[str, Tensor]:
    """Drop a wrapper prefix shared by every key (DDP's ``module.``, Lightning's ...)."""
    state = dict(state_dict)
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict inside an upstream checkpoint file (its ``state_dict``/``model``
    entry, or the file itself), loaded on the CPU without running pickled code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: expected a local checkpoint file, got {os.fspath(path)!r} "
                                "(nothing is downloaded; fetch the file first)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def check_frames(owner: str, frames, num_frames: int, img_size: int) -> None:
    """Raise unless ``frames`` is a float (B, num_frames, 3, img_size, img_size) tensor, B > 0."""
    if not isinstance(frames, Tensor) or not frames.is_floating_point():
        got = frames.dtype if isinstance(frames, Tensor) else type(frames).__name__
        raise TypeError(f"{owner}: frames must be a float Tensor (B, T, 3, S, S), got {got}")
    want = (num_frames, 3, img_size, img_size)
    if frames.dim() != 5 or tuple(frames.shape[1:]) != want or frames.shape[0] == 0:
        raise ValueError(f"{owner}: frames must be (B, T, 3, S, S) = (B, {', '.join(map(str, want))}), "
                         f"got {tuple(frames.shape)}")


def sized_config(config_cls: type, sizes: Mapping[str, Callable[[], Any]], size: str,
                 overrides: Mapping[str, Any], num_classes: int | None = None):
    """``sizes[size]()`` with ``overrides`` (and ``num_classes``) replacing its fields; a
    size or field that does not exist raises naming the choices."""
    if size not in sizes:
        raise ValueError(f"size: expected one of {sorted(sizes)}, got {size!r}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: expected fields of {config_cls.__name__} ({sorted(fields)}), got {unknown}")
    if num_classes is not None:
        overrides = {**overrides, "num_classes": num_classes}
    return dataclasses.replace(sizes[size](), **overrides)


def with_pretrained(model: AVModel, pretrained: str | os.PathLike | None) -> AVModel:
    """``model`` with a local upstream checkpoint loaded strictly (unchanged for None)."""
    if pretrained is not None:
        model.load_upstream_state_dict(read_checkpoint(pretrained))
    return model


def spread_layers(depth: int, levels: int) -> list[int]:
    """``levels`` layer indices spread evenly over ``depth`` layers, first and last included
    (rounded down, as DeepAVFusion's ``np.linspace(...).astype(int)``): 12, 4 -> [0, 3, 7, 11]."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels: expected an integer >= 1, got {levels!r}")
    return [i * (depth - 1) // max(levels - 1, 1) for i in range(levels)]


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``module`` (frozen backbones)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
