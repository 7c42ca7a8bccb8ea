"""Thresholds calibrated on the user's own held-out images: the one mechanism behind every "copy" and
"memorized" verdict.

A verdict score (a distance to the nearest training image, a similarity, a detector score) is computed
for held-out items that were never trained on (the null) and, where available, for items that are copies
by construction (training images as the model's VAE reproduces them). The threshold is the order statistic
of the null scores that flags at most `fpr` of them (default 1%), the conformal rule of a one-sided
test: with n null scores it flags at most floor(fpr * n) of them, so with fewer than 1 / fpr held-out
items nothing closer than the closest held-out item is flagged. The record keeps the stated rate, the rate
reached on the held-out items, their number and the share of the positives the threshold recalls, so a
report can say how its verdict was reached. Without held-out items the verdict falls back to a published
constant and says so (`uncalibrated`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from trainer.io import MemtrainError

DEFAULT_FPR = 0.01


@dataclass(frozen=True)
class Calibration:
    """A threshold on one score and how it was chosen.

    `higher_is_copy`: True for similarities and detector scores (flag `score > threshold`), False for
    distances (flag `score < threshold`). `calibrated` is False for a published constant used without
    held-out data; then `fpr_*`, `n_heldout` and `recall` are None and `source` names the constant.
    """

    metric: str
    threshold: float
    higher_is_copy: bool
    calibrated: bool
    fpr_target: float | None = None
    fpr_heldout: float | None = None
    n_heldout: int = 0
    recall: float | None = None
    n_positive: int = 0
    source: str = ""

    def flags(self, scores) -> np.ndarray:
        """Boolean array: which scores are past the threshold (NaN never flags)."""
        s = np.asarray(scores, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return s > self.threshold if self.higher_is_copy else s < self.threshold

    def describe(self) -> str:
        """One line for the first lines of a report."""
        op = ">" if self.higher_is_copy else "<"
        rule = f"{self.metric} {op} {self.threshold:.4g}"
        if not self.calibrated:
            return f"{rule} (uncalibrated: {self.source}; pass held-out images to calibrate on your data)"
        recall = "" if self.recall is None else f", recalls {self.recall:.0%} of {self.n_positive} {self.source}"
        coarse = ""
        if self.n_heldout * self.fpr_target < 1:
            coarse = (f"; {self.n_heldout} held-out items cannot resolve {self.fpr_target:.1%}: the threshold is the "
                      f"closest of them, give at least {math.ceil(1 / self.fpr_target)} for the stated rate")
        return (f"{rule}, calibrated at {self.fpr_target:.1%} false positives on {self.n_heldout} held-out "
                f"items (reached {self.fpr_heldout:.1%}){recall}{coarse}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> Calibration:
        try:
            return cls(**d)
        except TypeError as e:
            raise MemtrainError(f"{where}: not a calibration record ({e}); recompute it") from None


def check_fpr(fpr: float, name: str = "--fpr") -> None:
    """One MemtrainError unless the false-positive rate is in (0, 1)."""
    if not 0.0 < fpr < 1.0:
        raise MemtrainError(f"{name} must be in (0, 1), got {fpr:g}")


def _finite(scores, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[~np.isnan(s)]
    if np.isinf(s).any():
        raise MemtrainError(f"{name}: infinite scores cannot be calibrated")
    return s


def calibrate(heldout_scores, metric: str, higher_is_copy: bool, fpr: float = DEFAULT_FPR,
              positive_scores=None, positive_name: str = "training images") -> Calibration:
    """The threshold flagging at most `fpr` of `heldout_scores` (never-trained items), with the share of
    `positive_scores` (copies by construction, e.g. training images through the VAE) it recalls."""
    check_fpr(fpr, "the false-positive rate")
    null = _finite(heldout_scores, f"{metric} held-out scores")
    if null.size == 0:
        raise MemtrainError(f"{metric}: no held-out scores to calibrate on (pass held-out images)")
    k = math.floor(fpr * null.size)  # at most k held-out items may be flagged
    ordered = np.sort(-null if higher_is_copy else null)
    threshold = float(-ordered[k] if higher_is_copy else ordered[k])
    cal = Calibration(metric, threshold, higher_is_copy, True, fpr, 0.0, int(null.size), None, 0, positive_name)
    reached = float(cal.flags(null).mean())
    recall, n_pos = None, 0
    if positive_scores is not None:
        pos = _finite(positive_scores, f"{metric} positive scores")
        if pos.size:
            recall, n_pos = float(cal.flags(pos).mean()), int(pos.size)
    return Calibration(metric, threshold, higher_is_copy, True, fpr, reached, int(null.size), recall, n_pos,
                       positive_name)


def uncalibrated(metric: str, threshold: float, higher_is_copy: bool, source: str) -> Calibration:
    """A published constant used as the threshold when no held-out items are available; `source` cites it."""
    return Calibration(metric, float(threshold), higher_is_copy, False, source=source)
