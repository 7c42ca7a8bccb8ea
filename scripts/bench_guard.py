"""Seconds per image of guarded (AMG) vs unguarded generation on general prompts, side by side.

Both run in the same process, interleaved (the order alternates every repetition), on the same
prompts and seeds; the unguarded run is the stock pipeline (`trainer.sample.generate_images`).
The default model is the committed toy base (32x32); the default index holds the training images
of a toy world (`trainer.toy.world`) under the pixel embedding, and the general prompts are that
world's novel captions. Prints one JSON object with the per-repetition timings (wall clock and
process CPU time), the ratio guarded / unguarded of the best wall-clock seconds per image and of the
median CPU seconds per image (both robust to other jobs sharing the CPU), and the fraction of
generations and steps where the guard intervened.

    python scripts/bench_guard.py                          # toy base, 8 prompts x 1, 50 steps, 3 repetitions
    python scripts/bench_guard.py --prompts 16 --repeats 5 --steps 50
    python scripts/bench_guard.py --model path/to/pipeline --index path/to/index --prompt-file prompts.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainer.core.components import load_pipeline, model_resolution
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.mitigate.dedup import caption_groups  # noqa: E402
from trainer.prompts import read_prompts
from trainer.sample.guard import GuardedPipeline, guarded_generate
from trainer.toy import world as toy_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def toy_index(pipe, workdir: Path, seed: int) -> tuple[TrainingIndex, list[str]]:
    """(pixel index of a toy world's training images, that world's novel captions)."""
    data = workdir / "toy"
    toy_world.make_toy_data(data, toy_world.ToyDataConfig(seed=seed, n_duplicated=8, copies=4, n_singletons=128,
                                                          n_heldout=0, n_novel=100))
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    res = model_resolution(pipe)
    embed = make_embedder("pixels")
    images = torch.stack([
        torch.from_numpy(np.asarray(Image.open(data / "train" / r["file_name"]).convert("RGB").resize((res, res)),
                                    dtype=np.float32) / 255).permute(2, 0, 1)
        for r in rows
    ])
    captions = [r["text"] for r in rows]
    groups = caption_groups(captions)["normalized"]
    index = TrainingIndex(embed(images), captions, [r["file_name"] for r in rows], groups, "pixels", res,
                          {"source": "toy world"})
    novel = [r["text"] for r in toy_world.read_labels(data / "labels.jsonl") if r["group"] == "novel"]
    return index, novel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "trainer" / "toy" / "toy_base"))
    p.add_argument("--index", help="index directory (default: a toy world's training images, pixel embedding)")
    p.add_argument("--prompt-file", help="general prompts (default: the toy world's novel captions)")
    p.add_argument("--prompts", type=int, default=8, help="number of general prompts (default 8)")
    p.add_argument("-n", type=int, default=1, help="generations per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threshold", type=float, help="AMG threshold (default: the embedding's default)")
    p.add_argument("--check-every", type=int, nargs="+", default=[1],
                   help="AMG check intervals to time (default 1: every step, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    pipe = load_pipeline(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.index:
            index = TrainingIndex.load(args.index, resolution=model_resolution(pipe))
            general = []
        else:
            index, general = toy_index(pipe, Path(tmp), args.seed)
    if args.prompt_file:
        general = [r["text"] for r in read_prompts(args.prompt_file)]
    prompts = general[: args.prompts]
    if not prompts:
        p.error("no general prompts: pass --prompt-file")
    guards = {f"amg/{k}": GuardedPipeline.from_pipe(pipe, index=index, guard="amg", threshold=args.threshold,
                                                    check_every=k) for k in args.check_every}
    images = len(prompts) * args.n
    modes = ["none", *guards]
    timings: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    records: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            _, recs = guarded_generate(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale,
                                       guards.get(mode, "none"), batch_size=args.batch_size, progress=False)
            timings[mode].append((time.perf_counter() - start) / images)
            cpu[mode].append((time.process_time() - start_cpu) / images)
            records[mode] = recs
    best = {k: min(v) for k, v in timings.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    guard_summary = {}
    for mode in guards:
        recs = records[mode]
        guard_summary[mode] = {
            "ratio_guarded_over_unguarded": round(best[mode] / best["none"], 3),
            "ratio_cpu_seconds": round(median_cpu[mode] / median_cpu["none"], 3),
            "fraction_generations_intervened": sum(r["intervened"] for r in recs) / len(recs),
            "fraction_steps_intervened": sum(r["num_steps_intervened"] for r in recs) / (len(recs) * args.steps),
            "max_sigma": round(max(r["max_sigma"] for r in recs), 4),
        }
    print(json.dumps({
        "model": args.model, "images_per_run": images, "steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "index_size": len(index.embeddings), "embedding": index.embedding,
        "threshold": next(iter(guards.values())).guard.config.threshold.__dict__,
        "seconds_per_image": {k: [round(x, 4) for x in v] for k, v in timings.items()},
        "cpu_seconds_per_image": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
        "best_seconds_per_image": {k: round(v, 4) for k, v in best.items()},
        "guards": guard_summary,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
