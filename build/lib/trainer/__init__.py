"""memtrain: fine-tune Stable Diffusion models without memorizing their training data."""

__version__ = "0.1.0"
