"""PNG figures (matplotlib, Agg canvas, no pyplot global state), each written atomically.

- `save_image_grid`: a grid of images with a title each (validation samples);
- `save_replication_grid`: (generated image, its nearest training image) pairs side by side;
- `save_roc_curves`: ROC curves of several detectors (optionally with a log-FPR panel);
- `save_score_histograms`: per detector, score histograms of each prompt group;
- `save_curves`: metric-over-training-steps curves.

Images are float tensors [N, C, H, W] in [0, 1] (C = 1 or 3); small images (32 x 32) are
upscaled by an integer factor with nearest-neighbour interpolation so their pixels stay visible.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.data import open_image
from trainer.io import MemtrainError, atomic_file

DPI = 100
MIN_DISPLAY_PX = 128  # images smaller than this are upscaled (nearest) to at least this size


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _to_display(images: torch.Tensor, name: str) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H', W', 3], upscaled by an integer factor (nearest)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise MemtrainError(f"{name}: expected an image tensor [N, C, H, W], got {shape}")
    if images.shape[1] not in (1, 3):
        raise MemtrainError(f"{name}: expected 1 or 3 channels, got {images.shape[1]}")
    x = images.detach().cpu().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    scale = max(1, math.ceil(MIN_DISPLAY_PX / max(1, min(x.shape[2], x.shape[3]))))
    if scale > 1 and x.shape[0]:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def _title(text: str, width: int = 32) -> str:
    lines = textwrap.wrap(str(text), width) or [""]
    return "\n".join(lines[:2]) + ("..." if len(lines) > 2 else "")


def _grid(n: int, ncols: int) -> tuple[int, int]:
    if ncols < 1:
        raise MemtrainError(f"ncols must be >= 1, got {ncols}")
    cols = min(ncols, n)
    return math.ceil(n / cols), cols


def _check_titles(titles: Sequence[str] | None, n: int, name: str) -> list[str]:
    if titles is None:
        return [""] * n
    titles = list(titles)
    if len(titles) != n:
        raise MemtrainError(f"{name}: {len(titles)} titles for {n} images; expected one per image")
    return [str(t) for t in titles]


def save_image_grid(
    path: str | Path, images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 4
) -> Path:
    """A grid of images, `ncols` per row, with an optional short title each."""
    arr = _to_display(images, "images")
    n = arr.shape[0]
    if n == 0:
        raise MemtrainError("save_image_grid: no images to plot")
    labels = _check_titles(titles, n, "save_image_grid")
    rows, cols = _grid(n, ncols)
    fig = _figure(2.2 * cols, 2.5 * rows)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], interpolation="nearest")
            ax.set_title(_title(labels[i]), fontsize=7)
    return _save(fig, path)


def save_replication_grid(
    path: str | Path,
    generated: torch.Tensor,
    nearest: torch.Tensor,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    caption: str = "",
) -> Path:
    """Pairs (generated image | its nearest training image) side by side, `ncols` pairs per row.

    `generated[i]` and `nearest[i]` share one panel, separated by a white gap, titled `titles[i]`
    (e.g. "duplicated  L2=0.031"); the figure title says which side is which, then `caption` (e.g. the
    copy verdict the titles apply).
    """
    gen = _to_display(generated, "generated")
    near = _to_display(nearest, "nearest")
    n = gen.shape[0]
    if n == 0:
        raise MemtrainError("save_replication_grid: no images to plot")
    if near.shape != gen.shape:
        raise MemtrainError(
            f"save_replication_grid: generated {tuple(generated.shape)} and nearest {tuple(nearest.shape)} "
            "must have the same shape (one nearest training image per generation)"
        )
    labels = _check_titles(titles, n, "save_replication_grid")
    gap = np.full((gen.shape[1], max(2, gen.shape[2] // 16), 3), 255, dtype=np.uint8)
    rows, cols = _grid(n, ncols)
    fig = _figure(3.6 * cols, 2.2 * rows + 0.4)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(np.concatenate([gen[i], gap, near[i]], axis=1), interpolation="nearest")
            ax.set_title(_title(labels[i], 44), fontsize=7)
    head = "left: generated   right: nearest training image"
    fig.suptitle(head + (f"\n{textwrap.fill(caption, 40 * cols)}" if caption else ""), fontsize=9)
    return _save(fig, path)


def save_roc_curves(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]],
    title: str = "ROC",
    log_x: bool = False,
) -> Path:
    """ROC curves, one per detector: `curves[name] = (fpr, tpr, auc)`.

    With `log_x`, a second panel shows the low-FPR region on a log axis (points at FPR 0 are not
    drawn there), the view the membership-inference literature reports TPR at 1% FPR from.
    """
    if not curves:
        raise MemtrainError("save_roc_curves: no curves to plot")
    panels = 2 if log_x else 1
    fig = _figure(5.0 * panels, 4.5)
    axes = [fig.add_subplot(1, panels, p + 1) for p in range(panels)]
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape:
            raise MemtrainError(f"save_roc_curves: {name}: {fpr.size} FPR values but {tpr.size} TPR values")
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name} (AUC={auc:.3f})")
    for ax in axes:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_xlim(0, 1)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, loc="lower right")
    if log_x:
        axes[1].set_xscale("log")
        axes[1].set_xlim(1e-3, 1)
        axes[1].axvline(0.01, color="grey", linestyle="--", linewidth=1)
        axes[1].set_title(f"{title} (log FPR)")
    fig.tight_layout()
    return _save(fig, path)


def save_score_histograms(
    path: str | Path,
    scores_by_group: Mapping[str, Mapping[str, Sequence[float]]],
    bins: int = 30,
    title: str | None = None,
) -> Path:
    """One subplot per detector; in each, a density histogram of the scores of every prompt group.

    `scores_by_group[detector][group]` is an array of scores; bins are shared within a subplot
    (NaN scores are dropped) so the groups are directly comparable.
    """
    if not scores_by_group:
        raise MemtrainError("save_score_histograms: no detectors to plot")
    n = len(scores_by_group)
    rows, cols = _grid(n, 3)
    fig = _figure(4.2 * cols, 3.3 * rows + (0.4 if title else 0))
    for i, (detector, groups) in enumerate(scores_by_group.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        clean = {}
        for group, vals in groups.items():
            v = np.asarray(
                vals.detach().cpu() if isinstance(vals, torch.Tensor) else vals, dtype=float
            ).ravel()
            v = v[np.isfinite(v)]
            if v.size:
                clean[group] = v
        if not clean:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        else:
            lo = min(float(v.min()) for v in clean.values())
            hi = max(float(v.max()) for v in clean.values())
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            for group, v in clean.items():
                ax.hist(v, bins=edges, density=True, alpha=0.5, label=f"{group} (n={v.size})")
            ax.legend(fontsize=7)
        ax.set_title(str(detector), fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel("density")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def save_curves(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    ylabel: str,
    xlabel: str = "training step",
    thresholds: Mapping[str, float] | None = None,
    log_y: bool = False,
) -> Path:
    """Line plot of metrics over training: `series[name] = (steps, values)`.

    `thresholds[label] = y` draws dashed horizontal reference lines (e.g. nL2 = 1.4).
    """
    if not series:
        raise MemtrainError("save_curves: no series to plot")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (steps, values) in series.items():
        x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
        if x.shape != y.shape:
            raise MemtrainError(f"save_curves: {name}: {x.size} steps but {y.size} values")
        ax.plot(x, y, marker="o", markersize=3, label=str(name))
    for label, y in (thresholds or {}).items():
        ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=str(label))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_groups(
    report: dict[str, Any],
    images: Sequence,
    names: Sequence[str],
    out: str | Path,
    max_groups: int = 8,
    max_members: int = 6,
) -> None:
    """A PNG grid: one row per image group (largest first), thumbnails of its first members."""
    groups = report["image_groups"][:max_groups]
    title = (
        f"{report['summary']['image_groups']} near-duplicate groups among {report['n']} images "
        f"({report['embedding']}, cos >= {report['threshold']})"
    )
    if not groups:
        fig = _figure(6, 1.5)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no near-duplicate groups found", ha="center", va="center")
    else:
        cols = max(min(max_members, g["size"]) for g in groups)
        fig = _figure(1.6 * cols + 0.6, 1.7 * len(groups))
        axes = fig.subplots(len(groups), cols, squeeze=False)
        for r, g in enumerate(groups):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= min(max_members, g["size"]):
                    ax.axis("off")
                    continue
                i = g["members"][c]
                im = open_image(images[i], names[i])
                im.thumbnail((128, 128))
                ax.imshow(np.asarray(im))
                ax.set_title(f"#{i}", fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{g['size']} images", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
