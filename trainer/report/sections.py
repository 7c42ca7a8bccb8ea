"""The sections of `memtrain evaluate` (MemBench protocol, Hong et al. 2024): trigger scenario (detectors),
replication, membership (CLiD) and the general scenario (quality). Each returns a JSON-ready dict."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from trainer.core import distributed
from trainer.core.unet_core import count_evals
from trainer.data import find_training_images, load_images, load_rows
from trainer.detect import PROMPT_DETECTORS
from trainer.detect.clid import (
    clid_features,
    clid_th_scores,
    clid_vec_classifier,
    clid_vec_scores,
    fit_clid_alpha,
)
from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR, Calibration, calibrate
from trainer.measure.embedders import ImageEmbedder
from trainer.measure.features import PIXELS, QualityFeature, clip_scores, kid
from trainer.measure.index import TrainingIndex
from trainer.measure.index_candidates import CANDIDATES, candidate_rows
from trainer.measure.index_data import row_file_names, rows_match, training_rows
from trainer.measure.metrics import auroc, tpr_at_fpr
from trainer.measure.replication import replication_metrics, unique_images, vae_roundtrip
from trainer.measure.verdict import (
    CRITERIA,
    GRADIENT_METRIC,
    GU_RATIO,
    SSCD_METRIC,
    calibrate_replication,
    check_criterion,
    replication_stats,
)
from trainer.prompts import PromptRow, check_labels, group_name

CLID_FOLDS = 2


def detector_scores(pipe, texts: Sequence[str], detectors: Sequence[str], seed: int = 0, batch_size: int = 32,
                    progress: bool = True) -> dict[str, dict]:
    """Per registered prompt detector: `scores` [P] (float64 numpy), extra per-prompt arrays, `unet_evals`, `seconds`.

    Under `accelerate launch` the processes score shares of whole `batch_size` prompt chunks
    (`trainer.core.distributed`); every process returns all scores."""
    out = {}
    share = distributed.split_work(list(texts), batch_size)
    for name in tqdm([d for d in detectors if d in PROMPT_DETECTORS], desc="detectors", disable=not progress):
        start = time.perf_counter()
        with count_evals() as counter:
            result = PROMPT_DETECTORS[name].score(pipe, share, seed, batch_size) if share or not texts else {}
        parts = distributed.gather_in_order([{k: v.double().cpu() for k, v in result.items()}])
        arrays = {k: torch.cat([p[k] for p in parts if p]).numpy() for k in next(p for p in parts if p)}
        out[name] = {**arrays, "unet_evals": distributed.sum_over_processes(counter.unet_evals),
                     "seconds": time.perf_counter() - start}
    return out


def trigger_scenario(pipe, rows: Sequence[PromptRow], detectors: Sequence[str], source: str | Path,
                     seed: int = 0, batch_size: int = 32, progress: bool = True, fpr: float = DEFAULT_FPR) -> dict:
    """Detector scores of the labelled prompts (all prompts when none is labelled), AUROC and TPR@1%FPR, and
    each detector's verdict (`detector_verdict`): its threshold at `fpr` on the non-memorized prompts."""
    labelled = check_labels(rows, source)
    scored = [r for r in rows if r.label is not None] if labelled else list(rows)
    names = [d for d in detectors if d in PROMPT_DETECTORS]
    result = {"labelled": labelled, "n_prompts": len(scored), "detectors": {},
              "prompts": [{"text": r.text, "line": r.line, "label": r.label, "group": group_name(r), "scores": {}}
                          for r in scored]}
    if labelled:
        result["n_positive"] = sum(r.label == 1 for r in scored)
        result["n_negative"] = sum(r.label == 0 for r in scored)
    if not names:
        return result
    raw = detector_scores(pipe, [r.text for r in scored], names, seed, batch_size, progress)
    labels = np.array([np.nan if r.label is None else r.label for r in scored], dtype=float)
    for name, d in raw.items():
        scores = d["scores"]
        extras = [k for k in d if k not in ("scores", "unet_evals", "seconds")]
        for i, p in enumerate(result["prompts"]):
            p["scores"][name] = float(d["scores"][i])
            for k in extras:  # per-prompt parts of a score, e.g. anisotropy's N and C terms
                p["scores"][f"{name}_{k}"] = float(d[k][i])
        entry = {"name": PROMPT_DETECTORS[name].title, "unet_evals": d["unet_evals"],
                 "unet_evals_per_prompt": d["unet_evals"] / max(1, len(scored)), "seconds": round(d["seconds"], 2)}
        if labelled:
            try:
                entry.update(auroc=auroc(scores, labels), tpr_at_1fpr=tpr_at_fpr(scores, labels, 0.01),
                             mean_positive=float(scores[labels == 1].mean()),
                             mean_negative=float(scores[labels == 0].mean()))
            except MemtrainError as e:
                raise MemtrainError(f"{source}: {name}: {e}") from None
        entry.update(detector_verdict(scores, labels, entry["name"], fpr))
        for i in entry.get("flagged", []):
            result["prompts"][i].setdefault("flagged_by", []).append(name)
        result["detectors"][name] = entry
    return result


