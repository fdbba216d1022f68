"""Load an upstream checkpoint file into an avfast model with ``build(..., pretrained=PATH)``.

The file is read on the CPU without running pickled code (its ``state_dict`` / ``model``
entry or the file itself), wrapper prefixes such as DDP's ``module.`` are removed, upstream
names are mapped to avfast's (``upstream_key_map``) and the load is strict: every avfast
tensor is filled, and every upstream tensor is used or known to be unused. Then one forward
pass runs on random inputs of the model's shapes.

Real checkpoints must be fetched by hand (nothing is downloaded). Pass the method, the size
and the config fields that the checkpoint was trained with:

    python examples/load_upstream_checkpoint.py --method deepavfusion --size base --checkpoint checkpoint_latest.pth
    python examples/load_upstream_checkpoint.py --method stgcma --size base --checkpoint ave.pth \
        --set upstream_heads=8 --set adapter_ratio=0.0625

(An AV-MAE pre-training checkpoint fills DeepAVFusion's encoder and leaves its heads at
their init; a shape or key that does not fit the chosen config fails the strict load.)

``--make-fake`` first writes a fake upstream checkpoint (upstream's key names and shapes,
``module.`` prefix, random values, at ``--size``, tiny by default) to a temporary file and
loads that:

    python examples/load_upstream_checkpoint.py --make-fake --method mavt
"""

import argparse
import ast
import os
import re
import tempfile

import torch

from avfast.models import build_model
from avfast.models.base import read_checkpoint, strip_prefixes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--method", default="deepavfusion", choices=["deepavfusion", "mavt", "stgcma"])
parser.add_argument("--size", default="tiny", help="tiny, base, large (stgcma), ...")
parser.add_argument("--checkpoint", help="an upstream checkpoint file")
parser.add_argument("--make-fake", action="store_true", help="write a fake upstream checkpoint and load it")
parser.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config field, e.g. upstream_heads=8 or fusion_arch='dense' (repeatable)")
parser.add_argument("--batch", type=int, default=2)
args = parser.parse_args()
if (args.checkpoint is None) == (not args.make_fake):
    parser.error("pass either --checkpoint PATH or --make-fake")
overrides = {}
for item in args.set:
    field, _, value = item.partition("=")
    try:
        overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        overrides[field] = value  # a bare string: fusion_arch=dense


# ---------------------------------------------------------------------- the fake checkpoint

def upstream_name(method: str, key: str) -> str:
    """The upstream checkpoint's name of avfast's state_dict ``key`` (the inverse of the
    model's ``upstream_key_map``)."""
    if method == "deepavfusion":  # AVClassifier: encoder.{image,audio,fusion_*}.*, *_head.*
        return key
    if method == "mavt":  # MA_AVT: the frozen ViT under ViT.v., the projections at top level
        return re.sub(r"^vit\.", "ViT.v.", re.sub(r"^contrastive\.", "", key))
    if method == "stgcma":  # MM_CLIP_AVE: OpenAI CLIP's visual-tower names
        stem = {"backbone.patch_embed.proj.weight": "conv1.weight", "backbone.cls_token": "class_embedding",
                "backbone.pos_embed": "positional_embedding", "patch_embed_audio.weight": "conv1_audio.weight",
                "pos_embed_audio": "positional_embedding_audio"}
        block = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                 "attn.proj.": "attn.out_proj.", "norm1.": "ln_1.", "norm2.": "ln_2.",
                 "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
        if key in stem:
            return stem[key]
        key = re.sub(r"^backbone\.norm_pre\.", "ln_pre.", re.sub(r"^backbone\.norm\.", "ln_post.", key))
        if m := re.match(r"(?:backbone\.blocks|adapters)\.(\d+)\.(.+)", key):
            i, rest = m.groups()
            for ours, theirs in block.items():
                rest = theirs + rest[len(ours):] if rest.startswith(ours) else rest
            return f"transformer.resblocks.{i}.{rest}"
        return key  # temporal_embedding(_audio), mlp_head.*
    raise ValueError(f"upstream_name: no upstream naming written for {method!r}")


