"""MemBench's scenarios in `memtrain evaluate` (Hong et al. 2024), each computed and rendered side by side:
the trigger scenario (prompt detectors: AUROC, TPR at 1% FPR, calibrated verdicts), membership (CLiD,
Zhai et al. 2024, cross-fitted) and the general scenario (quality: KID, alignment / CLIP score). The
formulas are in `trainer.report.sections`; these functions read and fill an `EvalRun`."""

from __future__ import annotations

import time

import numpy as np

from trainer.data import load_images
from trainer.measure.features import choose_quality_feature, kid
from trainer.prompts import group_name
from trainer.report.render import figure, fmt
from trainer.report.run import EvalRun
from trainer.report.sections import (
    CLID_FOLDS,
    captions_of,
    general_scenario,
    membership_by_group,
    membership_scenario,
    trigger_scenario,
)

FLAGGED_LISTED = 20


def run_trigger(run: EvalRun) -> None:
    """The registered prompt detectors on every prompt row (`sections.trigger_scenario`)."""
    spec, t0 = run.spec, time.perf_counter()
    trigger = trigger_scenario(run.pipe, run.rows, run.detectors, run.prompts, spec.seed, spec.batch_size,
                               run.progress, spec.fpr)
    run.report["trigger"] = trigger
    run.cost["detectors"] = {"seconds": round(time.perf_counter() - t0, 2),
                             "unet_evals": sum(d["unet_evals"] for d in trigger["detectors"].values())}


def flagged_lines(trigger: dict) -> list[str]:
    flagged = [p for p in trigger["prompts"] if p.get("flagged_by")]
    if not flagged:
        return ["", "No prompt is flagged by any detector."]
    lines = ["", f"Prompts flagged by at least one detector ({len(flagged)}; all in report.json, "
             "`trigger.prompts[].flagged_by`):", "", "| prompt | label | flagged by |", "|---|---|---|"]
    lines += [f"| {p['text']} | {'-' if p['label'] is None else p['label']} | {', '.join(p['flagged_by'])} |"
              for p in flagged[:FLAGGED_LISTED]]
    if len(flagged) > FLAGGED_LISTED:
        lines.append(f"| ... {len(flagged) - FLAGGED_LISTED} more | | |")
    return lines


