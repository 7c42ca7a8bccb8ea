"""Benchmark the training-image index (trainer.measure.index), all in one run:

1. build rate: `build_index` on a few hundred synthetic images (random shapes, an imagefolder written to
   a temporary directory) with the `pixels` embedding, in images per second (reading, resizing,
   embedding and writing the index included, after an untimed warm-up build of 8 images);
2. query latency: milliseconds per batch of 64 queries and per single query (k=1) against 10k, 100k
   and 1M synthetic 512-d float16 embeddings (CLIP ViT-B / SSCD size), exact torch search vs faiss when
   it is importable. The
   queries are noisy copies of index rows, so both backends must return those rows; the table says
   whether they agree. Each latency is the best of --repeats runs after one warm-up.

3. approximate index (--ann-sizes): synthetic clustered unit vectors (--ann-dim, 10,000 centres, 1%
   planted near copies) written as an index's embeddings.safetensors and memory-mapped back, then
   `ann.build_tuned` under --max-memory: the factory chosen, build seconds, nprobe and recall@1 on the
   held sample, recall@1 on 200 fresh queries (noisy copies of rows, cos ~0.9) against exact search, and
   ms per single query approximate vs exact (torch over the memory map), with the peak RSS of the
   subprocess each size runs in.
4. real embedded images (--vectors FILE ...): the same as 3 on the embeddings of crops of the real photos on
   disk (`scripts/real_image_embeddings.py`: not LAION, not CLIP), the file's last 200 rows (other crops)
   as the fresh queries.

Memory: the 1M case holds 1M x 512 float16 = 1 GB of embeddings (generated in chunks, never as one
float32 matrix) plus faiss' own float16 copy (another 1 GB) while faiss is measured; the float32
variants (a 2 GB copy at 1M) only run up to --f32-max images (100k by default).

    OMP_NUM_THREADS=1 python scripts/bench_index.py                  # everything, one thread
    OMP_NUM_THREADS=1 python scripts/bench_index.py --sizes 10000 100000 --images 200
    OMP_NUM_THREADS=1 python scripts/bench_index.py --ann-only --ann-sizes 1000000 10000000 --ann-dim 128
    OMP_NUM_THREADS=1 python scripts/bench_index.py --ann-only --ann-sizes 100000 --ann-dim 198 \
        --vectors /tmp/real-pixels.safetensors /tmp/real-gradients.safetensors
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file, save_file  # noqa: E402

from trainer.measure import ann  # noqa: E402
from trainer.measure.index import TrainingIndex, faiss_available  # noqa: E402
from trainer.measure.index_build import build_index  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None

QUERIES = 200  # fresh queries of the approximate-index section


def synthetic_imagefolder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            for _ in range(rng.randint(2, 5)):
                x0, y0 = rng.randrange(size - 8), rng.randrange(size - 8)
                box = [x0, y0, rng.randint(x0 + 6, size), rng.randint(y0 + 6, size)]
                getattr(draw, rng.choice(["ellipse", "rectangle"]))(
                    box, fill=tuple(rng.randrange(256) for _ in range(3))
                )
            im.save(root / "images" / f"{i:05d}.png")
            f.write(
                json.dumps({"file_name": f"images/{i:05d}.png", "text": f"synthetic image {i % (n // 2)}"})
                + "\n"
            )
    return root


def bench_build(n: int, size: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_imagefolder(Path(tmp) / "data", n, size)
        warm = synthetic_imagefolder(Path(tmp) / "warm", 8, size, seed=1)
        build_index(str(warm), str(Path(tmp) / "warm-index"), "pixels", progress=False)  # one-off imports
        t0 = time.perf_counter()
        index = build_index(
            str(data), str(Path(tmp) / "index"), "pixels", batch_size=batch_size, progress=False
        )
        seconds = time.perf_counter() - t0
    return dict(
        images=n, size=size, seconds=round(seconds, 3), images_per_second=round(n / seconds, 1), dim=index.dim
    )


def synthetic_index(n: int, dim: int, seed: int, chunk: int = 65536) -> TrainingIndex:
    g = torch.Generator().manual_seed(seed)
    emb = torch.empty((n, dim), dtype=torch.float16)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        emb[s:e] = F.normalize(torch.randn(e - s, dim, generator=g), dim=1).half()
    empty = [""] * n
    return TrainingIndex(emb, empty, empty, [], "synthetic", 0)


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and, for faiss, nothing lazy left to build)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def time_backend(
    index: TrainingIndex, queries, backend: str, repeats: int
) -> tuple[float, float, torch.Tensor]:
    """(first call seconds (builds faiss' copy), best ms per call, indices)."""
    t0 = time.perf_counter()
    _, idx = index.search(queries, k=1, backend=backend)
    first = time.perf_counter() - t0
    return first, best_ms(lambda: index.search(queries, k=1, backend=backend), repeats), idx


def bench_query(n: int, dim: int, batches: list[int], repeats: int, seed: int, f32_max: int) -> list[dict]:
    """One row per query batch size: latency of the float16 index (torch, faiss fp16) and, for
    n <= f32_max, of a float32 copy (torch, faiss IndexFlatIP); one index in memory at a time."""
    index = synthetic_index(n, dim, seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, n, (max(batches),), generator=g)
    noise = 0.5 / dim**0.5 * torch.randn(len(targets), dim, generator=g)
    queries = index.embeddings[targets].float() + noise  # cosine ~0.9 to its target, ~0.2 at most to others
    rows = [dict(n=n, dim=dim, queries=b, gb_f16=round(n * dim * 2 / 2**30, 2)) for b in batches]
    exact = {}
    for row in rows:
        b = row["queries"]
        _, row["torch16_ms"], exact[b] = time_backend(index, queries[:b], "torch", repeats)
        row["found"] = int((exact[b][:, 0] == targets[:b]).sum())
        if faiss_available():
            first, row["faiss16_ms"], idx = time_backend(index, queries[:b], "faiss", repeats)
            row["faiss16_build_s"] = first if row is rows[0] else "-"  # the first call builds faiss' copy
            row["same"] = bool(torch.equal(idx, exact[b]))
    if n <= f32_max:
        index = TrainingIndex(index.embeddings.float(), index.captions, index.file_names, [], "synthetic", 0)
        for row in rows:
            b = row["queries"]
            _, row["torch32_ms"], idx = time_backend(index, queries[:b], "torch", repeats)
            row["same"] = row.get("same", True) and bool(torch.equal(idx, exact[b]))
            if faiss_available():
                _, row["faiss32_ms"], idx = time_backend(index, queries[:b], "faiss", repeats)
                row["same"] = row["same"] and bool(torch.equal(idx, exact[b]))
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def clustered_embeddings(n: int, dim: int, seed: int, chunk: int = 1 << 20) -> torch.Tensor:
    """[n, dim] float16 unit vectors around 10,000 centres (noise of norm 0.5: cos ~0.8 within a centre), the last 1% near copies
    (cos ~0.98) of earlier rows: image embeddings' structure, unlike uniform random vectors."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(10_000, dim, generator=g), dim=1)
    emb = torch.empty((n, dim), dtype=torch.float16)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = centres[torch.randint(10_000, (e - s,), generator=g)] + 0.5 * torch.randn(e - s, dim, generator=g) / dim**0.5
        emb[s:e] = F.normalize(x, dim=1).half()
    copies = n // 100
    originals = torch.randint(n - copies, (copies,), generator=g)
    noise = 0.2 / dim**0.5 * torch.randn(copies, dim, generator=g)
    emb[n - copies :] = F.normalize(emb[originals].float() + noise, dim=1).half()
    return emb


def bench_ann(n: int, dim: int, max_memory: str, repeats: int, seed: int, vectors: str | None = None) -> dict:
    """Build, tune and query an approximate index (see the module docstring, 3 and 4): of n synthetic vectors,
    or of the rows of `vectors` but its last QUERIES, which are the fresh queries."""
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(seed + 2)
        if vectors is None:
            save_file({"embeddings": clustered_embeddings(n, dim, seed)}, f"{tmp}/e.safetensors")
            gc.collect()
            emb = load_file(f"{tmp}/e.safetensors")["embeddings"]  # memory-mapped, as TrainingIndex.load
            targets = torch.randint(0, n, (QUERIES,), generator=g)
            queries = F.normalize(emb[targets].float() + 0.5 / dim**0.5 * torch.randn(QUERIES, dim, generator=g), dim=1)
            source = "synthetic clustered"
        else:
            rows = load_file(vectors)["embeddings"]
            emb, queries = rows[:-QUERIES], F.normalize(rows[-QUERIES:].float(), dim=1)
            n, dim = emb.shape
            source = Path(vectors).name
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t0 = time.perf_counter()
        index, record, held = ann.build_tuned(emb, "auto", max_memory, seed=seed)
        total = time.perf_counter() - t0
        exact = TrainingIndex(emb, [""] * n, [""] * n, [], "synthetic", 0)
        t1 = time.perf_counter()
        truth = exact.search(queries, k=1, backend="torch", chunk=65536)[0][:, 0]
        exact_ms = 1000 * (time.perf_counter() - t1) / QUERIES
        found = ann.search(index, emb, queries.numpy(), 1)[0][:, 0]
        ann_ms = best_ms(lambda: ann.search(index, emb, queries[:1].numpy(), 1), repeats)
        return dict(source=source, n=n, dim=dim, max_memory=max_memory, factory=record["factory"],
                    estimated_gb=round(record["estimated_bytes"] / 2**30, 3), build_s=record["build_seconds"],
                    tune_and_build_s=round(total, 1), nprobe=record["nprobe"], held_recall=record["recall_at_1"],
                    recall_by_nprobe=record["recall_by_nprobe"],
                    fresh_recall=round(float((found >= truth - 1e-4).float().mean()), 4),
                    ann_ms=round(ann_ms, 3), exact_ms=round(exact_ms, 1),
                    embeddings_gb=round(n * dim * 2 / 2**30, 2), rss_before_build_gb=round(rss_before, 2),
                    peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def run_ann_sizes(args) -> list[dict]:
    rows = []
    runs = [(n, []) for n in args.ann_sizes] + [(0, ["--ann-vectors", v]) for v in args.vectors]
    for n, extra in runs:  # one subprocess a size: its peak RSS is its own
        cmd = [sys.executable, __file__, "--ann-one", str(n), "--ann-dim", str(args.ann_dim), "--max-memory",
               args.max_memory, "--threads", str(args.threads), "--seed", str(args.seed), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="synthetic training images for the build rate")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, nargs="+", default=[64, 1], help="query batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--f32-max", type=int, default=100_000, help="also time a float32 copy up to this size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--ann-sizes", type=int, nargs="*", default=[1_000_000], help="approximate index sizes")
    ap.add_argument("--ann-dim", type=int, default=128)
    ap.add_argument("--max-memory", default=ann.DEFAULT_MAX_MEMORY, help="--max-memory of the approximate index")
    ap.add_argument("--ann-only", action="store_true", help="only the approximate index section")
    ap.add_argument("--vectors", nargs="*", default=[], metavar="SAFETENSORS",
                    help="also an approximate index of these real embeddings (scripts/real_image_embeddings.py); their "
                    f"last {QUERIES} rows are the queries")
    ap.add_argument("--ann-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ann-vectors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    if args.ann_one is not None:
        print(json.dumps(bench_ann(args.ann_one, args.ann_dim, args.max_memory, args.repeats, args.seed,
                                   args.ann_vectors)))
        return
    if args.ann_only:
        run_ann_sizes(args)
        return

    build = bench_build(args.images, args.image_size, args.batch_size)
    print(
        f"build (pixels, {build['images']} synthetic {build['size']}x{build['size']} PNGs, batch {args.batch_size}, "
        f"{args.threads} thread(s)): {build['seconds']} s = {build['images_per_second']} images/s"
    )
    rows = []
    for n in args.sizes:
        rows += bench_query(n, args.dim, args.queries, args.repeats, args.seed, args.f32_max)
        gc.collect()
    print(
        f"\nquery latency, ms per query batch (k=1, {args.dim}-d, best of {args.repeats}, {args.threads} thread(s)); "
        "16 = float16 index (faiss: IndexScalarQuantizer QT_fp16), 32 = float32 copy (faiss: IndexFlatIP); "
        "all exhaustive"
    )
    print(
        f"faiss {faiss.__version__}" if faiss is not None else "faiss not installed (pip install faiss-cpu)"
    )
    cols = ["torch16_ms", "faiss16_ms", "torch32_ms", "faiss32_ms", "faiss16_build_s"]
    print(
        f"{'n':>9} | {'batch':>5} | {'GB f16':>6} | "
        + " | ".join(f"{c:>15}" for c in cols)
        + " | faiss/torch 16 | found | same"
    )
    for r in rows:
        ratio = f"{r['faiss16_ms'] / r['torch16_ms']:.2f}" if "faiss16_ms" in r else "-"
        print(
            f"{r['n']:>9} | {r['queries']:>5} | {r['gb_f16']:>6} | "
            + " | ".join(f"{r.get(c, '-'):>15}" for c in cols)
            + f" | {ratio:>14} | {r['found']}/{r['queries']} | {r.get('same', '-')}"
        )
    for b in args.queries:
        sub = [r for r in rows if r["queries"] == b]
        for x, y in zip(sub, sub[1:], strict=False):
            print(
                f"batch {b}: {y['n']} vs {x['n']} images ({y['n'] / x['n']:.0f}x): torch16 "
                f"{y['torch16_ms'] / x['torch16_ms']:.1f}x the time"
                + (f", faiss16 {y['faiss16_ms'] / x['faiss16_ms']:.1f}x" if "faiss16_ms" in x else "")
            )
    approx = run_ann_sizes(args) if (args.ann_sizes or args.vectors) and faiss is not None else []
    if args.json:
        print(json.dumps(dict(build=build, query=rows, approx=approx), indent=2))


if __name__ == "__main__":
    main()