def detector_verdict(scores: np.ndarray, labels: np.ndarray | None, title: str, fpr: float = DEFAULT_FPR) -> dict:
    """A detector's verdict: the score threshold flagging at most `fpr` of the non-memorized (label 0) prompts
    (`trainer.measure.calibration.calibrate`, higher = memorized), its recall of the memorized prompts, and the
    indices of the prompts it flags; without non-memorized prompts, uncalibrated (scores only)."""
    if labels is None or not (labels == 0).any():
        return {"calibration": None, "verdict": f"{title}: uncalibrated, no non-memorized prompts (label 0) to set "
                                                 "a threshold on; scores only", "flagged": []}
    cal = calibrate(scores[labels == 0], title, True, fpr, scores[labels == 1] if (labels == 1).any() else None,
                    "memorized prompts")
    return {"calibration": cal.to_dict(), "verdict": cal.describe(),
            "flagged": np.flatnonzero(cal.flags(scores)).tolist()}


def without_replicating_negatives(trigger: dict, replication: dict) -> dict | None:
    """Detector AUROC and TPR@1%FPR again, leaving out the non-memorized (label 0) prompts whose own
    generations replicate a training image (`replicated` in the replication section).

    MemBench (Hong et al. 2024) verifies its prompt sets by generation; a prompt labelled not
    memorized that reproduces a training image is a trigger the labels missed (in the toy world, a
    novel caption sharing words with a duplicated one brings the duplicated image back). A
    diagnostic reported beside the headline numbers, which keep every labelled prompt; None when
    the prompts are unlabelled or nothing was generated."""
    if not trigger.get("labelled") or not trigger.get("detectors") or not replication:
        return None
    replicating = {g["text"] for g in replication["generations"] if g["group"] == "general" and g["replicated"]}
    keep = [p for p in trigger["prompts"] if not (p["label"] == 0 and p["text"] in replicating)]
    labels = np.array([p["label"] for p in keep], dtype=float)
    result = {"excluded": sorted(replicating & {p["text"] for p in trigger["prompts"] if p["label"] == 0}),
              "n_negative": int((labels == 0).sum()), "detectors": {}}
    if result["n_negative"] == 0:
        return result
    for name in trigger["detectors"]:
        scores = np.array([p["scores"][name] for p in keep])
        result["detectors"][name] = {"auroc": auroc(scores, labels), "tpr_at_1fpr": tpr_at_fpr(scores, labels, 0.01)}
    return result


