"""`memtrain demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.toy.base import TOY_BASE
from trainer.toy.demo import GUIDANCE_SCALE, default_processes, run_demo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="toy data -> fine-tune the toy base -> replication report (CPU, minutes)",
                       description="Run the toy world end to end and write OUT/report.json, OUT/report.md and "
                       "OUT/replication.png (generations beside their nearest training images).")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--base", default=str(TOY_BASE), help="base pipeline directory (default: the committed toy base)")
    p.add_argument("--recipe", default="toy", help="training recipe: a built-in name or a YAML file (default toy)")
    p.add_argument("-n", type=int, default=2, help="generations per prompt (default 2)")
    p.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE,
                   help=f"classifier-free guidance of the generations (default {GUIDANCE_SCALE})")
    p.add_argument("--processes", type=int, default=default_processes(),
                   help="training processes on the CPU, the recipe's batch split between them "
                   f"(default here {default_processes()}: one per core, up to 2)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value, e.g. train.max_steps=100")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = run_demo(args.out, args.base, args.recipe, args.overrides, n=args.n,
                      guidance_scale=args.guidance_scale, processes=args.processes)
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "groups": report["groups"]}, indent=2))
    return 0
