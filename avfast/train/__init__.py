"""Training, evaluation and the demo: ``avfast train | pretrain | eval | demo``."""

from avfast.train.checkpoint import load_checkpoint, save_checkpoint
from avfast.train.loop import Trainer, TrainConfig, evaluate_checkpoint

__all__ = ["TrainConfig", "Trainer", "evaluate_checkpoint", "load_checkpoint", "save_checkpoint"]
