"""Wall time of `memtrain evaluate` on 1 process and on N processes (gloo on CPU, or the GPUs under
`accelerate launch`-style torchrun), and the largest difference between the two reports.

Both runs are separate command-line runs (each pays its start-up). The reports are compared on every
number except wall-clock seconds; `max_abs_diff` 0 means identical numbers. Prints one JSON object.

    memtrain toy-data /tmp/evaldata
    python scripts/bench_distributed_eval.py --prompts /tmp/evaldata/labels.jsonl --out /tmp/bench
    python scripts/bench_distributed_eval.py --prompts P --out O -- --detectors noise,clid -n 1   # evaluate options
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.training.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a report as flat `a/b/0/c` keys, wall-clock seconds and the device left out."""
    out: dict[str, float] = {}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        if "seconds" in str(key) or key == "device":
            continue
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(v, dict | list):
            out.update(numbers(v, name))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "trainer/toy/toy_base"))
    parser.add_argument("--prompts", required=True, help="labelled prompt file (e.g. a toy world's labels.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more `memtrain evaluate` options (after --)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               ACCELERATE_USE_CPU=os.environ.get("ACCELERATE_USE_CPU", "1"), PYTHONPATH=str(ROOT))
    base = ["evaluate", args.model, "--prompts", args.prompts, *args.extra]
    one, many = Path(args.out) / "one", Path(args.out) / f"processes{args.processes}"
    seconds_one = timed([sys.executable, "-m", "trainer.cli", *base, "--out", str(one)], env)
    seconds_many = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                          "--master_port", str(free_port()), "-m", "trainer.cli", *base, "--out", str(many)], env)
    a = numbers(json.loads((one / "report.json").read_text()))
    b = numbers(json.loads((many / "report.json").read_text()))
    diffs = {k: 0.0 if math.isnan(a[k]) and math.isnan(b[k]) else abs(a[k] - b[k]) for k in a.keys() & b.keys()}
    print(json.dumps({"command": " ".join(base), "processes": args.processes,
                      "seconds_1_process": round(seconds_one, 1),
                      f"seconds_{args.processes}_processes": round(seconds_many, 1),
                      "speedup": round(seconds_one / seconds_many, 2), "numbers_compared": len(diffs),
                      "only_in_one_report": sorted(a.keys() ^ b.keys()),
                      "max_abs_diff": max(diffs.values(), default=0.0),
                      "largest_diffs": dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:5]),
                      "cpu_cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
