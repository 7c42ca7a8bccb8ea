"""The training rows worth loading, as a training-image index tells (`evaluate --index ... --train-data`): the k
nearest rows of each query image (generations, held-out images). Replication against a large training set then
decodes and VAE-encodes only those rows instead of every training image; with k >= N it is every row, so small
sets are measured exactly as before.

Index rows are the training set's rows when the index was built from that set (`memtrain index` records its
fingerprint, `check_index_data` compares it); an imported index (clip-retrieval, autofaiss) is matched to them by
the file names its metadata records. An index that does not name every training row gives no candidates and the
caller loads everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.measure.embedders import ImageEmbedder
from trainer.measure.index import TrainingIndex

CANDIDATES = 64  # nearest training rows per query image


def rows_match(index: TrainingIndex, n_rows: int) -> bool:
    """Whether index row i is training row i: the index records a fingerprint of the data with n_rows rows."""
    fingerprint = (index.meta or {}).get("fingerprint")
    return isinstance(fingerprint, dict) and fingerprint.get("count") == n_rows == len(index)


def training_rows(index: TrainingIndex, train_names: Sequence[str]) -> np.ndarray | None:
    """[len(index)] the training row of each index row (-1: an image outside the training set), or None when the
    index cannot bound the search: it does not name every training row, or two rows share a name. `train_names`
    are the rows' names as `memtrain index` records them (`index_data.row_file_name`). An index with this set's
    fingerprint is row for row; another is matched by name: a training row's name equals an index row's file
    name or ends it after a "/" (clip-retrieval records the path it embedded, often absolute, or the URL)."""
    if rows_match(index, len(train_names)):
        return np.arange(len(train_names))
    by_name = {name: row for row, name in enumerate(train_names)}
    if len(by_name) < len(train_names):
        return None
    mapping = np.full(len(index), -1, dtype=np.int64)
    for i, file_name in enumerate(index.file_names):
        parts = str(file_name).split("/")
        mapping[i] = next((by_name[s] for s in ("/".join(parts[k:]) for k in range(len(parts))) if s in by_name), -1)
    named = np.unique(mapping[mapping >= 0])
    return mapping if len(named) == len(train_names) else None


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
