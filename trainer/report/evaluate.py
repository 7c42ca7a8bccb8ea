"""`memtrain evaluate`: a MemBench-style memorization report for one checkpoint.

    memtrain evaluate CKPT --prompts labels.jsonl [--lora DIR] [--out runs/evaluate] [-n 2] [--sscd F] [--clip D]

Writes OUT/report.json (every number, the configuration and the per-prompt scores), OUT/report.md
(tables) and PNG figures, all into a temporary directory that replaces OUT at the end
(`io.atomic_dir`), so an interrupted run leaves nothing half written.

The prompt file (`read_labelled_prompts`) is plain text (one prompt a line: scores only) or JSONL
rows with `text` (or `prompt`) and optional `label` (1 = memorized, 0 = not), `group`, `file_name`
and `member`. A toy-world `labels.jsonl` (`memtrain toy-data`) works as is: group `duplicated` ->
label 1 (memorized), `novel` -> label 0; `singleton` and `heldout` rows get no label and are used
for membership only (`duplicated`/`singleton` with a `file_name` -> members, `heldout` ->
non-members). An explicit `label` / `member` overrides the group. `file_name` paths resolve under
`--data` (default: the prompt file's directory).

Sections (every number is written with its convention; the README has the long form):

1. Trigger scenario (`trigger_scenario`): per prompt, with n = 1 and the same x_T for every
   prompt (seed `--seed`), each detector of `trainer.detectors` with its paper defaults on the
   50-step DDIM schedule: Wen et al. noise magnitude of the first step (`noise`) and its mean
   over the first 10 steps (`noise10`, the paper's second variant), the anisotropy metric M
   (g_norm = 1, g_cos by model family), the first-step cross-attention entropy. AUROC
   (`metrics.auroc`) and TPR at 1% FPR (`metrics.tpr_at_fpr`): positive = memorized (label 1),
   a higher score = more memorized; the TPR of the last ROC point whose FPR is <= 1% (the best TPR
   any threshold reaches without exceeding 1% FPR, no interpolation; with fewer than 100
   negatives that is the TPR at 0% FPR).
2. Replication (`replication_stats`): `-n` generations per prompt (stock pipeline, DDIM `--steps`,
   guidance 7.5, generation j of every prompt from seed `--seed + j`) compared with the unique
   training images as the model's own VAE reproduces them (`report.vae_roundtrip`, the reason is in
   `trainer.report`), by `replication.replication_metrics`. Similarity = 1 - NN1/NN2 (the L2
   ratio of Gu et al.; 1 = an exact copy of one training image, 0 = equidistant from two);
   replicated when the ratio is < 1/3 (similarity > 2/3). Summaries by
   `replication.summarize_replication`: p95, max, fraction. With `--sscd`: the cosine of SSCD
   descriptors of each generation to its most similar training image (same references); p95, max
   and the fraction > 0.5. Reported for the memorized prompts (trigger) and, as the baseline, the
   non-memorized prompts (general).
3. Membership (`membership_scenario`): `detectors.clid_features` of each (image, caption) pair,
   then 2-fold cross-fitting (stratified, seed `--seed`): on one fold `detectors.fit_clid_alpha`
   chooses alpha (AUROC, grid 0, 0.05, ..., 1) with the robust scaler fitted on that fold, and
   `detectors.clid_th_scores` scores the other fold; CLiD_vec: `detectors.clid_vec_classifier`
   trained on one fold scores the other. AUROC / TPR at 1% FPR of the pooled out-of-fold scores
   (positive = member). DEVIATION: the paper fits alpha, the scaler and the classifier on a
   separate shadow split; there is none here, so each half is scored by a fit on the other half.
   The loss-only baseline (L = -loss, no fitting) is reported beside them. When the members
   come in several groups (toy: duplicated, singleton), each group's AUROC against all
   non-members too (`membership_by_group`).
4. General scenario (`general_scenario`): image quality of the generations of each group:
   toy-world text alignment (`toy_checker.alignment_scores`, mean; only when every caption is a
   toy caption), KID (`kid`): the unbiased MMD^2 (polynomial kernel (x.y/d + 1)^3, as in
   Binkowski et al. 2018) between the generations and the held-out images in the fixed feature
   space "pix8+palette" (`image_features`: 8x8 area-averaged RGB, 192 values in [0, 1], then the 8
   toy palette fractions of `toy_checker.palette_fractions`, d = 200; not Inception features, so
   values are comparable only within memtrain), and with `--clip` the CLIP score
   100 * max(cos(image, text), 0) of a user-supplied local CLIPModel.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import wandb
from PIL import Image
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from trainer.core.components import load_pipeline
from trainer.core.unet_core import count_evals
from trainer.data import image_to_tensor, load_rows, open_image
from trainer.detect import DETECTOR_STEPS, DETECTORS, PROMPT_DETECTORS
from trainer.detect.clid import (
    clid_features,
    clid_th_scores,
    clid_vec_classifier,
    clid_vec_scores,
    fit_clid_alpha,
)
from trainer.io import MemtrainError, atomic_dir, atomic_file, write_json
from trainer.measure.metrics import auroc, roc_points, tpr_at_fpr
from trainer.measure.replication import (
    NL2_THRESHOLD,
    RATIO_THRESHOLD,
    TILED_L2_THRESHOLD,
    replication_metrics,
    summarize_replication,
    unique_images,
)
from trainer.mitigate.dedup import _sscd_batch, load_clip, load_sscd
from trainer.report.plots import save_replication_grid, save_roc_curves, save_score_histograms
from trainer.sample.generate import generate_images, read_prompts
from trainer.toy.checker import alignment_scores, palette_fractions, parse_caption
from trainer.toy.study import vae_roundtrip

LABEL_GROUPS = {"duplicated": 1, "novel": 0}  # toy labels.jsonl group -> label (1 = memorized)
MEMBER_GROUPS = {"duplicated": 1, "singleton": 1, "heldout": 0}  # group -> training member?
LABEL_MAPPING = (
    "label 1 (memorized) = `label: 1` or group duplicated; label 0 (not memorized) = `label: 0` or group "
    "novel; membership: members = `member: 1` or group duplicated/singleton with a file_name, "
    "non-members = `member: 0` or group heldout; other rows are not scored in the trigger scenario"
)
ROC_CONVENTION = (
    "positive = memorized prompt (membership: training member), higher score = more memorized; "
    "TPR at 1% FPR = the TPR of the last ROC point whose FPR is <= 1% (the best TPR any threshold reaches "
    "without exceeding 1% FPR, no interpolation, metrics.tpr_at_fpr); with fewer than 100 negatives it is "
    "the TPR at 0% FPR"
)
SSCD_THRESHOLD = 0.5
CLID_FOLDS = 2
FEATURE = "pix8+palette"
FEATURE_SIDE = 8
REPLICATED_GRID = 16


# ---------------------------------------------------------------- prompts


@dataclass
class PromptRow:
    """One prompt of the prompt file and its roles."""

    text: str
    line: int
    label: int | None = None  # 1 memorized, 0 not; None: not in the trigger scenario's AUROC
    group: str | None = None
    file_name: str | None = None  # the row's image, relative to --data
    member: int | None = None  # 1 training member, 0 non-member; None: not in the membership scenario


def _binary(row: dict, key: str, where: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return int(value)
    raise MemtrainError(f"{where}: `{key}` must be 0 or 1 (or true/false), got {value!r}")


def read_labelled_prompts(path: str | Path) -> list[PromptRow]:
    """The rows of a prompt file (plain text or JSONL), with their label, group, image and member role.

    Errors (`MemtrainError`, naming the file and line): missing or empty file, malformed JSON, a
    row without a `text`/`prompt` string, a label or member that is not 0/1, a `member` row
    without `file_name`.
    """

    path = Path(path)
    rows = read_prompts(path)  # missing / empty file, bad JSON, missing text: errors naming file and line
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]  # as read_prompts
    out = []
    for row, line in zip(rows, lines, strict=True):
        where = f"{path}, line {line}"
        group = row.get("group")
        if group is not None and not isinstance(group, str):
            raise MemtrainError(f"{where}: `group` must be a string, got {group!r}")
        file_name = row.get("file_name")
        if file_name is not None and (not isinstance(file_name, str) or not file_name.strip()):
            raise MemtrainError(f"{where}: `file_name` must be a non-empty path string, got {file_name!r}")
        label = _binary(row, "label", where) if "label" in row else LABEL_GROUPS.get(group)
        if "member" in row:
            member = _binary(row, "member", where)
            if member is not None and file_name is None:
                raise MemtrainError(f"{where}: a `member` row needs the `file_name` of its image")
        else:
            member = MEMBER_GROUPS.get(group) if file_name else None
        out.append(PromptRow(row["text"], line, label, group, file_name, member))
    return out


def check_labels(rows: Sequence[PromptRow], source: str | Path) -> bool:
    """True when the prompts carry labels; a MemtrainError naming the file when one class is missing."""
    labels = [r.label for r in rows if r.label is not None]
    if not labels:
        return False
    missing = "negatives (label 0 / group novel)" if all(labels) else (
        "positives (label 1 / group duplicated)" if not any(labels) else None)
    if missing:
        raise MemtrainError(
            f"{source}: the labelled prompts have no {missing}; AUROC and TPR at 1% FPR need memorized and "
            "non-memorized prompts (or pass a plain prompt list for scores only)"
        )
    return True


def _group_name(row: PromptRow) -> str:
    if row.group:
        return row.group
    return {1: "memorized", 0: "not memorized"}.get(row.label, "unlabelled")


# ---------------------------------------------------------------- images


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1) or 1)


def load_images(paths: Sequence, names: Sequence[str], resolution: int, desc: str = "load images",
                progress: bool = True) -> torch.Tensor:
    """Images [N, 3, r, r] in [0, 1]: short side resized to `resolution`, center crop (as training)."""

    out = [image_to_tensor(open_image(p, n), resolution, True, False, random.Random(0))
           for p, n in tqdm(list(zip(paths, names, strict=True)), desc=desc, disable=not progress, leave=False)]
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return ((torch.stack(out) + 1) / 2).clamp(0, 1)


def find_training_images(data: Path, rows: Sequence[PromptRow]) -> tuple[list, list[str], str] | None:
    """(paths, names, description) of the training images replication is measured against.

    The imagefolder `DATA/train` (a toy dataset's), else `DATA` itself when it is an imagefolder
    (`metadata.jsonl` / `metadata.csv`), else the images of the member rows of the prompt file.
    """

    for root in (data / "train", data):
        if (root / "metadata.jsonl").exists() or (root / "metadata.csv").exists():
            found = load_rows(str(root))
            return list(found.images), list(found.names), f"{found.source} ({len(found.images)} rows)"
    member_files = {}
    for r in rows:
        if r.file_name and (r.member == 1 or r.label == 1):
            member_files.setdefault(data / r.file_name, f"line {r.line} ({r.file_name})")
    if member_files:
        return list(member_files), list(member_files.values()), f"the {len(member_files)} member images of the prompt file"
    return None


def _to_pil(images: torch.Tensor) -> list:

    arrays = (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


# ---------------------------------------------------------------- section 1: detectors


def detector_scores(pipe, texts: Sequence[str], detectors: Sequence[str], seed: int = 0, batch_size: int = 32,
                    progress: bool = True) -> dict[str, dict]:
    """Per registered prompt detector: `scores` [P] (float64 numpy), extra per-prompt arrays, `unet_evals`, `seconds`."""
    out = {}
    for name in tqdm([d for d in detectors if d in PROMPT_DETECTORS], desc="detectors", disable=not progress):
        start = time.perf_counter()
        with count_evals() as counter:
            result = PROMPT_DETECTORS[name].score(pipe, texts, seed, batch_size)
        arrays = {k: v.double().numpy() for k, v in result.items()}
        out[name] = {**arrays, "unet_evals": counter.unet_evals, "seconds": time.perf_counter() - start}
    return out


def trigger_scenario(pipe, rows: Sequence[PromptRow], detectors: Sequence[str], source: str | Path,
                     seed: int = 0, batch_size: int = 32, progress: bool = True) -> dict:
    """Detector scores of the labelled prompts (all prompts when none is labelled), AUROC and TPR@1%FPR."""

    labelled = check_labels(rows, source)
    scored = [r for r in rows if r.label is not None] if labelled else list(rows)
    names = [d for d in detectors if d in PROMPT_DETECTORS]
    result = {"labelled": labelled, "n_prompts": len(scored), "detectors": {},
              "prompts": [{"text": r.text, "line": r.line, "label": r.label, "group": _group_name(r), "scores": {}}
                          for r in scored]}
    if labelled:
        result["n_positive"] = sum(r.label == 1 for r in scored)
        result["n_negative"] = sum(r.label == 0 for r in scored)
    if not names:
        return result
    raw = detector_scores(pipe, [r.text for r in scored], names, seed, batch_size, progress)
    labels = np.array([r.label for r in scored], dtype=float) if labelled else None
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
        result["detectors"][name] = entry
    return result


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


# ---------------------------------------------------------------- section 2: replication


def sscd_similarity(model, generated: torch.Tensor, references: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Per generation, the max cosine of SSCD descriptors to any reference image (SSCD preprocessing of
    `dedup`: 288 x 288, ImageNet normalisation)."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pil = _to_pil(images[start : start + batch_size])
                out = model(_sscd_batch(pil)).float().reshape(len(pil), -1)
                chunks.append(torch.nn.functional.normalize(out, dim=1))
        return torch.cat(chunks)

    return (embed(generated) @ embed(references).T).max(dim=1).values.double().numpy()


def replication_stats(generated: torch.Tensor, groups: Sequence[str], references: torch.Tensor,
                      originals: torch.Tensor, sources: Sequence[int] | None = None, sscd_model=None,
                      batch_size: int = 32) -> dict:
    """Replication of each generation against the unique training images (`references`, as the VAE
    reproduces them; `originals`: the same images as stored), summarized per group.

    `sources[i]`: the index into `references` of generation i's own training image (-1: none).
    """

    metrics = replication_metrics(generated, references)
    vs_originals = replication_metrics(generated, originals)
    ratio = metrics["ratio"].double().numpy()
    similarity = 1.0 - ratio
    sscd = sscd_similarity(sscd_model, generated, references, batch_size) if sscd_model is not None else None
    per_gen = []
    for i in range(len(generated)):
        row = {"group": groups[i], "nn_index": int(metrics["nn_index"][i]), "l2": float(metrics["l2"][i]),
               "ratio": float(ratio[i]), "similarity": float(similarity[i]),
               "replicated": bool(metrics["ratio_memorized"][i]),
               "replicated_vs_originals": bool(vs_originals["ratio_memorized"][i]),
               "tiled_l2": float(metrics["tiled_l2"][i]), "nl2": float(metrics["nl2"][i])}
        if sources is not None and sources[i] >= 0:
            row["nearest_is_own_image"] = row["nn_index"] == int(sources[i])
        if sscd is not None:
            row["sscd"] = float(sscd[i])
        per_gen.append(row)
    summary = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        sim = summarize_replication(similarity[idx], 1 - RATIO_THRESHOLD, higher_is_replication=True)
        s = {
            "generations": len(idx),
            "similarity_p95": sim["p95"], "similarity_max": sim["max"], "similarity_mean": sim["mean"],
            "fraction_replicated": summarize_replication(ratio[idx], RATIO_THRESHOLD, False)["fraction"],
            "fraction_replicated_vs_originals": summarize_replication(
                vs_originals["ratio"][idx], RATIO_THRESHOLD, False)["fraction"],
            "fraction_tiled_l2": summarize_replication(metrics["tiled_l2"][idx], TILED_L2_THRESHOLD, False,
                                                       inclusive=True)["fraction"],
            "fraction_nl2": summarize_replication(metrics["nl2"][idx], NL2_THRESHOLD, False)["fraction"],
            "l2_p5": summarize_replication(metrics["l2"][idx], 0.0, False)["p5"],
        }
        own = [per_gen[i]["nearest_is_own_image"] for i in idx if "nearest_is_own_image" in per_gen[i]]
        s["nearest_is_own_image"] = float(np.mean(own)) if own else None
        if sscd is not None:
            sc = summarize_replication(sscd[idx], SSCD_THRESHOLD, higher_is_replication=True)
            s.update(sscd_p95=sc["p95"], sscd_max=sc["max"], sscd_fraction=sc["fraction"])
        summary[group] = s
    return {"groups": summary, "generations": per_gen}


# ---------------------------------------------------------------- section 3: membership


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
        features = clid_features(pipe, images * 2 - 1, list(captions), seed=seed, batch_size=batch_size,
                                 is_latents=False).numpy()
    th, vec = np.full(len(y), np.nan), np.full(len(y), np.nan)
    alphas = []
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        alpha = fit_clid_alpha(features[fit], y[fit])  # the scaler is fitted on the same fold
        alphas.append(alpha)
        th[held] = clid_th_scores(features[held], features[fit], alpha)
        vec[held] = clid_vec_scores(clid_vec_classifier(features[fit], y[fit], seed=seed), features[held])
    scores = {"clid_th": th, "clid_vec": vec, "loss": features[:, -1]}
    result = {"members": int(y.sum()), "non_members": int(len(y) - y.sum()), "folds": folds,
              "alphas": alphas, "unet_evals": counter.unet_evals, "seconds": round(time.perf_counter() - start, 2),
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


# ---------------------------------------------------------------- section 4: quality


def image_features(images: torch.Tensor) -> torch.Tensor:
    """The fixed "pix8+palette" feature [N, 200] of images in [0, 1]: 8x8 area-averaged RGB (192 values)
    then the 8 toy palette fractions (`toy_checker.palette_fractions`)."""

    pixels = torch.nn.functional.adaptive_avg_pool2d(images.float(), FEATURE_SIDE).flatten(1)
    return torch.cat([pixels, palette_fractions(images)], dim=1).double()


def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between feature sets x [m, d] and y [n, d] with the KID kernel (x.y / d + 1)^3
    (Binkowski et al. 2018), on the full sets (no subsets); needs m, n >= 2."""
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise MemtrainError(f"KID needs at least 2 samples on each side, got {m} and {n}")
    x, y = x.double(), y.double()

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def load_clip_scorer(path: str | Path):
    """(model, image processor, tokenizer) of a local full CLIPModel directory for the CLIP score."""


    model, processor, kind = load_clip(path)
    if kind != "clip":
        raise MemtrainError(f"--clip {path}: the CLIP score needs a full CLIPModel (text and vision towers); "
                            "this directory holds a vision-only model")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MemtrainError(f"--clip {path}: no usable CLIP tokenizer files (vocab.json, merges.txt) ({e})") from None
    return model, processor, tokenizer


def clip_scores(scorer, images: torch.Tensor, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """CLIP score per image: 100 * max(cos(image embedding, caption embedding), 0)."""
    model, processor, tokenizer = scorer
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    out = []

    def features(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pil = _to_pil(images[start : start + batch_size])
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
            text = tokenizer(list(captions[start : start + batch_size]), padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt")
            img = features(model.get_image_features(pixel_values=pixels))
            txt = features(model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=1)
            out.append(100 * cos.clamp_min(0))
    return torch.cat(out).double().numpy()


def _toy_captions(captions: Sequence[str]) -> bool:

    try:
        for c in dict.fromkeys(captions):
            parse_caption(c)
    except MemtrainError:
        return False
    return True


def general_scenario(generated: torch.Tensor, captions: Sequence[str], heldout: torch.Tensor | None = None,
                     clip_scorer=None, batch_size: int = 32) -> dict:
    """Quality of one group of generations (images [G, 3, H, W] in [0, 1], one caption each)."""

    result = {"generations": len(generated), "notes": []}
    if _toy_captions(captions):
        result["toy_alignment"] = float(alignment_scores(generated, list(captions)).mean())
    else:
        result["notes"].append("toy alignment skipped: not every caption is a toy-world caption")
    if heldout is None or len(heldout) < 2 or len(generated) < 2:
        result["notes"].append("KID skipped: needs at least 2 generations and 2 held-out images")
    else:
        result["kid"] = kid(image_features(generated), image_features(heldout))
    if clip_scorer is not None:
        scores = clip_scores(clip_scorer, generated, captions, batch_size)
        result["clip_score"] = float(scores.mean())
    return result


# ---------------------------------------------------------------- the protocol


@contextlib.contextmanager
def _count_unet_samples(unet) -> Iterator[list[int]]:
    """Count the samples passed through `unet` (UNet evaluations) while the block runs."""
    count = [0]

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count[0] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def parse_detectors(value: str | Sequence[str]) -> list[str]:
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise MemtrainError(f"--detectors: unknown {unknown or 'empty list'}; choose from {','.join(DETECTORS)}")
    return list(dict.fromkeys(names))


def _check_file(path: Path, where: str, data: Path) -> None:
    if not path.is_file():
        raise MemtrainError(f"{where}: image {path} does not exist (file_name paths resolve under --data {data})")


def evaluate(checkpoint: str | Path, prompts: str | Path, out: str | Path = "runs/evaluate",
             lora: str | Path | None = None, n: int = 2, batch_size: int = 32, seed: int = 0,
             data: str | Path | None = None, sscd: str | Path | None = None, clip: str | Path | None = None,
             wandb: bool = False, generate: bool = True, detectors: str | Sequence[str] = DETECTORS,
             steps: int = 50, guidance_scale: float = 7.5, device: str | None = None,
             progress: bool = True) -> dict:
    """Run the protocol of the module docstring; write OUT/report.json, report.md and PNGs; return the report."""

    t_start = time.perf_counter()
    for value, flag in ((n, "-n"), (batch_size, "--batch-size"), (steps, "--steps")):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    detectors = parse_detectors(detectors)
    prompts = Path(prompts)
    rows = read_labelled_prompts(prompts)
    labelled = check_labels(rows, prompts)
    data = Path(data) if data is not None else prompts.parent
    if not data.is_dir():
        raise MemtrainError(f"--data {data}: not a directory (the root that file_name paths resolve under)")
    for r in rows:
        if r.file_name and (r.member is not None or r.label == 1):
            _check_file(data / r.file_name, f"{prompts}, line {r.line}", data)
    checkpoint_path = Path(checkpoint)
    if not checkpoint_path.exists():
        raise MemtrainError(f"checkpoint {checkpoint}: no such directory (want a diffusers pipeline directory)")
    if not (checkpoint_path / "model_index.json").is_file():
        raise MemtrainError(f"checkpoint {checkpoint}: not a diffusers pipeline directory (no model_index.json)")
    if lora is not None and not Path(lora).exists():
        raise MemtrainError(f"--lora {lora}: no such file or directory")
    sscd_model = clip_scorer = None
    if sscd is not None:

        sscd_model = load_sscd(sscd)
    if clip is not None:
        clip_scorer = load_clip_scorer(clip)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(checkpoint_path, lora, device=device)
    pipe.set_progress_bar_config(disable=True)
    resolution = model_resolution(pipe)
    notes: list[str] = []
    cost: dict[str, dict] = {}
    config = {"checkpoint": str(checkpoint), "lora": str(lora) if lora else None, "prompts": str(prompts),
              "data": str(data), "n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
              "batch_size": batch_size, "detectors": detectors, "generate": generate,
              "sscd": str(sscd) if sscd else None, "clip": str(clip) if clip else None, "device": device,
              "resolution": resolution, "detector_schedule": f"DDIM {DETECTOR_STEPS} steps, n = 1"}
    report: dict = {"title": f"memtrain evaluate: {checkpoint}" + (f" + LoRA {lora}" if lora else ""),
                    "config": config, "label_mapping": LABEL_MAPPING, "roc_convention": ROC_CONVENTION,
                    "counts": {"prompts": len(rows), "labelled": sum(r.label is not None for r in rows),
                               "memorized": sum(r.label == 1 for r in rows),
                               "not_memorized": sum(r.label == 0 for r in rows),
                               "members": sum(r.member == 1 for r in rows),
                               "non_members": sum(r.member == 0 for r in rows)}}
    figures: dict = {}

    with atomic_dir(out) as tmp, tqdm(total=4, desc="evaluate", disable=not progress, dynamic_ncols=True) as stages:
        run = _start_wandb(tmp, config) if wandb else None
        try:
            # 1. trigger scenario: detectors
            stages.set_postfix_str("detectors")
            t0 = time.perf_counter()
            trigger = trigger_scenario(pipe, rows, detectors, prompts, seed, batch_size, progress)
            report["trigger"] = trigger
            cost["detectors"] = {"seconds": round(time.perf_counter() - t0, 2),
                                 "unet_evals": sum(d["unet_evals"] for d in trigger["detectors"].values())}
            stages.update()

            # 2. generation and replication
            stages.set_postfix_str("generate")
            gen_rows = ([r for r in rows if r.label is not None] if labelled else list(rows)) if generate else []
            scenario = {1: "trigger", 0: "general"}
            gen_groups = [scenario[r.label] if labelled else "all" for r in gen_rows for _ in range(n)]
            generated = None
            if gen_rows:
                t0 = time.perf_counter()
                with _count_unet_samples(pipe.unet) as counted:
                    generated = generate_images(pipe, [r.text for r in gen_rows], n=n, seed=seed, steps=steps,
                                                guidance_scale=guidance_scale, batch_size=batch_size,
                                                progress=progress)
                cost["generation"] = {"seconds": round(time.perf_counter() - t0, 2), "unet_evals": counted[0],
                                      "images": len(generated)}
            elif not generate:
                notes.append("--no-generate: replication and quality sections skipped")
            stages.update()

            stages.set_postfix_str("replication")
            if generated is not None:
                t0 = time.perf_counter()
                rep, note = replication_section(pipe, generated, gen_rows, n, gen_groups, rows, data, resolution,
                                                sscd_model, batch_size, progress)
                if rep is None:
                    notes.append(note)
                else:
                    report["replication"] = rep
                    references = rep.pop("_references")
                    verified = without_replicating_negatives(report.get("trigger", {}), rep)
                    if verified is not None:
                        report["trigger"]["without_replicating_negatives"] = verified
                    figures["replicated"] = (generated, references)
                    cost["replication"] = {"seconds": round(time.perf_counter() - t0, 2)}
            stages.update()

            # 3. membership
            stages.set_postfix_str("membership")
            member_rows = [r for r in rows if r.member is not None]
            n_mem = sum(r.member == 1 for r in member_rows)
            if "clid" not in detectors:
                notes.append("membership skipped: clid not in --detectors")
            elif min(n_mem, len(member_rows) - n_mem) < CLID_FOLDS:
                notes.append(f"membership skipped: needs at least {CLID_FOLDS} members and {CLID_FOLDS} "
                             f"non-members with images, found {n_mem} and {len(member_rows) - n_mem}")
            else:
                images = load_images([data / r.file_name for r in member_rows],
                                     [f"{prompts}, line {r.line} ({r.file_name})" for r in member_rows],
                                     resolution, "membership images", progress)
                membership = membership_scenario(pipe, images, [r.text for r in member_rows],
                                                 [r.member for r in member_rows], seed, batch_size)
                membership["groups"] = [_group_name(r) if r.group else ("member" if r.member else "non-member")
                                        for r in member_rows]
                membership["texts"] = [r.text for r in member_rows]
                membership["by_group"] = membership_by_group(membership)
                report["membership"] = membership
                cost["membership"] = {"seconds": membership["seconds"], "unet_evals": membership["unet_evals"]}
            stages.update()

            # 4. general scenario: quality
            stages.set_postfix_str("quality")
            if generated is not None:
                t0 = time.perf_counter()
                heldout_rows = [r for r in rows if r.member == 0]
                heldout = load_images([data / r.file_name for r in heldout_rows],
                                      [f"{prompts}, line {r.line} ({r.file_name})" for r in heldout_rows],
                                      resolution, "held-out images", progress) if heldout_rows else None
                if heldout is None:
                    notes.append("KID skipped: the prompt file has no held-out images (member 0 / group heldout)")
                quality = {"feature": f"{FEATURE}: 8x8 area-averaged RGB (192) + 8 toy palette fractions",
                           "groups": {}}
                captions = captions_of(gen_rows, n)
                for group in dict.fromkeys(gen_groups):
                    idx = [i for i, g in enumerate(gen_groups) if g == group]
                    quality["groups"][group] = general_scenario(
                        generated[idx], [captions[i] for i in idx], heldout, clip_scorer, batch_size)
                if heldout is not None and "replication" in report and len(heldout) >= 2:
                    quality["kid_reference"] = kid(image_features(figures["replicated"][1]), image_features(heldout))
                report["quality"] = quality
                cost["quality"] = {"seconds": round(time.perf_counter() - t0, 2)}
            stages.update()

            cost["total"] = {"seconds": round(time.perf_counter() - t_start, 2),
                             "unet_evals": sum(c.get("unet_evals", 0) for c in cost.values())}
            report["cost"] = cost
            report["notes"] = notes
            write_report(report, tmp, figures)
            if run is not None:
                _log_wandb(run, report, tmp)
                run.finish()
                run = None
        except BaseException:
            if run is not None:
                run.finish(exit_code=1)
            raise
    return report


def replication_section(pipe, generated: torch.Tensor, gen_rows: Sequence[PromptRow], n: int,
                        gen_groups: Sequence[str], rows: Sequence[PromptRow], data: Path, resolution: int,
                        sscd_model=None, batch_size: int = 32, progress: bool = True) -> tuple[dict | None, str]:
    """Replication of the generations against the training images of `data` (`find_training_images`):
    (`replication_stats` plus provenance, with the VAE references under `_references`), or (None, why not)."""

    train = find_training_images(data, rows)
    if train is None:
        return None, (f"replication skipped: no training images found (no imagefolder at {data / 'train'} or "
                      f"{data}, and no member rows with file_name)")
    paths, names, described = train
    if len(set(map(str, paths))) < 2:
        return None, f"replication skipped: the NN1/NN2 ratio needs at least 2 training images, found {described}"
    originals_all = load_images(paths, names, resolution, "training images", progress)
    originals, inverse = unique_images(originals_all)
    references = vae_roundtrip(pipe, originals)
    # the unique training image each generation's own prompt was trained on (toy: duplicated rows)
    index_of = {Path(p).resolve(): int(inverse[i]) for i, p in enumerate(paths) if isinstance(p, Path)}
    sources = [index_of.get((data / r.file_name).resolve(), -1) if r.file_name else -1
               for r in gen_rows for _ in range(n)]
    rep = replication_stats(generated, gen_groups, references, originals, sources, sscd_model, batch_size)
    for text, row in zip(captions_of(gen_rows, n), rep["generations"], strict=True):
        row["text"] = text
    rep.update(training_images=described, train_images=len(originals_all), unique_train_images=len(originals),
               reference="unique training images as reproduced by the model's VAE (decode(encode(x)), posterior "
                         "mean)",
               similarity="1 - NN1/NN2 (L2 ratio of Gu et al.); replicated when the ratio < 1/3",
               _references=references)
    return rep, ""


def captions_of(rows: Sequence[PromptRow], n: int) -> list[str]:
    """The caption of each generation (prompt-major, as `generate_images` orders them)."""
    return [r.text for r in rows for _ in range(n)]


# ---------------------------------------------------------------- output


def flat_summary(report: dict) -> dict[str, float]:
    """The headline numbers as flat `section/name/metric` keys (W&B summary)."""
    flat = {}
    for name, d in report.get("trigger", {}).get("detectors", {}).items():
        for k in ("auroc", "tpr_at_1fpr"):
            if k in d:
                flat[f"trigger/{name}/{k}"] = d[k]
    for group, s in report.get("replication", {}).get("groups", {}).items():
        for k, v in s.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                flat[f"replication/{group}/{k}"] = v
    for name, s in report.get("membership", {}).get("scores", {}).items():
        flat[f"membership/{name}/auroc"] = s["auroc"]
        flat[f"membership/{name}/tpr_at_1fpr"] = s["tpr_at_1fpr"]
    for group, g in report.get("membership", {}).get("by_group", {}).items():
        for name, v in g.items():
            if name != "members":
                flat[f"membership/{group}/{name}/auroc"] = v
    for group, q in report.get("quality", {}).get("groups", {}).items():
        for k in ("toy_alignment", "kid", "clip_score"):
            if k in q:
                flat[f"quality/{group}/{k}"] = q[k]
    for section, c in report.get("cost", {}).items():
        for k, v in c.items():
            flat[f"cost/{section}/{k}"] = v
    return {k: float(v) for k, v in flat.items() if v is not None}


def write_report(report: dict, out: str | Path, figures: dict | None = None) -> dict:
    """Write report.json, report.md and the PNGs into `out` (a directory); return the list of files."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = figures or {}
    files = []
    trigger = report.get("trigger", {})
    prompt_rows = trigger.get("prompts", [])
    names = list(trigger.get("detectors", {}))
    if trigger.get("labelled") and names:
        labels = [p["label"] for p in prompt_rows]
        curves = {}
        for name in names:
            fpr, tpr = roc_points([p["scores"][name] for p in prompt_rows], labels)
            curves[PROMPT_DETECTORS[name].title] = (fpr, tpr, trigger["detectors"][name]["auroc"])
        save_roc_curves(out / "roc.png", curves, title="trigger prompts (memorized = positive)", log_x=True)
        files.append("roc.png")
    membership = report.get("membership")
    if membership:
        labels = membership["member_flags"]
        curves = {}
        for name, s in membership["scores"].items():
            fpr, tpr = roc_points(membership["per_sample"][name], labels)
            curves[{"clid_th": "CLiD_th", "clid_vec": "CLiD_vec", "loss": "loss only"}[name]] = (fpr, tpr, s["auroc"])
        save_roc_curves(out / "roc_membership.png", curves, title="membership (member = positive)", log_x=True)
        files.append("roc_membership.png")
    by_group: dict = {}
    for name in names:
        groups: dict = {}
        for p in prompt_rows:
            groups.setdefault(p["group"], []).append(p["scores"][name])
        by_group[PROMPT_DETECTORS[name].title] = groups
    if membership:
        groups = {}
        for g, s in zip(membership["groups"], membership["per_sample"]["clid_th"], strict=True):
            groups.setdefault(g, []).append(s)
        by_group["CLiD_th (membership, out-of-fold)"] = groups
    if by_group:
        save_score_histograms(out / "scores_by_group.png", by_group, title="scores by group")
        files.append("scores_by_group.png")
    replication = report.get("replication")
    if replication and "replicated" in figures:
        generated, references = figures["replicated"]
        gens = replication["generations"]
        order = sorted((i for i, g in enumerate(gens) if not math.isnan(g["ratio"])), key=lambda i: gens[i]["ratio"])
        picks = order[:REPLICATED_GRID]
        if picks:
            titles = [f"{gens[i]['group']} r={gens[i]['ratio']:.2f} L2={gens[i]['l2']:.3f}" for i in picks]
            nearest = references[[gens[i]["nn_index"] for i in picks]]
            save_replication_grid(out / "replicated.png", generated[picks], nearest, titles, ncols=4)
            files.append("replicated.png")
    report["files"] = ["report.json", "report.md", *files]
    write_json(report, out / "report.json")
    with atomic_file(out / "report.md") as f:
        f.write(markdown(report))
    return report


def _figure(report: dict, name: str, alt: str) -> str:
    return f"![{alt}]({name})" if name in report.get("files", []) else ""


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "%":
        return f"{value:.1%}"
    return format(value, spec)


def markdown(report: dict) -> str:
    c = report["config"]
    counts = report["counts"]
    lines = [f"# {report['title']}", "",
             f"Prompts: `{c['prompts']}` ({counts['prompts']} rows: {counts['memorized']} memorized, "
             f"{counts['not_memorized']} not memorized, {counts['members']} members, {counts['non_members']} "
             f"non-members). Data root: `{c['data']}`. Generations: {c['n']} per prompt, DDIM {c['steps']} steps, "
             f"guidance {c['guidance_scale']}, seed {c['seed']}; detectors: {c['detector_schedule']}.", "",
             f"Label mapping: {report['label_mapping']}.", "",
             f"ROC convention: {report['roc_convention']}.", ""]
    trigger = report.get("trigger", {})
    if trigger.get("detectors"):
        lines += ["## Trigger scenario: detectors", ""]
        if trigger["labelled"]:
            lines += [f"{trigger['n_positive']} memorized vs {trigger['n_negative']} non-memorized prompts.", ""]
            lines += ["| detector | AUROC | TPR@1%FPR | mean (memorized) | mean (not) | UNet evals / prompt |",
                      "|---|---|---|---|---|---|"]
            for d in trigger["detectors"].values():
                lines.append(f"| {d['name']} | {_fmt(d['auroc'])} | {_fmt(d['tpr_at_1fpr'])} | "
                             f"{_fmt(d['mean_positive'], '.4g')} | {_fmt(d['mean_negative'], '.4g')} | "
                             f"{d['unet_evals_per_prompt']:g} |")
            verified = trigger.get("without_replicating_negatives")
            if verified and verified["excluded"] and verified["detectors"]:
                lines += ["", f"Diagnostic: {len(verified['excluded'])} of the {trigger['n_negative']} non-memorized "
                          "prompts have a generation that replicates a training image (ratio < 1/3; listed in report.json "
                          "as `trigger.without_replicating_negatives`). Without them:", "",
                          "| detector | AUROC | TPR@1%FPR |", "|---|---|---|"]
                lines += [f"| {trigger['detectors'][k]['name']} | {_fmt(v['auroc'])} | {_fmt(v['tpr_at_1fpr'])} |"
                          for k, v in verified["detectors"].items()]
        else:
            lines += [f"{trigger['n_prompts']} unlabelled prompts: scores only (report.json, `trigger.prompts`).", "",
                      "| detector | mean score | UNet evals / prompt |", "|---|---|---|"]
            for name, d in trigger["detectors"].items():
                mean = float(np.mean([p["scores"][name] for p in trigger["prompts"]]))
                lines.append(f"| {d['name']} | {mean:.4g} | {d['unet_evals_per_prompt']:g} |")
        lines += ["", _figure(report, "roc.png", "ROC"), ""]
    rep = report.get("replication")
    if rep:
        sscd = any("sscd_p95" in s for s in rep["groups"].values())
        lines += ["## Replication", "",
                  f"Generations against the {rep['unique_train_images']} {rep['reference']} "
                  f"({rep['train_images']} training images from {rep['training_images']}). Similarity = "
                  f"{rep['similarity']}." + (" SSCD: max cosine to any reference image; replicated when > 0.5."
                                             if sscd else ""), "",
                  "| group | generations | similarity p95 | similarity max | replicated | (vs originals) | "
                  "tiled L2 <= 0.15 | nL2 < 1.4 | nearest is own image |" + (" SSCD p95 | SSCD max | SSCD > 0.5 |"
                                                                           if sscd else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if sscd else "")]
        for group, s in rep["groups"].items():
            row = (f"| {group} | {s['generations']} | {_fmt(s['similarity_p95'])} | {_fmt(s['similarity_max'])} | "
                   f"{_fmt(s['fraction_replicated'], '%')} | {_fmt(s['fraction_replicated_vs_originals'], '%')} | "
                   f"{_fmt(s['fraction_tiled_l2'], '%')} | {_fmt(s['fraction_nl2'], '%')} | "
                   f"{_fmt(s['nearest_is_own_image'], '%')} |")
            if sscd:
                row += f" {_fmt(s['sscd_p95'])} | {_fmt(s['sscd_max'])} | {_fmt(s['sscd_fraction'], '%')} |"
            lines.append(row)
        lines += ["", _figure(report, "replicated.png", "most replicated generations"), ""]
    mem = report.get("membership")
    if mem:
        lines += ["## Membership (CLiD)", "",
                  f"{mem['members']} members vs {mem['non_members']} non-members; {mem['folds']}-fold cross-fitting "
                  f"(alpha per fold: {', '.join(f'{a:g}' for a in mem['alphas'])}). Deviation: the paper fits alpha, "
                  "the scaler and CLiD_vec on a separate shadow split; here each half is scored by a fit on the "
                  "other half.", "",
                  "| score | AUROC | TPR@1%FPR |", "|---|---|---|"]
        for name, label in (("clid_th", "CLiD_th"), ("clid_vec", "CLiD_vec"), ("loss", "loss only (L)")):
            s = mem["scores"][name]
            lines.append(f"| {label} | {_fmt(s['auroc'])} | {_fmt(s['tpr_at_1fpr'])} |")
        if mem.get("by_group"):
            lines += ["", "AUROC of each member group against all non-members (same out-of-fold scores):", "",
                      "| member group | members | CLiD_th | CLiD_vec | loss only (L) |", "|---|---|---|---|---|"]
            for group, g in mem["by_group"].items():
                lines.append(f"| {group} | {g['members']} | {_fmt(g['clid_th'])} | {_fmt(g['clid_vec'])} | "
                             f"{_fmt(g['loss'])} |")
        lines += ["", _figure(report, "roc_membership.png", "membership ROC"), ""]
    quality = report.get("quality")
    if quality:
        lines += ["## Quality (general scenario)", "",
                  f"KID: unbiased MMD^2, kernel (x.y/d + 1)^3, generations vs held-out images in the fixed feature "
                  f"{quality['feature']} (lower = closer; unbiased, so it can be slightly negative; comparable "
                  "only within memtrain). The general row is MemBench's general scenario; the trigger row shows "
                  "the same measures for the memorized prompts."
                  + (f" Reference: training images (through the VAE) vs held-out: {quality['kid_reference']:.4g}."
                     if "kid_reference" in quality else ""), "",
                  "| group | generations | toy alignment | KID | CLIP score |", "|---|---|---|---|---|"]
        for group, q in quality["groups"].items():
            lines.append(f"| {group} | {q['generations']} | {_fmt(q.get('toy_alignment'))} | "
                         f"{_fmt(q.get('kid'), '.4g')} | {_fmt(q.get('clip_score'), '.2f')} |")
        lines.append("")
    lines += [_figure(report, "scores_by_group.png", "scores by group"), ""]
    lines += ["## Cost", "", "| section | seconds | UNet evals |", "|---|---|---|"]
    for section, cst in report.get("cost", {}).items():
        evals = cst.get("unet_evals")
        lines.append(f"| {section} | {cst['seconds']:.1f} | {evals if evals is not None else '-'} |")
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in report["notes"]]]
    lines.append("")
    kept = [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]  # no double blank lines
    return "\n".join(kept)


# ---------------------------------------------------------------- W&B


def _start_wandb(tmp: Path, config: dict):
    """An offline-capable W&B run (WANDB_MODE and WANDB_DIR are respected; its files go into OUT/wandb)."""

    directory = os.environ.get("WANDB_DIR") or str(tmp)
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "memtrain"), job_type="evaluate", dir=directory,
                          config=config, name=f"evaluate {Path(config['checkpoint']).name}")
    except Exception as e:  # wandb raises its own error types (no login, no network)
        raise MemtrainError(f"--wandb: cannot start a W&B run ({e}); WANDB_MODE=offline logs without an account")\
            from None


def _log_wandb(run, report: dict, out: Path) -> None:

    values: dict = dict(flat_summary(report))
    for name in report.get("files", []):
        if name.endswith(".png"):
            values[f"figures/{name[:-4]}"] = wandb.Image(str(out / name))
    run.log(values)


# ---------------------------------------------------------------- CLI





