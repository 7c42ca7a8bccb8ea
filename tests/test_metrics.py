import numpy as np
import pytest
import torch

from trainer.io import MemtrainError
from trainer.measure.metrics import auroc, roc_points, tpr_at_fpr


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def sweep_tpr_at_fpr(scores, labels, target):
    """Brute force: every threshold `score >= t`, best TPR with FPR <= target."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    best = 0.0
    for t in np.append(np.unique(scores), np.inf):
        pred = scores >= t
        fpr = (pred & ~labels).sum() / (~labels).sum()
        tpr = (pred & labels).sum() / labels.sum()
        if fpr <= target:
            best = max(best, tpr)
    return best


def test_auroc_hand_example():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0  # higher score = positive
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # ties count one half


def test_auroc_matches_pairwise_count_with_ties_and_tensors():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.integers(0, 2, 40)
    ref = pairwise_auc(scores, labels)
    assert auroc(scores, labels) == pytest.approx(ref)
    assert auroc(torch.tensor(scores), torch.tensor(labels.astype(bool))) == pytest.approx(ref)


def test_tpr_at_fpr_is_interpolation_free():
    neg = list(range(10))  # FPR moves in steps of 0.1
    pos = [9.5, 8.5, 7.5, 0.5]
    scores, labels = neg + pos, [0] * 10 + [1] * 4
    # (0, 0.25) after 9.5; (0.1, 0.5) after 9 and 8.5: at FPR 5% the answer is the FPR-0 point,
    # not the 0.375 a linear interpolation would give
    assert tpr_at_fpr(scores, labels, fpr=0.05) == 0.25
    assert tpr_at_fpr(scores, labels, fpr=0.1) == 0.5  # a point exactly at the target counts
    assert tpr_at_fpr(scores, labels, fpr=0.0) == 0.25
    assert tpr_at_fpr(scores, labels, fpr=1.0) == 1.0


def test_tpr_at_1pct_fpr():
    neg = list(range(100))
    pos = [99.5, 98.5, 97.5, 50]
    scores, labels = neg + pos, [0] * 100 + [1] * 4
    assert tpr_at_fpr(scores, labels) == 0.5  # threshold 98.5: one false positive in 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tpr_at_fpr_matches_threshold_sweep(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: ties across classes
    for target in (0.0, 0.01, 0.05, 0.3):
        assert tpr_at_fpr(scores, labels, fpr=target) == pytest.approx(
            sweep_tpr_at_fpr(scores, labels, target)
        )


def test_roc_points():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50) + labels
    fpr, tpr = roc_points(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(auroc(scores, labels))


def test_undefined_and_invalid_inputs():
    with pytest.raises(MemtrainError, match="AUROC is undefined: labels contain no negatives"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(MemtrainError, match="AUROC is undefined: labels contain no positives"):
        auroc([0.1, 0.2], [0, 0])
    with pytest.raises(MemtrainError, match="undefined: labels contain no positives"):
        tpr_at_fpr([0.1, 0.2], [False, False])
    with pytest.raises(MemtrainError, match="undefined"):
        roc_points([0.1, 0.2], [1, 1])
    with pytest.raises(MemtrainError, match="undefined"):
        auroc([], [])
    with pytest.raises(MemtrainError, match="3 scores but 2 labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(MemtrainError, match="finite"):
        auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(MemtrainError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(MemtrainError, match="target FPR"):
        tpr_at_fpr([0.1, 0.2], [0, 1], fpr=1.5)
