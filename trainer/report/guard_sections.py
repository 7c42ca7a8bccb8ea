"""The optional sections of `memtrain evaluate`: the re-trigger test (`--attack`, Kowalczuk et al. 2025),
replication against a training-image index (`--index`, `trainer.measure.index`) and guarded sampling
side by side with the stock sampler (`--guard NAME`, a guard of `trainer.sample.guard.GUARDS`).

Index replication: each generation is embedded with the index's own embedder and its nearest
training image is looked up (exact cosine search), and the next nearest that is not an exact copy of it
(a row with a byte-identical embedding: the same image stored twice), whose similarity is
`second_similarity`; it is replicated when the cosine similarity to
the nearest exceeds the threshold: the index's own calibration on held-out images when it has one
(`memtrain index --heldout`), else an uncalibrated constant named in the report: 0.5 for SSCD (the
convention of Somepalli et al. 2023 and AMG), 0.85 for the pixel embedding (set on the toy world); a
CLIP index needs a calibration or an explicit threshold. Only the [N, d] embeddings are held, never the
training images, so a large training set works. The guard section also compares each intervened
generation with its unguarded version: pixel RMSE and the share of saturated pixels (at 0 or 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from trainer.core import distributed
from trainer.core.unet_core import count_unet_samples
from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration, uncalibrated
from trainer.measure.embedders import ImageEmbedder, make_embedder
from trainer.measure.index import TrainingIndex
from trainer.measure.replication import SSCD_THRESHOLD, summarize_replication
from trainer.measure.verdict import GU_RATIO, verdict_scores
from trainer.report.render import fmt
from trainer.report.run import EvalRun
from trainer.report.sections import general_scenario
from trainer.sample.amg import PIXEL_FALLBACK
from trainer.sample.guard import GUARDS, GuardedPipeline, guarded_generate, load_index
from trainer.sample.guards import NoGuard

INDEX_THRESHOLDS = {"sscd": (SSCD_THRESHOLD, "Somepalli et al.'s SSCD convention 0.5"),
                    "pixels": (PIXEL_FALLBACK, f"the toy-world constant {PIXEL_FALLBACK:g}")}
SATURATED = 1.0 / 255  # a pixel channel within this of 0 or 1 is saturated
INDEX_NEIGHBOURS = 2


def check_extras(attack: bool, attack_steps: int, guard: str | None, index: str | Path | None, generate: bool,
                 has_memorized: bool, has_train_images: bool) -> None:
    """The bad-input checks of the optional sections, before any model is loaded."""
    if attack:
        if int(attack_steps) < 1:
            raise MemtrainError(f"--attack-steps must be >= 1, got {attack_steps}")
        if not generate:
            raise MemtrainError("--attack measures replication of generations: drop --no-generate")
        if not has_memorized:
            raise MemtrainError("--attack needs memorized prompts (label 1) in the prompt file or --memorized")
        if not has_train_images:
            raise MemtrainError("--attack measures replication against the training images: pass --train-data "
                                "or give the memorized rows a file_name")
    guarded = guard not in (None, NoGuard.name)
    if guarded and guard not in GUARDS:
        raise MemtrainError(f"--guard must be one of {', '.join(g for g in GUARDS if g != NoGuard.name)}; got {guard!r}")
    if guarded and GUARDS[guard].needs_index and index is None:
        raise MemtrainError(f"--guard {guard} needs --index INDEX (a training-image index built by `memtrain index`)")
    if guarded and not generate:
        raise MemtrainError("--guard compares guarded with unguarded generations: drop --no-generate")
    if index is not None and not Path(index).exists():
        raise MemtrainError(f"--index {index}: no such index; build one with `memtrain index DATA --out {index}`")


def index_calibration(index: TrainingIndex, threshold: float | None, where: str) -> Calibration:
    """The replication criterion of an index: `threshold` when given, else its held-out calibration, else
    the embedding's uncalibrated constant (named)."""
    metric = f"top-1 cosine similarity ({index.embedding} index)"
    if threshold is not None:
        return uncalibrated(metric, threshold, True, f"--index-threshold {threshold:g}")
    copy = index.copy_calibration()
    if copy is not None:
        return copy
    if index.embedding not in INDEX_THRESHOLDS:
        raise MemtrainError(f"{where}: no default replication threshold for the {index.embedding!r} embedding; "
                            "calibrate the index (`memtrain index DATA --heldout DIR`) or pass --index-threshold")
    value, source = INDEX_THRESHOLDS[index.embedding]
    return uncalibrated(metric, value, True, source)


