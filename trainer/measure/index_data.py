"""The data an index was built from (`trainer.measure.index`): each row's file name as `memtrain index` records
it, a fingerprint of the set (row count, a hash of file names and sizes) that `check_index_data` compares with
a `--train-data` directory without decoding an image, and the training row of each index row (`training_rows`:
row for row with the fingerprint, by file name for an imported index)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trainer.data import load_rows
from trainer.data_shards import SHARD_SUFFIXES, ShardImage
from trainer.io import MemtrainError
from trainer.measure.index import INDEX_FILE, TrainingIndex


def _size(source) -> int | None:
    """Bytes of a row's image: the file's size, or the stored bytes of a datasets row (None when unknown)."""
    if isinstance(source, ShardImage):
        return getattr(source, "size", None)
    if isinstance(source, dict):
        if source.get("bytes"):
            return len(source["bytes"])
        source = source.get("path")
    if isinstance(source, str | Path):
        try:
            return Path(source).stat().st_size
        except OSError:
            return None
    return None


def data_fingerprint(images: Sequence, file_names: Sequence[str]) -> dict:
    """{"count", "sha256"}: the number of rows and a hash of each row's file name and size, which tells the
    data set an index was built from without decoding an image."""
    digest = hashlib.sha256()
    for source, name in zip(images, file_names, strict=True):
        digest.update(f"{name}\t{_size(source)}\n".encode())
    return {"count": len(file_names), "sha256": digest.hexdigest()}


def fingerprint_of(data: str | Path, caption_column: str = "text", image_column: str = "image") -> dict:
    """`data_fingerprint` of a training set directory (the file names as `memtrain index` records them)."""
    rows = load_rows(str(data), caption_column=caption_column, image_column=image_column)
    root = Path(data)
    return data_fingerprint(rows.images, row_file_names(rows.images, root))


def check_index_data(index: str | Path, data: str | Path) -> None:
    """A MemtrainError when the index at `index` was built from another data set than `data` (its fingerprint,
    written by `memtrain index`, differs); a warning for an index without one (built by an older memtrain)."""
    try:
        info = json.loads((Path(index) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return  # TrainingIndex.load names what is wrong with it
    recorded = (info.get("meta") or {}).get("fingerprint") if isinstance(info, dict) else None
    if not isinstance(recorded, dict):
        why = "imported from a faiss index" if (info.get("meta") or {}).get("imported") else "built by an older memtrain"
        print(f"memtrain: warning: --index {index} records no fingerprint of its data ({why}): its rows are matched "
              f"to {data}'s by file name, the images unchecked; `memtrain index {data} --out INDEX` builds a checked one",
              file=sys.stderr)
        return
    found = fingerprint_of(data)
    if found != {k: recorded.get(k) for k in found}:
        count = recorded.get("count")
        what = (f"{count} images, --train-data {found['count']}" if count != found["count"] else
                f"both {count} images, but other file names or sizes")
        raise MemtrainError(f"--index {index} was built from another data set than --train-data {data} ({what}); "
                            f"rebuild it with `memtrain index {data} --out INDEX` or pass the matching --train-data")


def row_file_name(source, root: Path, row: int) -> str:
    """The image's path relative to the data directory, "SHARD-FILE-NAME:KEY" for a shard's sample, or "row i"
    for an image stored in a dataset."""
    if isinstance(source, ShardImage):
        return f"{Path(source.shard).name}:{source.key}"
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        source = source["path"]
    if isinstance(source, str | Path):
        try:
            return Path(source).relative_to(root).as_posix()
        except ValueError:
            return str(source)
    return f"row {row}"


def row_file_names(images: Sequence, root: Path) -> list[str]:
    """`row_file_name` of every row of a training set's images."""
    return [row_file_name(source, root, row) for row, source in enumerate(images)]


def shard_key(name: str) -> str | None:
    """KEY of a shard sample's row name "SHARD-FILE-NAME:KEY" (`row_file_name`), else None."""
    shard, sep, key = name.partition(":")
    return key if sep and shard.endswith(SHARD_SUFFIXES) and key else None


def rows_match(index: TrainingIndex, n_rows: int) -> bool:
    """Whether index row i is training row i: the index records a fingerprint of the data with n_rows rows."""
    fingerprint = (index.meta or {}).get("fingerprint")
    return isinstance(fingerprint, dict) and fingerprint.get("count") == n_rows == len(index)


def training_rows(index: TrainingIndex, train_names: Sequence[str]) -> np.ndarray | None:
    """[len(index)] the training row of each index row (-1: an image outside the training set), or None when the
    index cannot tell: it does not name every training row, or two rows share a name. `train_names` are the rows'
    names as `memtrain index` records them (`row_file_name`). An index with this set's fingerprint is row for row;
    another is matched by name: a training row's name equals an index row's file name or ends it after a "/"
    (clip-retrieval records the path it embedded, often absolute, or the URL, and a webdataset sample's key
    alone, which stands for its "SHARD:KEY" row when no other shard holds that key)."""
    if rows_match(index, len(train_names)):
        return np.arange(len(train_names))
    by_name = {name: row for row, name in enumerate(train_names)}
    if len(by_name) < len(train_names):
        return None
    keys = [shard_key(name) for name in train_names]  # a webdataset sample also by its key alone, when unique
    unique_keys = {k for k, n in Counter(keys).items() if k is not None and n == 1 and k not in by_name}
    by_name.update({k: row for row, k in enumerate(keys) if k in unique_keys})
    mapping = np.full(len(index), -1, dtype=np.int64)
    for i, file_name in enumerate(index.file_names):
        parts = str(file_name).split("/")
        mapping[i] = next((by_name[s] for s in ("/".join(parts[k:]) for k in range(len(parts))) if s in by_name), -1)
    named = np.unique(mapping[mapping >= 0])
    return mapping if len(named) == len(train_names) else None


def embeddings_in_row_order(index: TrainingIndex, train_names: Sequence[str], where: str) -> torch.Tensor:
    """[N, d] the index's embedding of each training row (named `train_names`), in the training set's order; a
    MemtrainError naming `where` when the index does not name every row (`training_rows`)."""
    if rows_match(index, len(train_names)):
        return index.embeddings  # row for row (a built index): no copy of a large matrix
    mapping = training_rows(index, train_names)
    if mapping is None:
        raise MemtrainError(f"{where}: the index's rows cannot be matched to the data's {len(train_names)} rows (no "
                            "fingerprint of this data, and its file names do not name every row once); build the "
                            "index from this data with `memtrain index`")
    named = np.nonzero(mapping >= 0)[0]
    _, at = np.unique(mapping[named], return_index=True)  # rows 0..N-1 (each named), at their first index row
    return index.embeddings[torch.from_numpy(named[at])]
