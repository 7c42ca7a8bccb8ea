"""The toy world's Markdown: the side-by-side table and verdicts of `memtrain compare` (plain vs mitigated
fine-tunes of the toy base) and the replication study's table (`trainer.toy.study`)."""

from __future__ import annotations


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _whole_pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> list[str]:
    """The side-by-side Markdown table, one row per run."""
    lines = ["| run | steps | trained rows | views per distinct image (median, max) | dup. replication | "
             "dup. copies (verdict) | dup. nL2 < 1.4 | dup. nearest is own | "
             "singleton replication | novel replication | novel toy alignment | novel KID x100 | "
             "CLiD AUC (final) | CLiD TPR@1%FPR | train s | monitor s (calls, % of train) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep, gen, mon, cost = r["replication"], r["general"], r["final_monitor"] or {}, r["monitor_cost"]
        dup, single, novel = (rep.get(g, {}) for g in ("duplicated", "singleton", "novel"))
        kid = gen.get("kid")
        monitor = (f"{_num(cost['seconds'], '.0f')} ({cost['calls']}, {_pct(cost['fraction_of_training'])})"
                   if cost.get("seconds") is not None else "-")
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['data']['trained_rows']} | {_views(r)} | "
            f"{_pct(dup.get('fraction_replicated'))} | {_pct(dup.get('fraction_verdict'))} | "
            f"{_pct(dup.get('fraction_nl2'))} | {_pct(dup.get('nearest_is_own_image'))} | "
            f"{_pct(single.get('fraction_replicated'))} | {_pct(novel.get('fraction_replicated'))} | "
            f"{_pct(gen.get('toy_alignment'))} | {_num(None if kid is None else 100 * kid)} | "
            f"{_num(mon.get('clid_auc'))} | {_num(mon.get('clid_tpr_at_1fpr'))} | {r['train_s']:.0f} | {monitor} |")
    return lines


def _views(run: dict) -> str:
    seen = run["data"].get("exposure")
    return "-" if not seen else f"{seen['views_median']:.3g}, {seen['views_max']:.3g}"


def _membership(ref: dict, other: dict, match: str) -> list[str]:
    """The membership part of the verdict: CLiD before -> after and, when it rose while duplicated replication
    fell, why (exposure: how often each run saw a typical distinct image)."""
    a, b = ref.get("final_monitor") or {}, other.get("final_monitor") or {}
    if a.get("clid_auc") is None or b.get("clid_auc") is None:
        return []
    parts = [f"CLiD AUC {a['clid_auc']:.3f} -> {b['clid_auc']:.3f} (TPR at 1% FPR {_num(a.get('clid_tpr_at_1fpr'), '.2f')}"
             f" -> {_num(b.get('clid_tpr_at_1fpr'), '.2f')})"]
    rep_a = ref["replication"].get("duplicated", {}).get("fraction_replicated")
    rep_b = other["replication"].get("duplicated", {}).get("fraction_replicated")
    tpr_a, tpr_b = a.get("clid_tpr_at_1fpr"), b.get("clid_tpr_at_1fpr")
    rose = b["clid_auc"] > a["clid_auc"] or (tpr_a is not None and tpr_b is not None and tpr_b > tpr_a)
    if not (rose and rep_a is not None and rep_b is not None and rep_b < rep_a):
        return parts
    va, vb = (r["data"].get("exposure", {}).get("views_median") for r in (ref, other))
    if not va or not vb:
        return parts + ["**membership rose while replication fell**"]
    ratio = vb / va
    if match == "epochs" or abs(ratio - 1) < 0.05:
        why = (f"at matched exposure ({vb:.3g} vs {va:.3g} views per distinct image), so the rise comes with "
               f"{other['name']} itself")
    else:
        why = (f"{other['name']} saw a typical distinct image {vb:.3g} times vs {va:.3g} ({ratio:.2g}x as often: "
               f"the same {other['steps']} steps over {other['data']['trained_rows']} rows instead of "
               f"{ref['data']['trained_rows']}), so part of the rise is exposure, not the mitigation; "
               "`memtrain compare --match epochs` separates the two")
    return parts + [f"**membership rose while replication fell**: {why}"]


def _deltas(ref: dict, other: dict, match: str = "steps") -> str:
    parts = []
    a, b = ref["general"].get("toy_alignment"), other["general"].get("toy_alignment")
    if a is not None and b is not None:
        parts.append(f"toy alignment {100 * (b - a):+.1f} points")
    a, b = ref["general"].get("kid"), other["general"].get("kid")
    if a is not None and b is not None:
        parts.append(f"KID x100 {100 * (b - a):+.2f}")
    a = ref["replication"].get("duplicated", {}).get("fraction_replicated")
    b = other["replication"].get("duplicated", {}).get("fraction_replicated")
    if a is not None and b is not None:
        parts.append(f"duplicated-prompt replication {100 * a:.1f}% -> {100 * b:.1f}%")
    parts += _membership(ref, other, match)
    return f"{other['name']} vs {ref['name']}: " + ", ".join(parts)


