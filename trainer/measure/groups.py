"""Groups of rows: connected components of linked pairs, and rows that share a caption (exact or
normalized). Caption-duplicate grouping follows Chen et al., CVPR 2024, "Towards memorization-free
diffusion models" (duplicated captions act as keys to duplicated images); `mitigate.dedup` groups
near-duplicate images with the same components, `measure.index` marks duplicated-caption rows.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The connected-component label of each of `n` rows, given linked pairs (i[k], j[k])."""
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def groups_from_labels(labels: np.ndarray) -> list[list[int]]:
    """Components of two or more rows, members ascending, largest group first."""
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    groups = [g.tolist() for g in np.split(order, np.cumsum(counts)[:-1]) if len(g) >= 2]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


_PUNCT = set(string.punctuation)


def normalize_caption(text: str) -> str:
    """NFKC, lowercase, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    return re.sub(r"\s+", " ", text).strip()


def _key_groups(keys_per_row: list[list[str]]) -> list[list[int]]:
    first: dict[str, int] = {}
    ii, jj = [], []
    for row, keys in enumerate(keys_per_row):
        for key in keys:
            if key in first:
                ii.append(first[key])
                jj.append(row)
            else:
                first[key] = row
    if not ii:
        return []
    return groups_from_labels(components(len(keys_per_row), np.array(ii), np.array(jj)))


def caption_groups(captions: Sequence[str | Sequence[str]]) -> dict[str, list[list[int]]]:
    """Rows sharing any caption: `exact` (identical strings) and `normalized` (see normalize_caption)."""
    rows = [[c] if isinstance(c, str) else list(c) for c in captions]
    return {
        "exact": _key_groups([sorted(set(r)) for r in rows]),
        "normalized": _key_groups([sorted({normalize_caption(c) for c in r}) for r in rows]),
    }
