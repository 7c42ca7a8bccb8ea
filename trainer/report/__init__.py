"""Reports: `memtrain evaluate` (sections -> dict), every Markdown rendering, and the figures."""

from trainer.report.evaluate import evaluate

__all__ = ["evaluate"]
