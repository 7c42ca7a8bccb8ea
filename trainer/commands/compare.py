"""`memtrain compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.mitigate.presets import PRESETS
from trainer.toy.base import TOY_BASE
from trainer.toy.compare import compare


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="plain vs mitigated fine-tune of the toy base on the same data, side by side (CPU)",
        description="Make the toy data once, fine-tune the toy base on it with recipes/toy.yaml (plain) and "
        "recipes/toy-mitigated.yaml (dedup + caption randomization) for the same steps, both with the CLiD "
        "monitor on, then measure replication, toy alignment, KID and the CLiD curves. Writes OUT/compare.json, "
        "OUT/compare.md and OUT/clid_curves.png.")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--base", default=str(TOY_BASE), help="base pipeline directory (default: the committed toy base)")
    p.add_argument("--alone", default="", metavar="NAMES",
                   help=f"also one run per mitigation on its own, comma-separated: {', '.join(PRESETS)}, all, or "
                   "NAME:key=value[ key=value] for your own settings (e.g. mask3:train.loss_mask_threshold=3.0)")
    p.add_argument("--match", choices=("steps", "epochs"), default="steps",
                   help="steps: every run trains the plain run's optimizer steps (default); epochs: every run sees a "
                   "typical distinct image as often as the plain run (a de-duplicated run trains fewer steps), so "
                   "the effect of exposure is separated from the mitigation's")
    p.add_argument("-n", type=int, default=2, help="generations per prompt (default 2)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per generation (default 50)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. train.max_steps=100")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = compare(args.out, args.base, args.alone, n=args.n, overrides=args.overrides, steps=args.steps,
                     match=args.match)
    print(json.dumps({"report": str(Path(args.out) / "compare.md"),
                      "runs": {r["name"]: {"duplicated_replication": r["replication"].get("duplicated", {}).get(
                          "fraction_replicated"), "toy_alignment": r["general"].get("toy_alignment"),
                          "kid": r["general"].get("kid"),
                          "clid_auc": (r["final_monitor"] or {}).get("clid_auc"), "steps": r["steps"],
                          "views_per_distinct_image": r["data"]["exposure"]["views_median"]}
                                   for r in report["runs"]}},
                     indent=2))
    return 0
