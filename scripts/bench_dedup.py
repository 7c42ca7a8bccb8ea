"""Time the exact blocked near-duplicate search of `trainer.mitigate.dedup` on synthetic embeddings.

For each size n, random unit vectors (dimension --dim; 512 is CLIP ViT-B / SSCD size, 198 the
`pixels` embedding) get 5% planted near copies (cosine ~0.98 to their original); the search must
find exactly the planted groups. Each case runs in a fresh subprocess so its peak RSS
(ru_maxrss) is its own; "search overhead" is the peak minus the RSS just before the search (the
embedding matrix and the interpreter are already in the baseline).

    OMP_NUM_THREADS=1 python scripts/bench_dedup.py                 # 10k and 100k, dim 512
    OMP_NUM_THREADS=1 python scripts/bench_dedup.py --n 10000 --dim 198 --search semdedup
    OMP_NUM_THREADS=1 python scripts/bench_dedup.py --n 1000000 10000000 --dim 128 --search index
    OMP_NUM_THREADS=1 python scripts/bench_dedup.py --n 100000 --dim 198 --search index \
        --vectors /tmp/real-pixels.safetensors      # real embedded crops (scripts/real_image_embeddings.py)

--vectors: the embeddings of crops of the real photos on disk (not LAION, not CLIP), grouped by exact search
and by --search; there is no planted truth, so the table gives each search's groups and a digest of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def real(vectors: str, search: str, block: int, probe: int) -> dict:
    """The groups of the real embeddings in `vectors` (no planted truth: compare the digest with --search exact)."""
    from safetensors.torch import load_file

    from trainer.mitigate.dedup import near_duplicate_groups

    emb = load_file(vectors)["embeddings"].float().numpy()
    before = rss_mb()
    t0 = time.perf_counter()
    groups, pairs = near_duplicate_groups(emb, 0.95, search=search, block=block, probe=probe)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(sorted(sorted(map(int, g)) for g in groups)).encode()).hexdigest()[:12]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(vectors=Path(vectors).name, n=emb.shape[0], dim=emb.shape[1], search=search, seconds=round(seconds, 2),
                groups=len(groups), rows_in_groups=sum(len(g) for g in groups), linked_pairs=pairs, digest=digest,
                probe=probe if search == "index" else None, peak_rss_mb=round(peak, 1),
                search_overhead_mb=round(peak - before, 1), embeddings_mb=round(emb.nbytes / 2**20, 1))


def one(n: int, dim: int, block: int, search: str, threads: int | None, seed: int, probe: int = 2) -> dict:
    import numpy as np
    import torch

    from trainer.mitigate.dedup import near_duplicate_groups

    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n_copies = n // 20
    originals = rng.choice(n - n_copies, size=n_copies)  # with replacement: some groups have > 2 members
    sigma = 0.2 / np.sqrt(dim)  # cosine to the original ~ 1 / sqrt(1 + dim sigma^2) ~ 0.98
    emb[n - n_copies :] = emb[originals] + sigma * rng.standard_normal((n_copies, dim), dtype=np.float32)
    expected_groups = len(np.unique(originals))
    before = rss_mb()
    t0 = time.perf_counter()
    groups, pairs = near_duplicate_groups(emb, 0.95, search=search, block=block, probe=probe)
    seconds = time.perf_counter() - t0
    label = np.full(n, -1)
    for k, g in enumerate(groups):
        label[g] = k
    copies_found = float(np.mean((label[n - n_copies :] >= 0) & (label[n - n_copies :] == label[originals])))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found_ok = len(groups) == expected_groups and sum(len(g) for g in groups) == expected_groups + n_copies
    return dict(
        n=n,
        dim=dim,
        search=search,
        block=block,
        threads=torch.get_num_threads(),
        seconds=round(seconds, 2),
        groups=len(groups),
        expected_groups=expected_groups,
        linked_pairs=pairs,
        planted_found=found_ok,
        copies_found=round(copies_found, 4),
        probe=probe if search == "index" else None,
        rss_before_mb=round(before, 1),
        peak_rss_mb=round(peak, 1),
        search_overhead_mb=round(peak - before, 1),
        embeddings_mb=round(emb.nbytes / 2**20, 1),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--search", choices=("exact", "semdedup", "index"), default="exact")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", type=int, default=2, help="--search index: inverted lists each vector is compared in")
    p.add_argument("--vectors", nargs="*", default=[], metavar="SAFETENSORS",
                   help="after the synthetic sizes, the real embeddings of these files (scripts/real_image_embeddings.py), "
                   "each with --search exact and with --search (the groups' digests must agree)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-vectors", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_vectors:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(real(args.one_vectors, args.search, args.block, args.probe)))
        return 0
    if args.one:
        print(json.dumps(one(args.n[0], args.dim, args.block, args.search, args.threads, args.seed, args.probe)))
        return 0
    print(
        f"{'n':>8} {'dim':>4} {'search':>8} {'thr':>3} {'time s':>8} {'groups':>7} {'ok':>3} "
        f"{'peak MB':>8} {'emb MB':>7} {'search MB':>9} {'copies found':>12}"
    )
    for n in args.n:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--n",
            str(n),
            "--dim",
            str(args.dim),
            "--block",
            str(args.block),
            "--search",
            args.search,
            "--seed",
            str(args.seed),
            "--probe",
            str(args.probe),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        print(
            f"{r['n']:>8} {r['dim']:>4} {r['search']:>8} {r['threads']:>3} {r['seconds']:>8.2f} {r['groups']:>7} "
            f"{'yes' if r['planted_found'] else 'NO':>3} {r['peak_rss_mb']:>8.0f} {r['embeddings_mb']:>7.0f} "
            f"{r['search_overhead_mb']:>9.0f} {r['copies_found']:>12.4f}",
            flush=True,
        )
    for vectors in args.vectors:
        exact = None
        for search in dict.fromkeys(("exact", args.search)):
            cmd = [sys.executable, __file__, "--one-vectors", vectors, "--search", search, "--block", str(args.block),
                   "--probe", str(args.probe), *(["--threads", str(args.threads)] if args.threads else [])]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            if exact is None:
                exact = r
            else:  # the index compares a subset of the pairs at the same threshold: its pairs are exact ones
                r.update(pair_recall=round(r["linked_pairs"] / max(exact["linked_pairs"], 1), 4),
                         grouped_rows_recall=round(r["rows_in_groups"] / max(exact["rows_in_groups"], 1), 4),
                         speedup=round(exact["seconds"] / max(r["seconds"], 1e-9), 1))
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
