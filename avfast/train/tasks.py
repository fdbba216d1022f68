"""The Trainers of the downstream tasks: ``avfast train --task avs`` (the classification
Trainer with the task's data, model and validation metrics; logs, checkpoints, resume,
progress and DDP as for classification).
"""

from __future__ import annotations

import torch

from avfast.tasks.segmentation import THRESHOLDS, AVSLoader, MaskMetrics, build_avs_model, read_avsbench
from avfast.train.loop import Trainer


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

    def build_model(self):
        cfg = self.cfg
        overrides = dict(cfg.model_overrides)
        decoder = {k.removeprefix("decoder_"): overrides.pop(k) for k in list(overrides) if k.startswith("decoder_")}
        iou_weight = overrides.pop("iou_weight", 0.0)
        return build_avs_model(cfg.method, cfg.size, pretrained=cfg.pretrained, decoder=decoder,
                               iou_weight=iou_weight, **overrides)

    def make_loader(self, clips, *, train: bool):
        if self.cfg.loader == "dali":
            raise ValueError("loader: the AVS task reads its PNG frames with the CPU loader; expected 'auto' or "
                             "'cpu', got 'dali'")
        return AVSLoader(clips, self.preset, batch_size=self.cfg.batch_size, train=train,
                         num_workers=self.cfg.workers, seed=self.cfg.seed, shard_id=self.rank,
                         num_shards=self.world, device=self.device)

    def metric_sums(self, batch: dict, out: dict) -> torch.Tensor:
        annotated = batch["annotated"].flatten()
        prob = torch.sigmoid(out["logits"].float()).flatten(0, 1)[annotated]
        metrics = MaskMetrics()
        metrics.update(prob, batch["masks"].flatten(0, 1)[annotated])
        return metrics.to_tensor()

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        result = MaskMetrics.from_tensor(sums).compute()
        return {"val_miou": result["miou"], "val_fscore": result["fscore"]}
