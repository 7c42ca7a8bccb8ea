"""`memtrain evaluate`: a MemBench-style memorization report for one checkpoint (Hong et al. 2024).

`evaluate(spec)` checks the `EvalSpec` (`trainer.report.spec`), reads the inputs once into an `EvalRun`
(`trainer.report.run`) and runs the registered sections in order (`SECTIONS`): the trigger scenario
(prompt detectors), the generations, replication, membership (CLiD), quality, and, when asked, the
re-trigger tests (`--attack`) and guarded sampling (`--guard`). Each section computes and renders in its
own module; a new one is a function pair and one line in `SECTIONS`. Writes OUT/report.json, report.md
and PNGs atomically. docs/methods.md gives every convention.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from trainer.core import distributed
from trainer.core.components import load_pipeline, model_resolution
from trainer.detect import DETECTOR_STEPS, MEMBERSHIP_DETECTORS, PROMPT_DETECTORS
from trainer.io import MemtrainError, atomic_dir, atomic_file, check_replaceable, write_json
from trainer.measure.calibration import Calibration, check_fpr
from trainer.measure.features import choose_quality_feature, load_clip_scorer, load_sscd
from trainer.measure.index_data import check_index_data
from trainer.measure.metrics import roc_points
from trainer.measure.verdict import check_criterion, verdict_key
from trainer.plots import save_replication_grid, save_roc_curves, save_score_histograms
from trainer.report.attack_sections import (
    attack_lines,
    parse_attacks,
    parse_eps,
    run_attack,
    save_attack_grids,
)
from trainer.report.guard_sections import check_extras, guard_lines, index_and_embedder, run_guard
from trainer.report.render import flat_summary, footer_lines, header_lines, join_lines
from trainer.report.replication_sections import replication_lines, run_generation, run_replication
from trainer.report.run import EvalRun, Section
from trainer.report.scenario_sections import (
    membership_lines,
    quality_lines,
    run_membership,
    run_quality,
    run_trigger,
    trigger_lines,
)
from trainer.report.sections import parse_groups
from trainer.report.spec import EvalSpec, input_paths, read_rows
from trainer.sample.guards import NoGuard
from trainer.tracking import log_wandb_summary, start_wandb_run

ROC_CONVENTION = (
    "positive = memorized prompt (membership: training member), higher score = more memorized; "
    "TPR at 1% FPR = the TPR of the last ROC point whose FPR is <= 1% (the best TPR any threshold reaches "
    "without exceeding 1% FPR, no interpolation, metrics.tpr_at_fpr); with fewer than 100 negatives it is "
    "the TPR at 0% FPR"
)
REPLICATED_GRID = 16  # replicated.png: the 8 most copy-like generations and the 4 + 4 on either side of the line

# The report's sections in the order they run and render; one line adds one (docs/architecture.md).
SECTIONS: dict[str, Section] = {
    "detectors": Section("detectors", run_trigger, trigger_lines),
    "generate": Section("generate", run_generation),
    "replication": Section("replication", run_replication, replication_lines, needs=("generate",)),
    "membership": Section("membership", run_membership, membership_lines),
    "quality": Section("quality", run_quality, quality_lines, needs=("generate", "replication")),
    "attack": Section("attack", run_attack, attack_lines, enabled=lambda run: bool(run.attacks),
                      needs=("generate", "replication")),
    "guard": Section("guard", run_guard, guard_lines, enabled=lambda run: bool(run.guard),
                     needs=("generate", "replication", "quality")),
}


# ---------------------------------------------------------------- the protocol


def parse_detectors(value: str | Sequence[str]) -> list[str]:
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    known = [*PROMPT_DETECTORS, *MEMBERSHIP_DETECTORS]  # the registry as it is now (entries can be added)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise MemtrainError(f"--detectors: unknown {unknown or 'empty list'}; choose from {','.join(known)}")
    return list(dict.fromkeys(names))


def parse_sections(value: str | Sequence[str] | None) -> list[str] | None:
    """The sections a spec selects (`sections:`, comma-separated or a list) with the sections they read from, in
    `SECTIONS` order; None (every section its inputs ask for) when it selects none."""
    if value is None:
        return None
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise MemtrainError(f"--sections: unknown {unknown or 'empty list'}; choose from {','.join(SECTIONS)}")
    chosen = set()
    while names:
        name = names.pop()
        if name not in chosen:
            chosen.add(name)
            names += SECTIONS[name].needs
    return [name for name in SECTIONS if name in chosen]


def grid_picks(order: list[int], flagged: list[bool], size: int = REPLICATED_GRID) -> list[int]:
    """Which generations `replicated.png` shows, most copy-like first (`order`, with each one's verdict
    `flagged`): the size / 2 most copy-like, then the size / 4 copies nearest the threshold and the size / 4
    non-copies nearest it, so the picture shows where the verdict draws its line."""
    head = order[: size // 2]
    n_flagged = sum(flagged)
    below = [i for i in order[max(size // 2, n_flagged - size // 4) : n_flagged] if i not in head]
    above = [i for i in order[n_flagged:] if i not in head][: size - len(head) - len(below)]
    return [*head, *below, *above]


def as_spec(checkpoint, prompts, keys: dict) -> EvalSpec:
    """An `EvalSpec` from a spec (with `keys` replaced) or from a checkpoint, prompt file and spec keys."""
    names = {f.name for f in dataclasses.fields(EvalSpec)}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise MemtrainError(f"evaluate: unknown key {', '.join(unknown)} (the keys of EvalSpec: {', '.join(names)})")
    if isinstance(checkpoint, EvalSpec):
        return dataclasses.replace(checkpoint, **keys)
    return EvalSpec(checkpoint=checkpoint, prompts=prompts, **keys)


def check_spec(spec: EvalSpec) -> dict:
    """The checks of the spec that need no file (one MemtrainError each) and its parsed lists."""
    if spec.checkpoint is None:
        raise MemtrainError("evaluate: no checkpoint (give CHECKPOINT, or `checkpoint:` in the spec)")
    for value, flag in ((spec.n, "-n"), (spec.batch_size, "--batch-size"), (spec.steps, "--steps")):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    parse_sections(spec.sections)
    parsed = {"detectors": parse_detectors(spec.detectors), "groups": parse_groups(spec.groups)}
    check_fpr(spec.fpr)
    check_criterion(spec.criterion, spec.sscd is not None)
    feature = spec.quality_feature
    if spec.generate and isinstance(feature, str) and (feature != "clip" or spec.clip is None):
        choose_quality_feature(feature)  # an unknown name, or clip without --clip, fails before any work
    if spec.heldout is not None and not Path(spec.heldout).is_dir():
        raise MemtrainError(f"--heldout {spec.heldout}: not a directory (an imagefolder of images never trained on)")
    if (spec.prompts is None) == (spec.memorized is None):
        raise MemtrainError("give either --prompts FILE or --memorized FILE [--not-memorized FILE]")
    attacks = parse_attacks(spec.attack)
    parsed.update(attacks=attacks, attack_eps=parse_eps(spec.attack_eps) if "bounded" in attacks else None,
                  guard=None if spec.guard == NoGuard.name else spec.guard)
    if attacks and (int(spec.dori_steps) < 0 or int(spec.dori_control_steps) < 0):
        raise MemtrainError(f"--dori-steps and --dori-control-steps must be >= 0, got {spec.dori_steps}, "
                            f"{spec.dori_control_steps}")
    if spec.index_threshold is not None and not -1 < spec.index_threshold < 1:
        raise MemtrainError(f"--index-threshold must be in (-1, 1) (a cosine similarity), got {spec.index_threshold}")
    return parsed


def check_inputs(spec: EvalSpec, parsed: dict, read: dict) -> None:
    """The checks that read the inputs: the optional sections', the index's, the checkpoint's."""
    rows = read["rows"]
    check_extras(bool(parsed["attacks"]), spec.attack_steps, parsed["guard"], spec.index, spec.generate,
                 any(r.label == 1 for r in rows),
                 spec.train_data is not None or any(r.file_name and (r.member == 1 or r.label == 1) for r in rows))
    if spec.index is not None and spec.train_data is not None:
        check_index_data(spec.index, spec.train_data)
    if spec.index is not None and not spec.generate and distributed.is_main_process():
        print(f"memtrain evaluate: warning: --index {spec.index} measures the replication of generations; with "
              "--no-generate it is not used", file=sys.stderr)
    checkpoint = Path(spec.checkpoint)
    if not checkpoint.exists():
        raise MemtrainError(f"checkpoint {spec.checkpoint}: no such directory (want a diffusers pipeline directory)")
    if not (checkpoint / "model_index.json").is_file():
        raise MemtrainError(f"checkpoint {spec.checkpoint}: not a diffusers pipeline directory (no model_index.json)")
    if spec.lora is not None and not Path(spec.lora).exists():
        raise MemtrainError(f"--lora {spec.lora}: no such file or directory")


