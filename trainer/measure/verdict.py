"""The copy verdict: which generations are copies of a training image, by one score thresholded at a
false-positive rate calibrated on held-out images (`trainer.measure.calibration`). The default score is the
NN1/NN2 ratio of the image gradients (memtrain's criterion; Gu et al. 2023's ratio on pixels, L2 and SSCD
similarity are the alternatives); docs/methods.md, "Calibration"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR, Calibration, calibrate, uncalibrated
from trainer.measure.features import sscd_similarity
from trainer.measure.replication import (
    RATIO_THRESHOLD,
    SSCD_THRESHOLD,
    group_summary,
    replication_metrics,
    summarize_replication,
)

# The verdict's scores, by the name a Calibration carries: (per-generation key, higher is a copy).
L2_METRIC = "L2 to the nearest training image"
RATIO_METRIC = "NN1/NN2 L2 ratio"
GRADIENT_METRIC = "NN1/NN2 L2 ratio of the image gradients"
SSCD_METRIC = "SSCD similarity to the nearest training image"
VERDICT_METRICS = {GRADIENT_METRIC: ("gradient_ratio", False), L2_METRIC: ("l2", False),
                   RATIO_METRIC: ("ratio", False), SSCD_METRIC: ("sscd", True)}
CRITERIA = {"gradient": GRADIENT_METRIC, "l2": L2_METRIC, "ratio": RATIO_METRIC, "sscd": SSCD_METRIC}
# a lower bound: a stored image is sharper than anything the VAE decodes, so the gradient ratio recalls few
POSITIVES = "training images as stored (a lower bound on a decoded copy's recall)"
GU_RATIO = uncalibrated(RATIO_METRIC, RATIO_THRESHOLD, False, "Gu et al. 2023's constant 1/3")


def check_criterion(criterion: str, has_sscd: bool) -> None:
    """One MemtrainError for a `--criterion` that is not auto or in CRITERIA, or sscd without a model."""
    if criterion not in ("auto", *CRITERIA):
        raise MemtrainError(f"--criterion must be auto or one of {', '.join(CRITERIA)}; got {criterion!r}")
    if criterion == "sscd" and not has_sscd:
        raise MemtrainError("--criterion sscd needs --sscd MODEL")


def verdict_key(calibration: Calibration) -> str:
    """The per-generation key (`gradient_ratio`, `l2`, `ratio`, `sscd`) of the score a calibration thresholds."""
    if calibration.metric not in VERDICT_METRICS:
        raise MemtrainError(f"calibration of {calibration.metric!r}: not a replication criterion "
                            f"({', '.join(VERDICT_METRICS)}); recompute it")
    return VERDICT_METRICS[calibration.metric][0]


def verdict_scores(images: torch.Tensor, references: torch.Tensor, calibration: Calibration, sscd_model=None,
                   batch_size: int = 32, metrics: dict | None = None) -> np.ndarray:
    """Each image's score under the verdict's criterion against `references` (float64 [N]); `metrics`: the
    images' `replication_metrics` against `references` when the caller has them already."""
    key = verdict_key(calibration)
    if key == "sscd":
        if sscd_model is None:
            raise MemtrainError("the replication verdict is calibrated on SSCD similarity: pass the SSCD model")
        return sscd_similarity(sscd_model, images, references, batch_size)
    metrics = metrics if metrics is not None else replication_metrics(images, references)
    return metrics[key].double().cpu().numpy()


