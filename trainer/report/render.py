"""Every Markdown report of the production verbs, rendered from the report dicts (evaluate, dedup, edit;
the toy world's own tables render in `trainer.toy.render`). No numbers are computed here."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


def _figure(report: dict, name: str, alt: str) -> str:
    return f"![{alt}]({name})" if name in report.get("files", []) else ""


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "%":
        return f"{value:.1%}"
    return format(value, spec)


def evaluate_markdown(report: dict) -> str:
    c = report["config"]
    counts = report["counts"]
    lines = [f"# {report['title']}", "", *_verdict_lines(report),
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
            lines += ["| detector | AUROC | TPR@1%FPR | mean (memorized) | mean (not) | UNet evals / prompt | "
                      "threshold (calibrated) | flagged: memorized | flagged: not memorized |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for d in trigger["detectors"].values():
                labels = [trigger["prompts"][i]["label"] for i in d.get("flagged", [])]
                cal = d.get("calibration") or {}
                lines.append(f"| {d['name']} | {_fmt(d['auroc'])} | {_fmt(d['tpr_at_1fpr'])} | "
                             f"{_fmt(d['mean_positive'], '.4g')} | {_fmt(d['mean_negative'], '.4g')} | "
                             f"{d['unet_evals_per_prompt']:g} | {_fmt(cal.get('threshold'), '.4g')} | "
                             f"{labels.count(1)} of {trigger['n_positive']} | {labels.count(0)} of "
                             f"{trigger['n_negative']} |")
            lines += ["", "Each detector's verdict: a prompt is flagged as memorized when its score is above the "
                      "threshold that flags at most the stated share of the non-memorized prompts:", ""]
            lines += [f"- {d['verdict']}" for d in trigger["detectors"].values() if d.get("verdict")]
            lines += _flagged_lines(trigger)
            verified = trigger.get("without_replicating_negatives")
            if verified and verified["excluded"] and verified["detectors"]:
                lines += ["", f"Diagnostic: {len(verified['excluded'])} of the {trigger['n_negative']} non-memorized "
                          "prompts have a generation that replicates a training image (the copy verdict; listed in report.json "
                          "as `trigger.without_replicating_negatives`). Without them:", "",
                          "| detector | AUROC | TPR@1%FPR |", "|---|---|---|"]
                lines += [f"| {trigger['detectors'][k]['name']} | {_fmt(v['auroc'])} | {_fmt(v['tpr_at_1fpr'])} |"
                          for k, v in verified["detectors"].items()]
        else:
            n_ref = sum(p["label"] == 0 for p in trigger["prompts"])
            lines += [f"{trigger['n_prompts']} prompts without memorized labels (report.json, `trigger.prompts`): "
                      + (f"the {n_ref} known non-memorized prompts (label 0) calibrate each detector's threshold, "
                         "and the prompts above it are flagged." if n_ref else
                         "scores only; the detectors are uncalibrated: no non-memorized prompts (label 0) to set a "
                         "threshold on."), "",
                      "| detector | mean score | UNet evals / prompt | threshold (calibrated) | flagged |", "|---|---|---|---|---|"]
            for name, d in trigger["detectors"].items():
                mean = float(np.mean([p["scores"][name] for p in trigger["prompts"]]))
                cal = d.get("calibration") or {}
                lines.append(f"| {d['name']} | {mean:.4g} | {d['unet_evals_per_prompt']:g} | "
                             f"{_fmt(cal.get('threshold'), '.4g')} | {len(d.get('flagged', []))} of {trigger['n_prompts']} |")
            lines += ["", *[f"- {d['verdict']}" for d in trigger["detectors"].values() if d.get("verdict")]]
            if n_ref:
                lines += _flagged_lines(trigger)
        lines += ["", _figure(report, "roc.png", "ROC"), ""]
    rep = report.get("replication") or {}
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
            row = (f"| {group} | {s['generations']} | {_fmt(s['fraction_replicated'], '%')} | "
                   f"{_fmt(s['fraction_replicated_vs_originals'], '%')} | {_fmt(s.get('score_median'), '.4g')} | "
                   f"{_fmt(s['fraction_ratio_1_3'], '%')} | {_fmt(s['similarity_p95'])} | {_fmt(s['similarity_max'])} | "
                   f"{_fmt(s['fraction_tiled_l2'], '%')} | {_fmt(s['fraction_nl2'], '%')} | "
                   f"{_fmt(s['nearest_is_own_image'], '%')} |")
            if sscd:
                row += f" {_fmt(s['sscd_p95'])} | {_fmt(s['sscd_max'])} | {_fmt(s['sscd_fraction'], '%')} |"
            lines.append(row)
        lines += _calibration_lines(rep.get("verdict") or {})
        lines += ["", _figure(report, "replicated.png", "most replicated generations"), ""]
    if rep.get("index"):
        lines += _index_lines(rep["index"])
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
                  f"| group | generations | {_alignment_title(report)} | KID | CLIP score |", "|---|---|---|---|---|"]
        for group, q in quality["groups"].items():
            lines.append(f"| {group} | {q['generations']} | {_fmt(q.get(quality.get('alignment')))} | "
                         f"{_fmt(q.get('kid'), '.4g')} | {_fmt(q.get('clip_score'), '.2f')} |")
        lines.append("")
    if report.get("dori"):
        lines += dori_lines(report["dori"])
    if report.get("attack"):
        lines += _attack_lines(report["attack"])
    if report.get("guard"):
        lines += _guard_lines(report["guard"], report.get("quality", {}).get("alignment"))
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


FLAGGED_LISTED = 20


def _verdict_lines(report: dict) -> list[str]:
    """The report's first lines: how a copy is decided and whether the threshold was calibrated."""
    v = report.get("verdict")
    if not v:
        return []
    if v.get("calibrated"):
        head = f"**Copy verdict (calibrated)**: {v['criterion']}. Held-out images: {v.get('heldout_from', '-')}."
    else:
        head = (f"**Copy verdict: uncalibrated.** {v['criterion']}. Reason: {v['source']}; the held-out "
                "false-positive rate of this criterion on your data is unknown.")
    lines = [head]
    if v.get("heldout_in_training"):
        lines.append(f"**{v['heldout_in_training']} held-out images are also training images** "
                     "(pixel-equal): they pull the threshold to 0; remove them from the held-out set.")
    if v.get("calibrated") and 0 < v["heldout_images"] < 100 and v["calibration"].get("fpr_target"):
        lines.append(f"With {v['heldout_images']} held-out images the threshold is the closest one; a stated rate "
                     f"of {v['calibration']['fpr_target']:.0%} needs at least 100 to be resolved.")
    return [" ".join(lines), ""]