def prepare(spec: EvalSpec, calibration: dict | None, progress: bool) -> EvalRun:
    """Check the spec and its inputs (before anything is written), load the pipeline, scorers and index."""
    parsed = check_spec(spec)
    if calibration is not None:
        Calibration.from_dict(calibration.get("calibration", {}), "the reused copy verdict")
    check_replaceable(spec.out, "evaluate", input_paths(spec))
    read = read_rows(spec)
    check_inputs(spec, parsed, read)
    sscd_model = load_sscd(spec.sscd) if spec.sscd is not None else None
    clip_scorer = load_clip_scorer(spec.clip) if spec.clip is not None else None
    device = spec.device or str(distributed.process_device())
    pipe = load_pipeline(Path(spec.checkpoint), spec.lora, device=device)
    pipe.set_progress_bar_config(disable=True)
    run = EvalRun(spec=dataclasses.replace(spec, device=device), pipe=pipe, resolution=model_resolution(pipe),
                  progress=progress, calibration=calibration, sscd_model=sscd_model, clip_scorer=clip_scorer,
                  **parsed, **read)
    if spec.index is not None:
        run.training_index, run.embedder, run.index_criterion = index_and_embedder(spec.index, pipe, spec.index_model,
                                                                                   spec.index_threshold)
    run.report.update(report_head(run))
    return run


