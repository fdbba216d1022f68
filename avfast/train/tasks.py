"""The Trainers of the downstream tasks: ``avfast train --task avs|separation|avvp|avqa|text`` (the
classification Trainer with the task's data, model and validation metrics; logs,
checkpoints, resume, progress and DDP as for classification), and ``localize``:
sounding-region PNGs of a trained checkpoint (``avfast localize``).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from avfast.tasks import localization
from avfast.tasks.parsing import LLP_CATEGORIES, SCORES, ParsingMetrics, build_avvp_model, llp_loader, parse, read_llp
from avfast.tasks.question_answering import (QUESTION_TYPES, QAMetrics, QAVocabulary, avqa_loader,
                                             build_avqa_model, read_avqa, usable_questions)
from avfast.tasks.segmentation import (THRESHOLDS, AVSDALILoader, AVSDataset, AVSModel, MaskMetrics, avs_loader,
                                       build_avs_model, read_avsbench)
from avfast.tasks.separation import SeparationMetrics, build_separation_model, read_music, separate, separation_loader
from avfast.tasks.text_classification import (HEAD_KEYS, TOWER_KINDS, build_text_classifier, class_embeddings,
                                              few_shot, few_shot_indices, linear_probe, load_text_tower,
                                              parse_tower_specs, probe_accuracy)
from avfast.train.checkpoint import load_checkpoint
from avfast.train.loop import (TrainConfig, Trainer, dali_installed, load_manifest, model_from_checkpoint, model_preset,
                               split_manifest)


def _decoder_overrides(overrides: dict, prefix: str = "decoder_") -> dict:
    """Pop the ``<prefix><field>`` keys of ``overrides``: {field: value}."""
    return {k.removeprefix(prefix): overrides.pop(k) for k in list(overrides) if k.startswith(prefix)}


class AVSTrainer(Trainer):
    """AVSBench S4 / MS3 (``cfg.avs_subset``) under ``cfg.data``: trains on the train split,
    validates on ``cfg.val_split`` of ``cfg.val_data`` (default ``cfg.data``), reports
    ``val_miou`` and ``val_fscore`` (AVSBench's) and keeps the best mIoU in best.pt.
    ``cfg.model_overrides`` keys ``decoder_<field>`` go to the decoder (e.g. decoder_width=128),
    ``iou_weight`` to the loss; the others to the backbone."""

    score_name = "val_miou"
    metric_width = 3 + THRESHOLDS

    def load_data(self):
        cfg = self.cfg
        train = read_avsbench(cfg.data, cfg.avs_subset, "train", self.bad_rows)
        val = read_avsbench(cfg.val_data or cfg.data, cfg.avs_subset, cfg.val_split, self.bad_rows)
        self.num_classes = 1
        return train, val, []

    @staticmethod
    def model_for(cfg, num_classes: int):
        overrides = dict(cfg.model_overrides)
        decoder = _decoder_overrides(overrides)
        iou_weight = overrides.pop("iou_weight", 0.0)
        return build_avs_model(cfg.method, cfg.size, pretrained=cfg.pretrained, decoder=decoder,
                               iou_weight=iou_weight, **overrides)

    def make_loader(self, clips, *, train: bool):
        """DALI (``AVSDALILoader``) on a CUDA device with DALI installed, or when forced (on
        the CPU: DALI's CPU decoders); the CPU loader otherwise."""
        kind = self.cfg.loader
        if kind == "auto":
            kind = "dali" if self.device.type == "cuda" and dali_installed() else "cpu"
        common = dict(batch_size=self.cfg.batch_size, train=train, seed=self.cfg.seed, shard_id=self.rank,
                      num_shards=self.world)
        if kind == "dali":
            device_id = (self.device.index or 0) if self.device.type == "cuda" else None  # None: DALI on the CPU
            return AVSDALILoader(clips, self.preset, device_id=device_id, **common)
        if kind != "cpu":
            raise ValueError(f"loader: expected 'auto', 'cpu' or 'dali', got {self.cfg.loader!r}")
        return avs_loader(clips, self.preset, num_workers=self.cfg.workers, device=self.device, **common)

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        annotated = batch["annotated"].flatten()
        prob = torch.sigmoid(out["logits"].float()).flatten(0, 1)[annotated]
        metrics = MaskMetrics()
        metrics.update(prob, batch["masks"].flatten(0, 1)[annotated])
        return metrics.to_tensor()

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        result = MaskMetrics.from_tensor(sums).compute()
        return {"val_miou": result["miou"], "val_fscore": result["fscore"]}


class SeparationTrainer(Trainer):
    """Mix-and-separate on DeepAVFusion: ``cfg.data`` (and ``cfg.val_data``) a MUSIC-style
    json (``read_music``) or any solo-clip data classification reads (a class per
    instrument); validation mixes fixed pairs of the validation clips and reports
    ``val_sdr``, ``val_sir``, ``val_sar``, ``val_sdr_mixture`` and ``val_sdri`` (best.pt
    keeps the best SDR). ``cfg.model_overrides``: ``decoder_<field>`` to the decoder,
    ``binary`` (True: upstream's binary masks; False: ratio masks), the rest to DeepAVFusion."""

    score_name = "val_sdr"
    metric_width = 5

    def _solos(self, path: str):
        return read_music(path, bad=self.bad_rows) if path.endswith(".json") else load_manifest(path, self.bad_rows)

    def load_data(self):
        cfg = self.cfg
        manifest = self._solos(cfg.data)
        if cfg.val_data:
            train, val = manifest, self._solos(cfg.val_data)
            if val.classes != manifest.classes:
                raise ValueError(f"val_data: expected the training instruments {manifest.classes}, got {val.classes}")
        else:
            train, val = split_manifest(manifest, cfg.val_fraction, cfg.seed) if len(manifest) else (manifest, manifest)
        self.num_classes = len(manifest.classes)
        return train, val, manifest.classes

    @staticmethod
    def model_for(cfg, num_classes: int):
        overrides = dict(cfg.model_overrides)
        decoder = _decoder_overrides(overrides)
        binary = overrides.pop("binary", True)
        return build_separation_model(cfg.method, cfg.size, pretrained=cfg.pretrained, decoder=decoder,
                                      binary=binary, **overrides)

    def make_loader(self, clips, *, train: bool):
        if self.cfg.loader == "dali":
            raise ValueError("loader: the separation task mixes clips with the CPU loader; expected 'auto' or "
                             "'cpu', got 'dali'")
        return separation_loader(clips, self.preset, train=train, seed=self.cfg.seed,
                                 batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
                                 shard_id=self.rank, num_shards=self.world, device=self.device)

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        masks, frontend, metrics = self.model.masks(out), self.preset.audio.frontend, SeparationMetrics()
        for mask, sources, mixture in zip(masks.cpu(), batch["sources"].cpu(), batch["mixture"].cpu()):
            estimates = separate(mask, mixture[None].expand(len(mask), -1), frontend)
            metrics.update(estimates, sources, mixture)
        return metrics.to_tensor()

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        result = SeparationMetrics.from_tensor(sums).compute()
        return {f"val_{k}": v for k, v in result.items() if k != "sources"}


class AVVPTrainer(Trainer):
    """Weakly-supervised audio-visual video parsing on an LLP folder ``cfg.data``: trains on
    its train split (weak labels), validates on ``cfg.val_split`` ("val" or "test") of
    ``cfg.val_data`` (default ``cfg.data``) with LLP's per-video F1, reported as
    ``val_segment_audio`` ... ``val_event_type`` (``avfast.tasks.parsing``); best.pt keeps
    the best segment-level type@AV. ``cfg.model_overrides`` keys ``parser_<field>`` go to
    the parser (e.g. parser_width=256), ``smoothing`` to the loss, the rest to the backbone."""

    score_name = "val_segment_type"
    metric_width = len(SCORES) + 1

    def load_data(self):
        cfg = self.cfg
        train = read_llp(cfg.data, "train", bad=self.bad_rows)
        val = read_llp(cfg.val_data or cfg.data, cfg.val_split, bad=self.bad_rows)
        self.num_classes = len(LLP_CATEGORIES)
        return train, val, list(LLP_CATEGORIES)

    @staticmethod
    def model_for(cfg, num_classes: int):
        overrides = dict(cfg.model_overrides)
        parser = _decoder_overrides(overrides, "parser_")
        smoothing = overrides.pop("smoothing", 0.1)
        return build_avvp_model(cfg.method, cfg.size, pretrained=cfg.pretrained, parser=parser,
                                num_classes=num_classes, smoothing=smoothing, **overrides)

    def make_loader(self, videos, *, train: bool):
        if self.cfg.loader == "dali":
            raise ValueError("loader: the avvp task reads LLP with the CPU loader; expected 'auto' or 'cpu', got 'dali'")
        return llp_loader(videos, self.preset, train=train, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                          num_workers=self.cfg.workers, shard_id=self.rank, num_shards=self.world,
                          device=self.device)

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        evaluated = batch["evaluated"]
        audio, visual = parse(out)
        metrics = ParsingMetrics()
        metrics.update(audio[evaluated], visual[evaluated], batch["audio_events"][evaluated],
                       batch["visual_events"][evaluated])
        return metrics.to_tensor()

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        result = ParsingMetrics.from_tensor(sums).compute()
        return {f"val_{k}": v for k, v in result.items() if k != "videos"}


def avqa_file(folder: str, split: str) -> str:
    """MUSIC-AVQA's question file of ``split`` in ``folder`` (a json path passes through)."""
    return folder if folder.endswith(".json") else os.path.join(folder, f"avqa-{split}.json")


class AVQATrainer(Trainer):
    """Audio-visual question answering on a MUSIC-AVQA folder ``cfg.data`` (avqa-train.json,
    avqa-val.json, avqa-test.json, video/): trains on train, validates on ``cfg.val_split``
    of ``cfg.val_data`` (default ``cfg.data``), reports ``val_accuracy`` and the accuracy per
    modality and question type. The vocabulary (words, answers, max_words) is built from the
    training questions and kept in ``cfg.model_overrides``, so a checkpoint reads questions
    as it was trained; keys ``head_<field>`` go to the head (e.g. head_width=256), the rest
    to the backbone."""

    score_name = "val_accuracy"
    metric_width = 2 * len(QUESTION_TYPES)

    def load_data(self):
        cfg = self.cfg
        train = read_avqa(avqa_file(cfg.data, "train"), bad=self.bad_rows)
        val = read_avqa(avqa_file(cfg.val_data or cfg.data, cfg.val_split), bad=self.bad_rows)
        overrides = dict(cfg.model_overrides)
        if "words" not in overrides:
            vocab = QAVocabulary.build(train)
            overrides.update(words=list(vocab.words), answers=list(vocab.answers), max_words=vocab.max_words)
            self.cfg = dataclasses.replace(cfg, model_overrides=overrides)
        vocab = _vocabulary(overrides)
        self.num_classes = len(vocab.answers)
        return (usable_questions(train, vocab, self.bad_rows), usable_questions(val, vocab, self.bad_rows),
                list(vocab.answers))

    @staticmethod
    def model_for(cfg, num_classes: int):
        overrides = dict(cfg.model_overrides)
        vocab = _vocabulary(overrides)
        for key in ("words", "answers", "max_words"):
            overrides.pop(key)
        head = _decoder_overrides(overrides, "head_")
        return build_avqa_model(cfg.method, vocab, cfg.size, pretrained=cfg.pretrained, head=head, **overrides)

    def make_loader(self, questions, *, train: bool):
        if self.cfg.loader == "dali":
            raise ValueError("loader: the avqa task reads videos with the CPU loader; expected 'auto' or 'cpu', "
                             "got 'dali'")
        return avqa_loader(questions, _vocabulary(self.cfg.model_overrides), self.preset, train=train,
                           seed=self.cfg.seed, batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
                           shard_id=self.rank, num_shards=self.world, device=self.device)

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        metrics = QAMetrics()
        asked = batch["asked"]
        metrics.update(out["logits"][asked], batch["answer"][asked], batch["qtype"][asked])
        return metrics.to_tensor()

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        result = QAMetrics.from_tensor(sums).compute()
        return {f"val_{k}": v for k, v in result.items() if k != "questions"}


def _vocabulary(overrides: dict) -> QAVocabulary:
    """The QAVocabulary kept in a run's model_overrides."""
    missing = [k for k in ("words", "answers", "max_words") if k not in overrides]
    if missing:
        raise ValueError(f"model_overrides: expected the avqa vocabulary keys words, answers, max_words, "
                         f"missing {missing}")
    return QAVocabulary(tuple(overrides["words"]), tuple(overrides["answers"]), int(overrides["max_words"]))


class TextTrainer(Trainer):
    """Classification by similarity to class prompts (``avfast.tasks.text_classification``)
    on a folder of clips or a manifest, as for classification: the class names become the
    prompts of the towers ``cfg.text_weights`` (embedded once); ``cfg.shots``: train on that
    many clips per class (few-shot). The towers' widths and scales go to
    ``cfg.model_overrides`` and the class embeddings to the checkpoint, so scoring the
    training classes again needs no tower. Override ``visual_weight`` (0.5) mixes the branches."""

    def load_data(self):
        train, val, classes = super().load_data()
        self.num_classes = len(classes)
        if self.cfg.shots:
            train, _ = few_shot(train, self.cfg.shots, self.cfg.seed)
        self.towers = {}
        overrides = dict(self.cfg.model_overrides)
        if "text_dims" not in overrides:
            specs = parse_tower_specs(self.cfg.text_weights)
            self.towers = {kind: load_text_tower(spec) for kind, spec in specs.items()}
            overrides.update(text_dims={k: t.embed_dim for k, t in self.towers.items()},
                             text_scales={k: t.logit_scale for k, t in self.towers.items()})
            self.cfg = dataclasses.replace(self.cfg, model_overrides=overrides)
        return train, val, classes

    @staticmethod
    def model_for(cfg, num_classes: int):
        overrides = dict(cfg.model_overrides)
        head = {k: overrides.pop(k) for k in HEAD_KEYS if k in overrides}
        if "text_dims" not in head:
            raise ValueError("model_overrides: expected 'text_dims' (set from --text-weights), got none")
        return build_text_classifier(cfg.method, cfg.size, num_classes, pretrained=cfg.pretrained, **head, **overrides)

    def build_model(self):
        model = self.model_for(self.cfg, self.num_classes)
        if self.towers:
            model.head.set_classes(class_embeddings(self.towers, self.classes))
        return model

    @torch.no_grad()
    def embeddings(self, loader=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings (N, sum E): each tower's projected embedding, concatenated; labels (N,);
        logits (N, C)) of the clips of ``loader`` (default the validation loader)."""
        self.model.eval()
        feats, labels, logits = [], [], []
        for batch in loader or self.val_loader:
            with self.autocast():
                out = self.model(batch["frames"], batch["audio"])
            feats.append(torch.cat([out["embeddings"][k].float() for k in self.model.head.kinds], dim=-1).cpu())
            logits.append(out["logits"].float().cpu())
            labels.append(batch["label"].cpu())
        return torch.cat(feats), torch.cat(labels), torch.cat(logits)

    def few_shot_probe(self, shots: int, seed: int = 0) -> dict[str, float]:
        """A k-shot linear probe on the validation clips' embeddings: ``shots`` clips per
        class fit it, the others score it (probe_accuracy) and the prompt logits alike
        (prompt_accuracy, the same clips)."""
        x, y, logits = self.embeddings()
        chosen, rest = few_shot_indices(y.tolist(), shots, seed, self.classes)
        if not rest:
            raise ValueError(f"shots: expected clips left to score after {shots} per class, got none of {len(y)}")
        probe = linear_probe(x[chosen], y[chosen], len(self.classes))
        return {"probe_accuracy": probe_accuracy(probe, x[rest], y[rest]),
                "prompt_accuracy": float((logits[rest].argmax(-1) == y[rest]).float().mean()),
                "shots": shots, "probe_clips": len(chosen), "scored_clips": len(rest)}


def text_evaluator(path: str, data: str, *, zero_shot: bool = False, text_weights: list[str] | None = None,
                   batch_size: int = 8, workers: int = 4, device: str | None = None) -> TextTrainer:
    """A TextTrainer holding a ``--task text`` checkpoint, scoring all of ``data``. With
    ``zero_shot`` the classes are ``data``'s own (any names): their prompts are embedded by
    ``text_weights`` (default: the run's towers), which must match the checkpoint's widths;
    otherwise ``data`` must hold the checkpoint's classes and no tower is loaded."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    if config.get("task") != "text":
        raise ValueError(f"checkpoint: expected a --task text checkpoint, got task {config.get('task')!r} ({path})")
    overrides = dict(config["model_overrides"])
    dims = overrides["text_dims"]
    if zero_shot:
        overrides.pop("text_dims"), overrides.pop("text_scales", None)
    cfg = TrainConfig(**{**config, "data": data, "val_data": data, "batch_size": batch_size, "workers": workers,
                         "device": device, "resume": False, "pretrained": None, "shots": None, "num_classes": None,
                         "out": str(os.path.dirname(os.path.abspath(path))), "model_overrides": overrides,
                         "text_weights": list(text_weights or config.get("text_weights") or [])})
    trainer = TextTrainer(cfg)
    state = dict(ckpt["model"])
    if zero_shot:
        got = trainer.cfg.model_overrides["text_dims"]
        if got != dims:
            raise ValueError(f"text_weights: expected towers of the checkpoint's widths {dims}, got {got}")
        for kind in TOWER_KINDS:
            state.pop(f"head.{kind}_classes", None), state.pop(f"head.{kind}_scale", None)
    elif trainer.classes != ckpt["classes"]:
        raise ValueError(f"data: expected the checkpoint's classes {ckpt['classes'][:5]}..., got "
                         f"{trainer.classes[:5]}... from {data!r} (--zero-shot scores other classes)")
    missing, unexpected = trainer.model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") or k.count(".") != 1 for k in missing):
        raise ValueError(f"checkpoint: expected the model's weights, got missing {missing}, unexpected {unexpected}")
    return trainer


def localize(checkpoint: str, out: str, *, data: str | None = None, subset: str | None = None,
             split: str = "test", index: int = 0, video: str | None = None) -> str:
    """Write ``out``/<clip>.png, the sounding-region map of one clip (see
    ``avfast.tasks.localization``), and return its path. An AVS checkpoint maps clip ``index``
    of ``split`` of the AVSBench root ``data`` (its run's subset unless ``subset``); a
    classification checkpoint maps the video file ``video`` (Grad-CAM)."""
    model, cfg = model_from_checkpoint(checkpoint)
    preset = model_preset(model)
    if isinstance(model, AVSModel):
        if data is None or video is not None:
            raise ValueError("data: an AVS checkpoint maps a clip of an AVSBench root: expected --data ROOT "
                             f"(and no --video), got data={data!r}, video={video!r}")
        clips = read_avsbench(data, subset or cfg.avs_subset, split)
        if not 0 <= index < len(clips):
            raise ValueError(f"index: expected 0 <= index < {len(clips)} (the clips of {split!r}), got {index}")
        item = AVSDataset(clips, preset)[index]
        frames, audio, name = item["frames"], item["audio"], clips[index].id
        maps = localization.avs_maps(model, frames[None], audio[None])
    else:
        from avfast.data.cpu import ClipDataset
        from avfast.data.manifest import Clip, Manifest

        if video is None:
            raise ValueError(f"video: a {cfg.method} classification checkpoint maps a video file: expected "
                             "--video FILE, got none")
        if not os.path.isfile(video):
            raise FileNotFoundError(f"video: expected a video file, got no such file {video!r}")
        item = ClipDataset(Manifest([Clip(path=os.path.abspath(video), labels=())], []), preset, train=False)[0]
        if "frames" not in item:
            raise ValueError(f"video: could not read {video!r}: {item['unreadable']}")
        frames, audio = item["frames"], item["audio"]
        name = os.path.splitext(os.path.basename(video))[0]
        maps = localization.gradcam_maps(model, cfg.method, frames[None], audio[None])
    shown = localization.display_frames(frames, preset.video.mean, preset.video.std)
    return localization.write_overlay_png(os.path.join(out, f"{name}.png"), shown, maps.clamp(0, 1))
