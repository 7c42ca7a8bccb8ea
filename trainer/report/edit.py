"""The report of `memtrain edit --evaluate`: `memtrain evaluate` before and after an edit, side by side, with
the memorized prompts split into those named in the edit and the others."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from trainer.core.components import load_pipeline
from trainer.core.distributed import is_main_process, process_device
from trainer.edit.save import LORA_FILE
from trainer.measure.metrics import auroc
from trainer.measure.replication import l2_matrix
from trainer.prompts import read_labelled_prompts, read_prompts
from trainer.report.eval_cache import read_entry
from trainer.report.evaluate import evaluate
from trainer.sample.generate import generate_images


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def eval_summary(report: dict, named: set[str]) -> dict:
    """The side-by-side numbers of one `evaluate` report; memorized prompts split by named / not named."""
    out: dict = {"replication": {}, "quality": {}, "detectors": {}, "membership": {}}
    gens = report.get("replication", {}).get("generations", [])
    splits = {"named": lambda g: g["group"] == "trigger" and g["text"] in named,
              "unnamed": lambda g: g["group"] == "trigger" and g["text"] not in named,
              "general": lambda g: g["group"] == "general"}
    for split, keep in splits.items():
        rows = [g for g in gens if keep(g)]
        if rows:
            out["replication"][split] = {"generations": len(rows),
                                         "fraction_replicated": _mean(g["replicated"] for g in rows),
                                         "similarity_mean": _mean(g["similarity"] for g in rows),
                                         "similarity_max": float(max(g["similarity"] for g in rows))}
    for group, s in report.get("replication", {}).get("groups", {}).items():
        out["replication"].setdefault(f"group {group}", {})["fraction_replicated"] = s.get("fraction_replicated")
    keys = (report.get("quality", {}).get("alignment"), "kid", "clip_score")
    for group, q in report.get("quality", {}).get("groups", {}).items():
        out["quality"][group] = {k: q[k] for k in keys if k in q}
    for name, d in report.get("trigger", {}).get("detectors", {}).items():
        if "auroc" in d:
            out["detectors"][name] = d["auroc"]
    membership = report.get("membership", {})
    for name, s in membership.get("scores", {}).items():
        out["membership"][name] = s["auroc"]
    for group, g in membership.get("by_group", {}).items():
        for name, v in g.items():
            if name != "members":
                out["membership"][f"{group}/{name}"] = v
    if membership.get("per_sample"):  # the forgotten (named) members vs the non-members, the other members too
        flags, texts = np.asarray(membership["member_flags"]), membership["texts"]
        forgotten = np.array([t in named for t in texts]) & (flags == 1)
        for split, members in (("forgotten", forgotten), ("other members", (flags == 1) & ~forgotten)):
            keep = members | (flags == 0)
            if members.any() and (flags == 0).any():
                for name, values in membership["per_sample"].items():
                    out["membership"][f"{split}/{name}"] = auroc(np.asarray(values)[keep], members[keep].astype(int))
    return out


def evaluate_edit(source: Path, edited: Path, prompts: str, memorized: str, source_lora: str | None, lora_out: bool,
                  general: list[str], general_before: torch.Tensor | None, gen_kw: dict, eval_kw: dict,
                  cached: Path | None = None) -> dict:
    """`memtrain evaluate` on the source and the edited result (into edited/eval_before, eval_after), side by
    side, both judged by the before report's copy verdict (reused when the VAE is unchanged), plus the mean L2
    change of the general prompts' generations at the same seeds. `cached`: an entry of `report.eval_cache`
    holding the source's evaluation, copied instead of recomputed. Under `accelerate launch`
    every process calls it (`evaluate` and `gen_kw["across_processes"]` share the work); the main one writes."""
    t0 = time.perf_counter()
    if cached is not None:
        before = read_entry(cached, edited / "eval_before" if is_main_process() else None)[0]
    else:
        before = evaluate(source, prompts, out=edited / "eval_before", lora=source_lora, **eval_kw)
    after_ckpt, after_lora = (source, edited / LORA_FILE) if lora_out else (edited, None)
    # one copy verdict for both sides: the before report's calibration, reused when the VAE is unchanged
    after = evaluate(after_ckpt, prompts, out=edited / "eval_after", lora=after_lora, calibration=before.get("verdict"),
                     **eval_kw)
    named = set(read_prompts_texts(memorized))
    result = {"prompts": prompts, "before": eval_summary(before, named), "after": eval_summary(after, named),
              "files": ["eval_before/report.md", "eval_after/report.md"],
              "named_in_prompts": sum(r.label == 1 and r.text in named for r in read_labelled_prompts(prompts)),
              "notes": sorted(set(before.get("notes", []) + after.get("notes", []))),
              "verdict": {side: {k: r["verdict"].get(k) for k in ("criterion", "calibrated", "reused")}
                          for side, r in (("before", before), ("after", after)) if "verdict" in r}}
    if cached is not None:
        result["before_cache"] = {"reused": True, "entry": str(cached)}
    if general:
        device = eval_kw.get("device") or process_device()
        pipe = load_pipeline(after_ckpt, after_lora, device=device)
        general_after = generate_images(pipe, general, **gen_kw)
        change = l2_matrix(general_after, general_before).diagonal()
        result["general_l2_change"] = {"mean": float(change.mean()), "max": float(change.max()),
                                       "generations": len(change),
                                       "convention": "sqrt(mean((after - before)^2)) per generation, same seed"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def read_prompts_texts(path: str) -> list[str]:
    return [r["text"] for r in read_prompts(path)]


def flat_numbers(report: dict) -> dict[str, float]:
    """edit.json's numbers as flat `a/b/c` keys (W&B)."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", {k: report[k] for k in ("total_changed", "layers_changed", "seconds", "unet_evals") if k in report})
    walk("changed", report.get("changed", {}))
    walk("evaluation", {k: v for k, v in report.get("evaluation", {}).items() if k in ("before", "after",
                                                                                       "general_l2_change")})
    return flat
