"""The training rows worth loading, as a training-image index tells (`evaluate --index ... --train-data`): the k
nearest rows of each query image (generations, held-out images). Replication against a large training set then
decodes and VAE-encodes only those rows instead of every training image; with k >= N it is every row, so small
sets are measured exactly as before.

The caller maps the candidates to training rows (`index_data.training_rows`: row for row for an index built from
the set, by file name for an imported one).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.measure.embedders import ImageEmbedder
from trainer.measure.index import TrainingIndex

CANDIDATES = 64  # nearest training rows per query image


@torch.no_grad()
def candidate_rows(index: TrainingIndex, embedder: ImageEmbedder, images: list[torch.Tensor], k: int = CANDIDATES,
                   batch_size: int = 32) -> np.ndarray:
    """Sorted unique index rows among the k nearest (the index's own search) of any image of `images` ([M, 3, H,
    W] tensors in [0, 1], embedded `batch_size` at a time); every row when k >= len(index)."""
    if k >= len(index):
        return np.arange(len(index))
    found = []
    for batch in images:
        for s in range(0, len(batch), batch_size):
            found.append(index.search(embedder(batch[s:s + batch_size]).cpu(), k=k)[1].reshape(-1).numpy())
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