def calibrate_replication(heldout: torch.Tensor, references: torch.Tensor, originals: torch.Tensor,
                          fpr: float = DEFAULT_FPR, sscd_model=None, batch_size: int = 32) -> dict[str, Calibration]:
    """Every replication criterion calibrated on held-out images (`trainer.measure.calibration`).

    `heldout`: never-trained images as the model's VAE reproduces them (the null); `references`: the unique
    training images as the VAE reproduces them; `originals`: the same training images as stored, scored
    against `references` as the positives (a stored image is a copy of its own reconstruction, at the
    autoencoder's error). Returns {metric name: Calibration} for the gradient ratio, L2, the ratio and, with
    `sscd_model`, SSCD."""
    null, pos = replication_metrics(heldout, references), replication_metrics(originals, references)
    out = {name: calibrate(null[key].double().numpy(), name, higher, fpr, pos[key].double().numpy(),
                           POSITIVES)
           for name, (key, higher) in VERDICT_METRICS.items() if key != "sscd"}
    if sscd_model is not None:
        out[SSCD_METRIC] = calibrate(sscd_similarity(sscd_model, heldout, references, batch_size), SSCD_METRIC, True,
                                     fpr, sscd_similarity(sscd_model, originals, references, batch_size),
                                     POSITIVES)
    return out


def replication_stats(generated: torch.Tensor, groups: Sequence[str], references: torch.Tensor,
                      originals: torch.Tensor, sources: Sequence[int] | None = None, sscd_model=None,
                      batch_size: int = 32, calibration: Calibration = GU_RATIO) -> dict:
    """Replication of each generation against the unique training images (`references`, as the VAE
    reproduces them; `originals`: the same images as stored), summarized per group.

    `replicated`: the verdict of `calibration` (its criterion past its threshold; default Gu et al.'s
    uncalibrated ratio < 1/3), with its `score`; the ratio and the published criteria beside it.
    `sources[i]`: the index into `references` of generation i's own training image (-1: none).
    `nn_index` is the nearest training image under the verdict's score (by gradients for the gradient
    ratio, else by L2), the one a copy is shown beside.
    """
    metrics = replication_metrics(generated, references)
    vs_originals = replication_metrics(generated, originals)
    ratio = metrics["ratio"].double().numpy()
    similarity = 1.0 - ratio
    key = verdict_key(calibration)
    sscd = sscd_similarity(sscd_model, generated, references, batch_size) if sscd_model is not None else None
    scores = sscd if key == "sscd" else metrics[key].double().numpy()
    flags = calibration.flags(scores)
    flags_orig = (flags if key == "sscd"
                  else calibration.flags(vs_originals[key].double().numpy()))
    nearest = metrics["gradient_nn_index" if key == "gradient_ratio" else "nn_index"]
    per_gen = []
    for i in range(len(generated)):
        row = {"group": groups[i], "nn_index": int(nearest[i]), "l2": float(metrics["l2"][i]),
               "ratio": float(ratio[i]), "similarity": float(similarity[i]), "score": float(scores[i]),
               "replicated": bool(flags[i]), "replicated_vs_originals": bool(flags_orig[i]),
               "ratio_1_3": bool(metrics["ratio_memorized"][i]),
               "tiled_l2": float(metrics["tiled_l2"][i]), "nl2": float(metrics["nl2"][i]),
               "gradient_ratio": float(metrics["gradient_ratio"][i])}
        if sources is not None and sources[i] >= 0:
            row["nearest_is_own_image"] = row["nn_index"] == int(sources[i])
        if sscd is not None:
            row["sscd"] = float(sscd[i])
        per_gen.append(row)
    summary = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        own = [per_gen[i]["nearest_is_own_image"] for i in idx if "nearest_is_own_image" in per_gen[i]]
        s = group_summary(ratio[idx], vs_originals["ratio"][idx].double().numpy(), metrics["tiled_l2"][idx].numpy(),
                          metrics["nl2"][idx].numpy(), metrics["l2"][idx].numpy(), own)
        s.update(fraction_replicated=float(flags[idx].mean()), fraction_replicated_vs_originals=float(
            flags_orig[idx].mean()), threshold=calibration.threshold, score_median=float(np.median(scores[idx])))
        if sscd is not None:
            sc = summarize_replication(sscd[idx], SSCD_THRESHOLD, higher_is_replication=True)
            s.update(sscd_p95=sc["p95"], sscd_max=sc["max"], sscd_fraction=sc["fraction"])
        summary[group] = s
    return {"groups": summary, "generations": per_gen, "calibration": calibration.to_dict(),
            "criterion": calibration.describe()}
