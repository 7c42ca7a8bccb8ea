"""Approximate nearest-neighbour search for large training-image indexes (faiss IVF / SQ / PQ), chosen under a
memory budget, tuned and checked against exact search.

The choice follows autofaiss (criteo/autofaiss, "best_index"): an inverted file with about sqrt(N) lists,
each vector stored as well as the budget allows (Flat, SQ8, then 4-bit fast-scan product quantization
PQ{m}x4fs), written with faiss's own `index_factory` strings. Deviation: the candidates a search returns
are re-scored exactly from the index's memory-mapped embeddings (faiss's IndexRefine idea with the
vectors left on disk), so similarities are exact and recall@1 is that of the candidate list. `nprobe`
(inverted lists visited per query) is the smallest power of two whose recall@1 on a held sample reaches
the target; the sample (its rows and their exact neighbours) is stored with the index.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.io import MemtrainError

try:  # optional extra: memtrain[faiss]
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

APPROX_MIN = 100_000  # `memtrain index --approx auto` builds an approximate index above this many images
DEFAULT_MAX_MEMORY = "4G"
TARGET_RECALL = 0.95
RERANK = 64  # candidates re-scored exactly per query
HELD_SAMPLE = 1000
_ADD_CHUNK = 65536
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5T' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise MemtrainError(f"--max-memory {text!r}: give a size such as 4G, 512M or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def n_lists(n: int) -> int:
    """Inverted lists: the power of two nearest sqrt(N), at most N / 39 (faiss wants 39 training points a list)."""
    return max(1, min(2 ** round(math.log2(max(math.sqrt(n), 1))), n // 39))


def index_bytes(factory: str, n: int, d: int) -> int:
    """Resident bytes of an IVF index_factory string for n vectors of dimension d (codes, ids, centroids)."""
    nlist = int(re.match(r"IVF(\d+)", factory).group(1))
    code = factory.split(",")[-1]
    tables = 0
    if code == "Flat":
        per = 4 * d
    elif code == "SQ8":
        per, tables = d, 2 * 4 * d  # per-dimension min and range
    elif (pq := re.fullmatch(r"PQ(\d+)x4fs", code)) is not None:
        per, tables = int(pq.group(1)) / 2, 16 * 4 * d  # 16 centroids per sub-vector
    else:
        raise MemtrainError(f"cannot estimate the memory of {factory!r}")
    return int(n * (per + 8) + nlist * d * 4 + tables)


def choose_factory(n: int, d: int, max_memory: int) -> str:
    """The most precise IVF index of n d-dimensional vectors that fits `max_memory` bytes (autofaiss's order:
    Flat, SQ8, then fewer and fewer PQ bytes)."""
    nlist = n_lists(n)
    candidates = [f"IVF{nlist},Flat", f"IVF{nlist},SQ8"]
    candidates += [f"IVF{nlist},PQ{m}x4fs" for m in (d // 2, d // 4, d // 8, d // 16) if m >= 8 and d % m == 0]
    for factory in candidates:
        if index_bytes(factory, n, d) <= max_memory:
            return factory
    need = index_bytes(candidates[-1], n, d)
    raise MemtrainError(f"no approximate index of {n} x {d} vectors fits --max-memory {max_memory / 2**30:.2f} GiB "
                        f"(the smallest, {candidates[-1]}, needs {need / 2**30:.2f} GiB); raise --max-memory")


def _rows(embeddings: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(embeddings[torch.from_numpy(ids)].float().numpy())


def build(embeddings: torch.Tensor, factory: str, seed: int = 0, progress: bool = True):
    """Train (on at most 64 points per list, drawn with `seed`) and fill a faiss index of the [N, d] rows."""
    if faiss is None:
        raise MemtrainError("an approximate index needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)")
    n, d = embeddings.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise MemtrainError(f"--approx {factory!r} is not a faiss index_factory string ({e})") from None
    ivf = faiss.try_extract_index_ivf(index)
    n_train = min(n, 64 * (ivf.nlist if ivf is not None else 1024))
    sample = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
    index.train(_rows(embeddings, sample))
    with tqdm(total=n, desc=f"add ({factory})", unit="vec", disable=not progress, leave=False) as bar:
        for start in range(0, n, _ADD_CHUNK):
            index.add(np.ascontiguousarray(embeddings[start : start + _ADD_CHUNK].float().numpy()))
            bar.update(min(_ADD_CHUNK, n - start))
    return index


def set_nprobe(index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def search(index, embeddings: torch.Tensor, queries: np.ndarray, k: int,
           rerank: int = RERANK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by exact cosine among the index's max(k, rerank) candidates: (similarities, ids), best first."""
    cand = index.search(np.ascontiguousarray(queries, dtype=np.float32), max(k, rerank))[1]
    valid = cand >= 0
    rows = embeddings[torch.from_numpy(np.where(valid, cand, 0))].float()  # [M, c, d], gathered from the memory map
    sims = torch.einsum("mcd,md->mc", rows, torch.from_numpy(queries).float())
    sims[torch.from_numpy(~valid)] = -math.inf
    top, order = sims.topk(k, dim=1)
    return top, torch.from_numpy(cand).gather(1, order)


