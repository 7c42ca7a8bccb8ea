"""The training rows worth loading, as a training-image index tells (`evaluate --index ... --train-data`): the k
nearest rows of each query image (generations, held-out images). Replication against a large training set then
decodes and VAE-encodes only those rows instead of every training image; with k >= N it is every row, so small
sets are measured exactly as before.

The rows are the training set's rows only when the index was built from that set (`memtrain index` records its
fingerprint, `check_index_data` compares it), so an index without one (imported, or built by an older memtrain)
gives no candidates and the caller loads everything.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.measure.embedders import ImageEmbedder
from trainer.measure.index import TrainingIndex

CANDIDATES = 64  # nearest training rows per query image


def rows_match(index: TrainingIndex, n_rows: int) -> bool:
    """Whether index row i is training row i: the index records a fingerprint of the data with n_rows rows."""
    fingerprint = (index.meta or {}).get("fingerprint")
    return isinstance(fingerprint, dict) and fingerprint.get("count") == n_rows == len(index)


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
