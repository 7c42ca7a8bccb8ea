"""Sampling: stock DDIM generation, and generation guarded against replicating training images (AMG, Chen et
al. CVPR 2024; Wen et al.'s prompt-embedding mitigation, ICLR 2024)."""

from trainer.core.components import load_pipeline
from trainer.sample.generate import generate_images
from trainer.sample.guard import GuardedPipeline, guarded_generate

__all__ = ["GuardedPipeline", "generate_images", "guarded_generate", "load_pipeline"]
