"""Helpers shared by the upstream formulations: parameter sharing and argument checks."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def share_parameters(target: nn.Module, params: Mapping[str, nn.Parameter], owner: str) -> nn.Module:
    """Make every parameter of ``target`` (typically built on the meta device) the very
    ``nn.Parameter`` object ``params[name]`` (no copy: gradients, optimizer state and
    ``requires_grad`` are the source model's). ``params`` must name exactly target's parameters;
    shapes may differ only where target's forward reshapes (upstream's squeezed embeddings)."""
    names = {n for n, _ in target.named_parameters(remove_duplicate=False)}
    if names != set(params):
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise ValueError(f"{owner}: the model's parameters do not fill the upstream layout "
                         f"(missing {missing[:6]}, unexpected {extra[:6]})")
    for name, param in params.items():
        path, _, attr = name.rpartition(".")
        module = target.get_submodule(path) if path else target
        if not isinstance(param, nn.Parameter):
            raise TypeError(f"{owner}: {name!r} must be an nn.Parameter of the model, got {type(param).__name__}")
        setattr(module, attr, param)
    return target


def require_quirks(owner: str, config) -> None:
    """Upstream's formulation is the released code: it agrees with our model only when the
    model reproduces the code's quirks."""
    if not getattr(config, "upstream_quirks", True):
        raise ValueError(f"{owner}: the model must be built with upstream_quirks=True (the released "
                         f"code's formulation), got upstream_quirks=False")