def membership_scenario(pipe, images: torch.Tensor, captions: Sequence[str], members: Sequence[int],
                        seed: int = 0, batch_size: int = 32, folds: int = CLID_FOLDS) -> dict:
    """CLiD_th and CLiD_vec with `folds`-fold cross-fitting (see the module docstring).

    `images` [N, 3, H, W] in [0, 1]; `members[i]` 1 for a training member, 0 for a non-member.
    Returns per-sample scores (`clid_th`, `clid_vec`, `loss`), AUROC / TPR@1%FPR of each, the
    alphas chosen per fold, the CLiD features and the UNet evaluations spent.
    """
    y = np.asarray(members, dtype=np.int64)
    start = time.perf_counter()
    with count_evals() as counter:
        features = torch.stack(distributed.across_processes(
            lambda share: list(clid_features(pipe, images[share] * 2 - 1, [captions[i] for i in share], seed=seed,
                                             batch_size=batch_size, is_latents=False)),
            range(len(captions)), batch_size)).numpy()
    unet_evals = distributed.sum_over_processes(counter.unet_evals)
    th, vec = np.full(len(y), np.nan), np.full(len(y), np.nan)
    alphas = []
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        alpha = fit_clid_alpha(features[fit], y[fit])  # the scaler is fitted on the same fold
        alphas.append(alpha)
        th[held] = clid_th_scores(features[held], features[fit], alpha)
        vec[held] = clid_vec_scores(clid_vec_classifier(features[fit], y[fit], seed=seed), features[held])
    scores = {"clid_th": th, "clid_vec": vec, "loss": features[:, -1]}
    result = {"members": int(y.sum()), "non_members": int(len(y) - y.sum()), "folds": folds,
              "alphas": alphas, "unet_evals": unet_evals, "seconds": round(time.perf_counter() - start, 2),
              "scores": {}}
    for name, s in scores.items():
        result["scores"][name] = {"auroc": auroc(s, y), "tpr_at_1fpr": tpr_at_fpr(s, y, 0.01),
                                  "mean_member": float(s[y == 1].mean()), "mean_non_member": float(s[y == 0].mean())}
    result["member_flags"] = y.tolist()
    result["per_sample"] = {name: s.tolist() for name, s in scores.items()}
    result["features"] = features.tolist()
    return result


def membership_by_group(membership: dict) -> dict[str, dict[str, float]]:
    """AUROC of each membership score for one member group (e.g. toy `duplicated`, `singleton`) against
    all non-members, from the pooled out-of-fold scores; {} when the members form a single group."""
    groups = np.asarray(membership["groups"])
    flags = np.asarray(membership["member_flags"])
    member_groups = list(dict.fromkeys(groups[flags == 1].tolist()))
    if len(member_groups) < 2:
        return {}
    out = {}
    for group in member_groups:
        pick = (flags == 0) | (groups == group)
        out[group] = {"members": int((groups[pick] == group).sum())}
        for name, values in membership["per_sample"].items():
            out[group][name] = auroc(np.asarray(values)[pick], (groups[pick] == group).astype(int))
    return out


def general_scenario(generated: torch.Tensor, captions: Sequence[str], heldout: torch.Tensor | None = None,
                     clip_scorer=None, batch_size: int = 32, quality: QualityFeature = PIXELS) -> dict:
    """Quality of one group of generations (images [G, 3, H, W] in [0, 1], one caption each): KID against
    the held-out images in `quality`'s feature space, its alignment score when it has one, CLIP score."""
    result = {"generations": len(generated), "notes": []}
    if quality.alignment is not None:
        result[quality.alignment_key] = float(quality.alignment(generated, list(captions)).mean())
    if heldout is None or len(heldout) < 2 or len(generated) < 2:
        result["notes"].append("KID skipped: needs at least 2 generations and 2 held-out images")
    else:
        result["kid"] = kid(quality.features(generated), quality.features(heldout))
    if clip_scorer is not None:
        scores = clip_scores(clip_scorer, generated, captions, batch_size)
        result["clip_score"] = float(scores.mean())
    return result


