"""`memtrain compare`: plain vs mitigated fine-tuning of the toy base on the same planted-duplicate data.

Trains recipes/toy.yaml and recipes/toy-mitigated.yaml (plus one run per mitigation with `--alone`),
all with the memorization monitor, then measures for each pipeline the replication rate (as
`toy.study`: Gu et al. 2023, "On memorization in diffusion models"), the novel prompts' toy alignment
and KID (MemBench's general scenario, Hong et al. 2024) and the final CLiD curve. Writes
OUT/compare.json, OUT/compare.md, OUT/clid_curves.png and OUT/runs/NAME/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import data as data_lib
from trainer.config import apply_overrides, builtin_recipes, from_dict, read_recipe_tree
from trainer.core.components import load_pipeline
from trainer.io import MemtrainError, atomic_file, claim_output, write_json
from trainer.measure.features import kid
from trainer.mitigate.dedup import exposure
from trainer.mitigate.presets import PRESETS, parse_mitigation_specs
from trainer.plots import save_curves
from trainer.recipe import TrainRecipe
from trainer.report.sections import general_scenario
from trainer.toy import demo as demo
from trainer.toy import world as toy_world
from trainer.toy.base import TOY_BASE
from trainer.toy.checker import TOY_QUALITY, toy_features
from trainer.toy.render import compare_markdown
from trainer.toy.study import replication_study, summarize, write_study
from trainer.tracking import read_jsonl
from trainer.training.loop import train

PLAIN_RECIPE = builtin_recipes()["toy"]
MITIGATED_RECIPE = builtin_recipes()["toy-mitigated"]
MONITOR_KEY = "monitor/"
MATCHES = ("steps", "epochs")
SAME_TRAINING = ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "seed")


def parse_alone(value: str | list[str] | tuple[str, ...] | None) -> list[tuple[str, list[str]]]:
    """`--alone rt,cwr` -> [("rt", [overrides]), ("cwr", [...])]: preset names (`all` = every preset)
    or `NAME:key=value[ key=value]`; unknown names fail listing the valid ones."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    specs = [s.strip() for s in items if s.strip()]
    if [s.lower() for s in specs] == ["all"]:
        specs = list(PRESETS)
    return parse_mitigation_specs(specs, "--alone", reserved=("plain", "mitigated"))


def plan_runs(out: Path, base: Path, alone: list[tuple[str, list[str]]], overrides: list[str], plain_recipe: Path,
              mitigated_recipe: Path, progress: bool, match: str = "steps") -> list[dict]:
    """The recipes of every run (name, recipe, its overrides), all validated before anything is written.
    `match="epochs"`: the runs' `train.max_steps` may differ (`match_exposure` sets them once the data exists)."""
    if match not in MATCHES:
        raise MemtrainError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
    plain_tree = read_recipe_tree(plain_recipe)
    mitigated_tree = read_recipe_tree(mitigated_recipe)
    monitor = mitigated_tree.get("monitor")
    if not isinstance(monitor, dict) or not monitor.get("every_steps"):
        raise MemtrainError(f"{mitigated_recipe}: `monitor.every_steps` must be > 0: the comparison plots the "
                            "CLiD curve of both runs")
    labels = out / "data" / "labels.jsonl"
    runs = [("plain", plain_recipe, apply_overrides(plain_tree, []) | {"monitor": monitor}, []),
            ("mitigated", mitigated_recipe, mitigated_tree, [])]
    runs += [(name, plain_recipe, apply_overrides(plain_tree, []) | {"monitor": monitor}, extra)
             for name, extra in alone]
    planned = []
    for name, path, tree, extra in runs:
        fixed = [f"model.pretrained={base}", f"data.path={out / 'data' / 'train'}",
                 f"output.dir={out / 'runs' / name}", f"monitor.heldout={labels}", f"monitor.novel_prompts={labels}",
                 f"log.run_name=compare-{name}", f"log.progress={str(progress).lower()}"]
        recipe = from_dict(TrainRecipe, apply_overrides(tree, [*fixed, *extra, *overrides], TrainRecipe), where=str(path))
        recipe.validate()
        if not recipe.monitor.every_steps:
            raise MemtrainError(f"{name}: `monitor.every_steps` must be > 0 for the comparison (got 0)")
        planned.append({"name": name, "recipe": recipe, "recipe_path": str(path), "mitigation": extra})
    first = planned[0]["recipe"].train
    for run in planned[1:]:
        other = run["recipe"].train
        for key in SAME_TRAINING:
            if key == "max_steps" and match == "epochs":
                continue
            if getattr(first, key) != getattr(other, key):
                raise MemtrainError(
                    f"{run['recipe_path']}: `train.{key}`={getattr(other, key)!r} but the plain recipe "
                    f"{plain_recipe} has {getattr(first, key)!r}; the runs must train the same way "
                    f"(let the mitigated recipe `extends: {Path(plain_recipe).name}`)")
    return planned


