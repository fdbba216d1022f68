"""Few- and zero-shot audio-visual classification with text towers (DG-SCT's protocol): a
per-second method's clip embeddings matched to class prompts embedded by a CLIP text tower
(open_clip) for the visual side and a CLAP text tower (transformers' ``ClapModel``) for the
audio side, and k-shot linear probes on the same embeddings.

Text towers (``load_text_tower``) read local weights only, named by a spec
``KIND[:MODEL]=PATH``:

- ``clip:ViT-B-16=/w/open_clip_pytorch_model.bin``: an open_clip model name (default
  ViT-B-16) and its checkpoint file (a state dict of ``open_clip.create_model(MODEL)``);
- ``clap=/w/clap-htsat-unfused``: a folder written by ``ClapModel.save_pretrained`` holding
  its tokenizer too (e.g. a local copy of the hub's ``laion/clap-htsat-unfused``).

Nothing downloads; the towers are frozen and embed each class's prompts once (the mean of
its templates' normalised embeddings, normalised), so training never runs them.

Head (``TextMatchingHead``, DG-SCT's two text branches): the clip's visual embedding v
(the per-second pooled visual features averaged over seconds) and audio embedding a are
projected into the CLIP and the CLAP text spaces and normalised; with the class prompt
embeddings T_clip (C, E1), T_clap (C, E2) and each tower's logit scale s,

    logits = w * s_clip * norm(P_v v) T_clip^T + (1 - w) * s_clap * norm(P_a a) T_clap^T

(w = ``visual_weight``, 0.5; one branch alone where only one tower is given). Loss:
cross-entropy over the prompts of the training classes. Zero-shot: the same model scores
the prompts of classes it never saw (``set_classes``). k-shot linear probe
(``linear_probe``): multinomial logistic regression on the frozen normalised embeddings of
k clips per class (``few_shot``), scored on the others.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avfast.data.manifest import Manifest
from avfast.models.base import freeze

TEXT_METHODS = ("dgsct", "stgcma")
TOWER_KINDS = ("clip", "clap")
DEFAULT_CLIP_MODEL = "ViT-B-16"
VISUAL_TEMPLATES = ("a photo of a {}.",)  # CLIP's prompt
AUDIO_TEMPLATES = ("this is a sound of {}.",)  # LAION-CLAP's prompt


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """One ``--text-weights`` value: ``kind`` ("clip" or "clap"), open_clip ``model`` (clip), ``path``."""

    kind: str
    path: str
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> TowerSpec:
        """``KIND[:MODEL]=PATH`` -> a TowerSpec (the path must exist)."""
        head, sep, path = text.partition("=")
        kind, _, model = head.partition(":")
        if not sep or not path or kind not in TOWER_KINDS:
            raise ValueError(f"text_weights: expected 'clip[:MODEL]=PATH' or 'clap=PATH', got {text!r}")
        if kind == "clap" and model:
            raise ValueError(f"text_weights: a CLAP tower takes no model name ('clap=FOLDER'), got {text!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"text_weights: expected an existing {kind} weights path, got {path!r}")
        return cls(kind, path, (model or DEFAULT_CLIP_MODEL) if kind == "clip" else None)


def parse_tower_specs(texts) -> dict[str, TowerSpec]:
    """``--text-weights`` values -> {kind: TowerSpec}, at most one per kind, at least one."""
    specs: dict[str, TowerSpec] = {}
    for text in texts:
        spec = TowerSpec.parse(text)
        if spec.kind in specs:
            raise ValueError(f"text_weights: expected one {spec.kind} tower, got two ({specs[spec.kind].path!r}, "
                             f"{spec.path!r})")
        specs[spec.kind] = spec
    if not specs:
        raise ValueError("text_weights: expected a 'clip[:MODEL]=PATH' and/or a 'clap=PATH' tower, got none")
    return specs


class TextTower(nn.Module):
    """A frozen text encoder and its tokenizer: forward(texts: list[str]) -> (len, E)
    normalised embeddings. ``logit_scale``: its contrastive temperature's inverse."""

    def __init__(self, kind: str, encoder: nn.Module, tokenize, embed_dim: int, logit_scale: float):
        super().__init__()
        self.kind, self.encoder, self.tokenize = kind, freeze(encoder).eval(), tokenize
        self.embed_dim, self.logit_scale = int(embed_dim), float(logit_scale)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> Tensor:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
        out = self.encoder(self.tokenize(texts)).float()
        return F.normalize(out, dim=-1)

    def embed_classes(self, names: list[str], templates: tuple[str, ...]) -> Tensor:
        """Class names -> (C, E): per class the mean of its prompts' embeddings, normalised."""
        prompts = [t.format(readable_name(n)) for n in names for t in templates]
        emb = self(prompts).unflatten(0, (len(names), len(templates)))
        return F.normalize(emb.mean(1), dim=-1)