def labelled_trigger_lines(trigger: dict) -> list[str]:
    lines = [f"{trigger['n_positive']} memorized vs {trigger['n_negative']} non-memorized prompts.", "",
             "| detector | AUROC | TPR@1%FPR | mean (memorized) | mean (not) | UNet evals / prompt | "
             "threshold (calibrated) | flagged: memorized | flagged: not memorized |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in trigger["detectors"].values():
        labels = [trigger["prompts"][i]["label"] for i in d.get("flagged", [])]
        cal = d.get("calibration") or {}
        lines.append(f"| {d['name']} | {fmt(d['auroc'])} | {fmt(d['tpr_at_1fpr'])} | "
                     f"{fmt(d['mean_positive'], '.4g')} | {fmt(d['mean_negative'], '.4g')} | "
                     f"{d['unet_evals_per_prompt']:g} | {fmt(cal.get('threshold'), '.4g')} | "
                     f"{labels.count(1)} of {trigger['n_positive']} | {labels.count(0)} of "
                     f"{trigger['n_negative']} |")
    lines += ["", "Each detector's verdict: a prompt is flagged as memorized when its score is above the "
              "threshold that flags at most the stated share of the non-memorized prompts:", ""]
    lines += [f"- {d['verdict']}" for d in trigger["detectors"].values() if d.get("verdict")]
    lines += flagged_lines(trigger)
    verified = trigger.get("without_replicating_negatives")
    if verified and verified["excluded"] and verified["detectors"]:
        lines += ["", f"Diagnostic: {len(verified['excluded'])} of the {trigger['n_negative']} non-memorized "
                  "prompts have a generation that replicates a training image (the copy verdict; listed in report.json "
                  "as `trigger.without_replicating_negatives`). Without them:", "",
                  "| detector | AUROC | TPR@1%FPR |", "|---|---|---|"]
        lines += [f"| {trigger['detectors'][k]['name']} | {fmt(v['auroc'])} | {fmt(v['tpr_at_1fpr'])} |"
                  for k, v in verified["detectors"].items()]
    return lines


def unlabelled_trigger_lines(trigger: dict) -> list[str]:
    n_ref = sum(p["label"] == 0 for p in trigger["prompts"])
    lines = [f"{trigger['n_prompts']} prompts without memorized labels (report.json, `trigger.prompts`): "
             + (f"the {n_ref} known non-memorized prompts (label 0) calibrate each detector's threshold, "
                "and the prompts above it are flagged." if n_ref else
                "scores only; the detectors are uncalibrated: no non-memorized prompts (label 0) to set a "
                "threshold on."), "",
             "| detector | mean score | UNet evals / prompt | threshold (calibrated) | flagged |", "|---|---|---|---|---|"]
    for name, d in trigger["detectors"].items():
        mean = float(np.mean([p["scores"][name] for p in trigger["prompts"]]))
        cal = d.get("calibration") or {}
        lines.append(f"| {d['name']} | {mean:.4g} | {d['unet_evals_per_prompt']:g} | "
                     f"{fmt(cal.get('threshold'), '.4g')} | {len(d.get('flagged', []))} of {trigger['n_prompts']} |")
    lines += ["", *[f"- {d['verdict']}" for d in trigger["detectors"].values() if d.get("verdict")]]
    return lines + (flagged_lines(trigger) if n_ref else [])


def trigger_lines(report: dict) -> list[str]:
    trigger = report.get("trigger", {})
    if not trigger.get("detectors"):
        return []
    body = labelled_trigger_lines(trigger) if trigger["labelled"] else unlabelled_trigger_lines(trigger)
    return ["## Trigger scenario: detectors", "", *body, "", figure(report, "roc.png", "ROC"), ""]


def run_membership(run: EvalRun) -> None:
    """CLiD on the rows with a member flag and an image (`sections.membership_scenario`), or a note why not."""
    spec = run.spec
    member_rows = [r for r in run.rows if r.member is not None]
    n_mem = sum(r.member == 1 for r in member_rows)
    if "clid" not in run.detectors:
        run.notes.append("membership skipped: clid not in --detectors")
        return
    if min(n_mem, len(member_rows) - n_mem) < CLID_FOLDS:
        run.notes.append(f"membership skipped: needs at least {CLID_FOLDS} members and {CLID_FOLDS} "
                         f"non-members with images, found {n_mem} and {len(member_rows) - n_mem}")
        return
    images = load_images([run.data / r.file_name for r in member_rows],
                         [f"{run.prompts}, line {r.line} ({r.file_name})" for r in member_rows],
                         run.resolution, "membership images", run.progress)
    membership = membership_scenario(run.pipe, images, [r.text for r in member_rows],
                                     [r.member for r in member_rows], spec.seed, spec.batch_size)
    membership["groups"] = [group_name(r) if r.group else ("member" if r.member else "non-member")
                            for r in member_rows]
    membership["texts"] = [r.text for r in member_rows]
    membership["by_group"] = membership_by_group(membership)
    run.report["membership"] = membership
    run.cost["membership"] = {"seconds": membership["seconds"], "unet_evals": membership["unet_evals"]}


def membership_lines(report: dict) -> list[str]:
    mem = report.get("membership")
    if not mem:
        return []
    lines = ["## Membership (CLiD)", "",
             f"{mem['members']} members vs {mem['non_members']} non-members; {mem['folds']}-fold cross-fitting "
             f"(alpha per fold: {', '.join(f'{a:g}' for a in mem['alphas'])}). Deviation: the paper fits alpha, "
             "the scaler and CLiD_vec on a separate shadow split; here each half is scored by a fit on the "
             "other half.", "",
             "| score | AUROC | TPR@1%FPR |", "|---|---|---|"]
    for name, label in (("clid_th", "CLiD_th"), ("clid_vec", "CLiD_vec"), ("loss", "loss only (L)")):
        s = mem["scores"][name]
        lines.append(f"| {label} | {fmt(s['auroc'])} | {fmt(s['tpr_at_1fpr'])} |")
    if mem.get("by_group"):
        lines += ["", "AUROC of each member group against all non-members (same out-of-fold scores):", "",
                  "| member group | members | CLiD_th | CLiD_vec | loss only (L) |", "|---|---|---|---|---|"]
        for group, g in mem["by_group"].items():
            lines.append(f"| {group} | {g['members']} | {fmt(g['clid_th'])} | {fmt(g['clid_vec'])} | "
                         f"{fmt(g['loss'])} |")
    return [*lines, "", figure(report, "roc_membership.png", "membership ROC"), ""]


def run_quality(run: EvalRun) -> None:
    """KID and alignment of the generations per group in the chosen feature (`sections.general_scenario`)."""
    if run.generated is None:
        return
    spec, t0 = run.spec, time.perf_counter()
    if run.heldout_set is None:
        run.notes.append("KID skipped: no held-out images (--heldout DIR, or member 0 / group heldout rows)")
    captions = captions_of(run.gen_rows, spec.n)
    feature = run.feature = choose_quality_feature(spec.quality_feature, run.clip_scorer, spec.batch_size)
    quality = {"feature": f"{feature.name}: {feature.description}", "groups": {}}
    if feature.alignment_key:
        quality["alignment"] = feature.alignment_key
    for group in dict.fromkeys(run.gen_groups):
        idx = [i for i, g in enumerate(run.gen_groups) if g == group]
        quality["groups"][group] = general_scenario(run.generated[idx], [captions[i] for i in idx], run.heldout_set,
                                                    run.clip_scorer, spec.batch_size, feature)
    if run.heldout_set is not None and run.references is not None and len(run.heldout_set) >= 2:
        quality["kid_reference"] = kid(feature.features(run.references), feature.features(run.heldout_set))
    run.report["quality"] = quality
    run.cost["quality"] = {"seconds": round(time.perf_counter() - t0, 2)}


def alignment_title(report: dict) -> str:
    """The alignment column's title: the quality feature's alignment key, spaced."""
    return (report.get("quality", {}).get("alignment") or "alignment").replace("_", " ")


def quality_lines(report: dict) -> list[str]:
    quality = report.get("quality")
    if not quality:
        return []
    lines = ["## Quality (general scenario)", "",
             f"KID: unbiased MMD^2, kernel (x.y/d + 1)^3, generations vs held-out images in the fixed feature "
             f"{quality['feature']} (lower = closer; unbiased, so it can be slightly negative; comparable "
             "only within memtrain). The general row is MemBench's general scenario; the trigger row shows "
             "the same measures for the memorized prompts."
             + (f" Reference: training images (through the VAE) vs held-out: {quality['kid_reference']:.4g}."
                if "kid_reference" in quality else ""), "",
             f"| group | generations | {alignment_title(report)} | KID | CLIP score |", "|---|---|---|---|---|"]
    for group, q in quality["groups"].items():
        lines.append(f"| {group} | {q['generations']} | {fmt(q.get(quality.get('alignment')))} | "
                     f"{fmt(q.get('kid'), '.4g')} | {fmt(q.get('clip_score'), '.2f')} |")
    return [*lines, ""]