def report_head(run: EvalRun) -> dict:
    """The report's title, settings (`config`), label mapping, ROC convention and row counts."""
    spec, rows, attacks = run.spec, run.rows, run.attacks

    def text(value):
        return str(value) if value else None

    config = {"checkpoint": str(spec.checkpoint), "lora": text(spec.lora), "prompts": str(run.prompts),
              "data": str(run.data), "train_data": text(spec.train_data), "n": spec.n, "steps": spec.steps,
              "guidance_scale": spec.guidance_scale, "seed": spec.seed, "batch_size": spec.batch_size,
              "detectors": run.detectors, "generate": spec.generate, "sscd": text(spec.sscd), "clip": text(spec.clip),
              "device": spec.device, "resolution": run.resolution,
              "detector_schedule": f"DDIM {DETECTOR_STEPS} steps, n = 1", "attack": attacks,
              "attack_eps": run.attack_eps, "dori_steps": spec.dori_steps if "dori" in attacks else None,
              "dori_control_steps": spec.dori_control_steps if "dori" in attacks else None,
              "attack_steps": spec.attack_steps if attacks else None, "index": text(spec.index),
              "index_model": text(spec.index_model), "index_threshold": spec.index_threshold,
              "index_criterion": run.index_criterion.describe() if run.index_criterion else None, "guard": run.guard,
              "heldout": text(spec.heldout), "fpr": spec.fpr, "criterion": spec.criterion, "groups": run.groups}
    return {"title": f"memtrain evaluate: {spec.checkpoint}" + (f" + LoRA {spec.lora}" if spec.lora else ""),
            "config": config, "label_mapping": run.roles.mapping(), "roc_convention": ROC_CONVENTION,
            "counts": {"prompts": len(rows), "labelled": sum(r.label is not None for r in rows),
                       "memorized": sum(r.label == 1 for r in rows), "not_memorized": sum(r.label == 0 for r in rows),
                       "members": sum(r.member == 1 for r in rows), "non_members": sum(r.member == 0 for r in rows)}}


