"""A nearest-neighbour index of the training images (`memtrain index DATA --out INDEX`, built by
`trainer.measure.index_build`): which training image is closest to this one, and how close, for replication checks and generation-time guidance
(AMG: Chen et al., CVPR 2024, "Towards memorization-free diffusion models").

Stores unit-norm embeddings (`trainer.measure.embedders`; safetensors, float16 by default) of the
training images at the index's resolution, each row's first caption and the duplicate-caption groups.
Search is exact (chunked matrix products with a running top-k, or an exhaustive faiss index when faiss
is installed: `backend="auto"`, large CPU indexes queried a few images at a time), or approximate when
the index holds a faiss IVF index (`trainer.measure.ann`, `memtrain index --approx`), memory-mapped.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.io import MemtrainError, atomic_dir, write_json
from trainer.measure import ann
from trainer.measure.calibration import Calibration

try:  # optional extra: memtrain[faiss]
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

INDEX_VERSION = 1
# backend="auto" uses faiss (when installed) for a CPU index above this many images, queried with at most
# FAISS_AUTO_MAX_QUERIES queries at a time
FAISS_AUTO_MIN, FAISS_AUTO_MAX_QUERIES = 200_000, 8
CPU_CHUNK, DEVICE_CHUNK = 1024, 65536  # default rows per matrix product
_MERGE_EVERY = 64  # chunks' top-k candidates are folded into one top-k this often
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.json"
ANN_FILE, ANN_HELD_FILE = "ann.faiss", "ann_heldout.safetensors"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_QUERY_BLOCK = 1024  # queries per matrix product: bounds the [queries, chunk] similarity block


# ---------------------------------------------------------------- the index


def faiss_available() -> bool:
    return faiss is not None


@dataclass
class TrainingIndex:
    """Embeddings of the training images (row i = training row i) with their captions and file names."""

    embeddings: torch.Tensor  # [N, d], float16 or float32, rows of unit norm
    captions: list[str]
    file_names: list[str]
    duplicate_caption_groups: list[list[int]]
    embedding: str
    resolution: int
    meta: dict = field(default_factory=dict)
    # `memtrain index --heldout`: {"copy": Calibration dict, "null_similarity": float, "heldout": dir, "vae": dir}
    calibration: dict = field(default_factory=dict)
    _faiss: Any = field(default=None, init=False, repr=False, compare=False)
    # the approximate index (meta["ann"] describes it) and its held sample: {"ids", "sims", "nearest"}
    ann_index: Any = field(default=None, repr=False, compare=False)
    ann_held: dict = field(default_factory=dict, repr=False, compare=False)
    ann_file: Path | None = field(default=None, repr=False, compare=False)  # its file, copied by save (mmap: no write)
    _duplicated: set = field(default_factory=set, init=False, repr=False, compare=False)
    _copy_ids: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        n = self.embeddings.shape[0] if self.embeddings.ndim == 2 else -1
        if n < 0 or len(self.captions) != n or len(self.file_names) != n:
            raise MemtrainError(
                f"index parts disagree: embeddings {list(self.embeddings.shape)}, {len(self.captions)} captions, "
                f"{len(self.file_names)} file names; rebuild it with `memtrain index`"
            )
        self._duplicated = {i for g in self.duplicate_caption_groups for i in g}

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def caption_is_duplicated(self, i: int) -> bool:
        """True when training row i shares its caption (exactly or after normalisation) with another row."""
        return int(i) in self._duplicated

    def copy_ids(self) -> np.ndarray:
        """[N] ids: rows with byte-identical embeddings (the same image stored more than once) share an id."""
        if self._copy_ids is None:
            rows = self.embeddings.detach().cpu().contiguous().numpy()
            self._copy_ids = np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)
        return self._copy_ids

    def copy_calibration(self) -> Calibration | None:
        """The top-1 similarity threshold calibrated on held-out images (`memtrain index --heldout`), if any."""
        if not self.calibration.get("copy"):
            return None
        return Calibration.from_dict(self.calibration["copy"], where="index.json calibration")

    def null_similarity(self) -> float:
        """Mean cosine similarity of unrelated images: held-out to training images when the index is
        calibrated, else between distinct training images (exact, from the mean embedding)."""
        if self.calibration.get("null_similarity") is not None:
            return float(self.calibration["null_similarity"])
        n = len(self)
        mean = self.embeddings.double().mean(dim=0)
        if n < 2:
            return 0.0
        total = float(mean @ mean) * n * n - float(self.embeddings.double().pow(2).sum())
        return total / (n * (n - 1))

    def to(self, device) -> TrainingIndex:
        self.embeddings = self.embeddings.to(device)
        return self

    def search(
        self, queries: torch.Tensor, k: int = 1, chunk: int | None = None, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k cosine neighbours: (similarities [M, k] float32, indices [M, k] int64), best first,
        on the queries' device. Queries are L2-normalised here; no gradient flows (re-score the winner
        with the embedder's output for that). `chunk`: index rows per matrix product (default 1024 on
        CPU, 65536 on a GPU). backend: auto (the approximate index when there is one) | torch | faiss |
        ann (approximate: `ann.search`, exact similarities of its candidates)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MemtrainError(
                f"queries must be [M, {self.dim}] ({self.embedding} embeddings), got {list(queries.shape)}; "
                f"embed them with make_embedder({self.embedding!r})"
            )
        n = len(self)
        if not 1 <= k <= n:
            raise MemtrainError(f"k must be in 1..{n} (the index has {n} images), got {k}")
        if chunk is None:
            chunk = CPU_CHUNK if self.device.type == "cpu" else DEVICE_CHUNK
        if chunk < 1:
            raise MemtrainError(f"chunk must be >= 1, got {chunk}")
        if backend not in ("auto", "torch", "faiss", "ann"):
            raise MemtrainError(f"unknown search backend {backend!r}; choose auto, torch, faiss or ann")
        if backend == "ann" and self.ann_index is None:
            raise MemtrainError("backend='ann' needs an approximate index: build it with `memtrain index --approx`")
        if backend == "faiss" and faiss is None:
            raise MemtrainError(
                "backend='faiss' needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)"
            )
        if backend == "auto" and self.ann_index is not None and self.device.type == "cpu":
            backend = "ann"
        if backend == "auto":
            use_faiss = faiss is not None and self.device.type == "cpu" and n > FAISS_AUTO_MIN
            use_faiss = use_faiss and queries.shape[0] <= FAISS_AUTO_MAX_QUERIES
            backend = "faiss" if use_faiss else "torch"
        out_device = queries.device
        q = F.normalize(queries.detach().float(), dim=1)
        if q.shape[0] == 0:
            return q.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=out_device)
        if backend == "ann":
            sims, idx = ann.search(self.ann_index, self.embeddings, q.cpu().numpy(), k)
            return sims.to(out_device), idx.to(out_device)
        if backend == "faiss":
            sims, idx = self._faiss_index().search(q.cpu().numpy(), k)
            return torch.from_numpy(sims).to(out_device), torch.from_numpy(idx).to(out_device)
        q = q.to(self.device)
        results = [
            self._torch_search(q[s : s + _QUERY_BLOCK], k, chunk) for s in range(0, q.shape[0], _QUERY_BLOCK)
        ]
        return torch.cat([r[0] for r in results]).to(out_device), torch.cat([r[1] for r in results]).to(
            out_device
        )

    @torch.no_grad()
    def _torch_search(self, q: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        values: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for start in range(0, len(self), chunk):
            sims = q @ self.embeddings[start : start + chunk].to(torch.float32).T
            v, i = sims.topk(min(k, sims.shape[1]), dim=1)
            values.append(v)
            indices.append(i + start)
            if len(values) == _MERGE_EVERY or start + chunk >= len(self):  # fold the candidates into a top-k
                v, i = torch.cat(values, dim=1), torch.cat(indices, dim=1)
                v, sel = v.topk(min(k, v.shape[1]), dim=1)
                values, indices = [v], [i.gather(1, sel)]
        return values[0], indices[0]

    def _faiss_index(self):
        if self._faiss is None:
            d = self.dim
            if self.embeddings.dtype == torch.float16:  # exhaustive search over the same float16 values
                index = faiss.IndexScalarQuantizer(
                    d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
                )
            else:
                index = faiss.IndexFlatIP(d)
            for start in range(0, len(self), 65536):  # convert in chunks: no float32 copy of the whole index
                index.add(np.ascontiguousarray(self.embeddings[start : start + 65536].float().cpu().numpy()))
            self._faiss = index
        return self._faiss

    def save(self, path: str | Path) -> None:
        """Write `path/embeddings.safetensors` and `path/index.json` atomically (the directory appears whole)."""
        dtype = {v: k for k, v in DTYPES.items()}.get(self.embeddings.dtype)
        if dtype is None:
            raise MemtrainError(f"index embeddings must be float16 or float32, got {self.embeddings.dtype}")
        with atomic_dir(path, "index") as tmp:
            save_file(
                {"embeddings": self.embeddings.detach().contiguous().cpu()},
                str(tmp / EMBEDDINGS_FILE),
                metadata={"format": "pt"},
            )
            if self.ann_file is not None:  # a memory-mapped faiss index cannot be written back: copy its file
                shutil.copyfile(self.ann_file, tmp / ANN_FILE)
            elif self.ann_index is not None:
                ann.faiss.write_index(self.ann_index, str(tmp / ANN_FILE))
            if self.ann_index is not None:
                save_file({k: torch.from_numpy(np.asarray(v)) for k, v in self.ann_held.items()}, str(tmp / ANN_HELD_FILE))
            write_json(
                dict(
                    version=INDEX_VERSION,
                    embedding=self.embedding,
                    resolution=self.resolution,
                    dtype=dtype,
                    count=len(self),
                    dim=self.dim,
                    meta=self.meta,
                    calibration=self.calibration,
                    duplicate_caption_groups=self.duplicate_caption_groups,
                    captions=self.captions,
                    file_names=self.file_names,
                ),
                tmp / INDEX_FILE,
            )

    @classmethod
    def load(
        cls, path: str | Path, embedding: str | None = None, resolution: int | None = None, device="cpu"
    ) -> TrainingIndex:
        """Read an index written by `save` / `memtrain index`, checking it matches what the caller needs."""
        p = Path(path)
        build = f"build one with `memtrain index DATA --out {p}`"
        if not p.exists():
            raise MemtrainError(f"index {p} does not exist; {build}")
        meta_file, emb_file = p / INDEX_FILE, p / EMBEDDINGS_FILE
        if not p.is_dir() or not meta_file.exists() or not emb_file.exists():
            raise MemtrainError(
                f"{p} is not a memtrain index (needs {INDEX_FILE} and {EMBEDDINGS_FILE}); {build}"
            )
        try:
            info = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise MemtrainError(f"{meta_file}: not valid JSON ({e.msg}); rebuild the index") from None
        missing = [
            key
            for key in (
                "version",
                "embedding",
                "resolution",
                "count",
                "captions",
                "file_names",
                "duplicate_caption_groups",
            )
            if key not in info
        ]
        if missing:
            raise MemtrainError(
                f"{meta_file}: missing keys {missing}; rebuild the index with `memtrain index`"
            )
        if info["version"] != INDEX_VERSION:
            raise MemtrainError(
                f"{meta_file}: index version {info['version']}, this memtrain reads version "
                f"{INDEX_VERSION}; rebuild the index with `memtrain index`"
            )
        if info["count"] == 0:
            raise MemtrainError(f"index {p} is empty (0 images); rebuild it from a non-empty training set")
        if embedding is not None and info["embedding"] != embedding:
            raise MemtrainError(
                f"index {p} holds {info['embedding']} embeddings, but {embedding} embeddings were requested; "
                f"rebuild it with `memtrain index DATA --out {p} --embedding {embedding}` or use {info['embedding']}"
            )
        if resolution is not None and int(info["resolution"]) != int(resolution):
            raise MemtrainError(
                f"index {p} was built from {info['resolution']}x{info['resolution']} images, but resolution "
                f"{resolution} was requested; rebuild it with `memtrain index DATA --out {p} --resolution "
                f"{resolution}`"
            )
        try:
            emb = load_file(str(emb_file), device=str(device))["embeddings"]
        except (SafetensorError, OSError, KeyError) as e:
            raise MemtrainError(f"{emb_file}: cannot read the embeddings ({e}); rebuild the index") from None
        if emb.ndim != 2 or emb.shape[0] != info["count"] or emb.dtype not in DTYPES.values():
            raise MemtrainError(
                f"{emb_file}: embeddings {list(emb.shape)} {emb.dtype} do not match {meta_file} "
                f"({info['count']} images); rebuild the index"
            )
        index = cls(
            emb,
            list(info["captions"]),
            list(info["file_names"]),
            [list(g) for g in info["duplicate_caption_groups"]],
            info["embedding"],
            int(info["resolution"]),
            dict(info.get("meta", {})),
            dict(info.get("calibration") or {}),
        )
        if (p / ANN_FILE).exists():
            _load_ann(index, p)
        return index


def _load_ann(index: TrainingIndex, p: Path) -> None:
    """Memory-map the approximate index of `p` (its nprobe from index.json); without faiss, search stays exact."""
    if ann.faiss is None:
        print(f"memtrain: warning: {p} holds an approximate index ({ANN_FILE}) but faiss is not installed; searching "
              "exactly (pip install faiss-cpu for the approximate search)", file=sys.stderr)
        return
    try:
        index.ann_index = ann.faiss.read_index(str(p / ANN_FILE), ann.faiss.IO_FLAG_MMAP | ann.faiss.IO_FLAG_READ_ONLY)
        held = load_file(str(p / ANN_HELD_FILE))
    except (RuntimeError, SafetensorError, OSError) as e:
        raise MemtrainError(f"{p / ANN_FILE}: cannot read the approximate index ({e}); rebuild the index") from None
    index.ann_held, index.ann_file = {k: v.numpy() for k, v in held.items()}, p / ANN_FILE
    if index.ann_index.ntotal != len(index) or index.ann_index.d != index.dim:
        raise MemtrainError(f"{p / ANN_FILE} holds {index.ann_index.ntotal} x {index.ann_index.d} vectors, "
                            f"the index {len(index)} x {index.dim}; rebuild the index")
    ann.set_nprobe(index.ann_index, int((index.meta.get("ann") or {}).get("nprobe", 1)))
