"""Every Markdown report of the production verbs, rendered from the report dicts (evaluate, dedup, edit;
the toy world's own tables render in `trainer.toy.render`), and evaluate's headline numbers as flat keys
(`flat_summary`, the W&B summary and the command's output). No numbers are computed here."""

from __future__ import annotations

import math
import re
from typing import Any


def figure(report: dict, name: str, alt: str) -> str:
    return f"![{alt}]({name})" if name in report.get("files", []) else ""


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "%":
        return f"{value:.1%}"
    return format(value, spec)


def header_lines(report: dict) -> list[str]:
    """The evaluate report's title, copy-verdict line and settings (before the sections)."""
    c = report["config"]
    counts = report["counts"]
    return [f"# {report['title']}", "", *verdict_lines(report),
            f"Prompts: `{c['prompts']}` ({counts['prompts']} rows: {counts['memorized']} memorized, "
            f"{counts['not_memorized']} not memorized, {counts['members']} members, {counts['non_members']} "
            f"non-members). Data root: `{c['data']}`. Generations: {c['n']} per prompt, DDIM {c['steps']} steps, "
            f"guidance {c['guidance_scale']}, seed {c['seed']}; detectors: {c['detector_schedule']}.", "",
            f"Label mapping: {report['label_mapping']}.", "",
            f"ROC convention: {report['roc_convention']}.", ""]


def footer_lines(report: dict) -> list[str]:
    """The evaluate report's last lines (after the sections): scores by group, cost, notes."""
    lines = [figure(report, "scores_by_group.png", "scores by group"), ""]
    lines += ["## Cost", "", "| section | seconds | UNet evals |", "|---|---|---|"]
    for section, cst in report.get("cost", {}).items():
        evals = cst.get("unet_evals")
        lines.append(f"| {section} | {cst['seconds']:.1f} | {evals if evals is not None else '-'} |")
    if report.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in report["notes"]]]
    return lines


def join_lines(lines: list[str]) -> str:
    """Markdown from lines, without double blank lines."""
    lines = [*lines, ""]
    kept = [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]
    return "\n".join(kept)


def verdict_lines(report: dict) -> list[str]:
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


def _short(name: str) -> str:
    return re.sub(r"^.*metadata\.(jsonl|csv), ", "", name)


def dedup_markdown(report: dict[str, Any], data: str = "", max_groups: int = 50) -> str:
    s = report["summary"]
    lists = f" ({report['lists']})" if report.get("lists") else ""
    lines = [
        f"# De-duplication report{f': {data}' if data else ''}",
        "",
        f"{report['n']} images; embedding `{report['embedding']}`, cosine threshold {report['threshold']}, "
        f"search `{report['search']}`{lists}.",
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
    return fmt(value, "%")


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
    verdict = report.get("verdict", {}).get("calibration")
    if verdict:
        flat["replication/verdict/threshold"] = verdict["threshold"]
        flat["replication/verdict/fpr_heldout"] = verdict["fpr_heldout"]
        flat["replication/verdict/recall"] = verdict["recall"]
    for name, s in report.get("membership", {}).get("scores", {}).items():
        flat[f"membership/{name}/auroc"] = s["auroc"]
        flat[f"membership/{name}/tpr_at_1fpr"] = s["tpr_at_1fpr"]
    for group, g in report.get("membership", {}).get("by_group", {}).items():
        for name, v in g.items():
            if name != "members":
                flat[f"membership/{group}/{name}/auroc"] = v
    for group, q in report.get("quality", {}).get("groups", {}).items():
        for k in (report["quality"].get("alignment"), "kid", "clip_score"):
            if k in q:
                flat[f"quality/{group}/{k}"] = q[k]
    for row in report.get("attack", {}).get("rows", []):
        for who in ("plain", "noise", "image"):
            v = row.get(who)
            if v is not None:
                flat[f"attack/eps{row['eps']:g}/{who}"] = v if who == "plain" else v["replication"]
    dori = report.get("dori") or {}
    for part in ("memorized", "control"):
        curve = dori.get(part)
        if curve:
            flat[f"dori/{part}/replication"] = curve["replication"][-1]
            flat[f"dori/{part}/plain"] = curve["replication"][0]
    for attacker, a in report.get("attack", {}).get("attackers", {}).items():
        flat[f"attack/{attacker}/unet_evals"] = a["unet_evals"]
        flat[f"attack/{attacker}/seconds"] = a["seconds"]
    for group, s in report.get("replication", {}).get("index", {}).get("groups", {}).items():
        flat[f"replication_index/{group}/fraction_replicated"] = s["fraction_replicated"]
        flat[f"replication_index/{group}/similarity_p95"] = s["similarity_p95"]
    guarded = report.get("guard", {})
    for group, g in guarded.get("groups", {}).items():
        for side in ("unguarded", "guarded"):
            for k, v in g[side].items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    flat[f"guard/{group}/{side}/{k}"] = v
    for side in ("unguarded", "guarded"):
        if side in guarded:
            flat[f"guard/{side}/seconds_per_image"] = guarded[side]["seconds_per_image"]
    for section, c in report.get("cost", {}).items():
        for k, v in c.items():
            flat[f"cost/{section}/{k}"] = v
    return {k: float(v) for k, v in flat.items() if v is not None}
