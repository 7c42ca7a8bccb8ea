"""A nearest-neighbour index of the training images (`memtrain index DATA --out INDEX`): which training
image is closest to this one, and how close, for replication checks and generation-time guidance
(AMG: Chen et al., CVPR 2024, "Towards memorization-free diffusion models").

Stores unit-norm embeddings (`trainer.measure.embedders`; safetensors, float16 by default) of the
training images at the index's resolution, each row's first caption and the duplicate-caption groups.
Search is exact (chunked matrix products with a running top-k, or an exhaustive faiss index when faiss
is installed: `backend="auto"`, large CPU indexes queried a few images at a time), or approximate when
the index holds a faiss IVF index (`trainer.measure.ann`, `memtrain index --approx`), memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.data import DECODE_ERRORS, decode_error, load_rows, open_image
from trainer.data_shards import ShardImage, shard_files
from trainer.io import MemtrainError, atomic_dir, check_output, write_json
from trainer.measure import ann
from trainer.measure.calibration import Calibration
from trainer.measure.embedders import make_embedder
from trainer.measure.index_embed import PART_ROWS, embed_rows, parts_dir, remove_parts
from trainer.mitigate.dedup import caption_groups

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
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096  # --resolution: a batch holds batch_size x 3 x side^2 floats
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
            if self.ann_index is not None:
                ann.faiss.write_index(self.ann_index, str(tmp / ANN_FILE))
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
    index.ann_held = {k: v.numpy() for k, v in held.items()}
    if index.ann_index.ntotal != len(index) or index.ann_index.d != index.dim:
        raise MemtrainError(f"{p / ANN_FILE} holds {index.ann_index.ntotal} x {index.ann_index.d} vectors, "
                            f"the index {len(index)} x {index.dim}; rebuild the index")
    ann.set_nprobe(index.ann_index, int((index.meta.get("ann") or {}).get("nprobe", 1)))


# ---------------------------------------------------------------- building


def _image_size(source, name: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, dict | ShardImage):  # a datasets image dict or a shard's sample: decode
        return open_image(source, name).size
    try:
        with Image.open(source) as im:
            return im.size
    except FileNotFoundError:
        raise MemtrainError(f"{name}: image file is missing") from None
    except DECODE_ERRORS as e:
        raise decode_error(name, e) from None


def _default_resolution(images: Sequence, names: Sequence[str], progress: bool) -> int:
    first = None
    for source, name in tqdm(
        list(zip(images, names, strict=True)),
        desc="image sizes",
        unit="img",
        disable=not progress,
        leave=False,
    ):
        size = _image_size(source, name)
        if first is None:
            first = (size, name)
        elif size != first[0]:
            raise MemtrainError(
                f"training images differ in size ({first[1]} is {first[0][0]}x{first[0][1]}, {name} is "
                f"{size[0]}x{size[1]}); pass --resolution (the model's training resolution)"
            )
    (w, h), name = first
    if w != h:
        raise MemtrainError(
            f"training images are {w}x{h}, not square; pass --resolution (the model's training "
            "resolution: short side resized, centre crop)"
        )
    return w


def _size(source) -> int | None:
    """Bytes of a row's image: the file's size, or the stored bytes of a datasets row (None when unknown)."""
    if isinstance(source, ShardImage):
        return getattr(source, "size", None)
    if isinstance(source, dict):
        if source.get("bytes"):
            return len(source["bytes"])
        source = source.get("path")
    if isinstance(source, str | Path):
        try:
            return Path(source).stat().st_size
        except OSError:
            return None
    return None


def data_fingerprint(images: Sequence, file_names: Sequence[str]) -> dict:
    """{"count", "sha256"}: the number of rows and a hash of each row's file name and size, which tells the
    data set an index was built from without decoding an image."""
    digest = hashlib.sha256()
    for source, name in zip(images, file_names, strict=True):
        digest.update(f"{name}\t{_size(source)}\n".encode())
    return {"count": len(file_names), "sha256": digest.hexdigest()}


def fingerprint_of(data: str | Path, caption_column: str = "text", image_column: str = "image") -> dict:
    """`data_fingerprint` of a training set directory (the file names as `memtrain index` records them)."""
    rows = load_rows(str(data), caption_column=caption_column, image_column=image_column)
    root = Path(data)
    return data_fingerprint(rows.images, [_file_name(s, root, i) for i, s in enumerate(rows.images)])


def check_index_data(index: str | Path, data: str | Path) -> None:
    """A MemtrainError when the index at `index` was built from another data set than `data` (its fingerprint,
    written by `memtrain index`, differs); a warning for an index without one (built by an older memtrain)."""
    try:
        info = json.loads((Path(index) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return  # TrainingIndex.load names what is wrong with it
    recorded = (info.get("meta") or {}).get("fingerprint") if isinstance(info, dict) else None
    if not isinstance(recorded, dict):
        print(f"memtrain: warning: --index {index} records no fingerprint of its data (built by an older memtrain): "
              f"it cannot be checked against --train-data {data}; rebuild it with `memtrain index {data} --out INDEX`",
              file=sys.stderr)
        return
    found = fingerprint_of(data)
    if found != {k: recorded.get(k) for k in found}:
        count = recorded.get("count")
        what = (f"{count} images, --train-data {found['count']}" if count != found["count"] else
                f"both {count} images, but other file names or sizes")
        raise MemtrainError(f"--index {index} was built from another data set than --train-data {data} ({what}); "
                            f"rebuild it with `memtrain index {data} --out INDEX` or pass the matching --train-data")


def _file_name(source, root: Path, row: int) -> str:
    """The image's path relative to the data directory, "SHARD-FILE-NAME:KEY" for a shard's sample, or "row i"
    for an image stored in a dataset."""
    if isinstance(source, ShardImage):
        return f"{Path(source.shard).name}:{source.key}"
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        source = source["path"]
    if isinstance(source, str | Path):
        try:
            return Path(source).relative_to(root).as_posix()
        except ValueError:
            return str(source)
    return f"row {row}"


def build_index(
    data: str,
    out: str,
    embedding: str = "pixels",
    path: str | None = None,
    resolution: int | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
    caption_column: str = "text",
    image_column: str = "image",
    progress: bool = True,
    device=None,
    save: bool = True,
    approx: str = "auto",
    max_memory: str | int | None = None,
    target_recall: float = ann.TARGET_RECALL,
    part_rows: int = PART_ROWS,
) -> TrainingIndex | None:
    """Embed every training image of `data` (imagefolder with metadata.jsonl/csv, webdataset tar or parquet
    shards, or a `datasets` save_to_disk directory) at `resolution` and write the index to `out` (atomically).

    Images are opened, resized and embedded `batch_size` at a time and then dropped: memory holds one
    batch of images plus the [N, d] embedding matrix being built. Under `accelerate launch` the processes
    embed shares of the rows (`index_embed`; finished parts survive a crash) and the main process writes
    the index and returns it (None elsewhere). `approx` (`ann.wanted`: auto, exact, choose
    or a faiss index_factory string) adds an approximate index chosen under `max_memory` and tuned to
    `target_recall` recall@1 on a held sample."""
    root = Path(data)
    shards = shard_files(data)
    if shards is not None and not root.is_dir():
        root = shards[0].parent  # a pattern or one file: the folder of the shards
    if not root.exists():
        raise MemtrainError(
            f"training data {data} does not exist; give an imagefolder directory "
            "(metadata.jsonl or metadata.csv), webdataset / parquet shards or a `datasets` save_to_disk directory"
        )
    if not root.is_dir():
        raise MemtrainError(
            f"training data {data} is not a directory (want an imagefolder or a datasets directory)"
        )
    out_path = Path(out).resolve()
    if out_path == root.resolve() or root.resolve() in out_path.parents or out_path in root.resolve().parents:
        raise MemtrainError(f"--out {out} overlaps the training data {data}; write the index somewhere else")
    check_output(out, "index", {"DATA": data, "--model": path})
    if batch_size < 1:
        raise MemtrainError(f"--batch-size must be >= 1, got {batch_size}")
    if part_rows < 1:
        raise MemtrainError(f"--part-rows must be >= 1, got {part_rows}")
    if dtype not in DTYPES.values():
        raise MemtrainError(f"--dtype must be float16 or float32, got {dtype}")
    if resolution is not None and not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise MemtrainError(f"--resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] (the side images are "
                            f"embedded at), got {resolution}")
    ann.check_options(approx, max_memory, target_recall)
    embedder = make_embedder(embedding, path, device)

    t0 = time.perf_counter()
    rows = load_rows(str(data), caption_column=caption_column, image_column=image_column)
    n = len(rows.images)
    if n == 0:
        raise MemtrainError(f"training data {data} has no images; nothing to index")
    if resolution is None:
        resolution = _default_resolution(rows.images, rows.names, progress)
        if resolution > MAX_RESOLUTION:
            raise MemtrainError(f"training images are {resolution}x{resolution}, above --resolution's "
                                f"{MAX_RESOLUTION}; pass --resolution (the model's training resolution)")
    file_names = [_file_name(s, root, i) for i, s in enumerate(rows.images)]
    fingerprint = data_fingerprint(rows.images, file_names)
    work = parts_dir(out)
    key = dict(fingerprint=fingerprint, embedding=embedding, model=str(path), resolution=int(resolution),
               dtype=str(dtype), batch_size=batch_size, part_rows=part_rows)
    emb = embed_rows(rows, embedder, resolution, batch_size, dtype, out, key, f"index ({embedding})", progress,
                     part_rows)
    if emb is None:  # not the main process of `accelerate launch`: the main process writes the index
        return None
    seconds = time.perf_counter() - t0
    groups = caption_groups(rows.captions)
    index = TrainingIndex(
        embeddings=emb,
        captions=[c[0] for c in rows.captions],
        file_names=file_names,
        duplicate_caption_groups=groups["normalized"],
        embedding=embedding,
        resolution=int(resolution),
        meta=dict(
            data=str(data),
            model=str(path) if path else None,
            exact_caption_groups=len(groups["exact"]),
            build_seconds=round(seconds, 3),
            images_per_second=round(n / max(seconds, 1e-9), 1),
            fingerprint=fingerprint,
        ),
    )
    if ann.wanted(approx, n):
        index.ann_index, index.meta["ann"], index.ann_held = ann.build_tuned(emb, approx, max_memory, target_recall,
                                                                            progress=progress)
    if save:  # False: the caller adds to it (e.g. a calibration) and saves it
        index.save(out)
    remove_parts(work)
    return index


def index_summary(index: TrainingIndex, out: str) -> dict:
    dup_rows = sum(len(g) for g in index.duplicate_caption_groups)
    return dict(
        out=str(out),
        images=len(index),
        embedding=index.embedding,
        dim=index.dim,
        dtype=str(index.embeddings.dtype).removeprefix("torch."),
        resolution=index.resolution,
        duplicate_caption_groups=len(index.duplicate_caption_groups),
        rows_with_duplicated_captions=dup_rows,
        size_mb=round(index.embeddings.numel() * index.embeddings.element_size() / 2**20, 2),
        build_seconds=index.meta.get("build_seconds"),
        images_per_second=index.meta.get("images_per_second"),
        search="exact" if index.ann_index is None else {k: index.meta["ann"].get(k) for k in (
            "factory", "nprobe", "recall_at_1", "held_sample", "estimated_bytes", "build_seconds")},
    )
