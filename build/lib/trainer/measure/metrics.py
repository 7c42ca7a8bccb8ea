"""Detection metrics (scikit-learn): AUROC, TPR at a fixed FPR, and ROC points for plotting.

Convention everywhere: a higher score means positive (memorized prompt / training member), and
labels are 1 (or True) for positives, 0 (or False) for negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from trainer.io import MemtrainError

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x).ravel()


def _check(scores: ArrayLike, labels: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores).astype(np.float64)
    y = _as_numpy(labels)
    if s.shape != y.shape:
        raise MemtrainError(f"{what}: {s.size} scores but {y.size} labels; expected one label per score")
    if s.size == 0:
        raise MemtrainError(f"{what} is undefined: no scores given")
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))[:5].tolist()
        raise MemtrainError(f"{what}: scores must be finite; NaN/inf at positions {bad}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    else:
        yf = y.astype(np.float64)
        if not np.isin(yf, (0.0, 1.0)).all():
            raise MemtrainError(
                f"{what}: labels must be 0/1 (or bool), got values {np.unique(y)[:10].tolist()}"
            )
        y = yf.astype(np.int64)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise MemtrainError(f"{what} is undefined: labels contain no positives (all {y.size} are 0)")
    if n_pos == y.size:
        raise MemtrainError(f"{what} is undefined: labels contain no negatives (all {y.size} are 1)")
    return s, y


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half). Raises MemtrainError without both classes."""
    s, y = _check(scores, labels, "AUROC")
    return float(roc_auc_score(y, s))


def roc_points(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """`(fpr, tpr)` of the full ROC curve, starting at (0, 0) and ending at (1, 1), every threshold kept."""
    s, y = _check(scores, labels, "ROC curve")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float = 0.01) -> float:
    """TPR at a fixed FPR (default 1%), interpolation-free.

    Convention (as in the membership-inference literature, e.g. Carlini et al. 2022 "Membership
    inference attacks from first principles"): the TPR of the last ROC point whose FPR is <= the
    target, i.e. the best TPR any score threshold reaches while its FPR does not exceed `fpr`.
    No interpolation between ROC points. With few negatives the achievable FPRs are coarse (e.g.
    with 50 negatives the smallest non-zero FPR is 2%, so TPR at 1% FPR is the TPR at 0% FPR).
    """
    if not 0.0 <= fpr <= 1.0:
        raise MemtrainError(f"tpr_at_fpr: target FPR must be in [0, 1], got {fpr}")
    s, y = _check(scores, labels, f"TPR at {fpr:g} FPR")
    f, t, _ = roc_curve(y, s, drop_intermediate=False)
    ok = np.flatnonzero(f <= fpr + 1e-12)
    return float(t[ok[-1]])  # f[0] == 0, so ok is never empty