def training_rows(recipe) -> dict:
    """Rows of the training data, how many the recipe trains on after its `data.dedup` policy (the grouping
    of `dedup.apply_dedup_policy`, as `loop.make_caption_fn_and_weights`) and how often it sees each distinct
    image (`dedup.exposure`; the comparison trains in one process)."""
    rows = data_lib.load_rows(recipe.data.path, recipe.data.caption_column, recipe.data.image_column,
                              recipe.data.split, recipe.data.max_samples)
    opt = recipe.train
    seen = exposure(rows, recipe.data.dedup, opt.max_steps * opt.batch_size * opt.gradient_accumulation_steps,
                    recipe.data.dedup_threshold)
    return {"rows": len(rows.images), "trained_rows": seen["trained_rows"], "dedup": recipe.data.dedup,
            "reweighted": recipe.data.dedup == "reweight", "exposure": seen}


def match_exposure(runs: list[dict], match: str) -> dict[str, dict]:
    """{run name: training_rows}; with `match="epochs"` each run's `train.max_steps` is first set so that it
    sees a typical distinct image as often as the plain (first) run does (`views_median`), e.g. a
    de-duplicated run takes fewer steps."""
    rows = {run["name"]: training_rows(run["recipe"]) for run in runs}
    if match == "epochs":
        ref = rows[runs[0]["name"]]["exposure"]["views_median"]
        for run in runs[1:]:
            opt = run["recipe"].train
            views = rows[run["name"]]["exposure"]["views_median"]
            opt.max_steps = max(1, math.floor(opt.max_steps * ref / views + 0.5))
            rows[run["name"]] = training_rows(run["recipe"])
    return rows


def monitor_curves(metrics_jsonl: str | Path) -> list[dict]:
    """The monitor's entries of a run's JSONL metrics file: [{"step", "clid_auc", ...}] in step order."""
    path = Path(metrics_jsonl)
    if not path.exists():
        raise MemtrainError(f"{path}: no JSONL metrics (the training run did not log)")
    entries = []
    for row in read_jsonl(path):
        values = {k[len(MONITOR_KEY):]: v for k, v in row.items() if k.startswith(MONITOR_KEY)}
        if values:
            entries.append({"step": row["step"], **values})
    return sorted(entries, key=lambda e: e["step"])