def replication_section(pipe, generated: torch.Tensor, gen_rows: Sequence[PromptRow], n: int,
                        gen_groups: Sequence[str], rows: Sequence[PromptRow], data: Path, train_data: str | None,
                        resolution: int, sscd_model=None, batch_size: int = 32, progress: bool = True,
                        heldout: torch.Tensor | None = None, fpr: float = DEFAULT_FPR, criterion: str = "auto",
                        reuse: dict | None = None, index: TrainingIndex | None = None,
                        embedder: ImageEmbedder | None = None, candidates: int = CANDIDATES) -> tuple[dict | None, str]:
    """Replication of the generations against the training images of `data` (`find_training_images`):
    (`replication_stats` plus provenance, with the VAE references under `_references`), or (None, why not).
    With the `index` of `train_data` (and its `embedder`), only the training rows it finds nearest to the
    generations and held-out images are loaded (`index_candidates`, `candidates` per image): every row of a set
    of at most `candidates` images.

    The copy verdict (`replication_verdict`): `reuse` (an earlier report's `verdict`) when the VAE is the same,
    else calibrated at `fpr` on `heldout` (never-trained images, as stored), else Gu et al.'s ratio."""
    train = find_training_images(train_data, data, rows)
    if train is None:
        return None, (f"replication skipped: no training images found (no imagefolder at {data / 'train'} or "
                      f"{data}, and no member rows with file_name)")
    paths, names, described = train
    n_rows = len(paths)
    mapping = None if index is None or train_data is None else training_rows(
        index, row_file_names(paths, Path(train_data)))
    if mapping is not None:
        queries = [generated] + ([heldout] if heldout is not None and len(heldout) else [])
        found = mapping[candidate_rows(index, embedder, queries, candidates, batch_size)]
        picked = np.unique(found[found >= 0])
        if len(picked) < n_rows:
            paths, names = [paths[i] for i in picked], [names[i] for i in picked]
            matched = "" if rows_match(index, n_rows) else ", index rows matched to training rows by file name"
            described += (f"; the {len(picked)} rows --index finds nearest ({candidates} per generation or held-out "
                          f"image{matched}) loaded")
    if len(set(map(str, paths))) < 2:
        return None, f"replication skipped: the NN1/NN2 ratio needs at least 2 training images, found {described}"
    originals_all = load_images(paths, names, resolution, "training images", progress)
    originals, inverse = unique_images(originals_all)
    references = vae_roundtrip(pipe, originals)
    verdict = replication_verdict(pipe, references, originals, heldout, fpr, criterion, sscd_model, batch_size,
                                  reuse)
    # the unique training image each generation's own prompt was trained on (toy: duplicated rows)
    index_of = {Path(p).resolve(): int(inverse[i]) for i, p in enumerate(paths) if isinstance(p, Path)}
    sources = [index_of.get((data / r.file_name).resolve(), -1) if r.file_name else -1
               for r in gen_rows for _ in range(n)]
    rep = replication_stats(generated, gen_groups, references, originals, sources, sscd_model, batch_size,
                            verdict["calibration"])
    for text, row in zip(captions_of(gen_rows, n), rep["generations"], strict=True):
        row["text"] = text
    rep.update(training_images=described, train_images=len(originals_all), training_rows=n_rows,
               unique_train_images=len(originals),
               reference="unique training images as reproduced by the model's VAE (decode(encode(x)), posterior "
                         "mean)",
               similarity="1 - NN1/NN2 (L2 ratio of Gu et al.)", verdict=verdict["record"],
               _references=references)
    return rep, ""


def replication_verdict(pipe, references: torch.Tensor, originals: torch.Tensor, heldout: torch.Tensor | None,
                        fpr: float = DEFAULT_FPR, criterion: str = "auto", sscd_model=None, batch_size: int = 32,
                        reuse: dict | None = None) -> dict:
    """The copy verdict of a report: {"calibration": Calibration, "record": JSON-ready provenance}.

    `criterion` auto = SSCD similarity with an SSCD model, else the NN1/NN2 ratio of image gradients; every
    criterion is calibrated (`calibrate_replication`) so the record shows the alternatives' thresholds and
    recall too. Without held-out images: Gu et al.'s ratio < 1/3, uncalibrated. `reuse`: an earlier
    report's verdict record, taken as it is when its VAE has the same weights (`vae_fingerprint`; an edit
    changes the UNet or text encoder, so before and after an edit are judged by one threshold)."""
    check_criterion(criterion, sscd_model is not None)
    name = CRITERIA[criterion] if criterion != "auto" else SSCD_METRIC if sscd_model is not None else GRADIENT_METRIC
    record: dict = {"criterion_requested": criterion, "vae": vae_fingerprint(pipe)}
    calibration = None
    if reuse is not None and reuse.get("vae") == record["vae"]:
        calibration = Calibration.from_dict(reuse["calibration"], "the reused copy verdict")
        record.update({k: v for k, v in reuse.items() if k not in ("calibration", "criterion", "calibrated")},
                      reused="the earlier report's calibration (the same VAE weights)")
    elif reuse is not None:
        record["reused"] = "not reused: the VAE differs from the earlier report's, recalibrated"
    if calibration is None and (heldout is None or len(heldout) == 0):
        calibration = GU_RATIO
        record.update(source="no held-out images (--heldout DIR, or prompt rows with member 0 / group heldout)",
                      heldout_images=0)
    elif calibration is None:
        every = calibrate_replication(vae_roundtrip(pipe, heldout), references, originals, fpr, sscd_model,
                                      batch_size)
        calibration = every[name]
        record.update(source="held-out images through the model's VAE vs the unique training images through it",
                      heldout_images=len(heldout), alternatives={k: c.to_dict() for k, c in every.items()},
                      heldout_in_training=int((replication_metrics(heldout, originals)["l2"] == 0).sum()))
    record.update(calibration=calibration.to_dict(), criterion=calibration.describe(),
                  calibrated=calibration.calibrated)
    return {"calibration": calibration, "record": record}


