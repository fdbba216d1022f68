"""Tiny random text towers written to local files as ``--text-weights`` expects them: an
open_clip model of a registered tiny config (its state dict in a file) and a transformers
ClapModel folder with a byte-level BPE tokenizer of no merges. Nothing downloads."""

import json
import os
from pathlib import Path

import torch

TINY_CLIP = "avfast-tiny-clip"
TINY_CLIP_CONFIG = {"embed_dim": 16,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def register_tiny_clip(folder) -> str:
    """Register the tiny open_clip config (written under ``folder``); its model name."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_CLIP


def tiny_clip_weights(folder, seed: int = 0) -> str:
    """A random tiny open_clip model's state dict file; ``clip:<name>=<file>`` loads it."""
    import open_clip

    name = register_tiny_clip(Path(folder) / "configs")
    torch.manual_seed(seed)
    path = os.path.join(folder, "tiny_clip.pt")
    torch.save(open_clip.create_model(name).state_dict(), path)
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable symbols of byte-level BPE, one per byte value."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def tiny_clap_weights(folder, seed: int = 0) -> str:
    """A random tiny ClapModel (and tokenizer) saved by save_pretrained; ``clap=<folder>`` loads it."""
    from transformers import ClapConfig, ClapModel, RobertaTokenizer

    folder = Path(folder) / "tiny_clap"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=8),
        audio_config=dict(depths=[1, 1], num_attention_heads=[1, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          spec_size=64, num_mel_bins=16, window_size=4, patch_stride=(4, 4), projection_dim=8),
        projection_dim=8)
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