def make_fake_checkpoint(path: str) -> None:
    """An upstream-shaped checkpoint for ``args.method`` at ``args.size``: upstream's names,
    its shapes, DataParallel's ``module.`` prefix, random values (zero-initialised adapters
    and gates made non-zero), plus entries that upstream saves but never uses."""
    torch.manual_seed(123)
    donor = build_model(args.method, args.size, num_classes=args.num_classes, **overrides)
    state = {}
    for key, value in donor.state_dict().items():
        name = upstream_name(args.method, key)
        value = value + 0.02 * torch.randn_like(value) if value.is_floating_point() else value
        if name in ("class_embedding", "positional_embedding", "positional_embedding_audio"):
            value = value.reshape(-1, value.shape[-1]).squeeze(0)  # CLIP stores (D,) and (L, D)
        state["module." + name] = value
    if args.method == "mavt":  # created upstream, unused: per-block logit scales, the ViT's own head
        D = donor.config.embed_dim
        state |= {f"module.logit_scale.{i}": torch.ones(()) for i in range(donor.config.depth)}
        C = 21843  # the in21k ViT's classifier
        state |= {"module.ViT.v.head.weight": 0.02 * torch.randn(C, D), "module.ViT.v.head.bias": torch.zeros(C)}
    torch.save({"epoch": 9, "state_dict": state}, path)
    print(f"wrote a fake upstream {args.method} checkpoint ({len(state)} tensors) to {path}")


# ---------------------------------------------------------------------- load, check, run

def example_inputs(model, batch: int):
    """Random (frames, audio) shaped as the model's forward expects."""
    cfg = model.config
    if args.method == "deepavfusion":
        return torch.randn(batch, 1, 3, cfg.img_size, cfg.img_size), torch.randn(batch, 1, *cfg.audio_size)
    if args.method == "mavt":
        S = cfg.img_size
        return torch.randn(batch, 1, 3, S, S), torch.randn(batch, 1, S, S)
    if args.method == "stgcma":
        T, S = cfg.num_frames, cfg.img_size
        return torch.randn(batch, T, 3, S, S), torch.randn(batch, T, cfg.audio_frames, cfg.num_mel_bins)
    raise ValueError(f"example_inputs: no input shapes written for {args.method!r}")


with tempfile.TemporaryDirectory() as tmp:
    path = args.checkpoint
    if args.make_fake:
        path = os.path.join(tmp, f"upstream_{args.method}.pth")
        make_fake_checkpoint(path)
    model = build_model(args.method, args.size, num_classes=args.num_classes, pretrained=path, **overrides)
    model.eval()

    # what went where: upstream name -> avfast name, values compared
    upstream = strip_prefixes(read_checkpoint(path))
    mapping = model.upstream_key_map(upstream.keys())
    ours = model.state_dict()
    same = sum(torch.equal(ours[n], upstream[k].reshape(ours[n].shape)) for k, n in mapping.items())
    unused = sorted(set(upstream) - set(mapping))
    print(f"loaded {len(mapping)} upstream tensors strictly into {type(model).__name__} ({args.size}), "
          f"{same} equal after loading; upstream-only entries left out: {len(unused)}"
          + (f" ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})" if unused else ""))
    renamed = [k for k, n in mapping.items() if k != n] or list(mapping)
    for k in renamed[:3]:
        print(f"  {k} -> {mapping[k]}")

frames, audio = example_inputs(model, args.batch)
with torch.no_grad():
    out = model(frames, audio)
logits = model.predict(out)
print(f"forward: frames {tuple(frames.shape)}, audio {tuple(audio.shape)} -> logits {tuple(logits.shape)}, "
      f"finite: {bool(torch.isfinite(logits).all())}")
