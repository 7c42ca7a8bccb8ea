"""The Accelerate fine-tuning loop, its loss, model setup, checkpoints and run lock, and the memorization monitor
that runs inside it."""

from trainer.training.loop import train

__all__ = ["train"]
