"""The four methods as model classes on timm backbones and avfast modules.

    build_model("mavt" | "stgcma" | "dgsct" | "deepavfusion", size="tiny" | "base" | ..., ...)
"""

import importlib

METHODS = {
    "mavt": "avfast.models.mavt",
    "stgcma": "avfast.models.stgcma",
    "dgsct": "avfast.models.dgsct",
    "deepavfusion": "avfast.models.deepavfusion",
}


def build_model(method: str, size: str = "base", num_classes: int | None = None,
                pretrained: str | None = None, **overrides):
    """The ``method`` model at ``size`` (its config's upstream defaults plus ``overrides``)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
    module = importlib.import_module(METHODS[method])
    return module.build(size, num_classes=num_classes, pretrained=pretrained, **overrides)