def compare_markdown(report: dict) -> str:
    runs = report["runs"]
    main = [r for r in runs if r["name"] in ("plain", "mitigated")]
    alone = [r for r in runs if r["name"] not in ("plain", "mitigated")]
    first = runs[0]
    mon = report["monitor"]
    steps = (f"Every run: {first['max_steps']} steps" if report.get("match", "steps") == "steps" else
             "Steps matched to exposure (`--match epochs`): every run sees a typical distinct image as often as "
             f"the plain run's {first['max_steps']} steps do")
    lines = [f"# {report['title']}", "",
             f"Toy data {report['data']['path']} ({first['data']['rows']} training rows: "
             f"{report['data']['config'].get('n_duplicated')} images x {report['data']['config'].get('copies')} "
             f"copies + {report['data']['config'].get('n_singletons')} singletons), base {report['base']}. "
             f"{steps}, batch {first['batch_size']}, lr {first['learning_rate']}; "
             f"{report['n_per_prompt']} generation(s) per prompt (DDIM {report['generation_steps']} steps, guidance "
             f"{first['guidance_scale']}).", "",
             f"Replicated: NN1/NN2 L2 ratio < {first['ratio_threshold']:g} against the "
             "VAE-reproduced unique training images (Gu et al. 2023 use 1/3; see memtrain demo); nL2 < 1.4 (Carlini et al. 2023); nearest is own: the prompt's own training image is the "
             "nearest. Views per distinct image: how often the run drew a typical (median) and the most drawn distinct image (a "
             "near-duplicate group counts once; de-duplication spends the same steps on fewer rows). Toy alignment (toy_checker) and KID (unbiased MMD^2, kernel (x.y/d+1)^3 over the "
             "pix8+palette feature, x100) of the novel prompts' generations against the held-out images (MemBench's "
             "general scenario). CLiD: the monitor's CLiD_th AUC / TPR at 1% FPR at the last step (Zhai et al.; "
             f"{mon['members']} members vs {mon['heldout_count']} held-out pairs, every {mon['every_steps']} steps). "
             "Every run probes the same member images: distinct training images (one row per near-duplicate "
             "group, `monitor.distinct_members`), which a `drop`-de-duplicated run trains on too.", "",
             "## Plain vs mitigated", "", *table(main), ""]
    ref = next((r for r in runs if r["name"] == "plain"), None)
    if ref is not None:
        lines += [f"- {_deltas(ref, r, report.get('match', 'steps'))}" for r in runs
                  if r is not ref and r["name"] == "mitigated"]
        kid_ref = ref["general"].get("kid_reference")
        if kid_ref is not None:
            lines.append(f"- KID x100 of the training images (through the VAE) vs held-out, for scale: "
                         f"{100 * kid_ref:.2f}")
        lines.append("")
    for r in main:
        if r["name"] == "mitigated":
            lines += [f"Mitigated recipe {r['recipe']}: dedup={r['data']['dedup']}, captions "
                      f"{', '.join(f'{k}={v}' for k, v in r['captions'].items()) or 'unchanged'}.", ""]
    if alone:
        lines += ["## Each mitigation on its own", "", *table(([ref] if ref else []) + alone), ""]
        lines += [f"- {r['name']}: {' '.join(r['mitigation'])}" for r in alone]
        if ref is not None:
            lines += [f"- {_deltas(ref, r, report.get('match', 'steps'))}" for r in alone]
        lines.append("")
    lines += ["![CLiD AUC vs step](clid_curves.png)", "",
              f"Total {report['timing']['total_s']:.0f} s. Per run: OUT/runs/NAME (logs/metrics.jsonl, monitor.json, "
              "monitor.png, report/report.md).", ""]
    return "\n".join(lines)


def fraction(x: float) -> str:
    return "1/3" if abs(x - 1 / 3) < 1e-9 else f"{x:g}"


def study_markdown(report: dict) -> str:
    lines = [f"# {report['title']}", "", f"Replication criterion: {report['criterion']}.",
             f"{report['n_per_prompt']} generation(s) per prompt (DDIM {report['sampler_steps']} steps, "
             f"guidance {report['guidance_scale']:g}), "
             f"{report['unique_train_images']} unique training images ({report['train_images']} with duplicates).", ""]
    cal = report.get("calibration")
    if cal:
        lines += [f"Calibration: the criterion flags {cal['flagged_rate']:.0%} of the {cal['heldout_images']} held-out "
                  f"images (never trained on; their NN1/NN2 ratio: min {cal['ratio_min']:.2f}, 5th percentile "
                  f"{cal['ratio_p5']:.2f}, median {cal['ratio_median']:.2f}).", ""]
    if report.get("verdict_text"):
        lines += [f"Copy verdict of `memtrain evaluate` (beside the study's criterion, column \"copies (verdict)\"): "
                  f"{report['verdict_text']}.", ""]
    for key in ("training", "timing"):
        if key in report:
            lines += [f"**{key}**: " + ", ".join(f"{k}={v}" for k, v in report[key].items()), ""]
    threshold = fraction(report["ratio_threshold"])
    lines += [f"| group | prompts | generations | replication rate (ratio < {threshold}) | replicated: a duplicated "
              "image | (vs originals) | copies (verdict) | ratio < 1/3 | tiled-L2 <= 0.15 | nL2 < 1.4 | nearest is own "
              "image | median L2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, s in report["groups"].items():
        own = "-" if s["nearest_is_own_image"] is None else f"{s['nearest_is_own_image']:.0%}"
        lines.append(f"| {group} | {s['prompts']} | {s['generations']} | {s['fraction_replicated']:.0%} | "
                     f"{s['replicated_duplicated_images']} of {s['replicated_generations']} | "
                     f"{s['fraction_replicated_vs_originals']:.0%} | {_whole_pct(s.get('fraction_verdict'))} | "
                     f"{s['fraction_ratio_1_3']:.0%} | "
                     f"{s['fraction_tiled_l2']:.0%} | {s['fraction_nl2']:.0%} | {own} | {s['l2_median']:.3f} |")
    lines += ["", "![generations beside their nearest training images](replication.png)", ""]
    return "\n".join(lines)
