"""Replication study of a checkpoint on a toy-world dataset: generate for each labelled prompt group,
measure replication against the unique training images, write JSON, Markdown and a PNG grid.

Replicated when the NN1/NN2 L2 ratio is below `ratio_threshold` (Gu et al. 2023, "On memorization in
diffusion models"; 1/3 by default), with tiled L2 and nL2 (Carlini et al., USENIX Security 2023,
"Extracting training data from diffusion models") reported beside it; held-out images give the
criterion's false-positive rate. Deviation: references are the VAE-reproduced training images
(`reference="vae"`), so the autoencoder's error is not counted as non-replication.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.io import MemtrainError, atomic_file, write_json
from trainer.measure.replication import (
    RATIO_THRESHOLD,
    group_summary,
    replication_metrics,
    unique_images,
    vae_roundtrip,
)
from trainer.measure.verdict import GRADIENT_METRIC, calibrate_replication
from trainer.plots import save_replication_grid
from trainer.sample.generate import generate_images
from trainer.toy.render import fraction, study_markdown
from trainer.toy.world import read_labels

GROUPS = ("duplicated", "singleton", "novel")


def load_image_dir(root: Path) -> tuple[torch.Tensor, list[str]]:
    """All images of an imagefolder directory as [N, 3, H, W] in [0, 1], with their file names."""
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    arrays = [np.asarray(Image.open(root / r["file_name"]).convert("RGB"), dtype=np.float32) / 255 for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [r["file_name"] for r in rows]


def replication_study(pipe, data_root: str | Path, n: int = 2, seed: int = 0, max_per_group: int = 64,
                      steps: int = 50, guidance_scale: float = 7.5, progress: bool = True,
                      reference: str = "vae", ratio_threshold: float = RATIO_THRESHOLD) -> dict:
    """Generate `n` images for up to `max_per_group` prompts of each group and measure replication
    (replicated: NN1/NN2 ratio < `ratio_threshold`); calibrate the criterion on held-out images."""
    data_root = Path(data_root)
    labels = read_labels(data_root / "labels.jsonl")
    train, names = load_image_dir(data_root / "train")
    unique, inverse = unique_images(train)
    # which unique training image each labelled prompt was trained on
    file_to_unique = {f"train/{name}": int(inverse[i]) for i, name in enumerate(names)}
    # and the group (duplicated / singleton) of each unique training image the labels name
    unique_group = {file_to_unique[r["file_name"]]: r["group"] for r in labels if r.get("file_name") in file_to_unique}
    prompts = []
    for group in GROUPS:
        rows = [r for r in labels if r["group"] == group][:max_per_group]
        prompts += [dict(r, source=file_to_unique.get(r.get("file_name"), -1)) for r in rows]
    if not prompts:
        raise MemtrainError(f"{data_root / 'labels.jsonl'} has no duplicated, singleton or novel prompts")
    images = generate_images(pipe, [p["text"] for p in prompts], n=n, seed=seed, steps=steps,
                             guidance_scale=guidance_scale, progress=progress)
    references = vae_roundtrip(pipe, unique) if reference == "vae" else unique
    # held-out pairs (never trained on), when the data has them: the criterion's calibration
    has_heldout = (data_root / "heldout" / "metadata.jsonl").exists()
    heldout = load_image_dir(data_root / "heldout")[0] if has_heldout else None
    metrics = replication_metrics(images, references, ratio_threshold=ratio_threshold)
    originals = replication_metrics(images, unique, ratio_threshold=ratio_threshold)
    per_gen = []
    for i, image_metrics in enumerate(zip(*(metrics[k] for k in metrics), strict=True)):
        row = dict(zip(metrics, (v.item() for v in image_metrics), strict=True))
        row.update({f"{k}_vs_originals": originals[k][i].item() for k in ("l2", "ratio", "ratio_memorized")})
        prompt = prompts[i // n]
        row.update(text=prompt["text"], group=prompt["group"], source=prompt["source"],
                   nearest_is_source=row["nn_index"] == prompt["source"],
                   nearest_group=unique_group.get(row["nn_index"], "unlabelled"))
        per_gen.append(row)
    heldout_refs = None if heldout is None else vae_roundtrip(pipe, heldout) if reference == "vae" else heldout
    verdict = None
    if heldout_refs is not None:  # the default copy verdict of `evaluate`, calibrated on the same held-out images
        verdict = calibrate_replication(heldout_refs, references, unique)[GRADIENT_METRIC]
        for row in per_gen:
            row["verdict_copy"] = bool(verdict.flags([row["gradient_ratio"]])[0])
    return {"images": images, "unique_train": references, "generations": per_gen, "n": n, "seed": seed,
            "train_images": len(train), "unique_train_images": len(unique), "reference": reference,
            "steps": steps, "guidance_scale": guidance_scale, "ratio_threshold": ratio_threshold,
            "heldout_images": heldout, "verdict": None if verdict is None else verdict.to_dict(),
            "verdict_text": None if verdict is None else verdict.describe(),
            "calibration": None if heldout_refs is None else heldout_calibration(heldout_refs, references,
                                                                                ratio_threshold)}


def heldout_calibration(heldout: torch.Tensor, references: torch.Tensor, ratio_threshold: float) -> dict:
    """The replication criterion applied to the held-out (never trained) images, compared like the
    generations: its false-positive rate on new images of the training distribution."""
    ratio = replication_metrics(heldout, references, ratio_threshold=ratio_threshold)["ratio"].numpy()
    return {"heldout_images": len(heldout), "flagged_rate": float(np.mean(ratio < ratio_threshold)),
            "ratio_min": float(np.min(ratio)), "ratio_p5": float(np.percentile(ratio, 5)),
            "ratio_median": float(np.median(ratio))}


def summarize(study: dict) -> dict:
    """Per-group replication (`measure.replication.group_summary`, at the study's threshold), plus how many
    replicated generations reproduce one of the duplicated training images."""
    summary = {}
    for group in GROUPS:
        rows = [g for g in study["generations"] if g["group"] == group]
        if not rows:
            continue
        own = [r["nearest_is_source"] for r in rows] if group != "novel" else None
        s = group_summary([r["ratio"] for r in rows], [r["ratio_vs_originals"] for r in rows],
                          [r["tiled_l2"] for r in rows], [r["nl2"] for r in rows], [r["l2"] for r in rows], own,
                          study["ratio_threshold"])
        replicated = [r for r in rows if r["ratio_memorized"]]
        if "verdict_copy" in rows[0]:
            s["fraction_verdict"] = float(np.mean([r["verdict_copy"] for r in rows]))
        summary[group] = {"prompts": len({r["text"] for r in rows}), **s,
                          "replicated_generations": len(replicated),
                          "replicated_duplicated_images": sum(r["nearest_group"] == "duplicated" for r in replicated)}
    return summary


def write_study(study: dict, out: str | Path, title: str, extra: dict | None = None, grid_per_group: int = 8) -> dict:
    """Write report.json, report.md and replication.png into `out`; return the JSON report."""
    out = Path(out)
    summary = summarize(study)
    ref = "as reproduced by the model's VAE" if study["reference"] == "vae" else "(originals)"
    report = {"title": title,
              "criterion": f"NN1/NN2 L2 ratio < {fraction(study['ratio_threshold'])} against the unique training "
                           f"images {ref} (Gu et al. 2023)",
              "ratio_threshold": study["ratio_threshold"], "calibration": study["calibration"],
              "verdict": study.get("verdict"), "verdict_text": study.get("verdict_text"),
              "n_per_prompt": study["n"], "seed": study["seed"], "sampler_steps": study["steps"],
              "guidance_scale": study["guidance_scale"], "train_images": study["train_images"],
              "unique_train_images": study["unique_train_images"], "groups": summary, **(extra or {}),
              "generations": [{k: v for k, v in g.items()} for g in study["generations"]]}
    picks = []
    for group in GROUPS:
        rows = [i for i, g in enumerate(study["generations"]) if g["group"] == group]
        picks += rows[:: max(1, study["n"])][:grid_per_group]
    if picks:
        gens = study["generations"]
        titles = [f"{gens[i]['group'][:5]} L2={gens[i]['l2']:.2f} r={gens[i]['ratio']:.2f}" for i in picks]
        nearest = study["unique_train"][[gens[i]["nn_index"] for i in picks]]
        save_replication_grid(out / "replication.png", study["images"][picks], nearest, titles, ncols=4)
    write_json(report, out / "report.json")
    with atomic_file(out / "report.md") as f:
        f.write(study_markdown(report))
    return report