class _OpenCLIPText(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)


class _CLAPText(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> Tensor:
        out = self.model.get_text_features(**inputs)
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers >= 5 returns an output


def _open_clip_tower(spec: TowerSpec) -> TextTower:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("a clip text tower needs open_clip: pip install open_clip_torch") from err
    if spec.model not in open_clip.list_models():
        raise ValueError(f"text_weights: expected an open_clip model name (open_clip.list_models()), "
                         f"got {spec.model!r}")
    if not os.path.isfile(spec.path):
        raise ValueError(f"text_weights: a clip tower expects a checkpoint file, got the folder {spec.path!r}")
    model = open_clip.create_model(spec.model, pretrained=spec.path)
    del model.visual  # only the text side is used
    tokenizer = open_clip.get_tokenizer(spec.model)
    scale = float(model.logit_scale.detach().exp())
    dim = model.text_projection.shape[1] if model.text_projection is not None else model.transformer.width
    return TextTower("clip", _OpenCLIPText(model), tokenizer, dim, scale)


def _clap_tower(spec: TowerSpec) -> TextTower:
    try:
        from transformers import AutoTokenizer, ClapModel
    except ImportError as err:
        raise ImportError("a clap text tower needs transformers: pip install transformers") from err
    if not os.path.isdir(spec.path):
        raise ValueError(f"text_weights: a clap tower expects a save_pretrained folder, got the file {spec.path!r}")
    model = ClapModel.from_pretrained(spec.path, local_files_only=True)
    del model.audio_model, model.audio_projection  # only the text side is used
    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    tokenize = lambda texts: dict(tokenizer(texts, padding=True, return_tensors="pt"))  # noqa: E731
    return TextTower("clap", _CLAPText(model), tokenize, model.config.projection_dim, float(model.logit_scale_a.detach().exp()))


def load_text_tower(spec: TowerSpec | str) -> TextTower:
    """The frozen text tower of ``spec`` (a TowerSpec or its ``KIND[:MODEL]=PATH`` text)."""
    spec = TowerSpec.parse(spec) if isinstance(spec, str) else spec
    return _open_clip_tower(spec) if spec.kind == "clip" else _clap_tower(spec)


def readable_name(name: str) -> str:
    """A class folder name as prompt text: '_' and '-' become spaces ('dog_barking' -> 'dog barking')."""
    return re.sub(r"[_\-]+", " ", name).strip()


TEMPLATES = {"clip": VISUAL_TEMPLATES, "clap": AUDIO_TEMPLATES}


def class_embeddings(towers: dict[str, TextTower], classes: list[str]) -> dict[str, Tensor]:
    """{kind: (C, E) prompt embeddings of ``classes``} for each tower (CLIP: visual prompts, CLAP: audio)."""
    return {kind: tower.embed_classes(classes, TEMPLATES[kind]) for kind, tower in towers.items()}


class TextMatchingHead(nn.Module):
    """Clip embeddings v (B, Dv), a (B, Da) -> logits (B, C) against class prompt embeddings
    (module docstring). ``dims``: {kind: E} of the towers used ("clip" scores v, "clap" a)."""

    def __init__(self, visual_dim: int, audio_dim: int, num_classes: int, dims: dict[str, int],
                 scales: dict[str, float] | None = None, visual_weight: float = 0.5):
        super().__init__()
        if not dims or set(dims) - set(TOWER_KINDS):
            raise ValueError(f"dims: expected {{kind: width}} for kinds in {TOWER_KINDS}, got {dims!r}")
        if not 0.0 <= visual_weight <= 1.0:
            raise ValueError(f"visual_weight: expected a number in [0, 1], got {visual_weight!r}")
        self.kinds = tuple(k for k in TOWER_KINDS if k in dims)
        self.visual_weight = float(visual_weight)
        inputs = {"clip": visual_dim, "clap": audio_dim}
        self.proj = nn.ModuleDict({k: nn.Linear(inputs[k], int(dims[k])) for k in self.kinds})
        for k in self.kinds:
            self.register_buffer(f"{k}_classes", torch.zeros(num_classes, int(dims[k])))
            self.register_buffer(f"{k}_scale", torch.tensor(float((scales or {}).get(k, 100.0))))

    @property
    def num_classes(self) -> int:
        return getattr(self, f"{self.kinds[0]}_classes").shape[0]

    def set_classes(self, embeddings: dict[str, Tensor], scales: dict[str, float] | None = None) -> None:
        """Score these classes from now on: {kind: (C, E)} for every kind of the head."""
        if set(embeddings) != set(self.kinds):
            raise ValueError(f"embeddings: expected the kinds {self.kinds}, got {tuple(embeddings)}")
        sizes = {k: tuple(e.shape) for k, e in embeddings.items()}
        count = {s[0] for s in sizes.values()}
        for k, e in embeddings.items():
            width = self.proj[k].out_features
            if e.dim() != 2 or e.shape[1] != width or len(count) != 1:
                raise ValueError(f"embeddings[{k!r}]: expected (C, {width}) with one C for all kinds, got {sizes}")
            setattr(self, f"{k}_classes", F.normalize(e.float(), dim=-1).to(self.proj[k].weight.device))
            if scales and k in scales:
                getattr(self, f"{k}_scale").fill_(float(scales[k]))

    def embed(self, v: Tensor, a: Tensor) -> dict[str, Tensor]:
        """{kind: (B, E) normalised projected embedding} ("clip": of v, "clap": of a)."""
        x = {"clip": v, "clap": a}
        return {k: F.normalize(self.proj[k](x[k].float()), dim=-1) for k in self.kinds}

    def forward(self, v: Tensor, a: Tensor) -> Tensor:
        weight = {"clip": self.visual_weight, "clap": 1.0 - self.visual_weight} if len(self.kinds) == 2 else None
        logits = 0
        for k, e in self.embed(v, a).items():
            term = getattr(self, f"{k}_scale") * e @ getattr(self, f"{k}_classes").t()
            logits = logits + (term if weight is None else weight[k] * term)
        return logits


def clip_embeddings(method: str, backbone: nn.Module, frames: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
    """A per-second method's clip embeddings: (visual (B, Dv), audio (B, Da)), its per-second
    pooled features averaged over seconds (DG-SCT: the adapters' attention-pooled maps;
    STG-CMA: the final norm of each second's CLS tokens)."""
    v, a = backbone.forward_features(frames, audio)
    if method == "stgcma":  # tokens (B*T, L, D)
        norm, B = backbone.backbone.norm, frames.shape[0]
        v, a = norm(v[:, 0]).unflatten(0, (B, -1)), norm(a[:, 0]).unflatten(0, (B, -1))
    return v.mean(1), a.mean(1)


def embedding_widths(method: str, backbone: nn.Module) -> tuple[int, int]:
    """(Dv, Da) of ``clip_embeddings``."""
    cfg = backbone.config
    if method == "dgsct":
        stages = len(cfg.visual_depths)
        return cfg.visual_dim(stages - 1), cfg.audio_dim(stages - 1)
    return cfg.embed_dim, cfg.embed_dim


class TextClassifier(nn.Module):
    """A per-second method's backbone and a ``TextMatchingHead``.

    forward(frames (B, T, 3, S, S), audio (B, T, *features)) -> {"logits": (B, C),
    "embeddings": {kind: (B, E)}}. The backbone's own heads are frozen; ``loss`` is the
    cross-entropy of the logits against batch["label"] (B,)."""

    def __init__(self, method: str, backbone: nn.Module, num_classes: int, dims: dict[str, int],
                 scales: dict[str, float] | None = None, visual_weight: float = 0.5):
        super().__init__()
        if method not in TEXT_METHODS:
            raise ValueError(f"method: expected one of {TEXT_METHODS} (per-second methods), got {method!r}")
        self.method, self.backbone = method, backbone
        self.preset, self.config = backbone.preset, backbone.config
        for name in backbone.dense_unused:
            freeze(backbone.get_submodule(name))
        self.head = TextMatchingHead(*embedding_widths(method, backbone), num_classes, dims, scales, visual_weight)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        v, a = clip_embeddings(self.method, self.backbone, frames, audio)
        return {"logits": self.head(v, a), "embeddings": self.head.embed(v, a)}

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"]

    def loss(self, out: dict[str, Tensor], batch: dict) -> tuple[Tensor, dict[str, float]]:
        logits, target = out["logits"], batch["label"].to(out["logits"].device)
        loss = F.cross_entropy(logits.float(), target)
        return loss, {"loss": loss.item(), "acc": float((logits.detach().argmax(-1) == target).float().mean())}


HEAD_KEYS = ("text_dims", "text_scales", "visual_weight")  # model_overrides keys of the head


def build_text_classifier(method: str, size: str = "base", num_classes: int = 2, *, text_dims: dict[str, int],
                          text_scales: dict[str, float] | None = None, visual_weight: float = 0.5,
                          pretrained: str | None = None, **overrides) -> TextClassifier:
    """A ``TextClassifier``: ``method``'s backbone at ``size`` (``overrides``; ``pretrained``:
    a local upstream checkpoint) and a head for towers of widths ``text_dims`` {kind: E}."""
    from avfast.models import build_model

    if method not in TEXT_METHODS:
        raise ValueError(f"method: expected one of {TEXT_METHODS} (per-second methods), got {method!r}")
    backbone = build_model(method, size, num_classes=2, pretrained=pretrained, **overrides)
    return TextClassifier(method, backbone, num_classes, text_dims, text_scales, visual_weight)


def few_shot_indices(labels, shots: int, seed: int = 0, classes: list[str] | None = None
                     ) -> tuple[list[int], list[int]]:
    """(chosen, rest): ``shots`` positions of each class of ``labels`` (a class id per item,
    -1 unlabelled), drawn with ``seed``, and the other labelled positions, each sorted. Every
    class of ``classes`` (default: those present) needs ``shots`` items."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots: expected a positive integer, got {shots!r}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(int(x) for x in labels):
        if label >= 0:
            by_class.setdefault(label, []).append(i)
    names = classes if classes is not None else [str(c) for c in sorted(by_class)]
    ids = range(len(classes)) if classes is not None else sorted(by_class)
    short = {name: len(by_class.get(c, [])) for c, name in zip(ids, names) if len(by_class.get(c, [])) < shots}
    if short:
        raise ValueError(f"shots: expected at least {shots} labelled clips per class, got fewer for {short}")
    rng = np.random.default_rng([seed, 11])
    chosen = sorted(i for c in sorted(by_class) for i in rng.permutation(by_class[c])[:shots].tolist())
    taken = set(chosen)
    return chosen, sorted(i for members in by_class.values() for i in members if i not in taken)


def few_shot(manifest: Manifest, shots: int, seed: int = 0) -> tuple[Manifest, Manifest]:
    """(k-shot set, rest) of a manifest: ``shots`` clips of each class (first label), drawn
    with ``seed``, and its other labelled clips."""
    labels = [clip.labels[0] if clip.labels else -1 for clip in manifest.clips]
    chosen, rest = few_shot_indices(labels, shots, seed, manifest.classes)
    pick = lambda idx: Manifest([manifest.clips[i] for i in idx], manifest.classes, manifest.root)  # noqa: E731
    return pick(chosen), pick(rest)


def linear_probe(train_x: Tensor, train_y: Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                 steps: int = 100) -> nn.Linear:
    """A multinomial logistic regression (N, D) -> (N, C) fitted by L-BFGS to the
    normalised features ``train_x`` and labels ``train_y`` (N,), L2 penalty ``weight_decay``."""
    if train_x.dim() != 2 or train_y.shape != train_x.shape[:1]:
        raise ValueError(f"train_x, train_y: expected (N, D) and (N,), got {tuple(train_x.shape)} and "
                         f"{tuple(train_y.shape)}")
    if train_y.numel() and (int(train_y.min()) < 0 or int(train_y.max()) >= num_classes):
        raise ValueError(f"train_y: expected labels in [0, {num_classes}), got [{int(train_y.min())}, "
                         f"{int(train_y.max())}]")
    x, y = F.normalize(train_x.detach().double(), dim=-1), train_y.long()
    probe = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe


def probe_accuracy(probe: nn.Linear, x: Tensor, y: Tensor) -> float:
    """Accuracy of ``probe`` on the normalised features ``x`` (N, D), labels ``y`` (N,)."""
    with torch.no_grad():
        return float((probe(F.normalize(x.double(), dim=-1)).argmax(-1) == y).double().mean())