def _flagged_lines(trigger: dict) -> list[str]:
    flagged = [p for p in trigger["prompts"] if p.get("flagged_by")]
    if not flagged:
        return ["", "No prompt is flagged by any detector."]
    lines = ["", f"Prompts flagged by at least one detector ({len(flagged)}; all in report.json, "
             "`trigger.prompts[].flagged_by`):", "", "| prompt | label | flagged by |", "|---|---|---|"]
    lines += [f"| {p['text']} | {_fmt_plain(p['label'])} | {', '.join(p['flagged_by'])} |"
              for p in flagged[:FLAGGED_LISTED]]
    if len(flagged) > FLAGGED_LISTED:
        lines.append(f"| ... {len(flagged) - FLAGGED_LISTED} more | | |")
    return lines


def _calibration_lines(v: dict) -> list[str]:
    alternatives = v.get("alternatives")
    if not alternatives:
        return []
    lines = ["", "Each criterion calibrated on the same held-out images (the verdict's criterion is named "
             "above; `--criterion` chooses):", "",
             "| criterion | threshold | held-out flagged | training images recalled |", "|---|---|---|---|"]
    for name, c in alternatives.items():
        op = ">" if c["higher_is_copy"] else "<"
        lines.append(f"| {name} | {op} {c['threshold']:.4g} | {_fmt(c['fpr_heldout'], '%')} of {c['n_heldout']} | "
                     f"{_fmt(c['recall'], '%')} of {c['n_positive']} |")
    return lines


