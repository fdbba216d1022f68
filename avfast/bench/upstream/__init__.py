"""Upstream's formulations of the methods, as modules sharing our models' parameters.

Each ``Upstream<X>(model)`` wraps one ``avfast.models`` instance without copying a parameter
and keeps its call contract: ``forward(frames, audio) -> dict`` (the keys ``model.loss``
needs), ``loss(out, batch) -> (loss, metrics)`` computed upstream's way, ``predict(out)``,
``trainable_parameters()``. The computation is the released code's (eager, unfused, with
its layouts and materialised intermediates), restated from shared/UPSTREAM.md; it is the
baseline of ``avfast.bench.train_step`` and the oracle of the models' float64 tests.

    mavt          UpstreamMAVT(MAVT)
    stgcma        UpstreamSTGCMA(STGCMA), UpstreamSTGCMANet (upstream-named, own parameters)
    deepavfusion  UpstreamDeepAVFusion(DeepAVFusion), UpstreamDeepAVFusionMAE(DeepAVFusionMAE)
    dgsct         UpstreamDGSCT(DGSCT)
"""

import importlib

_CLASSES = {
    "UpstreamMAVT": "mavt",
    "UpstreamSTGCMA": "stgcma",
    "UpstreamSTGCMANet": "stgcma",
    "UpstreamDeepAVFusion": "deepavfusion",
    "UpstreamDeepAVFusionMAE": "deepavfusion",
    "UpstreamDGSCT": "dgsct",
}


def __getattr__(name: str):
    if name in _CLASSES:  # imported on first use: each module pulls in its model and timm
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_CLASSES)
