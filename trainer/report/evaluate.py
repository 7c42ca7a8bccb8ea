"""`memtrain evaluate`: a MemBench-style memorization report for one checkpoint (Hong et al. 2024).

Trigger scenario (registered prompt detectors: AUROC, TPR at 1% FPR), replication of generations
against the training images, membership (CLiD, Zhai et al. 2024, cross-fitted) and the general
scenario (KID, alignment / CLIP score); optionally the re-trigger test (`--attack`), replication
against a training-image index (`--index`) and guarded sampling side by side (`--guard`),
`trainer.report.guard_sections`. Writes OUT/report.json, report.md and PNGs atomically.
docs/methods.md gives every convention; `trainer.report.sections` computes each section.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from trainer.core import distributed
from trainer.core.components import load_pipeline, model_resolution
from trainer.core.unet_core import count_unet_samples
from trainer.data import load_images
from trainer.detect import DETECTOR_STEPS, DETECTORS, MEMBERSHIP_DETECTORS, PROMPT_DETECTORS
from trainer.detect.dori import CONTROL_STEPS, DORI_STEPS
from trainer.io import MemtrainError, atomic_dir, atomic_file, check_replaceable, write_json
from trainer.measure.calibration import DEFAULT_FPR, Calibration, check_fpr
from trainer.measure.features import (
    QualityFeature,
    choose_quality_feature,
    kid,
    load_clip_scorer,
    load_sscd,
)
from trainer.measure.index import check_index_data
from trainer.measure.metrics import roc_points
from trainer.measure.replication import check_criterion, verdict_key
from trainer.plots import save_replication_grid, save_roc_curves, save_score_histograms
from trainer.prompts import LabelGroups, check_labels, group_name, read_labelled_prompts, rows_from_lists
from trainer.report.guard_sections import (
    DEFAULT_ATTACK_EPS,
    attack_report,
    check_extras,
    dori_report,
    guard_section,
    index_and_embedder,
    index_replication,
    parse_attacks,
    parse_eps,
)
from trainer.report.render import evaluate_markdown
from trainer.report.sections import (
    CLID_FOLDS,
    captions_of,
    general_scenario,
    generation_rows,
    heldout_images,
    membership_by_group,
    membership_scenario,
    parse_groups,
    replication_section,
    trigger_scenario,
    without_replicating_negatives,
)
from trainer.sample.generate import generate_images
from trainer.sample.guards import NoGuard
from trainer.tracking import log_wandb_summary, start_wandb_run

ROC_CONVENTION = (
    "positive = memorized prompt (membership: training member), higher score = more memorized; "
    "TPR at 1% FPR = the TPR of the last ROC point whose FPR is <= 1% (the best TPR any threshold reaches "
    "without exceeding 1% FPR, no interpolation, metrics.tpr_at_fpr); with fewer than 100 negatives it is "
    "the TPR at 0% FPR"
)
REPLICATED_GRID = 16  # replicated.png: the 8 most copy-like generations and the 4 + 4 on either side of the line


# ---------------------------------------------------------------- the protocol


def parse_detectors(value: str | Sequence[str]) -> list[str]:
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    known = [*PROMPT_DETECTORS, *MEMBERSHIP_DETECTORS]  # the registry as it is now (entries can be added)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise MemtrainError(f"--detectors: unknown {unknown or 'empty list'}; choose from {','.join(known)}")
    return list(dict.fromkeys(names))


def _check_file(path: Path, where: str, data: Path) -> None:
    if not path.is_file():
        raise MemtrainError(f"{where}: image {path} does not exist (file_name paths resolve under --data {data})")


def grid_picks(order: list[int], flagged: list[bool], size: int = REPLICATED_GRID) -> list[int]:
    """Which generations `replicated.png` shows, most copy-like first (`order`, with each one's verdict
    `flagged`): the size / 2 most copy-like, then the size / 4 copies nearest the threshold and the size / 4
    non-copies nearest it, so the picture shows where the verdict draws its line."""
    head = order[: size // 2]
    n_flagged = sum(flagged)
    below = [i for i in order[max(size // 2, n_flagged - size // 4) : n_flagged] if i not in head]
    above = [i for i in order[n_flagged:] if i not in head][: size - len(head) - len(below)]
    return [*head, *below, *above]


def evaluate(checkpoint: str | Path, prompts: str | Path | None = None, out: str | Path = "runs/evaluate",
             lora: str | Path | None = None, n: int = 2, batch_size: int = 32, seed: int = 0,
             data: str | Path | None = None, train_data: str | None = None, sscd: str | Path | None = None,
             clip: str | Path | None = None, wandb: bool = False, generate: bool = True,
             detectors: str | Sequence[str] = DETECTORS, steps: int = 50, guidance_scale: float = 7.5,
             device: str | None = None, memorized: str | Path | None = None,
             not_memorized: str | Path | None = None, progress: bool = True, attack: bool = False,
             attack_eps: str | Sequence[float] = DEFAULT_ATTACK_EPS, attack_steps: int = 20,
             dori_steps: int = DORI_STEPS, dori_control_steps: int = CONTROL_STEPS,
             index: str | Path | None = None, index_model: str | Path | None = None,
             index_threshold: float | None = None, guard: str | None = None, guard_options: dict | None = None,
             heldout: str | Path | None = None, fpr: float = DEFAULT_FPR, criterion: str = "auto",
             groups: str | Sequence[str] = ("trigger", "general"), calibration: dict | None = None,
             quality_feature: str | QualityFeature | None = None, label_groups: str | Path | None = None) -> dict:
    """Run the protocol; write OUT/report.json, report.md and PNGs; return the report.

    Prompts: a labelled prompt file (`trainer.prompts`), or two plain lists `memorized` and
    `not_memorized`. `train_data`: the training set replication is measured against (an imagefolder,
    a `save_to_disk` directory or a local datasets path; default: the member images of the prompt
    file). `data`: the root that `file_name` paths resolve under (default: the prompt file's directory).
    `attack`: the re-trigger tests of the memorized prompts ("dori", "bounded" or both; True = both): DoRI for
    `dori_steps` (non-memorized members as control for `dori_control_steps`), the bounded attack at
    `attack_eps` with `attack_steps` attack steps;
    `index`: a `memtrain index` directory for replication (its embedder from `index_model` for clip / sscd,
    replicated above `index_threshold`); `guard` (a name in `trainer.sample.guard.GUARDS`; one with `needs_index` needs `index`): guarded
    generations side by side, `guard_options` the guard's keyword options. `quality_feature`: the
    general scenario's feature space (a `measure.features.QUALITY_FEATURES` name, `clip`, or a
    `QualityFeature`; default CLIP with `clip`, else pix8), named in the report. `label_groups`: a YAML file of
    the roles of the prompt file's group names (`prompts.LabelGroups`; default the packaged one).

    The copy verdict (`trainer.report.sections.replication_verdict`) is calibrated at `fpr` false positives on
    held-out images (`heldout`: a directory of never-trained images, plus the member-0 rows of the prompt
    file) by `criterion` (auto: SSCD with `sscd`, else L2); `calibration` (an earlier report's `verdict`)
    is reused instead when the model's VAE has the same weights (`sections.replication_verdict`). `groups`: which rows to generate
    from (trigger, general, member, heldout; `sections.generation_rows`). Detectors' thresholds are
    calibrated at `fpr` on the non-memorized prompts.

    Under `accelerate launch` every process runs this call: detectors, CLiD and the generations (stock and
    guarded) are shared out by whole batches (`trainer.core.distributed`), each process on its own device
    unless `device` is given; the rest is recomputed on every process; only the main process writes.
    """
    t_start = time.perf_counter()
    progress = progress and distributed.is_main_process()
    for value, flag in ((n, "-n"), (batch_size, "--batch-size"), (steps, "--steps")):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    detectors = parse_detectors(detectors)
    groups = parse_groups(groups)
    check_fpr(fpr)
    check_criterion(criterion, sscd is not None)
    if generate and isinstance(quality_feature, str) and (quality_feature != "clip" or clip is None):
        choose_quality_feature(quality_feature)  # an unknown name, or clip without --clip, fails before any work
    if calibration is not None:
        Calibration.from_dict(calibration.get("calibration", {}), "the reused copy verdict")
    if heldout is not None and not Path(heldout).is_dir():
        raise MemtrainError(f"--heldout {heldout}: not a directory (an imagefolder of images never trained on)")
    inputs = {"CHECKPOINT": checkpoint, "--prompts": prompts, "--memorized": memorized,
              "--not-memorized": not_memorized, "--lora": lora, "--train-data": train_data, "--data": data,
              "--sscd": sscd, "--clip": clip, "--index": index, "--index-model": index_model, "--heldout": heldout}
    check_replaceable(out, "evaluate", inputs)
    if (prompts is None) == (memorized is None):
        raise MemtrainError("give either --prompts FILE or --memorized FILE [--not-memorized FILE]")
    roles = LabelGroups.load(label_groups)
    if prompts is not None:
        prompts = Path(prompts)
        rows = read_labelled_prompts(prompts, roles)
    else:
        rows = rows_from_lists(memorized, not_memorized)
        prompts = Path(memorized)
    labelled = check_labels(rows, prompts, roles)
    data = Path(data) if data is not None else prompts.parent
    if not data.is_dir():
        raise MemtrainError(f"--data {data}: not a directory (the root that file_name paths resolve under)")
    for r in rows:
        if r.file_name and (r.member is not None or r.label == 1):
            _check_file(data / r.file_name, f"{prompts}, line {r.line}", data)
    attacks = parse_attacks(attack)
    attack = bool(attacks)
    attack_eps = parse_eps(attack_eps) if "bounded" in attacks else None
    if attack and (int(dori_steps) < 0 or int(dori_control_steps) < 0):
        raise MemtrainError(f"--dori-steps and --dori-control-steps must be >= 0, got {dori_steps}, {dori_control_steps}")
    guard = None if guard == NoGuard.name else guard
    check_extras(attack, attack_steps, guard, index, generate, any(r.label == 1 for r in rows),
                 train_data is not None or any(r.file_name and (r.member == 1 or r.label == 1) for r in rows))
    if index_threshold is not None and not -1 < index_threshold < 1:
        raise MemtrainError(f"--index-threshold must be in (-1, 1) (a cosine similarity), got {index_threshold}")
    if index is not None and train_data is not None:
        check_index_data(index, train_data)
    if index is not None and not generate and distributed.is_main_process():
        print(f"memtrain evaluate: warning: --index {index} measures the replication of generations; with "
              "--no-generate it is not used", file=sys.stderr)
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

    device = device or str(distributed.process_device())
    pipe = load_pipeline(checkpoint_path, lora, device=device)
    pipe.set_progress_bar_config(disable=True)
    resolution = model_resolution(pipe)
    training_index = embedder = index_criterion = None
    if index is not None:
        training_index, embedder, index_criterion = index_and_embedder(index, pipe, index_model, index_threshold)
    notes: list[str] = []
    cost: dict[str, dict] = {}
    config = {"checkpoint": str(checkpoint), "lora": str(lora) if lora else None, "prompts": str(prompts),
              "data": str(data), "train_data": str(train_data) if train_data else None, "n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
              "batch_size": batch_size, "detectors": detectors, "generate": generate,
              "sscd": str(sscd) if sscd else None, "clip": str(clip) if clip else None, "device": device,
              "resolution": resolution, "detector_schedule": f"DDIM {DETECTOR_STEPS} steps, n = 1",
              "attack": attacks, "attack_eps": attack_eps,
              "dori_steps": dori_steps if "dori" in attacks else None,
              "dori_control_steps": dori_control_steps if "dori" in attacks else None, "attack_steps": attack_steps if attack else None,
              "index": str(index) if index else None, "index_model": str(index_model) if index_model else None,
              "index_threshold": index_threshold,
              "index_criterion": index_criterion.describe() if index_criterion else None, "guard": guard,
              "heldout": str(heldout) if heldout else None, "fpr": fpr, "criterion": criterion, "groups": groups}
    report: dict = {"title": f"memtrain evaluate: {checkpoint}" + (f" + LoRA {lora}" if lora else ""),
                    "config": config, "label_mapping": roles.mapping(), "roc_convention": ROC_CONVENTION,
                    "counts": {"prompts": len(rows), "labelled": sum(r.label is not None for r in rows),
                               "memorized": sum(r.label == 1 for r in rows),
                               "not_memorized": sum(r.label == 0 for r in rows),
                               "members": sum(r.member == 1 for r in rows),
                               "non_members": sum(r.member == 0 for r in rows)}}
    figures: dict = {}

    n_stages = 5 + bool(attack) + bool(guard)
    with distributed.on_main_process(atomic_dir(out, "evaluate", inputs)) as tmp, \
            tqdm(total=n_stages, desc="evaluate", disable=not progress, dynamic_ncols=True) as stages:
        run = start_wandb_run(tmp, config, "evaluate", f"evaluate {Path(checkpoint).name}") if wandb and tmp else None
        try:
            # 1. trigger scenario: detectors
            stages.set_postfix_str("detectors")
            t0 = time.perf_counter()
            trigger = trigger_scenario(pipe, rows, detectors, prompts, seed, batch_size, progress, fpr)
            report["trigger"] = trigger
            cost["detectors"] = {"seconds": round(time.perf_counter() - t0, 2),
                                 "unet_evals": sum(d["unet_evals"] for d in trigger["detectors"].values())}
            stages.update()

            # 2. generation and replication
            stages.set_postfix_str("generate")
            picked = generation_rows(rows, groups, labelled) if generate else []
            gen_rows = [r for r, _ in picked]
            gen_groups = [g for _, g in picked for _ in range(n)]
            generated = None
            if gen_rows:
                t0 = time.perf_counter()
                with count_unet_samples(pipe.unet) as counted:
                    generated = generate_images(pipe, [r.text for r in gen_rows], n=n, seed=seed, steps=steps,
                                                guidance_scale=guidance_scale, batch_size=batch_size,
                                                progress=progress, across_processes=True)
                cost["generation"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "unet_evals": distributed.sum_over_processes(counted[0]),
                                      "images": len(generated)}
            elif not generate:
                notes.append("--no-generate: replication and quality sections skipped")
            stages.update()

            stages.set_postfix_str("replication")
            heldout_set, heldout_from = heldout_images(heldout, rows, data, prompts, resolution, progress)
            if generated is not None:
                t0 = time.perf_counter()
                rep, note = replication_section(pipe, generated, gen_rows, n, gen_groups, rows, data, train_data,
                                                resolution, sscd_model, batch_size, progress, heldout_set, fpr,
                                                criterion, calibration)
                if rep is None:
                    notes.append(note + ("; replication from --index only" if training_index is not None else ""))
                if training_index is not None:
                    rep = rep or {}
                    rep["index"] = index_replication(generated, gen_groups, captions_of(gen_rows, n), training_index,
                                                     embedder, index_criterion, batch_size)
                    rep["index"]["path"] = str(index)
                if rep is not None:
                    report["replication"] = rep
                    if "verdict" in rep:
                        rep["verdict"]["heldout_from"] = heldout_from
                        report["verdict"] = rep["verdict"]
                    if "_references" in rep:
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
                membership["groups"] = [group_name(r) if r.group else ("member" if r.member else "non-member")
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
                if heldout_set is None:
                    notes.append("KID skipped: no held-out images (--heldout DIR, or member 0 / group heldout rows)")
                captions = captions_of(gen_rows, n)
                feature = choose_quality_feature(quality_feature, clip_scorer, batch_size)
                quality = {"feature": f"{feature.name}: {feature.description}", "groups": {}}
                if feature.alignment_key:
                    quality["alignment"] = feature.alignment_key
                for group in dict.fromkeys(gen_groups):
                    idx = [i for i, g in enumerate(gen_groups) if g == group]
                    quality["groups"][group] = general_scenario(
                        generated[idx], [captions[i] for i in idx], heldout_set, clip_scorer, batch_size, feature)
                if heldout_set is not None and "replicated" in figures and len(heldout_set) >= 2:
                    quality["kid_reference"] = kid(feature.features(figures["replicated"][1]),
                                                   feature.features(heldout_set))
                report["quality"] = quality
                cost["quality"] = {"seconds": round(time.perf_counter() - t0, 2)}
            stages.update()
            references = figures["replicated"][1] if "replicated" in figures else None
            verdict = Calibration.from_dict(report["verdict"]["calibration"]) if "verdict" in report else None

            # 5. the re-trigger test of the memorized prompts (Kowalczuk et al. 2025)
            if attack:
                stages.set_postfix_str("attack")
                mem_rows = [r for r in rows if r.label == 1]
                images = None
                if all(r.file_name for r in mem_rows):
                    images = load_images([data / r.file_name for r in mem_rows],
                                         [f"{prompts}, line {r.line} ({r.file_name})" for r in mem_rows],
                                         resolution, "attacked prompts' images", progress)
                else:
                    notes.append("re-trigger test: image-known attacker skipped (a memorized row has no file_name)")
                if references is None:
                    notes.append("re-trigger test skipped: no training images to measure replication against")
                if references is not None and "bounded" in attacks:
                    report["attack"] = attack_report(pipe, [r.text for r in mem_rows], images, references,
                                                     attack_eps, n, seed, attack_steps, steps, guidance_scale,
                                                     batch_size, verdict, sscd_model)
                    cost["attack"] = {k: report["attack"][k] for k in ("seconds", "unet_evals")}
                if references is not None and "dori" in attacks and images is None:
                    notes.append("DoRI skipped: it needs every memorized row's training image (file_name)")
                elif references is not None and "dori" in attacks:
                    report["dori"] = dori_report(pipe, rows, mem_rows, images, references, data, prompts, resolution,
                                                 n, seed, dori_steps, dori_control_steps, steps, guidance_scale,
                                                 batch_size, verdict, sscd_model, notes, progress)
                    cost["dori"] = {k: report["dori"][k] for k in ("seconds", "unet_evals")}
                stages.update()

            # 6. guarded sampling beside the stock sampler
            if guard and generated is not None:
                stages.set_postfix_str(f"guard {guard}")
                t0 = time.perf_counter()
                section = guard_section(
                    pipe, guard, generated, [r.text for r in gen_rows], n, gen_groups, seed, steps, guidance_scale,
                    batch_size, progress, cost["generation"], references, training_index, embedder, index_criterion,
                    (lambda im, caps: general_scenario(im, caps, heldout_set, clip_scorer, batch_size, feature)),
                    report["quality"]["groups"], guard_options, across_processes=True, calibration=verdict,
                    sscd_model=sscd_model)
                report["guard"] = section
                cost["guard"] = {"seconds": round(time.perf_counter() - t0, 2),
                                 "unet_evals": section["guarded"]["unet_evals"]}
                stages.update()

            cost["total"] = {"seconds": round(time.perf_counter() - t_start, 2),
                             "unet_evals": sum(c.get("unet_evals", 0) for c in cost.values())}
            report["cost"] = cost
            report["notes"] = notes
            if tmp is None:  # not the main process: it computed its shares, the main process writes
                return report
            write_report(report, tmp, figures)
            if run is not None:
                log_wandb_summary(run, flat_summary(report), tmp, report.get("files", []))
                run.finish()
                run = None
        except BaseException:
            if run is not None:
                run.finish(exit_code=1)
            raise
    return report


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
    report["files"] = ["report.json", "report.md", *files]
    write_json(report, out / "report.json")
    with atomic_file(out / "report.md") as f:
        f.write(evaluate_markdown(report))
    return report