def _index_lines(ix: dict) -> list[str]:
    lines = ["## Replication (training-image index)", "",
             f"Index `{ix.get('path', '')}`: {ix['images']} training images, {ix['embedding']} embedding at "
             f"{ix['resolution']}x{ix['resolution']}. Similarity = {ix['similarity']}. Per generation: the nearest "
             "training image (file, caption) in report.json, `replication.index.generations`.", "",
             f"Criterion: {ix.get('criterion', ix.get('similarity'))}.", "",
             "| group | generations | similarity mean | p95 | max | replicated | nearest caption is the prompt |",
             "|---|---|---|---|---|---|---|"]
    for group, s in ix["groups"].items():
        lines.append(f"| {group} | {s['generations']} | {_fmt(s['similarity_mean'])} | {_fmt(s['similarity_p95'])} | "
                     f"{_fmt(s['similarity_max'])} | {_fmt(s['fraction_replicated'], '%')} | "
                     f"{_fmt(s['nearest_caption_is_prompt'], '%')} |")
    return [*lines, ""]


def dori_lines(d: dict) -> list[str]:
    """The DoRI section: replication along the attack (steps-to-copy curves) for memorized prompts and the control."""
    lines = ["## DoRI: re-triggering by the text embedding", "",
             f"Per memorized prompt, its whole text embedding (every token) optimised towards its own training image "
             f"(Kowalczuk et al. 2026: Adam lr {d['lr']:g}, {d['batch']} (t, noise) pairs redrawn each step, "
             f"{d['steps']} steps, from the prompt's embedding); control: as many non-memorized member images, each "
             f"from its own caption, for {d.get('control_steps', '-')} steps. {d['n']} generation(s) per prompt at "
             f"each checkpoint; a copy: {d['criterion']}, nearest to the targeted image.", "",
             "| images | " + " | ".join(f"step {s}" for s in d["memorized"]["checkpoints"]) + " |",
             "|---|" + "---|" * len(d["memorized"]["checkpoints"])]
    lines.append("| memorized | " + " | ".join(_fmt(v, "%") for v in d["memorized"]["replication"]) + " |")
    c = d.get("control")
    if c:
        lines += ["", "| control (non-memorized members) | " + " | ".join(f"step {s}" for s in c["checkpoints"]) + " |",
                  "|---|" + "---|" * len(c["checkpoints"]),
                  "| copied | " + " | ".join(_fmt(v, "%") for v in c["replication"]) + " |"]
    first = [s for s in d["memorized"]["steps_to_copy"] if s is not None]
    lines += ["", f"Memorized prompts copied within {d['steps']} steps: {len(first)} of {d['prompts']}"
              + (f" (median first copy at step {sorted(first)[len(first) // 2]})" if first else "")
              + (f"; control images copied within {d['control_steps']} steps: "
                 f"{sum(s is not None for s in c['steps_to_copy'])} of {len(c['steps_to_copy'])} (the paper: none "
                 "within 500)" if c else "; no control images") + f". UNet evals {d['unet_evals']}, "
              f"{d['seconds']:.1f} s.", ""]
    return lines


def _attack_lines(a: dict) -> list[str]:
    lines = ["## Re-trigger test", "",
             f"{a['prompts']} memorized prompts; per prompt a text-embedding perturbation d with ||d|| <= eps ||e|| "
             f"({a['steps']} PGD steps, {a['n_noise']} noise draws a step; Kowalczuk et al. 2025), then {a['n']} "
             f"generation(s) per prompt. Replicated (copy): {a.get('criterion', 'NN1/NN2 L2 ratio < 1/3')}, against the "
             "replication section's references. \"noise\": no image known (maximizes Wen et al.'s first-step noise "
             "magnitude); \"image\": the training image known (minimizes its denoising loss).", "",
             "| eps | plain prompt | attack \"noise\" | attack \"image\" |", "|---|---|---|---|"]
    for row in a["rows"]:
        cells = [_fmt(row[k]["replication"], "%") if row.get(k) else "-" for k in ("noise", "image")]
        lines.append(f"| {row['eps']:g} | {_fmt(row['plain'], '%')} | {cells[0]} | {cells[1]} |")
    lines += ["", "| attacker | UNet evals | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['unet_evals']} | {v['seconds']:.1f} |" for k, v in a["attackers"].items()]
    return [*lines, ""]


def _alignment_title(report: dict) -> str:
    """The alignment column's title: the quality feature's alignment key (e.g. `toy_alignment`), spaced."""
    return (report.get("quality", {}).get("alignment") or "alignment").replace("_", " ")