def evaluate(checkpoint: str | Path | EvalSpec | None = None, prompts: str | Path | None = None, *,
             progress: bool = True, calibration: dict | None = None, **keys) -> dict:
    """Run the protocol for an `EvalSpec` (or a checkpoint, a prompt file and spec keys, e.g. `n=1,
    train_data=...`); write OUT/report.json, report.md and PNGs; return the report.

    `calibration` (an earlier report's `verdict`) is reused as the copy verdict when the model's VAE has the
    same weights (`sections.replication_verdict`). Under `accelerate launch` every process runs this call:
    detectors, CLiD and the generations (stock and guarded) are shared out by whole batches
    (`trainer.core.distributed`), each process on its own device unless `device` is given; the rest is
    recomputed on every process; only the main process writes.
    """
    t_start = time.perf_counter()
    spec = as_spec(checkpoint, prompts, keys)
    run = prepare(spec, calibration, progress and distributed.is_main_process())
    chosen = parse_sections(spec.sections) or list(SECTIONS)
    sections = [s for s in SECTIONS.values() if s.name in chosen and s.enabled(run)]
    if asked := set(parse_sections(spec.sections) or ()) - {s.name for s in sections}:
        raise MemtrainError(f"--sections {','.join(sorted(asked))}: not switched on by the other settings (the attack "
                            "section needs --attack, the guard section --guard); add them or leave the section out")
    with distributed.on_main_process(atomic_dir(spec.out, "evaluate", input_paths(spec))) as tmp, \
            tqdm(total=len(sections), desc="evaluate", disable=not run.progress, dynamic_ncols=True) as stages:
        tracker = (start_wandb_run(tmp, run.report["config"], "evaluate", f"evaluate {Path(spec.checkpoint).name}")
                   if spec.wandb and tmp else None)
        try:
            for section in sections:
                stages.set_postfix_str(section.name)
                section.run(run)
                stages.update()
            run.cost["total"] = {"seconds": round(time.perf_counter() - t_start, 2),
                                 "unet_evals": sum(c.get("unet_evals", 0) for c in run.cost.values())}
            run.report.update(cost=run.cost, notes=run.notes)
            if tmp is None:  # not the main process: it computed its shares, the main process writes
                return run.report
            write_report(run.report, tmp, run.figures)
            if tracker is not None:
                log_wandb_summary(tracker, flat_summary(run.report), tmp, run.report.get("files", []))
                tracker.finish()
                tracker = None
        except BaseException:
            if tracker is not None:
                tracker.finish(exit_code=1)
            raise
    return run.report


def evaluate_markdown(report: dict) -> str:
    """report.md: the header, each registered section's Markdown in order, the cost and notes."""
    lines = header_lines(report)
    for section in SECTIONS.values():
        if section.render is not None:
            lines += section.render(report)
    return join_lines(lines + footer_lines(report))


# ---------------------------------------------------------------- output


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
        cal = Calibration.from_dict(replication["calibration"])
        sign = -1.0 if cal.higher_is_copy else 1.0  # most copy-like first
        order = sorted((i for i, g in enumerate(gens) if not math.isnan(g["score"])), key=lambda i: sign * gens[i]["score"])
        picks = grid_picks(order, [gens[i]["replicated"] for i in order])
        if picks:
            key = verdict_key(cal)
            op = ">" if cal.higher_is_copy else "<"
            titles = [f"{'COPY' if gens[i]['replicated'] else 'not a copy'} ({gens[i]['group']}): {key} "
                      f"{gens[i]['score']:.3f} {op if gens[i]['replicated'] else 'vs'} {cal.threshold:.3f}, "
                      f"r={gens[i]['ratio']:.2f}" for i in picks]
            nearest = references[[gens[i]["nn_index"] for i in picks]]
            save_replication_grid(out / "replicated.png", generated[picks], nearest, titles, ncols=4,
                                  caption=f"copy: {cal.describe()}")
            files.append("replicated.png")
    files += save_attack_grids(out, figures)
    report["files"] = ["report.json", "report.md", *files]
    write_json(report, out / "report.json")
    with atomic_file(out / "report.md") as f:
        f.write(evaluate_markdown(report))
    return report
