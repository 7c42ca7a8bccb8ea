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
from trainer.measure.features import choose_quality_feature, load_clip_scorer
from trainer.measure.metrics import auroc
from trainer.measure.replication import l2_matrix
from trainer.prompts import read_labelled_prompts, read_prompts
from trainer.report.eval_cache import read_entry
from trainer.report.evaluate import evaluate
from trainer.report.sections import general_scenario, heldout_images
from trainer.sample.generate import generate_images

TARGET = 0.05  # issue 25's bar: named replication <= 5% (>= 95% removed), plain and under each attack


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
    out["attacks"] = attack_summary(report, named)
    return out


def _split(texts: list[str], per_prompt: list[float], named: set[str]) -> dict:
    """Mean per-prompt replication of the named and the other (unnamed) memorized prompts."""
    return {split: _mean(v for t, v in zip(texts, per_prompt, strict=True) if (t in named) == is_named)
            for split, is_named in (("named", True), ("unnamed", False))}


def attack_summary(report: dict, named: set[str]) -> dict:
    """Replication of the named and unnamed memorized prompts under each re-trigger attack of an `evaluate`
    report: DoRI at its last step (a copy: the targeted image nearest), the bounded attack per attacker and eps."""
    out = {}
    d = report.get("dori")
    if d:
        out["dori"] = {"label": f"DoRI, {d['steps']} steps", **_split(d["texts"], d["memorized"]["per_prompt_final"],
                                                                       named)}
    a = report.get("attack")
    for row in (a or {}).get("rows", []):
        for attacker, who in (("image", "image known"), ("noise", "no image")):
            if row.get(attacker):
                out[f"bounded {attacker} {row['eps']:g}"] = {
                    "label": f"bounded attack eps {row['eps']:g}, {who}",
                    **_split(a["texts"], row[attacker]["per_prompt"], named)}
    return out


def seed_spread(images: torch.Tensor, texts: list[str], n: int, eval_kw: dict, prompts: str) -> dict:
    """The unedited model's seed-to-seed spread of the general prompts' quality: `images` [P * n] hold n seeds
    per prompt (prompt-major, as `generate_images`); per seed the general scenario (alignment, KID against
    the evaluation's held-out images, CLIP score); the spread is max - min over the seeds, and `l2` the mean
    L2 distance between the first two seeds' images of the same prompt. Empty for n < 2."""
    if n < 2:
        return {}
    clip = load_clip_scorer(eval_kw["clip"]) if eval_kw.get("clip") else None
    batch_size = eval_kw.get("batch_size", 32)
    feature = choose_quality_feature(eval_kw.get("quality_feature"), clip, batch_size)
    data = Path(eval_kw["data"]) if eval_kw.get("data") else Path(prompts).parent
    heldout, _ = heldout_images(eval_kw.get("heldout"), read_labelled_prompts(prompts), data, Path(prompts),
                                images.shape[-1], progress=False)
    per_seed = [general_scenario(images[j::n], texts, heldout, clip, batch_size, feature) for j in range(n)]
    spread = {k: float(np.ptp([q[k] for q in per_seed])) for k in per_seed[0]
              if k not in ("generations", "notes") and all(k in q for q in per_seed)}
    spread["l2"] = float(l2_matrix(images[0::n], images[1::n]).diagonal().mean())
    spread["seeds"] = n
    return spread


def _judge(before: float | None, after: float | None, bar: float | None, higher_is_better: bool) -> str:
    if before is None or after is None or bar is None:
        return "unknown"
    worse = (before - after) if higher_is_better else (after - before)
    return "kept" if worse <= bar else "lost"


def quality_verdict(ev: dict) -> dict:
    """Each general-quality measure against the unedited model's seed-to-seed spread: kept when it worsened
    by no more than the spread (the L2 change at fixed seeds: no more than the seed-to-seed L2 distance)."""
    spread = ev.get("seed_spread") or {}
    b, a = ev["before"]["quality"].get("general", {}), ev["after"]["quality"].get("general", {})
    out = {}
    for key in dict.fromkeys([*b, *a]):
        out[key] = {"before": b.get(key), "after": a.get(key), "spread": spread.get(key),
                    "status": _judge(b.get(key), a.get(key), spread.get(key), key != "kid")}
    if "general_l2_change" in ev:
        change = ev["general_l2_change"]["mean"]
        out["l2 change"] = {"before": 0.0, "after": change, "spread": spread.get("l2"),
                            "status": _judge(0.0, change, spread.get("l2"), False)}
    return out


def edit_verdict(ev: dict, target: float = TARGET) -> list[dict]:
    """The verdict per target of issue 25, from `evaluate_edit`'s result: named prompts removed (replication
    <= target), still removed under each attack (<= target; "re-triggered" when the plain prompt is removed but
    the attack copies, "still copies" when neither is), the unnamed memorized prompts reduced, general
    quality kept within the seed-to-seed spread. Rows {"target", "status", "before", "after", "detail"}."""
    rows = []
    b, a = ev["before"], ev["after"]
    named_b = b["replication"].get("named", {}).get("fraction_replicated")
    named_a = a["replication"].get("named", {}).get("fraction_replicated")
    rows.append({"target": f"named prompts removed (replication <= {target:.0%})", "before": named_b,
                 "after": named_a, "status": "unknown" if named_a is None else
                 ("removed" if named_a <= target else "not removed"), "detail": "plain prompt"})
    for key, att in a.get("attacks", {}).items():
        before = b.get("attacks", {}).get(key, {}).get("named")
        # "re-triggered": the attack brings back what the plain prompt no longer shows
        status = ("unknown" if att["named"] is None else "holds" if att["named"] <= target else
                  "re-triggered" if named_a is not None and named_a <= target else "still copies")
        rows.append({"target": f"named prompts stay removed under {att['label']}", "before": before,
                     "after": att["named"], "status": status, "detail": f"unnamed after: {_pct(att['unnamed'])}"})
    un_b = b["replication"].get("unnamed", {}).get("fraction_replicated")
    un_a = a["replication"].get("unnamed", {}).get("fraction_replicated")
    rows.append({"target": "unnamed memorized prompts reduced", "before": un_b, "after": un_a,
                 "status": "unknown" if un_a is None or un_b is None else
                 ("reduced" if un_a < un_b or un_a == 0 else "not reduced"), "detail": "plain prompt"})
    quality = ev.get("quality_verdict") or quality_verdict(ev)
    statuses = {q["status"] for q in quality.values()}
    rows.append({"target": "general quality kept (within the unedited model's seed-to-seed spread)",
                 "before": None, "after": None,
                 "status": "lost" if "lost" in statuses else ("kept" if statuses == {"kept"} else "unknown"),
                 "detail": "; ".join(f"{k} {q['status']}" for k, q in quality.items()) or "no general prompts"})
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


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
        result["seed_spread"] = seed_spread(general_before, general, gen_kw.get("n", 1), eval_kw, prompts)
    result["quality_verdict"] = quality_verdict(result)
    result["verdict_per_target"] = edit_verdict(result)
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
