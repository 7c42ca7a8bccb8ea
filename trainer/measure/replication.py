"""Generation-based replication metrics: does a generated image copy a training image?

Implements L2, tiled L2 (<= 0.15) and nL2 (< 1.4) from Carlini et al., USENIX Security 2023,
"Extracting training data from diffusion models" (nL2 as used by AMG, Chen et al., CVPR 2024), the
memorization ratio NN1/NN2 < 1/3 (Gu et al. 2023, "On memorization in diffusion models"), the same
ratio on the images' gradients (memtrain's copy criterion, docs/methods.md) and the summaries of
Somepalli et al., CVPR 2023, "Diffusion art or digital forgery?". Images are [N, C, H, W]
in [0, 1], distances in float64 blocks. The training set must hold each picture once: pass
`unique_images(train)[0]`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from trainer.io import MemtrainError

DEFAULT_BLOCK = 256
TILED_L2_THRESHOLD = 0.15  # Carlini et al. 2023: extracted when tiled L2 <= 0.15
RATIO_THRESHOLD = 1 / 3  # Gu et al. 2023: memorized when NN1 / NN2 < 1/3
NL2_THRESHOLD = 1.4  # Carlini et al. 2023 / AMG: memorized when nL2 < 1.4


# ---------------------------------------------------------------- checks and helpers


def _check_images(x: torch.Tensor, name: str, allow_empty: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise MemtrainError(f"{name}: expected a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise MemtrainError(f"{name}: expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise MemtrainError(
            f"{name}: expected float images in [0, 1], got dtype {x.dtype} (divide uint8 by 255)"
        )
    if x.shape[0] == 0:
        if not allow_empty:
            raise MemtrainError(f"{name}: no images")
        return
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if not (lo >= -1e-4 and hi <= 1 + 1e-4):
        raise MemtrainError(
            f"{name}: pixel values must be in [0, 1], found range [{lo:.4g}, {hi:.4g}] "
            "(images in [-1, 1] need (x + 1) / 2; NaN is not allowed)"
        )


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    _check_images(a, names[0])
    _check_images(b, names[1])
    if a.shape[1:] != b.shape[1:]:
        raise MemtrainError(
            f"{names[0]} {tuple(a.shape[1:])} and {names[1]} {tuple(b.shape[1:])}: images must have the "
            "same channels and size (resize one set first)"
        )


def _tile_bounds(size: int, n: int) -> list[tuple[int, int]]:
    """`n` non-overlapping intervals covering [0, size); as `np.array_split`, the first `size % n`
    tiles are one pixel larger when `size` does not divide evenly."""
    if n < 1:
        raise MemtrainError(f"tiles_per_side must be >= 1, got {n}")
    if size < n:
        raise MemtrainError(f"cannot split {size} pixels into {n} tiles (tiles_per_side too large)")
    q, r = divmod(size, n)
    edges = [i * q + min(i, r) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _check_tiles(x: torch.Tensor, tiles_per_side: int) -> None:
    _tile_bounds(x.shape[2], tiles_per_side)
    _tile_bounds(x.shape[3], tiles_per_side)


def _tiles(x: torch.Tensor, tiles_per_side: int) -> list[torch.Tensor]:
    """Per tile, the flattened pixels [N, C * th * tw] in float64."""
    rows = _tile_bounds(x.shape[2], tiles_per_side)
    cols = _tile_bounds(x.shape[3], tiles_per_side)
    x = x.to(torch.float64)
    return [x[:, :, r0:r1, c0:c1].reshape(x.shape[0], -1) for r0, r1 in rows for c0, c1 in cols]


def _mean_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared distance [n, m] between rows of x [n, D] and y [m, D] (float64)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0) / x.shape[1]


# ---------------------------------------------------------------- distance matrices


def l2_matrix(a: torch.Tensor, b: torch.Tensor, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """L2 distance `sqrt(mean((a_i - b_j)^2))` for every pair: float32 [N, M] on a's device.

    Computed in float64, `block` rows of `a` x `block` rows of `b` at a time.
    """
    _check_pair(a, b)
    if block < 1:
        raise MemtrainError(f"block must be >= 1, got {block}")
    n, m = a.shape[0], b.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=a.device)
    for i in range(0, n, block):
        x = a[i : i + block].to(torch.float64).reshape(min(block, n - i), -1)
        for j in range(0, m, block):
            y = b[j : j + block].to(a.device, torch.float64).reshape(min(block, m - j), -1)
            out[i : i + block, j : j + block] = _mean_sq_dist(x, y).sqrt_()
    return out


def tiled_l2_matrix(
    a: torch.Tensor, b: torch.Tensor, tiles_per_side: int = 4, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Tiled L2 (Carlini et al. 2023) for every pair: float32 [N, M], max over tiles of the tile L2.

    The image is split into `tiles_per_side` x `tiles_per_side` non-overlapping tiles (16 tiles of
    128 px at 512 px, 8 px at 32 px); when the size does not divide evenly, the first tiles are one
    pixel larger (`np.array_split`). A generation is extracted when its tiled L2 is <= 0.15
    (`TILED_L2_THRESHOLD`).
    """
    _check_pair(a, b)
    if block < 1:
        raise MemtrainError(f"block must be >= 1, got {block}")
    _check_tiles(a, tiles_per_side)
    n, m = a.shape[0], b.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=a.device)
    for i in range(0, n, block):
        xt = _tiles(a[i : i + block], tiles_per_side)
        for j in range(0, m, block):
            yt = _tiles(b[j : j + block].to(a.device), tiles_per_side)
            worst = None
            for x, y in zip(xt, yt, strict=True):
                d = _mean_sq_dist(x, y)
                worst = d if worst is None else torch.maximum(worst, d)
            out[i : i + block, j : j + block] = worst.sqrt_()
    return out