def index_and_embedder(path: str | Path, pipe, model: str | Path | None,
                       threshold: float | None) -> tuple[TrainingIndex, ImageEmbedder, Calibration]:
    """(index, its embedder, replication criterion) for `--index` (checked against the model's resolution)."""
    index = load_index(path, pipe)
    calibration = index_calibration(index, threshold, f"--index {path}")
    model = model or (index.meta or {}).get("model")
    return index, make_embedder(index.embedding, model, pipe.device), calibration


@torch.no_grad()
def _embed(embedder: ImageEmbedder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([embedder(images[s:s + batch_size]).cpu() for s in range(0, len(images), batch_size)])


def index_replication(generated: torch.Tensor, groups: Sequence[str], captions: Sequence[str], index: TrainingIndex,
                      embedder: ImageEmbedder, calibration: Calibration | float, batch_size: int = 32) -> dict:
    """Nearest training images of each generation from the index (module docstring), summarized per group."""
    if not isinstance(calibration, Calibration):
        calibration = index_calibration(index, float(calibration), "index")
    threshold = calibration.threshold
    start = time.perf_counter()
    copies = index.copy_ids()  # the second neighbour skips exact copies of the nearest (module docstring)
    k = min(len(index), max(INDEX_NEIGHBOURS, int(np.bincount(copies).max()) + 1))
    sims, nn = index.search(_embed(embedder, generated, batch_size), k=k)
    sims, nn = sims.double().numpy(), nn.numpy()
    rows = []
    for i in range(len(generated)):
        j = int(nn[i, 0])
        second = next((float(sims[i, c]) for c in range(1, k) if copies[nn[i, c]] != copies[j]), None)
        rows.append({"group": groups[i], "text": captions[i], "nearest_index": j,
                     "nearest_file": index.file_names[j], "nearest_caption": index.captions[j],
                     "similarity": float(sims[i, 0]), "second_similarity": second,
                     "replicated": bool(calibration.flags(sims[i, 0]))})
    summary = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        s = summarize_replication(sims[idx, 0], threshold, higher_is_replication=True)
        summary[group] = {"generations": len(idx), "similarity_mean": s["mean"], "similarity_p95": s["p95"],
                          "similarity_max": s["max"], "fraction_replicated": s["fraction"],
                          "nearest_caption_is_prompt": float(np.mean([rows[i]["nearest_caption"] == captions[i]
                                                                      for i in idx]))}
    return {"embedding": index.embedding, "images": len(index), "resolution": index.resolution,
            "threshold": threshold, "calibration": calibration.to_dict(), "criterion": calibration.describe(),
            "groups": summary, "generations": rows,
            "similarity": f"cosine similarity of the {index.embedding} embeddings to the nearest training image "
                          f"(exact search); replicated when {calibration.describe()}",
            "seconds": round(time.perf_counter() - start, 2)}


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Per image: the share of pixel channels at 0 or 1 (within 1/255), the signature of a guard pushed too far."""
    x = images.float().flatten(1)
    return ((x <= SATURATED) | (x >= 1 - SATURATED)).float().mean(1)


def intervened_quality(generated: torch.Tensor, guarded: torch.Tensor, idx: list[int], records: list[dict]) -> dict:
    """Intervened generations against their unguarded versions: pixel RMSE and saturation (mean, max)."""
    hit = [i for i in idx if records[i]["intervened"]]
    plain_sat, guard_sat = saturation(generated[idx]), saturation(guarded[idx])
    out = {"saturation_mean": float(guard_sat.mean()), "saturation_max": float(guard_sat.max()),
           "unguarded_saturation_mean": float(plain_sat.mean()), "unguarded_saturation_max": float(plain_sat.max())}
    if hit:
        rmse = (guarded[hit] - generated[hit]).float().flatten(1).pow(2).mean(1).sqrt()
        out.update(intervened_rmse_mean=float(rmse.mean()), intervened_saturation_mean=float(saturation(guarded[hit]).mean()),
                   intervened_unguarded_saturation_mean=float(saturation(generated[hit]).mean()))
    return out


def _replication_fractions(images: torch.Tensor, idx: list[int], references: torch.Tensor | None,
                           index_hits: list[dict] | None, index_verdict: Calibration | None,
                           calibration: Calibration = GU_RATIO, sscd_model=None) -> dict:
    out = {}
    if references is not None:  # the replication section's copy verdict (replication_stats)
        scores = verdict_scores(images[idx], references, calibration, sscd_model)
        out["fraction_replicated"] = float(calibration.flags(scores).mean())
    if index_hits is not None:
        out["fraction_replicated_index"] = float(np.mean(index_verdict.flags([index_hits[i]["similarity"] for i in idx])))
    return out


def guard_section(pipe, guard: str, generated: torch.Tensor, texts: list[str], n: int, groups: Sequence[str],
                  seed: int, steps: int, guidance_scale: float, batch_size: int, progress: bool,
                  baseline_cost: dict, references: torch.Tensor | None = None, index: TrainingIndex | None = None,
                  embedder: ImageEmbedder | None = None, index_verdict: Calibration | float | None = None,
                  quality: Callable[[torch.Tensor, list[str]], dict] | None = None,
                  baseline_quality: dict | None = None, options: dict | None = None,
                  across_processes: bool = False, calibration: Calibration = GU_RATIO, sscd_model=None) -> dict:
    """Guarded generations of the same prompts and seeds as `generated` (the stock sampler's), side by side.

    Per group (trigger / general): replication with and without the guard (the replication section's
    criteria: its copy verdict `calibration` when `references` are given, index similarity when `index` is), quality (`quality`
    of the guarded images beside `baseline_quality`), the fraction of generations and of sampling steps
    where the guard intervened, the largest pixel change of a generation it did not intervene in, and the
    intervened generations against their unguarded versions (`intervened_quality`).
    `across_processes`: the processes of `accelerate launch` share the generations (`guarded_generate`)."""
    options = dict(options or {})
    if index is not None and index_verdict is not None and not isinstance(index_verdict, Calibration):
        index_verdict = index_calibration(index, float(index_verdict), "index")
    sampler = GuardedPipeline.from_pipe(pipe, index, guard=guard, embedder=embedder, **options)
    start = time.perf_counter()
    with count_unet_samples(pipe.unet) as counted:
        guarded, records = guarded_generate(pipe, texts, n, seed, steps, guidance_scale, sampler, index, batch_size,
                                            progress, across_processes)
    unet_evals = distributed.sum_over_processes(counted[0])
    seconds = time.perf_counter() - start
    captions = [t for t in texts for _ in range(n)]
    base_hits = guard_hits = None
    if index is not None:
        base_hits = index_replication(generated, groups, captions, index, embedder, index_verdict, batch_size)
        guard_hits = index_replication(guarded, groups, captions, index, embedder, index_verdict, batch_size)
    change = (guarded - generated).flatten(1).abs().amax(1)
    result = {"guard": guard, "options": {k: v for k, v in options.items() if isinstance(v, int | float | str)},
              "generations": len(guarded), "steps": steps, "trigger": sampler.trigger,
              "criteria": {},
              "unguarded": {"seconds_per_image": baseline_cost["seconds"] / len(generated),
                            "unet_evals_per_image": baseline_cost["unet_evals"] / len(generated)},
              "guarded": {"seconds_per_image": seconds / len(guarded), "unet_evals_per_image": unet_evals / len(guarded),
                          "unet_evals": unet_evals},
              "groups": {}}
    if references is not None:
        result["criteria"]["fraction_replicated"] = f"{calibration.describe()} (the replication section)"
    if index is not None:
        result["criteria"]["fraction_replicated_index"] = index_verdict.describe()
    result["seconds_ratio"] = result["guarded"]["seconds_per_image"] / max(result["unguarded"]["seconds_per_image"],
                                                                         1e-12)
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        recs = [records[i] for i in idx]
        calm = [i for i in idx if not records[i]["intervened"]]
        plain = _replication_fractions(generated, idx, references, base_hits and base_hits["generations"],
                                       index_verdict, calibration, sscd_model)
        guarded_side = _replication_fractions(guarded, idx, references, guard_hits and guard_hits["generations"],
                                              index_verdict, calibration, sscd_model)
        if quality is not None:
            guarded_side.update({k: v for k, v in quality(guarded[idx], [captions[i] for i in idx]).items()
                                 if k != "notes"})
        if baseline_quality is not None and group in baseline_quality:
            plain.update({k: v for k, v in baseline_quality[group].items() if k != "notes"})
        guarded_side["fraction_intervened"] = float(np.mean([bool(r["intervened"]) for r in recs]))
        guarded_side.update(sampler.guard.summarize(recs, steps))
        guarded_side["max_abs_change_not_intervened"] = float(change[calm].max()) if calm else None
        guarded_side.update(intervened_quality(generated, guarded, idx, records))
        result["groups"][group] = {"generations": len(idx), "unguarded": plain, "guarded": guarded_side}
    result["records"] = [{k: v for k, v in r.items() if k != "sigmas"} for r in records]
    return result


def run_guard(run: EvalRun) -> None:
    """The guarded generations beside the stock ones (`guard_section`), quality in the quality section's feature."""
    if run.generated is None:
        return
    spec, t0 = run.spec, time.perf_counter()
    section = guard_section(
        run.pipe, run.guard, run.generated, [r.text for r in run.gen_rows], spec.n, run.gen_groups, spec.seed,
        spec.steps, spec.guidance_scale, spec.batch_size, run.progress, run.cost["generation"], run.references,
        run.training_index, run.embedder, run.index_criterion,
        (lambda im, caps: general_scenario(im, caps, run.heldout_set, run.clip_scorer, spec.batch_size, run.feature)),
        run.report["quality"]["groups"], spec.guard_options, across_processes=True, calibration=run.verdict,
        sscd_model=run.sscd_model)
    run.report["guard"] = section
    run.cost["guard"] = {"seconds": round(time.perf_counter() - t0, 2), "unet_evals": section["guarded"]["unet_evals"]}


def guard_table(g: dict, alignment: str | None = None) -> list[str]:
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
            lines.append(f"| {group} | {side} | {fmt(v.get('fraction_replicated'), '%')} | "
                         f"{fmt(v.get('fraction_replicated_index'), '%')} | {fmt(v.get(alignment))} | "
                         f"{fmt(v.get('kid'), '.4g')} | {fmt(v.get('clip_score'), '.2f')} | "
                         f"{fmt(v.get('fraction_intervened'), '%')} | {fmt(v.get('fraction_steps_intervened'), '%')} | "
                         f"{fmt(v.get('max_abs_change_not_intervened'), '.2g')} |")
    lines += ["", "Intervened generations against their unguarded versions (same prompt and seed): pixel RMSE, "
              "and the share of saturated pixel channels (at 0 or 1).", "",
              "| group | intervened RMSE to unguarded | saturation (intervened) | saturation unguarded (same images) "
              "| saturation max guarded | saturation max unguarded |", "|---|---|---|---|---|---|"]
    for group, s in g["groups"].items():
        v = s["guarded"]
        lines.append(f"| {group} | {fmt(v.get('intervened_rmse_mean'), '.3g')} | "
                     f"{fmt(v.get('intervened_saturation_mean'), '%')} | "
                     f"{fmt(v.get('intervened_unguarded_saturation_mean'), '%')} | "
                     f"{fmt(v.get('saturation_max'), '%')} | {fmt(v.get('unguarded_saturation_max'), '%')} |")
    return [*lines, ""]


def guard_lines(report: dict) -> list[str]:
    return guard_table(report["guard"], report.get("quality", {}).get("alignment")) if report.get("guard") else []