def vae_fingerprint(pipe) -> str:
    """sha256 of the VAE's parameters and buffers (names, shapes, bytes): which autoencoder a calibration holds for."""
    digest = hashlib.sha256()
    for name, tensor in sorted(pipe.vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def captions_of(rows: Sequence[PromptRow], n: int) -> list[str]:
    """The caption of each generation (prompt-major, as `generate_images` orders them)."""
    return [r.text for r in rows for _ in range(n)]


GENERATION_GROUPS = ("trigger", "general", "member", "heldout")


def parse_groups(value: str | Sequence[str]) -> list[str]:
    """`--groups trigger,general,member,heldout`: which prompt rows `evaluate` generates from."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [g for g in names if g not in GENERATION_GROUPS]
    if unknown or not names:
        raise MemtrainError(f"--groups: unknown {unknown or 'empty list'}; choose from {','.join(GENERATION_GROUPS)}")
    return list(dict.fromkeys(names))


def generation_rows(rows: Sequence[PromptRow], groups: Sequence[str], labelled: bool) -> list[tuple[PromptRow, str]]:
    """(row, group) of each prompt to generate from: `trigger` = label 1 (memorized), `general` = label 0,
    `member` = other training members (e.g. toy singletons), `heldout` = non-members (member 0, the measured
    false-positive rate of the copy verdict on generations). Unlabelled prompt files: every row is group `all`
    unless its member role is asked for."""
    out = []
    for r in rows:
        role = "member" if r.member == 1 else "heldout" if r.member == 0 else None
        if labelled:
            group = "trigger" if r.label == 1 else "general" if r.label == 0 else role
        else:
            group = role if role in groups else "all"
        if group == "all" or group in groups:
            out.append((r, group))
    return out


def heldout_rows(heldout_dir: str | Path):
    """The rows (`load_rows`) of `--heldout DIR`, or one MemtrainError naming it."""
    try:
        return load_rows(str(heldout_dir))
    except OSError as e:
        raise MemtrainError(f"--heldout {heldout_dir}: cannot load the held-out images ({e})") from None


def heldout_caption_rows(heldout_dir: str | Path | None, rows: Sequence[PromptRow]) -> list[PromptRow]:
    """Prompt rows from the captions of `--heldout DIR` (member 0, group `heldout`), for `--groups heldout`
    when the prompt file has no held-out rows of its own: generations from captions whose images were never
    trained on, the copy verdict's false-positive rate on generations. One row per image (its first caption)."""
    if heldout_dir is None or any(r.member == 0 for r in rows):
        return []
    found = heldout_rows(heldout_dir)
    out = [PromptRow(text=c[0], line=i + 1, group="heldout", member=0)
           for i, c in enumerate(found.captions) if c and c[0].strip()]
    if not out:
        raise MemtrainError(f"--heldout {heldout_dir}: --groups heldout needs captions (a `text` column in its "
                            "metadata), or held-out rows (`member: 0`) in the prompt file")
    return out


def heldout_images(heldout_dir: str | Path | None, rows: Sequence[PromptRow], data: Path, source: Path,
                   resolution: int, progress: bool = True) -> tuple[torch.Tensor | None, str]:
    """Never-trained images: the rows of `--heldout DIR` (any `load_rows` source) and the prompt file's
    member-0 rows with a file_name; (images [N, 3, r, r] or None, where they came from)."""
    paths, names, parts = [], [], []
    if heldout_dir is not None:
        found = heldout_rows(heldout_dir)
        paths += list(found.images)
        names += list(found.names)
        parts.append(f"{len(found.images)} from --heldout {heldout_dir}")
    member0 = [r for r in rows if r.member == 0 and r.file_name]
    if member0:
        paths += [data / r.file_name for r in member0]
        names += [f"{source}, line {r.line} ({r.file_name})" for r in member0]
        parts.append(f"{len(member0)} member-0 rows of {source}")
    if not paths:
        return None, "none"
    return load_images(paths, names, resolution, "held-out images", progress), " and ".join(parts)
