"""De-duplication of an image-caption training set: near-duplicate image groups, caption duplicates,
and the `drop` / `reweight` training policies.

Implements image de-duplication by embedding cosine similarity and connected components (Webster et
al., arXiv 2023, "On the de-duplication of LAION-2B"), SemDeDup's within-cluster search (Abbas et al.,
arXiv 2023, "SemDeDup: Data-efficient learning at web-scale through semantic deduplication") and
the same within-cluster search over the inverted lists of a faiss index (each image in its `probe`
nearest lists, so memory is bounded by a list, not by N^2), caption-duplicate grouping (Chen et al., CVPR 2024, "Towards memorization-free diffusion models":
duplicated captions act as keys to duplicated images). Embeddings (`pixels`, `phash`, `clip`,
`sscd`), thresholds and policies: docs/methods.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from tqdm.auto import tqdm

from trainer.data import Rows
from trainer.io import MemtrainError
from trainer.measure import ann
from trainer.measure.features import default_names, embed_images
from trainer.measure.groups import caption_groups, components, groups_from_labels, normalize_caption

DEFAULT_THRESHOLD = 0.95
PHASH_THRESHOLD = 0.875  # <= 4 of 64 bits differ
_COMPRESS_EDGES = 1_000_000


def default_threshold(embedding: str) -> float:
    return PHASH_THRESHOLD if embedding == "phash" else DEFAULT_THRESHOLD


# ---------------------------------------------------------------- near-duplicate search


def _spanning_edges(n: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (root, member) with the same connected components as (i, j); at most n - 1 of them."""
    labels = components(n, i, j)
    nodes = np.unique(np.concatenate([i, j]))
    roots = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(roots, labels[nodes], nodes)
    r = roots[labels[nodes]]
    keep = r != nodes
    return r[keep], nodes[keep]