def exact_neighbours(embeddings: torch.Tensor, ids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """For each row in `ids`: its nearest other row (exact cosine, by chunks of the matrix) and their similarity."""
    q = torch.from_numpy(_rows(embeddings, ids))
    best = torch.full((len(ids),), -math.inf)
    arg = torch.zeros(len(ids), dtype=torch.long)
    own = torch.from_numpy(ids)
    for start in range(0, embeddings.shape[0], chunk):
        sims = q @ embeddings[start : start + chunk].float().T
        mine = (own >= start) & (own < start + sims.shape[1])
        sims[mine.nonzero()[:, 0], own[mine] - start] = -math.inf  # not itself
        v, i = sims.max(dim=1)
        better = v > best
        best[better], arg[better] = v[better], i[better] + start
    return arg.numpy(), best.numpy()


def held_recall(index, embeddings: torch.Tensor, held: dict, rerank: int = RERANK) -> float:
    """recall@1 on the held rows: the share whose nearest other row found by the index is as close (exactly)
    as the true nearest other row."""
    ids = held["ids"]
    sims, found = search(index, embeddings, _rows(embeddings, ids), 2, rerank)
    other = torch.where(found[:, 0] == torch.from_numpy(ids), sims[:, 1], sims[:, 0])
    return float((other.numpy() >= held["sims"] - 1e-4).mean())


def tune(index, embeddings: torch.Tensor, target: float = TARGET_RECALL, seed: int = 0,
         rerank: int = RERANK, progress: bool = True) -> tuple[dict, dict]:
    """Draw the held sample, find its exact neighbours, and set the smallest power-of-two nprobe reaching
    `target` recall@1 (all lists if none does). Returns (the record for index.json, the held sample)."""
    n = embeddings.shape[0]
    ids = np.sort(np.random.default_rng(seed + 1).choice(n, min(HELD_SAMPLE, n), replace=False))
    t0 = time.perf_counter()
    truth_ids, truth_sims = exact_neighbours(embeddings, ids)
    held = {"ids": ids, "sims": truth_sims, "nearest": truth_ids}
    exact_seconds = time.perf_counter() - t0
    ivf = faiss.try_extract_index_ivf(index)
    probes = [2**i for i in range(int(math.log2(ivf.nlist)) + 1)] + [ivf.nlist] if ivf is not None else [1]
    tried = {}
    for nprobe in tqdm(probes, desc="tune nprobe", disable=not progress, leave=False):
        set_nprobe(index, nprobe)
        tried[nprobe] = held_recall(index, embeddings, held, rerank)
        if tried[nprobe] >= target:
            break
    nprobe = min((p for p, r in tried.items() if r >= target), default=max(tried))
    set_nprobe(index, nprobe)
    return {"nprobe": nprobe, "rerank": rerank, "recall_at_1": tried[nprobe], "target_recall": target,
            "held_sample": len(ids), "recall_by_nprobe": {str(p): round(r, 4) for p, r in tried.items()},
            "exact_seconds": round(exact_seconds, 3)}, held


def check_options(approx: str, max_memory: str | int | None, target: float) -> None:
    """One MemtrainError for a bad --approx / --max-memory / --target-recall, before anything is embedded."""
    if max_memory is not None:
        parse_memory(max_memory)
    if not 0.0 < target <= 1.0:
        raise MemtrainError(f"--target-recall must be in (0, 1], got {target}")
    if approx in ("auto", "exact"):
        return
    if faiss is None:
        raise MemtrainError(f"--approx {approx} needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)")
    if approx != "choose":
        try:
            faiss.index_factory(8 * 16, approx, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError:
            raise MemtrainError(f"--approx {approx!r}: not auto, exact, choose or a faiss index_factory string "
                                "such as IVF1024,SQ8") from None


def wanted(approx: str, n: int) -> bool:
    """Whether `--approx` asks for an approximate index of n images (auto: above APPROX_MIN, when faiss is installed)."""
    if approx == "exact":
        return False
    if approx == "auto":
        return faiss is not None and n > APPROX_MIN
    return True


def build_tuned(embeddings: torch.Tensor, approx: str, max_memory: str | int | None, target: float = TARGET_RECALL,
                seed: int = 0, progress: bool = True) -> tuple[object, dict, dict]:
    """(faiss index, record, held sample) for `--approx` auto / choose (the factory chosen under --max-memory) or
    a faiss index_factory string."""
    n, d = embeddings.shape
    budget = parse_memory(max_memory if max_memory is not None else DEFAULT_MAX_MEMORY)
    factory = choose_factory(n, d, budget) if approx in ("auto", "choose") else approx
    t0 = time.perf_counter()
    index = build(embeddings, factory, seed, progress)
    built = time.perf_counter() - t0
    record, held = tune(index, embeddings, target, seed, progress=progress)
    record = {"factory": factory, "max_memory_bytes": budget, "estimated_bytes": _estimate(factory, n, d),
              "build_seconds": round(built, 3), **record}
    return index, record, held


def _estimate(factory: str, n: int, d: int) -> int | None:
    try:
        return index_bytes(factory, n, d)
    except (MemtrainError, AttributeError):
        return None
