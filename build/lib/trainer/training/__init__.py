"""The Accelerate fine-tuning loop and the memorization monitor that runs inside it."""

from trainer.training.loop import train

__all__ = ["train"]