def _exact_links(emb: torch.Tensor, threshold: float, block: int, progress: bool, desc: str):
    n = emb.shape[0]
    nb = math.ceil(n / block)
    ii: list[np.ndarray] = []
    jj: list[np.ndarray] = []
    stored = n_pairs = 0
    with tqdm(total=nb * (nb + 1) // 2, desc=desc, disable=not progress, unit="block") as pbar:
        for r0 in range(0, n, block):
            a = emb[r0 : r0 + block]
            for c0 in range(r0, n, block):
                sim = a @ emb[c0 : c0 + block].T
                mask = sim >= threshold
                if c0 == r0:
                    mask = torch.triu(mask, diagonal=1)
                idx = mask.nonzero()
                if len(idx):
                    ii.append(idx[:, 0].numpy().astype(np.int64) + r0)
                    jj.append(idx[:, 1].numpy().astype(np.int64) + c0)
                    n_pairs += len(idx)
                    stored += len(idx)
                    if stored > _COMPRESS_EDGES:
                        i, j = _spanning_edges(n, np.concatenate(ii), np.concatenate(jj))
                        ii, jj, stored = [i], [j], len(i)
                pbar.update(1)
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    return np.concatenate(ii), np.concatenate(jj), n_pairs


def _list_links(emb: torch.Tensor, lists: Sequence[np.ndarray], threshold: float, block: int, progress: bool):
    """Linked pairs within each list of rows (SemDeDup's clusters, an IVF index's inverted lists): (i, j, count)."""
    ii, jj = [], []
    for members in tqdm(lists, desc="lists", disable=not progress, unit="list"):
        if len(members) < 2:
            continue
        members = np.sort(members)
        rows = emb[torch.from_numpy(members)].float()
        mi, mj, _ = _exact_links(torch.nn.functional.normalize(rows, dim=1), threshold, block, False, "")
        ii.append(members[mi])
        jj.append(members[mj])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    pairs = np.unique(np.stack([np.concatenate(ii), np.concatenate(jj)], axis=1), axis=0)  # a pair in two lists
    return pairs[:, 0], pairs[:, 1], len(pairs)


def ivf_lists(emb: torch.Tensor, lists: int | None = None, probe: int = 2, seed: int = 0, quantizer=None,
              progress: bool = False) -> list[np.ndarray]:
    """Rows of each inverted list: every row goes to its `probe` nearest centroids, those of `quantizer` (a
    faiss IVF index's coarse quantizer) or of faiss k-means with `lists` centroids (default `ann.n_lists`)."""
    if ann.faiss is None:
        raise MemtrainError("--search index needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)")
    n, d = emb.shape
    if quantizer is None:
        k = min(n, lists or ann.n_lists(n))
        sample = np.sort(np.random.default_rng(seed).choice(n, min(n, 64 * k), replace=False))
        kmeans = ann.faiss.Kmeans(d, k, niter=10, seed=seed, spherical=True)
        kmeans.train(np.ascontiguousarray(emb[torch.from_numpy(sample)].float().numpy()))
        quantizer = kmeans.index
    probe = min(probe, quantizer.ntotal)
    assign = np.empty((n, probe), dtype=np.int64)
    for start in tqdm(range(0, n, 65536), desc="assign", disable=not progress, leave=False):
        rows = np.ascontiguousarray(torch.nn.functional.normalize(emb[start : start + 65536].float(), dim=1).numpy())
        assign[start : start + len(rows)] = quantizer.search(rows, probe)[1]
    flat = assign.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.flatnonzero(np.diff(flat[order])) + 1
    return [order_part // probe for order_part in np.split(order, bounds)]


def near_duplicate_groups(
    embeddings: np.ndarray | torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    search: str = "exact",
    block: int = 4096,
    clusters: int | None = None,
    seed: int = 0,
    progress: bool = False,
    probe: int = 2,
    quantizer=None,
) -> tuple[list[list[int]], int]:
    """Groups (connected components of cos >= threshold, size >= 2, members ascending; largest group
    first) and the number of linked pairs. Rows are L2-normalised here. search: exact (all pairs, in
    blocks), semdedup (pairs within k-means clusters) or index (pairs within the inverted lists of
    `ivf_lists`, each row in its `probe` nearest; `clusters` lists, or those of `quantizer`)."""
    if not -1.0 <= threshold <= 1.0:
        raise MemtrainError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if search not in ("exact", "semdedup", "index"):
        raise MemtrainError(f"unknown search {search!r}; choose exact, semdedup or index")
    emb = embeddings if torch.is_tensor(embeddings) else torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    emb = emb.reshape(len(emb), -1)
    n = emb.shape[0]
    if n < 2:
        return [], 0
    if search == "index":  # rows are normalised list by list: the [N, d] matrix may be a memory map
        i, j, n_pairs = _list_links(emb, ivf_lists(emb, clusters, probe, seed, quantizer, progress), threshold,
                                    block, progress)
        return (groups_from_labels(components(n, i, j)) if len(i) else []), n_pairs
    emb = torch.nn.functional.normalize(emb.float(), dim=1).contiguous()
    if search == "exact":
        i, j, n_pairs = _exact_links(emb, threshold, block, progress, "pairs")
    else:
        k = min(n, clusters or max(1, round(math.sqrt(n))))
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096)
        assign = km.fit_predict(emb.numpy())
        order = np.argsort(assign, kind="stable")
        bounds = np.flatnonzero(np.diff(assign[order])) + 1
        i, j, n_pairs = _list_links(emb, np.split(order, bounds), threshold, block, progress)
    if not len(i):
        return [], n_pairs
    return groups_from_labels(components(n, i, j)), n_pairs


# ---------------------------------------------------------------- policies


def dedup_weights(groups: Sequence[Sequence[int]], n: int, policy: str) -> np.ndarray:
    """`drop`: bool keep mask (first member of each group kept). `reweight`: float64 sampling weights,
    1/m for each member of a group of m (each group sums to 1), 1 for every other row."""
    if policy not in ("drop", "reweight"):
        raise MemtrainError(f"unknown de-duplication policy {policy!r}; choose drop or reweight")
    seen = np.zeros(n, dtype=bool)
    for g in groups:
        for i in g:
            if not 0 <= i < n:
                raise MemtrainError(f"de-duplication group index {i} is outside 0..{n - 1}")
            if seen[i]:
                raise MemtrainError(f"row {i} is in two de-duplication groups; groups must be disjoint")
            seen[i] = True
    if policy == "drop":
        keep = np.ones(n, dtype=bool)
        for g in groups:
            keep[sorted(g)[1:]] = False
        return keep
    weights = np.ones(n, dtype=np.float64)
    for g in groups:
        weights[list(g)] = 1.0 / len(g)
    return weights


def row_groups(rows, threshold: float = DEFAULT_THRESHOLD, progress: bool = True) -> list[list[int]]:
    """Near-duplicate groups of training rows (`data.Rows`) on the `pixels` embedding: what the
    training-time policies (and the monitor's distinct-member probe) group by."""
    emb = embed_images(rows.images, rows.names, "pixels", progress=progress)
    return near_duplicate_groups(emb, threshold)[0]


def apply_dedup_policy(rows, policy: str, threshold: float = DEFAULT_THRESHOLD, progress: bool = True):
    """For training: (rows, None) with the extra copies dropped, or (rows, weights) for `reweight`
    (a float64 tensor for the epoch sampler). Uses the `pixels` embedding."""
    if policy == "none":
        return rows, None
    result = dedup_weights(row_groups(rows, threshold, progress), len(rows.images), policy)
    if policy == "reweight":
        return rows, torch.from_numpy(result)
    keep = np.flatnonzero(result).tolist()
    return Rows(
        [rows.images[i] for i in keep],
        [rows.captions[i] for i in keep],
        rows.source,
        [rows.names[i] for i in keep],
    ), None


def exposure(rows, policy: str, samples: int, threshold: float = DEFAULT_THRESHOLD, progress: bool = False) -> dict:
    """How often a training run draws each distinct image (a near-duplicate group or a lone row): `samples`
    draws (optimizer steps x global batch) over the rows the `policy` trains on, each drawn with its
    sampling probability (uniform over the kept rows; `reweight`'s weights). De-duplication spends the same
    steps on fewer rows, so each distinct image is seen more often: `views_median` is what a typical
    (lone) image sees, `epochs` the passes over the trained rows."""
    n = len(rows.images)
    groups = row_groups(rows, threshold, progress) if n > 1 else []
    distinct = np.arange(n)
    for g in groups:
        distinct[list(g)] = min(g)
    if policy == "none":
        weight = np.ones(n)
    else:
        weight = dedup_weights(groups, n, policy).astype(np.float64)
    views = float(samples) * np.bincount(np.unique(distinct, return_inverse=True)[1], weights=weight / weight.sum())
    trained_rows = int(np.count_nonzero(weight)) if policy != "reweight" else n
    return {"samples": int(samples), "trained_rows": trained_rows, "distinct_images": int(len(views)),
            "epochs": float(samples) / trained_rows, "views_median": float(np.median(views)),
            "views_max": float(views.max()), "policy": policy}


# ---------------------------------------------------------------- report


def _image_group(g: list[int], embeddings, names: list[str], caption_of, max_examples: int) -> dict:
    """One near-duplicate group: its members, the least similar member's cosine to the first, examples."""
    rows = torch.as_tensor(np.asarray(embeddings[g], dtype=np.float32)).reshape(len(g), -1)
    rows = torch.nn.functional.normalize(rows, dim=1).numpy()
    sims = rows @ rows[0]
    return dict(size=len(g), representative=g[0], members=g,
                min_similarity_to_representative=round(float(sims[1:].min()), 4),
                examples=[dict(index=i, name=names[i], caption=caption_of(i)) for i in g[:max_examples]])


def dedup_report(
    images_or_paths: Sequence,
    captions: Sequence[str | Sequence[str]] | None = None,
    threshold: float | None = None,
    embedding: str = "pixels",
    clip: str | Path | None = None,
    sscd: str | Path | None = None,
    names: Sequence[str] | None = None,
    search: str = "exact",
    clusters: int | None = None,
    embeddings: np.ndarray | None = None,
    batch_size: int = 32,
    device: str | None = None,
    max_examples: int = 5,
    progress: bool = True,
    probe: int = 2,
    quantizer=None,
) -> dict[str, Any]:
    """Image near-duplicate groups and caption duplicate groups, with sizes, similarities and examples.

    `embeddings` (n, d) skips the embedding step. Group members are row indices (0-based).
    """
    n = len(images_or_paths) if embeddings is None else len(embeddings)
    if captions is not None and len(captions) != n:
        raise MemtrainError(f"{len(captions)} captions for {n} images")
    names = list(names) if names is not None else default_names(images_or_paths)
    threshold = default_threshold(embedding) if threshold is None else float(threshold)
    t0 = time.perf_counter()
    if embeddings is None:
        embeddings = embed_images(
            images_or_paths,
            names,
            embedding,
            clip=clip,
            sscd=sscd,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    t1 = time.perf_counter()
    groups, n_pairs = near_duplicate_groups(
        embeddings, threshold, search=search, clusters=clusters, progress=progress, probe=probe, quantizer=quantizer
    )
    t2 = time.perf_counter()

    def caption_of(i: int):
        if captions is None:
            return None
        return captions[i] if isinstance(captions[i], str) else list(captions[i])

    image_groups = [_image_group(g, embeddings, names, caption_of, max_examples) for g in groups]
    in_groups = sum(len(g) for g in groups)
    report: dict[str, Any] = dict(
        n=n,
        embedding=embedding,
        threshold=threshold,
        search=search,
        summary=dict(
            image_groups=len(groups),
            images_in_groups=in_groups,
            duplicates_to_drop=in_groups - len(groups),
            duplicate_fraction=round((in_groups - len(groups)) / n, 4) if n else 0.0,
            linked_pairs=n_pairs,
            largest_group=len(groups[0]) if groups else 0,
        ),
        image_groups=image_groups,
        timing_s=dict(embed=round(t1 - t0, 3), search=round(t2 - t1, 3)),
    )
    if captions is not None:
        cap = caption_groups(captions)
        for kind in ("exact", "normalized"):
            entries = []
            for g in cap[kind]:
                first = caption_of(g[0])
                text = first if isinstance(first, str) else first[0]
                entries.append(
                    dict(
                        size=len(g),
                        members=g,
                        text=text if kind == "exact" else normalize_caption(text),
                        examples=[
                            dict(index=i, name=names[i], caption=caption_of(i)) for i in g[:max_examples]
                        ],
                    )
                )
            report[f"caption_groups_{kind}"] = entries
        report["summary"]["caption_groups_exact"] = len(cap["exact"])
        report["summary"]["caption_groups_normalized"] = len(cap["normalized"])
    return report
