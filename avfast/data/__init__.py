"""avfast.data: manifests, synthetic clips, ``prepare``, front-end presets and two loaders.

    Manifest, read_folder, read_vggsound, read_ave, read_audioset   sources -> a clip table
    prepare(src, dst)          FLAC audio (+ short-GOP video), a manifest with metadata
    PRESETS / get_preset       each method's frames, audio windows and front-end
    CPULoader / ClipDataset    PyAV + torch in DataLoader workers
    DALILoader                 DALI decoding on the GPU

Names load on first use, so ``import avfast.data.sampling`` does not import PyAV or DALI.
"""

import importlib

_EXPORTS = {
    "ClipDataset": "cpu", "CPULoader": "cpu", "collate": "cpu",
    "DALILoader": "dali",
    "BadRow": "manifest", "Clip": "manifest", "Manifest": "manifest", "align_classes": "manifest",
    "check_clips": "manifest", "read_audioset": "manifest", "read_ave": "manifest",
    "read_folder": "manifest", "read_manifest": "manifest", "read_vggsound": "manifest",
    "prepare": "prepare",
    "PRESETS": "presets", "AudioSpec": "presets", "Preset": "presets", "VideoSpec": "presets",
    "get_preset": "presets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"avfast.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'avfast.data' has no attribute {name!r}")