def measure_run(run: dict, data: Path, n: int, steps: int, progress: bool) -> dict:
    """Replication, general scenario and monitor curves of one trained run."""
    recipe = run["recipe"]
    out = Path(recipe.output.dir)
    # the demo's sampler settings and replication criterion, so the plain row is the demo's figure
    kwargs = {"n": n, "steps": steps, "progress": progress, "guidance_scale": demo.GUIDANCE_SCALE,
              "ratio_threshold": demo.RATIO_THRESHOLD}
    t0 = time.time()
    torch.manual_seed(0)
    pipe = load_pipeline(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    study = replication_study(pipe, data, **kwargs)
    summary = summarize(study)
    novel = [i for i, g in enumerate(study["generations"]) if g["group"] == "novel"]
    heldout = study["heldout_images"]  # loaded once by replication_study for its calibration
    if heldout is None:
        raise MemtrainError(f"{data}: no held-out images (heldout/metadata.jsonl); the general scenario needs them")
    general = general_scenario(study["images"][novel], [study["generations"][i]["text"] for i in novel], heldout,
                               quality=TOY_QUALITY)
    general["kid_reference"] = kid(toy_features(study["unique_train"]), toy_features(heldout))
    write_study(study, out / "report", f"memtrain compare: replication after the {run['name']} fine-tune",
                extra={"recipe": run["recipe_path"], "mitigation": run["mitigation"]})
    measure_s = time.time() - t0
    curves = monitor_curves(out / "logs" / "metrics.jsonl")
    return {"replication": summary, "general": general, "curves": curves, "final_monitor": curves[-1] if curves else None,
            "guidance_scale": kwargs["guidance_scale"],
            "ratio_threshold": kwargs["ratio_threshold"], "measure_s": round(measure_s, 1)}


def compare(out: str | Path = "runs/compare", base: str | Path = TOY_BASE, alone: str | list[str] | None = None,
            n: int = 2, overrides: list[str] = (), steps: int = 50, data_config=None,
            plain_recipe: str | Path = PLAIN_RECIPE, mitigated_recipe: str | Path = MITIGATED_RECIPE,
            progress: bool = True, match: str = "steps") -> dict:
    """Run the comparison of the module docstring; write OUT/compare.json, compare.md, clid_curves.png.
    `match`: "steps" (every run the plain run's optimizer steps) or "epochs" (every run sees each distinct
    image as often as the plain run: `match_exposure`)."""
    out, base = Path(out), Path(base)
    names = parse_alone(alone)
    for value, flag in ((n, "-n"), (steps, "--steps")):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    if not (base / "model_index.json").is_file():
        raise MemtrainError(f"--base {base}: not a diffusers pipeline directory (no model_index.json); the toy "
                            "base is built by `python scripts/build_toy_base.py`")
    runs = plan_runs(out, base, names, list(overrides), Path(plain_recipe), Path(mitigated_recipe), progress, match)
    claim_output(out, "compare", ["data/", "runs/", "compare.json", "compare.md", "clid_curves.png"],
                 {"--base": base, "plain recipe": plain_recipe, "mitigated recipe": mitigated_recipe})
    t_start = time.time()
    toy_world.make_toy_data(out / "data", data_config or toy_world.ToyDataConfig())
    data_rows = match_exposure(runs, match)
    data_s = round(time.time() - t_start, 1)
    results = []
    bar = tqdm(runs, desc="compare", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run["name"])
        recipe = run["recipe"]
        shutil.rmtree(recipe.output.dir, ignore_errors=True)  # a fresh run: the JSONL metrics file appends
        rows = data_rows[run["name"]]
        t0 = time.time()
        summary = train(recipe)
        train_s = time.time() - t0
        measured = measure_run(run, out / "data", n, steps, progress)
        monitor = summary.get("monitor") or {}
        results.append({
            "name": run["name"], "recipe": run["recipe_path"], "mitigation": run["mitigation"],
            "output_dir": recipe.output.dir, "steps": summary["steps"], "max_steps": recipe.train.max_steps,
            "batch_size": recipe.train.batch_size, "learning_rate": recipe.train.learning_rate,
            "final_loss": summary["loss"], "data": rows,
            "captions": {k: v for k, v in vars(recipe.data.captions).items()
                         if v and (k.endswith("_p") or k in ("embedding_noise", "multiple_captions"))},
            "train_s": round(train_s, 1),
            "monitor_cost": {"calls": monitor.get("calls"), "seconds": monitor.get("seconds"),
                             "unet_evals": monitor.get("unet_evals"),
                             "fraction_of_training": monitor.get("fraction_of_training")},
            "monitor_alarms": _alarms(Path(recipe.output.dir) / "monitor.json"),
            **measured,
        })
    bar.close()
    report = {"title": "memtrain compare: plain vs mitigated fine-tune of the toy base",
              "data": {"path": str(out / "data"), "config": vars(data_config or toy_world.ToyDataConfig())},
              "base": str(base), "n_per_prompt": n, "generation_steps": steps, "overrides": list(overrides),
              "match": match,
              "monitor": vars(runs[0]["recipe"].monitor), "runs": results,
              "timing": {"data_s": data_s, "total_s": round(time.time() - t_start, 1)}}
    save_clid_curves(results, out / "clid_curves.png")
    write_json(report, out / "compare.json")
    with atomic_file(out / "compare.md") as f:
        f.write(compare_markdown(report))
    return report


def _alarms(monitor_json: Path) -> list[dict]:
    """The monitor's alarms (warn or stop) of a run, from its OUT/monitor.json."""
    return json.loads(monitor_json.read_text()).get("alarms", []) if monitor_json.exists() else []


def save_clid_curves(results: list[dict], path: Path) -> Path:
    """CLiD AUC vs step of every run (from its JSONL metrics) in one PNG."""
    series = {r["name"]: ([c["step"] for c in r["curves"]], [c["clid_auc"] for c in r["curves"]])
              for r in results if r["curves"]}
    return save_curves(path, series, "CLiD membership AUC during fine-tuning (Zhai et al.)",
                       "CLiD AUC (members vs held-out)", thresholds={"chance": 0.5})
