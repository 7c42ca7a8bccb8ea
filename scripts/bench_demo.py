"""Training speed of `memtrain demo` in 1 and in N CPU processes, measured side by side in one run.

Each row trains the demo's recipe (recipes/toy.yaml on the committed toy base and fresh toy data, the
global batch of the recipe) through `trainer.training.launch.train_on_cpu_processes` for warm-up +
measured steps, logging every step; the speed is the measured steps over the wall time between their
`metrics.jsonl` rows (start-up, checkpoint and export are outside it), and the main process's CPU time
per step from the same rows. Rounds alternate the order so
that load from other jobs on the machine hits every row alike.

    OMP_NUM_THREADS=1 python scripts/bench_demo.py --processes 1 2 --steps 60 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_recipe  # noqa: E402
from trainer.recipe import TrainRecipe  # noqa: E402
from trainer.toy import world as toy_world  # noqa: E402
from trainer.toy.base import TOY_BASE  # noqa: E402
from trainer.tracking import read_jsonl  # noqa: E402
from trainer.training.launch import train_on_cpu_processes  # noqa: E402


def speed(metrics: Path, warmup: int) -> dict:
    """Steps per wall second, and the main process's CPU seconds per step (what a step costs on an idle core:
    on a busy machine the wall time also holds the waits for a core)."""
    rows = {row["step"]: row for row in read_jsonl(metrics) if "loss" in row}
    first, last = rows[warmup], rows[max(rows)]
    steps = last["step"] - first["step"]
    return {"steps_per_s": steps / (last["time"] - first["time"]),
            "cpu_s_per_step": (last["process_time"] - first["process_time"]) / steps}


def run(recipe_name: str, data: Path, out: Path, processes: int, warmup: int, steps: int,
        overrides: list[str]) -> dict:
    recipe = load_recipe(TrainRecipe, recipe_name, [
        f"model.pretrained={TOY_BASE}", f"data.path={data}", f"output.dir={out}", "log.progress=false",
        "log.every_steps=1", f"train.max_steps={warmup + steps}", "checkpoint.every_steps=1000000",
        "output.export=none", *overrides])
    start = time.perf_counter()
    train_on_cpu_processes(recipe, processes)
    return dict(speed(out / "logs" / "metrics.jsonl", warmup), wall_s=time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--recipe", default="toy", help="recipe (default: the demo's, toy)")
    p.add_argument("--warmup", type=int, default=10, help="steps before timing (default 10)")
    p.add_argument("--steps", type=int, default=60, help="measured steps per run (default 60)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, alternating the order")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every row, e.g. train.ema=false")
    args = p.parse_args()
    results: dict[int, list[dict]] = {n: [] for n in args.processes}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp_name:
        tmp = Path(tmp_name)
        toy_world.make_toy_data(tmp / "data", toy_world.ToyDataConfig())
        for rnd in range(args.rounds):
            for n in args.processes if rnd % 2 == 0 else args.processes[::-1]:
                r = run(args.recipe, tmp / "data" / "train", tmp / f"r{rnd}-p{n}", n, args.warmup, args.steps,
                        args.overrides)
                results[n].append(r)
                print(f"round {rnd + 1}, {n} process(es): {r['steps_per_s']:.2f} steps/s, "
                      f"{r['cpu_s_per_step']:.3f} CPU s/step ({r['wall_s']:.0f} s)", flush=True)
    base = {key: statistics.median(r[key] for r in results[args.processes[0]])
            for key in ("steps_per_s", "cpu_s_per_step")}
    print("\nprocesses | steps/s | speed-up | CPU s/step (main process) | speed-up on idle cores")
    for n in args.processes:
        wall = statistics.median(r["steps_per_s"] for r in results[n])
        cpu = statistics.median(r["cpu_s_per_step"] for r in results[n])
        print(f"{n} | {wall:.2f} | {wall / base['steps_per_s']:.2f}x | {cpu:.3f} | {base['cpu_s_per_step'] / cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