def _guard_lines(g: dict, alignment: str | None = None) -> list[str]:
    crit = "; ".join(f"{k}: {v}" for k, v in g["criteria"].items()) or "no replication criterion available"
    u, gd = g["unguarded"], g["guarded"]
    lines = ["## Guarded sampling", "",
             f"Guard `{g['guard']}` (trainer.sample.guard) against the stock sampler, same prompts and seeds, "
             f"{g['generations']} generations, DDIM {g['steps']} steps. Replicated: {crit}. Seconds per image: "
             f"{u['seconds_per_image']:.3g} unguarded, {gd['seconds_per_image']:.3g} guarded (ratio "
             f"{g['seconds_ratio']:.2f}); UNet evals per image {u['unet_evals_per_image']:g} vs "
             f"{gd['unet_evals_per_image']:g}."
             + (f" AMG trigger: {g['trigger']}." if g.get("trigger") else ""), "",
             f"| group | guard | replicated | replicated (index) | {(alignment or 'alignment').replace('_', ' ')} | KID "
             "| CLIP score | generations "
             "intervened | steps intervened | max change where not intervened |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for group, s in g["groups"].items():
        for side in ("unguarded", "guarded"):
            v = s[side]
            lines.append(f"| {group} | {side} | {_fmt(v.get('fraction_replicated'), '%')} | "
                         f"{_fmt(v.get('fraction_replicated_index'), '%')} | {_fmt(v.get(alignment))} | "
                         f"{_fmt(v.get('kid'), '.4g')} | {_fmt(v.get('clip_score'), '.2f')} | "
                         f"{_fmt(v.get('fraction_intervened'), '%')} | {_fmt(v.get('fraction_steps_intervened'), '%')} | "
                         f"{_fmt(v.get('max_abs_change_not_intervened'), '.2g')} |")
    lines += ["", "Intervened generations against their unguarded versions (same prompt and seed): pixel RMSE, "
              "and the share of saturated pixel channels (at 0 or 1).", "",
              "| group | intervened RMSE to unguarded | saturation (intervened) | saturation unguarded (same images) "
              "| saturation max guarded | saturation max unguarded |", "|---|---|---|---|---|---|"]
    for group, s in g["groups"].items():
        v = s["guarded"]
        lines.append(f"| {group} | {_fmt(v.get('intervened_rmse_mean'), '.3g')} | "
                     f"{_fmt(v.get('intervened_saturation_mean'), '%')} | "
                     f"{_fmt(v.get('intervened_unguarded_saturation_mean'), '%')} | "
                     f"{_fmt(v.get('saturation_max'), '%')} | {_fmt(v.get('unguarded_saturation_max'), '%')} |")
    return [*lines, ""]


def _short(name: str) -> str:
    return re.sub(r"^.*metadata\.(jsonl|csv), ", "", name)


def dedup_markdown(report: dict[str, Any], data: str = "", max_groups: int = 50) -> str:
    s = report["summary"]
    lines = [
        f"# De-duplication report{f': {data}' if data else ''}",
        "",
        f"{report['n']} images; embedding `{report['embedding']}`, cosine threshold {report['threshold']}, "
        f"search `{report['search']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| image near-duplicate groups | {s['image_groups']} |",
        f"| images in groups | {s['images_in_groups']} |",
        f"| extra copies (`drop` removes these) | {s['duplicates_to_drop']} ({100 * s['duplicate_fraction']:.1f}%) |",
        f"| largest group | {s['largest_group']} |",
        f"| linked pairs | {s['linked_pairs']} |",
    ]
    if "caption_groups_exact" in s:
        lines += [
            f"| exact caption duplicate groups | {s['caption_groups_exact']} |",
            f"| normalized caption duplicate groups | {s['caption_groups_normalized']} |",
        ]
    lines += [
        "",
        "Training policies: `data.dedup=drop` keeps the first image of each group; `data.dedup=reweight` "
        "keeps all images and gives each group total sampling weight 1.",
        "",
        "## Image near-duplicate groups",
        "",
    ]
    if not report["image_groups"]:
        lines.append("None found.")
    for k, g in enumerate(report["image_groups"][:max_groups]):
        ex = ", ".join(f"`{_short(e['name'])}`" for e in g["examples"])
        more = f" and {g['size'] - len(g['examples'])} more" if g["size"] > len(g["examples"]) else ""
        lines.append(
            f"{k + 1}. {g['size']} images (min cos to first {g['min_similarity_to_representative']}): "
            f"{ex}{more}"
        )
    if len(report["image_groups"]) > max_groups:
        lines.append(f"\n... {len(report['image_groups']) - max_groups} more groups in report.json")
    for kind in ("exact", "normalized"):
        key = f"caption_groups_{kind}"
        if key not in report:
            continue
        lines += ["", f"## Caption duplicate groups ({kind})", ""]
        if not report[key]:
            lines.append("None found.")
        for k, g in enumerate(report[key][:max_groups]):
            ex = ", ".join(f"`{_short(e['name'])}`" for e in g["examples"])
            more = f" and {g['size'] - len(g['examples'])} more" if g["size"] > len(g["examples"]) else ""
            lines.append(f'{k + 1}. {g["size"]} rows with "{g["text"]}": {ex}{more}')
        if len(report[key]) > max_groups:
            lines.append(f"\n... {len(report[key]) - max_groups} more groups in report.json")
    return "\n".join(lines) + "\n"


def _fmt_plain(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _pct(value) -> str:
    return _fmt(value, "%")


def edit_verdict_lines(report: dict) -> list[str]:
    """edit.md's lead: one row per target of the edit (removed / re-triggered / quality kept)."""
    if report.get("warning"):
        head = [f"**Warning: {report['warning']}**", ""]
    else:
        head = []
    rows = (report.get("evaluation") or {}).get("verdict_per_target")
    if not rows:
        return [*head, "**Verdict: not measured** (run the edit with `--evaluate PROMPTS` for removal, re-trigger "
                "and quality verdicts).", ""]
    lines = [*head, "## Verdict", "", "| target | verdict | before | after | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | **{r['status']}** | {_pct(r['before'])} | {_pct(r['after'])} | {_cell(r['detail'])} |"
              for r in rows]
    return [*lines, ""]


def edit_attack_lines(ev: dict | None) -> list[str]:
    """The re-trigger attacks beside the plain prompt: named and unnamed memorized prompts, before and after."""
    if not ev:
        return []
    b, a = ev["before"], ev["after"]
    lines = ["## Plain prompt and re-trigger attacks", "", "Share of generations that copy (the copy verdict below; "
             "DoRI counts a copy only when the targeted image is nearest).", "",
             "| prompt | named before | named after | unnamed before | unnamed after |", "|---|---|---|---|---|"]
    cells = [side["replication"].get(split, {}).get("fraction_replicated")
             for split in ("named", "unnamed") for side in (b, a)]
    lines.append("| plain | " + " | ".join(_pct(c) for c in cells) + " |")
    for key, att in a.get("attacks", {}).items():
        before = b.get("attacks", {}).get(key, {})
        lines.append(f"| {att['label']} | {_pct(before.get('named'))} | {_pct(att['named'])} | "
                     f"{_pct(before.get('unnamed'))} | {_pct(att['unnamed'])} |")
    if not a.get("attacks"):
        lines += ["", "No re-trigger attack was run (`--eval-attack dori,bounded` runs both)."]
    return [*lines, ""]


def edit_skipped_lines(report: dict) -> list[str]:
    """What the edit or its evaluation skipped, and why: the method's skipped prompts and the evaluation's notes."""
    skipped, notes = report.get("skipped") or {}, (report.get("evaluation") or {}).get("notes") or []
    if not skipped and not notes:
        return ["Nothing was skipped.", ""]
    lines = ["## Skipped", ""]
    if skipped:
        lines += [f"Memorized prompts skipped by the edit: {len(skipped)} (nothing was removed for them).", "",
                  "| prompt | why |",
                  "|---|---|", *[f"| {_cell(prompt)} | {_cell(why)} |" for prompt, why in skipped.items()], ""]
    if notes:
        lines += ["In the evaluation:", "", *[f"- {n}" for n in notes], ""]
    return lines


def edit_markdown(report: dict) -> str:
    lines = [f"# memtrain edit {report['method']}: {report['source']}", "", *edit_verdict_lines(report),
             report["description"] + ".", "",
             f"Output: {report['output']} in {report['out']}. Edit time {report['seconds']:.2f} s, "
             f"{report['unet_evals']} UNet evaluations, {report['total_changed']} weights changed in "
             f"{report['layers_changed']} parameters"
             + (f", peak memory {report['peak_memory_mb']:.0f} MB" if report.get("peak_memory_mb") else "") + ".", ""]
    verdict = (report.get("evaluation") or {}).get("verdict", {})
    if verdict.get("before", {}).get("criterion"):
        reused = verdict.get("after", {}).get("reused") or "recalibrated on the edit"
        lines += [f"**Copy verdict{'' if verdict['before'].get('calibrated') else ': uncalibrated'}** (before and after): "
                  f"{verdict['before']['criterion']}; after the edit: {reused}.", ""]
    lines += edit_attack_lines(report.get("evaluation"))
    lines += edit_skipped_lines(report)
    lines += ["## Parameters", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["parameters"].items() if v is not None]
    lines += ["", "## Weights changed", "", "| parameter | entries changed |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["changed"].items()]
    lora = report["result"].get("lora") if isinstance(report["result"], dict) else None
    if lora:
        lines += ["", f"LoRA rank {lora['rank']} (relative residual tolerance {lora['tol']:g}; largest residual "
                  f"{lora['max_residual']:.2e}).", "", "| parameter | rank for tolerance | residual at rank |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['rank_for_tol']} | {v['residual']:.2e} |" for k, v in lora["layers"].items()]
    ev = report.get("evaluation")
    if ev:
        b, a = ev["before"], ev["after"]
        lines += ["", "## Before and after", "", f"`memtrain evaluate` of {ev['prompts']} on the source and on the "
                  "edit (eval_before/, eval_after/). named = memorized prompts named in --memorized "
                  f"({ev['named_in_prompts']} in the prompt file); unnamed = the other memorized prompts.", "",
                  "| measure | before | after |", "|---|---|---|"]
        for split in dict.fromkeys([*b["replication"], *a["replication"]]):
            for k in ("fraction_replicated", "similarity_mean"):
                bv, av = b["replication"].get(split, {}).get(k), a["replication"].get(split, {}).get(k)
                if bv is not None or av is not None:
                    lines.append(f"| replication {split}: {k} | {_fmt_plain(bv)} | {_fmt_plain(av)} |")
        for group in dict.fromkeys([*b["quality"], *a["quality"]]):
            for k in dict.fromkeys([*b["quality"].get(group, {}), *a["quality"].get(group, {})]):
                bv, av = b["quality"].get(group, {}).get(k), a["quality"].get(group, {}).get(k)
                if bv is not None or av is not None:
                    lines.append(f"| {group} {k} | {_fmt_plain(bv, '.4g')} | {_fmt_plain(av, '.4g')} |")
        for section, label in (("detectors", "detector AUROC"), ("membership", "membership AUROC")):
            for k in dict.fromkeys([*b[section], *a[section]]):
                lines.append(f"| {label} {k} | {_fmt_plain(b[section].get(k))} | {_fmt_plain(a[section].get(k))} |")
        if "general_l2_change" in ev:
            g = ev["general_l2_change"]
            lines += ["", f"General prompts' generations at the same seeds moved by L2 {g['mean']:.4f} on average "
                      f"(max {g['max']:.4f}, {g['generations']} generations; {g['convention']})."]
        if ev.get("quality_verdict"):
            spread = ev.get("seed_spread") or {}
            lines += ["", "General quality against the unedited model's seed-to-seed spread (max - min over its "
                      f"{spread.get('seeds', '-')} seeds; L2: the distance between two seeds' images of a prompt):", "",
                      "| measure | before | after | spread | verdict |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {_fmt_plain(q['before'], '.4g')} | {_fmt_plain(q['after'], '.4g')} | "
                      f"{_fmt_plain(q['spread'], '.4g')} | {q['status']} |" for k, q in ev["quality_verdict"].items()]
        cache = ev.get("before_cache")
        if cache:
            lines += ["", (f"The source's evaluation was reused from the cache {cache['entry']} (same checkpoint files, "
                           "prompt file and settings)." if cache["reused"] else
                           f"The source's evaluation was cached in {cache['entry']} for later edits.")]
    lines.append("")
    return "\n".join(lines)
