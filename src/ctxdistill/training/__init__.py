"""Training: the loop (loop.py), processes (distributed.py), checkpoints, resume, outputs, signals."""

from .loop import TrainResult, Trainer, train

__all__ = ["TrainResult", "Trainer", "train"]
