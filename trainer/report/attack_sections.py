"""The re-trigger tests of `memtrain evaluate` (`--attack dori,bounded`), computed and rendered side by side:
DoRI (Kowalczuk et al. 2026: the text embedding optimised towards the prompt's training image, with
non-memorized members as control; `trainer.detect.dori`) and the bounded attack (Kowalczuk et al. 2025:
||d|| <= eps ||e||, no image known and image known; `trainer.detect.attack`). Copies are judged by the
report's copy verdict; each attack's generations are drawn beside their nearest training images
(attack_dori.png, attack_bounded_image_eps0.1.png, ...), as replicated.png, to check the verdicts by eye.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.core.unet_core import count_unet_samples
from trainer.data import load_images
from trainer.detect.attack import ATTACKERS, attack_section
from trainer.detect.dori import dori_section, own_references
from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration
from trainer.measure.replication import replication_metrics
from trainer.measure.verdict import GU_RATIO, verdict_key, verdict_scores
from trainer.plots import save_replication_grid
from trainer.report.render import figure, fmt
from trainer.report.run import EvalRun


def parse_eps(value: str | float | Sequence[float]) -> list[float]:
    """`--attack-eps 0.05,0.1,0.2` (or a number / list) as a list of budgets > 0."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int | float) else value
    try:
        eps = [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise MemtrainError(f"--attack-eps: want comma-separated numbers > 0, got {value!r}") from None
    if not eps or any(not e > 0 for e in eps):
        raise MemtrainError(f"--attack-eps: every budget must be > 0 (||d|| <= eps * ||e||), got {value!r}")
    return eps


ATTACKS = ("dori", "bounded")


def parse_attacks(value: bool | str | Sequence[str] | None) -> list[str]:
    """`--attack dori,bounded` as a list; True (bare `--attack`) = both, False / None = none."""
    if value is None or value is False:
        return []
    items = ATTACKS if value is True else value.split(",") if isinstance(value, str) else value
    attacks = [a.strip() for a in items if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise MemtrainError(f"--attack: want a comma-separated subset of {','.join(ATTACKS)}, got {value!r}")
    return list(dict.fromkeys(attacks))


def attack_report(pipe, texts: list[str], images: torch.Tensor | None, references: torch.Tensor,
                  eps_values: Sequence[float], n: int, seed: int, steps: int, sample_steps: int,
                  guidance_scale: float, batch_size: int, calibration: Calibration = GU_RATIO,
                  sscd_model=None) -> dict:
    """`trainer.detect.attack.attack_section` for the memorized prompts, with its total cost (`unet_evals`,
    `seconds`: the attacks plus the generations of the plain and perturbed prompts; the attackers' own
    optimisation cost is under `attackers`); copies judged by the report's verdict `calibration`."""
    start = time.perf_counter()
    with count_unet_samples(pipe.unet) as counted:
        section = attack_section(pipe, texts, images, references, eps_values=eps_values, n=n, seed=seed,
                                 steps=steps, sample_steps=sample_steps, guidance_scale=guidance_scale,
                                 batch_size=batch_size, calibration=calibration, sscd_model=sscd_model,
                                 keep_generations=True)
    section["texts"] = list(texts)
    section["seconds"] = round(time.perf_counter() - start, 2)
    section["unet_evals"] = counted[0]
    return section


def dori_report(pipe, rows, mem_rows, images: torch.Tensor, references: torch.Tensor, data: Path, source: Path,
                resolution: int, n: int, seed: int, steps: int, control_steps: int, sample_steps: int,
                guidance_scale: float, batch_size: int, calibration: Calibration | None, sscd_model, notes: list,
                progress: bool = True) -> dict:
    """`trainer.detect.dori.dori_section` for the memorized prompts, with as control as many non-memorized
    member rows (member 1, not label 1, with file_name) in file order; copies judged by the report's verdict."""
    control = [r for r in rows if r.member == 1 and r.label != 1 and r.file_name][:len(mem_rows)]
    control_images = None
    if control:
        control_images = load_images([data / r.file_name for r in control],
                                     [f"{source}, line {r.line} ({r.file_name})" for r in control], resolution,
                                     "DoRI control images", progress)
    else:
        notes.append("DoRI control skipped: no non-memorized member rows (member 1, not label 1) with file_name")
    return dori_section(pipe, [r.text for r in mem_rows], images, [r.text for r in control], control_images,
                        references, n, seed, steps, control_steps, sample_steps=sample_steps,
                        guidance_scale=guidance_scale, batch_size=batch_size, calibration=calibration or GU_RATIO,
                        sscd_model=sscd_model, keep_generations=True)


def attack_panels(generated: torch.Tensor, references: torch.Tensor, own: Sequence[int] | None, texts: list[str],
                  n: int, calibration: Calibration, own_only: bool, sscd_model=None, batch_size: int = 32) -> tuple:
    """(generated, nearest training images, titles) of one attack's generations (prompt-major, n per prompt),
    for `save_replication_grid`: each title gives the verdict, the score against the threshold, whether the
    nearest image is the prompt's own (`own`: its index in `references` per prompt, or None when unknown; DoRI
    counts a copy only then, `own_only`) and the prompt."""
    metrics = replication_metrics(generated, references)
    scores = verdict_scores(generated, references, calibration, sscd_model, batch_size, metrics)
    flags = calibration.flags(scores)
    nearest = metrics["nn_index"].cpu()
    op, key = (">" if calibration.higher_is_copy else "<"), verdict_key(calibration)
    titles = []
    for i, (score, flag) in enumerate(zip(scores, flags, strict=True)):
        is_own = None if own is None else int(nearest[i]) == int(own[i // n])
        copy = bool(flag) and (is_own or not own_only)
        where = "" if is_own is None else f", nearest: {'own' if is_own else 'other'} image"
        titles.append(f"{'COPY' if copy else 'not a copy'}: {key} {score:.3f} {op if flag else 'vs'} "
                      f"{calibration.threshold:.3f}{where}; {texts[i // n]}")
    return generated, references[nearest], titles


def _attack_figures(run: EvalRun, images: torch.Tensor | None, texts: list[str]) -> None:
    """Move the attacks' generations out of the report into `run.figures["attacks"]` ({file: panels, caption})."""
    references, verdict, n = run.references, run.verdict or GU_RATIO, run.spec.n
    kw = dict(sscd_model=run.sscd_model, batch_size=run.spec.batch_size)
    grids = run.figures.setdefault("attacks", {})
    dori = run.report.get("dori") or {}
    own = (dori["memorized"]["own"] if dori.get("memorized")  # the same images' own references, found once
           else own_references(run.pipe, images, references).tolist() if images is not None else None)
    for part, name, own_only in (("memorized", "attack_dori.png", True), ("control", "attack_dori_control.png", True)):
        curve = dori.get(part)
        if curve and "_generated" in curve:
            steps = dori["steps"] if part == "memorized" else dori["control_steps"]
            grids[name] = (*attack_panels(curve.pop("_generated"), references, curve["own"],
                                          curve.get("texts", dori["texts"]), n, verdict, own_only, **kw),
                           f"DoRI{' control' if part == 'control' else ''}: the embeddings at step {steps}")
    for row in (run.report.get("attack") or {}).get("rows", []):
        for attacker in ATTACKERS:
            if row.get(attacker) and "_generated" in row[attacker]:
                grids[f"attack_bounded_{attacker}_eps{row['eps']:g}.png"] = (
                    *attack_panels(row[attacker].pop("_generated"), references, own, texts, n, verdict, False, **kw),
                    f'bounded attack "{attacker}", eps {row["eps"]:g}')


def save_attack_grids(out: Path, figures: dict) -> list[str]:
    """Write each attack's generations beside their nearest training images; return the file names."""
    files = []
    for name, (generated, nearest, titles, what) in (figures.get("attacks") or {}).items():
        save_replication_grid(out / name, generated, nearest, titles, ncols=4, caption=what)
        files.append(name)
    return files


def run_attack(run: EvalRun) -> None:
    """The requested attacks on the memorized prompts, against the replication section's references."""
    spec = run.spec
    mem_rows = [r for r in run.rows if r.label == 1]
    images = None
    if all(r.file_name for r in mem_rows):
        images = load_images([run.data / r.file_name for r in mem_rows],
                             [f"{run.prompts}, line {r.line} ({r.file_name})" for r in mem_rows],
                             run.resolution, "attacked prompts' images", run.progress)
    else:
        run.notes.append("re-trigger test: image-known attacker skipped (a memorized row has no file_name)")
    references, verdict = run.references, run.verdict
    if references is None:
        run.notes.append("re-trigger test skipped: no training images to measure replication against")
    if references is not None and "bounded" in run.attacks:
        run.report["attack"] = attack_report(run.pipe, [r.text for r in mem_rows], images, references, run.attack_eps,
                                             spec.n, spec.seed, spec.attack_steps, spec.steps, spec.guidance_scale,
                                             spec.batch_size, verdict, run.sscd_model)
        run.cost["attack"] = {k: run.report["attack"][k] for k in ("seconds", "unet_evals")}
    if references is not None and "dori" in run.attacks and images is None:
        run.notes.append("DoRI skipped: it needs every memorized row's training image (file_name)")
    elif references is not None and "dori" in run.attacks:
        run.report["dori"] = dori_report(run.pipe, run.rows, mem_rows, images, references, run.data, run.prompts,
                                         run.resolution, spec.n, spec.seed, spec.dori_steps, spec.dori_control_steps,
                                         spec.steps, spec.guidance_scale, spec.batch_size, verdict, run.sscd_model,
                                         run.notes, run.progress)
        run.cost["dori"] = {k: run.report["dori"][k] for k in ("seconds", "unet_evals")}
    if references is not None:
        _attack_figures(run, images, [r.text for r in mem_rows])


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
    lines.append("| memorized | " + " | ".join(fmt(v, "%") for v in d["memorized"]["replication"]) + " |")
    c = d.get("control")
    if c:
        lines += ["", "| control (non-memorized members) | " + " | ".join(f"step {s}" for s in c["checkpoints"]) + " |",
                  "|---|" + "---|" * len(c["checkpoints"]),
                  "| copied | " + " | ".join(fmt(v, "%") for v in c["replication"]) + " |"]
    first = [s for s in d["memorized"]["steps_to_copy"] if s is not None]
    lines += ["", f"Memorized prompts copied within {d['steps']} steps: {len(first)} of {d['prompts']}"
              + (f" (median first copy at step {sorted(first)[len(first) // 2]})" if first else "")
              + (f"; control images copied within {d['control_steps']} steps: "
                 f"{sum(s is not None for s in c['steps_to_copy'])} of {len(c['steps_to_copy'])} (the paper: none "
                 "within 500)" if c else "; no control images") + f". UNet evals {d['unet_evals']}, "
              f"{d['seconds']:.1f} s.", ""]
    return lines


def bounded_lines(a: dict) -> list[str]:
    lines = ["## Re-trigger test", "",
             f"{a['prompts']} memorized prompts; per prompt a text-embedding perturbation d with ||d|| <= eps ||e|| "
             f"({a['steps']} PGD steps, {a['n_noise']} noise draws a step; Kowalczuk et al. 2025), then {a['n']} "
             f"generation(s) per prompt. Replicated (copy): {a.get('criterion', 'NN1/NN2 L2 ratio < 1/3')}, against the "
             "replication section's references. \"noise\": no image known (maximizes Wen et al.'s first-step noise "
             "magnitude); \"image\": the training image known (minimizes its denoising loss).", "",
             "| eps | plain prompt | attack \"noise\" | attack \"image\" |", "|---|---|---|---|"]
    for row in a["rows"]:
        cells = [fmt(row[k]["replication"], "%") if row.get(k) else "-" for k in ("noise", "image")]
        lines.append(f"| {row['eps']:g} | {fmt(row['plain'], '%')} | {cells[0]} | {cells[1]} |")
    lines += ["", "| attacker | UNet evals | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['unet_evals']} | {v['seconds']:.1f} |" for k, v in a["attackers"].items()]
    return [*lines, ""]


def _figure_lines(report: dict, prefix: str) -> list[str]:
    """The attack figures whose file names start with `prefix` (the generations beside their nearest images)."""
    names = [f for f in report.get("files", []) if f.startswith(prefix)]
    return [*(figure(report, f, f"{f[:-4]}: generations beside their nearest training images") for f in names),
            ""] if names else []


def attack_lines(report: dict) -> list[str]:
    return [*(dori_lines(report["dori"]) + _figure_lines(report, "attack_dori") if report.get("dori") else []),
            *(bounded_lines(report["attack"]) + _figure_lines(report, "attack_bounded") if report.get("attack")
              else [])]
