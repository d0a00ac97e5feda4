"""Training engine: the incremental loop, evaluation, checkpoints and distributed set-up."""

from .trainer import Trainer, run

__all__ = ["Trainer", "run"]
