"""The generations of `memtrain evaluate` and their replication of training images, each computed and
rendered side by side: the stock generations of the requested prompt groups, the copy verdict against the
training images (`trainer.report.sections.replication_section`, calibrated on held-out images) and
nearest-neighbour search in a training-image index (`trainer.report.guard_sections.index_replication`)."""

from __future__ import annotations

import time

from trainer.core import distributed
from trainer.core.unet_core import count_unet_samples
from trainer.report.guard_sections import index_replication
from trainer.report.render import figure, fmt
from trainer.report.run import EvalRun
from trainer.report.sections import (
    captions_of,
    generation_rows,
    heldout_caption_rows,
    heldout_images,
    replication_section,
    without_replicating_negatives,
)
from trainer.sample.generate import generate_images


def run_generation(run: EvalRun) -> None:
    """`n` stock generations of each row of the requested groups (shared by the processes of a launch)."""
    spec = run.spec
    picked = generation_rows(run.rows, run.groups, run.labelled) if spec.generate else []
    if spec.generate and "heldout" in run.groups:
        picked += [(r, "heldout") for r in heldout_caption_rows(spec.heldout, run.rows)]
    run.gen_rows = [r for r, _ in picked]
    run.gen_groups = [g for _, g in picked for _ in range(spec.n)]
    if run.gen_rows:
        t0 = time.perf_counter()
        with count_unet_samples(run.pipe.unet) as counted:
            run.generated = generate_images(run.pipe, [r.text for r in run.gen_rows], n=spec.n, seed=spec.seed,
                                            steps=spec.steps, guidance_scale=spec.guidance_scale,
                                            batch_size=spec.batch_size, progress=run.progress, across_processes=True)
        run.cost["generation"] = {"seconds": round(time.perf_counter() - t0, 2),
                                  "unet_evals": distributed.sum_over_processes(counted[0]),
                                  "images": len(run.generated)}
    elif not spec.generate:
        run.notes.append("--no-generate: replication and quality sections skipped")


def run_replication(run: EvalRun) -> None:
    """The held-out images (for the verdict and KID), then the generations' replication of the training
    images and / or of the index."""
    spec = run.spec
    run.heldout_set, heldout_from = heldout_images(spec.heldout, run.rows, run.data, run.prompts, run.resolution,
                                                   run.progress)
    if run.generated is None:
        return
    t0 = time.perf_counter()
    rep, note = replication_section(run.pipe, run.generated, run.gen_rows, spec.n, run.gen_groups, run.rows, run.data,
                                    spec.train_data, run.resolution, run.sscd_model, spec.batch_size, run.progress,
                                    run.heldout_set, spec.fpr, spec.criterion, run.calibration, run.training_index,
                                    run.embedder)
    if rep is None:
        run.notes.append(note + ("; replication from --index only" if run.training_index is not None else ""))
    if run.training_index is not None:
        rep = rep or {}
        rep["index"] = index_replication(run.generated, run.gen_groups, captions_of(run.gen_rows, spec.n),
                                         run.training_index, run.embedder, run.index_criterion, spec.batch_size)
        rep["index"]["path"] = str(spec.index)
    if rep is None:
        return
    run.report["replication"] = rep
    if "verdict" in rep:
        rep["verdict"]["heldout_from"] = heldout_from
        run.report["verdict"] = rep["verdict"]
    if "_references" in rep:
        references = rep.pop("_references")
        verified = without_replicating_negatives(run.report.get("trigger", {}), rep)
        if verified is not None:
            run.report["trigger"]["without_replicating_negatives"] = verified
        run.figures["replicated"] = (run.generated, references)
    run.cost["replication"] = {"seconds": round(time.perf_counter() - t0, 2)}


def calibration_lines(v: dict) -> list[str]:
    alternatives = v.get("alternatives")
    if not alternatives:
        return []
    lines = ["", "Each criterion calibrated on the same held-out images (the verdict's criterion is named "
             "above; `--criterion` chooses):", "",
             "| criterion | threshold | held-out flagged | training images recalled |", "|---|---|---|---|"]
    for name, c in alternatives.items():
        op = ">" if c["higher_is_copy"] else "<"
        lines.append(f"| {name} | {op} {c['threshold']:.4g} | {fmt(c['fpr_heldout'], '%')} of {c['n_heldout']} | "
                     f"{fmt(c['recall'], '%')} of {c['n_positive']} |")
    return lines


def index_lines(ix: dict) -> list[str]:
    lines = ["## Replication (training-image index)", "",
             f"Index `{ix.get('path', '')}`: {ix['images']} training images, {ix['embedding']} embedding at "
             f"{ix['resolution']}x{ix['resolution']}. Similarity = {ix['similarity']}. Per generation: the nearest "
             "training image (file, caption) in report.json, `replication.index.generations`.", "",
             f"Criterion: {ix.get('criterion', ix.get('similarity'))}.", "",
             "| group | generations | similarity mean | p95 | max | replicated | nearest caption is the prompt |",
             "|---|---|---|---|---|---|---|"]
    for group, s in ix["groups"].items():
        lines.append(f"| {group} | {s['generations']} | {fmt(s['similarity_mean'])} | {fmt(s['similarity_p95'])} | "
                     f"{fmt(s['similarity_max'])} | {fmt(s['fraction_replicated'], '%')} | "
                     f"{fmt(s['nearest_caption_is_prompt'], '%')} |")
    return [*lines, ""]


def replication_lines(report: dict) -> list[str]:
    rep = report.get("replication") or {}
    lines = []
    if rep.get("groups"):
        sscd = any("sscd_p95" in s for s in rep["groups"].values())
        lines += ["## Replication", "",
                  f"Generations against the {rep['unique_train_images']} {rep['reference']} "
                  f"({rep['train_images']} training images from {rep['training_images']}). Replicated (copy): "
                  f"{rep['criterion']}. Similarity = {rep['similarity']}; ratio < 1/3 is Gu et al.'s criterion."
                  + (" SSCD: max cosine to any reference image; > 0.5 is Somepalli et al.'s convention." if sscd
                     else ""), "",
                  "| group | generations | replicated | (vs originals) | median score | ratio < 1/3 | similarity p95 | "
                  "similarity max | tiled L2 <= 0.15 | nL2 < 1.4 | nearest is own image |"
                  + (" SSCD p95 | SSCD max | SSCD > 0.5 |" if sscd else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if sscd else "")]
        for group, s in rep["groups"].items():
            row = (f"| {group} | {s['generations']} | {fmt(s['fraction_replicated'], '%')} | "
                   f"{fmt(s['fraction_replicated_vs_originals'], '%')} | {fmt(s.get('score_median'), '.4g')} | "
                   f"{fmt(s['fraction_ratio_1_3'], '%')} | {fmt(s['similarity_p95'])} | {fmt(s['similarity_max'])} | "
                   f"{fmt(s['fraction_tiled_l2'], '%')} | {fmt(s['fraction_nl2'], '%')} | "
                   f"{fmt(s['nearest_is_own_image'], '%')} |")
            if sscd:
                row += f" {fmt(s['sscd_p95'])} | {fmt(s['sscd_max'])} | {fmt(s['sscd_fraction'], '%')} |"
            lines.append(row)
        lines += calibration_lines(rep.get("verdict") or {})
        lines += ["", figure(report, "replicated.png", "most replicated generations"), ""]
    if rep.get("index"):
        lines += index_lines(rep["index"])
    return lines