def tiled_l2_pairs(
    a: torch.Tensor, b: torch.Tensor, tiles_per_side: int = 4, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Tiled L2 between a[i] and b[i] (same N): float32 [N]. See `tiled_l2_matrix`."""
    _check_pair(a, b)
    if a.shape[0] != b.shape[0]:
        raise MemtrainError(f"tiled_l2_pairs: {a.shape[0]} vs {b.shape[0]} images; expected the same number")
    rows = _tile_bounds(a.shape[2], tiles_per_side)
    cols = _tile_bounds(a.shape[3], tiles_per_side)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for i in range(0, a.shape[0], block):
        diff = a[i : i + block].to(torch.float64) - b[i : i + block].to(a.device, torch.float64)
        sq = diff * diff
        per_tile = torch.stack(
            [sq[:, :, r0:r1, c0:c1].mean(dim=(1, 2, 3)) for r0, r1 in rows for c0, c1 in cols], dim=1
        )
        out[i : i + block] = per_tile.amax(1).sqrt()
    return out


def image_gradients(images: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical finite differences as one image in [0, 1]: [N, 2C, H - 1, W - 1].

    `(d + 1) / 2` of each difference d in [-1, 1], so every distance function here applies; a distance
    between gradient images is half the distance between the differences, and their ratio is unchanged.
    A copy reproduces where a training image's edges and textures lie; a related image (another crop of
    the scene, a recoloured background) shares colours and layout, not the positions of its edges."""
    _check_images(images, "images")
    dy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    dx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    return (torch.cat([dy, dx], 1) + 1) / 2


def _nearest(generated: torch.Tensor, train: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest L2 distances from each generation to `train` and their indices (float64, long)."""
    g, dev = generated.shape[0], generated.device
    values = torch.empty((g, k), dtype=torch.float64, device=dev)
    index = torch.empty((g, k), dtype=torch.long, device=dev)
    for i in range(0, g, block):
        d = l2_matrix(generated[i : i + block], train, block=block).to(torch.float64)
        values[i : i + block], index[i : i + block] = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return values, index


# ---------------------------------------------------------------- deduplication


def unique_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove exact duplicates (all pixel values equal): `(unique [U, C, H, W], inverse [N] long)`.

    `unique` keeps first occurrences in their original order and `images[i] == unique[inverse[i]]`.
    Call this on the training set before `replication_metrics`, so that a picture's second copy is
    never its own second nearest neighbour (which would make the Gu et al. ratio 1 and dilute nL2);
    `inverse` maps a unique index back to the training rows, e.g. `(inverse == nn).nonzero()`.
    """
    _check_images(images, "images")
    n = images.shape[0]
    if n == 0:
        return images.clone(), torch.empty(0, dtype=torch.long, device=images.device)
    flat = images.reshape(n, -1)
    _, inv = torch.unique(flat, dim=0, return_inverse=True)
    n_groups = int(inv.max()) + 1
    first = torch.full((n_groups,), n, dtype=torch.long, device=images.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=images.device), reduce="amin")
    order = torch.argsort(first)  # groups by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_groups, device=images.device)
    return images[first[order]].clone(), rank[inv]


# ---------------------------------------------------------------- per-generation metrics


def replication_metrics(
    generated: torch.Tensor,
    train: torch.Tensor,
    k: int = 50,
    alpha: float = 0.5,
    tiles_per_side: int = 4,
    tiled_threshold: float = TILED_L2_THRESHOLD,
    ratio_threshold: float = RATIO_THRESHOLD,
    nl2_threshold: float = NL2_THRESHOLD,
    block: int = DEFAULT_BLOCK,
) -> dict[str, torch.Tensor]:
    """Nearest-training-image metrics for each generation; `train` must be deduplicated.

    Pass UNIQUE training images (`unique_images(train)[0]`): with exact duplicates the second
    nearest neighbour is the same picture and the ratio / nL2 criteria break (a warning is issued
    when an NN2 distance of 0 is seen). Returns, per generation (tensors of length G):

    - `nn_index` (long): index into `train` of the nearest image by L2;
    - `l2`: its L2; `l2_second`: L2 to the second nearest (NaN with one training image);
    - `ratio`: `l2 / l2_second` (Gu et al. 2023; NaN when undefined);
    - `tiled_l2`: tiled L2 to the L2-nearest image (Carlini et al. 2023);
    - `knn_mean_l2`: mean L2 over the k nearest (k clipped to the number of training images);
    - `nl2`: `l2 / (alpha * knn_mean_l2)` (Carlini et al. 2023; AMG, Chen et al. 2024);
    - `gradient_ratio`, `gradient_nn_index`: the NN1/NN2 ratio and nearest image between the
      `image_gradients` of generation and training images (memtrain's copy criterion);
    - flags (bool): `ratio_memorized` (ratio < 1/3), `tiled_extracted` (tiled_l2 <= 0.15),
      `nl2_memorized` (nl2 < 1.4). NaN values never flag.
    """
    _check_pair(generated, train, ("generated", "train"))
    _check_images(train, "train", allow_empty=False)
    if k < 1:
        raise MemtrainError(f"k must be >= 1, got {k}")
    if not alpha > 0:
        raise MemtrainError(f"alpha must be > 0, got {alpha}")
    _check_tiles(train, tiles_per_side)
    g, m = generated.shape[0], train.shape[0]
    kk = min(max(k, 2), m)  # NN2 needs two neighbours even when k == 1
    k_eff = min(k, m)
    dev = generated.device
    values, index = _nearest(generated, train, kk, block)
    if m >= 2 and train.shape[2] > 1 and train.shape[3] > 1:
        grad_values, grad_index = _nearest(image_gradients(generated), image_gradients(train), 2, block)
        gradient_ratio = torch.where(grad_values[:, 1] > 0, grad_values[:, 0] / grad_values[:, 1], float("nan"))
        gradient_nn = grad_index[:, 0]
    else:  # a single training image or 1-pixel images: no second neighbour or no gradient
        gradient_ratio = torch.full((g,), float("nan"), dtype=torch.float64, device=dev)
        gradient_nn = index[:, 0]

    nan = torch.full((g,), float("nan"), dtype=torch.float64, device=dev)
    l2 = values[:, 0]
    second = values[:, 1] if m >= 2 else nan
    if m >= 2 and bool((second == 0).any()):
        warnings.warn(
            "replication_metrics: a second-nearest L2 of 0 means the training set holds exact "
            "duplicates; pass unique_images(train)[0]",
            stacklevel=2,
        )
    ratio = torch.where(second > 0, l2 / second, nan)
    knn_mean = values[:, :k_eff].mean(1)
    denom = alpha * knn_mean
    nl2 = torch.where(denom > 0, l2 / denom, nan)
    nn = index[:, 0]
    tiled = (
        tiled_l2_pairs(generated, train[nn.to(train.device)], tiles_per_side, block=block)
        if g
        else torch.empty(0, dtype=torch.float32, device=dev)
    )

    return {
        "nn_index": nn,
        "l2": l2.float(),
        "l2_second": second.float(),
        "ratio": ratio.float(),
        "tiled_l2": tiled,
        "knn_mean_l2": knn_mean.float(),
        "nl2": nl2.float(),
        "gradient_ratio": gradient_ratio.float(),
        "gradient_nn_index": gradient_nn,
        "ratio_memorized": ratio < ratio_threshold,
        "tiled_extracted": tiled <= tiled_threshold,
        "nl2_memorized": nl2 < nl2_threshold,
    }


# ---------------------------------------------------------------- summaries


def summarize_replication(
    values: torch.Tensor | np.ndarray | Sequence[float],
    threshold: float,
    higher_is_replication: bool,
    inclusive: bool = False,
) -> dict[str, float]:
    """Summary of one per-generation metric: the MemBench / Somepalli et al. / AMG convention.

    Returns `n` (finite values used; NaNs are dropped and counted in `n_nan`), `mean`, `min`,
    `p5`, `p95`, `max` (plain percentiles, linear interpolation), `threshold`, and `fraction`:
    the share of generations past the threshold in the replication direction (`> threshold` when
    higher is replication, e.g. SSCD > 0.5; `< threshold` otherwise, e.g. nL2 < 1.4;
    `inclusive=True` makes it `>=` / `<=`, e.g. tiled L2 <= 0.15). For a metric where lower is
    replication (L2, tiled L2, ratio, nL2), `p5` and `min` are the worst-case tail that `p95` and
    `max` are for a similarity.
    """
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().double().numpy().ravel()
    else:
        arr = np.asarray(values, dtype=np.float64).ravel()
    finite = arr[~np.isnan(arr)]
    if finite.size == 0:
        raise MemtrainError(
            f"summarize_replication: no values to summarize ({arr.size} given, all NaN or empty)"
        )
    if higher_is_replication:
        past = finite >= threshold if inclusive else finite > threshold
    else:
        past = finite <= threshold if inclusive else finite < threshold
    return {
        "n": int(finite.size),
        "n_nan": int(arr.size - finite.size),
        "mean": float(finite.mean()),
        "min": float(finite.min()),
        "p5": float(np.percentile(finite, 5)),
        "p95": float(np.percentile(finite, 95)),
        "max": float(finite.max()),
        "threshold": float(threshold),
        "fraction": float(past.mean()),
    }


SSCD_THRESHOLD = 0.5


def group_summary(ratio, ratio_vs_originals, tiled_l2, nl2, l2, own=None,
                  threshold: float = RATIO_THRESHOLD) -> dict:
    """The one replication summary of a group of generations (per-generation arrays from
    `replication_metrics`): replicated when the NN1/NN2 ratio < `threshold` (Gu et al.'s 1/3 by
    default), beside the ratio < 1/3 rate, tiled L2 <= 0.15 (Carlini et al.), nL2 < 1.4 (AMG), the
    similarity 1 - ratio, L2 quantiles and, when `own` is given, how often the nearest training image is
    the prompt's own."""
    ratio = np.asarray(ratio, dtype=np.float64)
    similarity = summarize_replication(1.0 - ratio, 1 - threshold, higher_is_replication=True)
    l2 = np.asarray(l2, dtype=np.float64)
    return {
        "generations": len(ratio),
        "threshold": float(threshold),
        "fraction_replicated": summarize_replication(ratio, threshold, False)["fraction"],
        "fraction_replicated_vs_originals": summarize_replication(ratio_vs_originals, threshold, False)["fraction"],
        "fraction_ratio_1_3": summarize_replication(ratio, RATIO_THRESHOLD, False)["fraction"],
        "fraction_tiled_l2": summarize_replication(tiled_l2, TILED_L2_THRESHOLD, False, inclusive=True)["fraction"],
        "fraction_nl2": summarize_replication(nl2, NL2_THRESHOLD, False)["fraction"],
        "similarity_p95": similarity["p95"], "similarity_max": similarity["max"], "similarity_mean": similarity["mean"],
        "l2_median": float(np.median(l2)), "l2_p5": float(np.percentile(l2, 5)),
        "ratio_median": float(np.median(ratio)),
        "nearest_is_own_image": float(np.mean(own)) if own is not None and len(own) else None,
    }


@torch.no_grad()
def vae_roundtrip(pipe, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """decode(encode(x)) with the posterior mean, images in [0, 1] -> [0, 1]."""
    vae = pipe.vae
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(vae.device, vae.dtype) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)
