"""A training-image index from an existing faiss index (`memtrain index --from-faiss`): what clip-retrieval
(rom1504/clip-retrieval: `image.index` + `metadata/*.parquet` with `caption`, `url`, `image_path` columns) or
autofaiss (criteo/autofaiss: `knn.index` + `index_infos.json`) wrote, used as it is, with no image embedded again.

Row i of the faiss index is row i of the metadata (the parquet files in natural name order, as clip-retrieval
numbers them) and of the embeddings (`--embeddings`: the .npy files the index was built from, e.g.
clip-retrieval's `img_emb/`). Without them the vectors are read back from the faiss index (`reconstruct_n`):
exact for Flat / HNSW-Flat / IVF-Flat, the decoded codes (an approximation) for SQ / PQ indexes. The vectors
are L2-normalised (memtrain searches by cosine). A non-flat index becomes the index's approximate search
(`trainer.measure.ann`), its nprobe tuned to the target recall@1 on a held sample as for a built one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.io import MemtrainError, check_output
from trainer.measure import ann
from trainer.measure.embedders import make_embedder
from trainer.measure.groups import caption_groups
from trainer.measure.index import DTYPES, TrainingIndex
from trainer.measure.index_build import MAX_RESOLUTION, MIN_RESOLUTION

INDEX_NAMES = ("image.index", "knn.index")  # clip-retrieval's, autofaiss's
INFOS_NAMES = ("index_infos.json", "infos.json")  # autofaiss's index_infos_path default, and older names
CAPTION_COLUMNS = ("caption", "text", "TEXT")
NAME_COLUMNS = ("image_path", "url", "URL", "key")
_CHUNK = 65536


def natural_sorted(files) -> list[Path]:
    """Files ordered by the numbers in their names (metadata_2 before metadata_10), as clip-retrieval numbers parts."""
    return sorted(files, key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(f).name)])


def find_faiss_file(path: str | Path) -> Path:
    """The faiss index file: `path` itself, or in folder `path` image.index, knn.index or its only *.index."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise MemtrainError(f"--from-faiss {p} does not exist; give the faiss index file (clip-retrieval's "
                            "image.index, autofaiss's knn.index) or its folder")
    for name in INDEX_NAMES:
        if (p / name).is_file():
            return p / name
    found = sorted(f for f in p.glob("*.index") if f.is_file())
    if len(found) != 1:
        raise MemtrainError(f"--from-faiss {p}: {'no' if not found else len(found)} *.index files in the folder "
                            f"(looked for {', '.join(INDEX_NAMES)}); give the index file itself")
    return found[0]


def read_faiss(path: Path):
    """The faiss index at `path`, memory-mapped read-only."""
    if ann.faiss is None:
        raise MemtrainError("--from-faiss needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)")
    try:
        return ann.faiss.read_index(str(path), ann.faiss.IO_FLAG_MMAP | ann.faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unreadable"
        raise MemtrainError(f"--from-faiss {path}: not a faiss index ({first})") from None


def read_infos(index_file: Path, infos: str | Path | None = None) -> dict:
    """autofaiss's index infos (index_key, index_param, ...): `infos`, else a known name beside the index; {} if none."""
    candidates = [Path(infos)] if infos is not None else [index_file.parent / n for n in INFOS_NAMES]
    for f in candidates:
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise MemtrainError(f"--infos {f}: not valid JSON ({e}); give autofaiss's index_infos.json") from None
            return data if isinstance(data, dict) else {}
        if infos is not None:
            raise MemtrainError(f"--infos {f} does not exist; give autofaiss's index_infos.json or leave it out")
    return {}


def parquet_files(metadata: str | Path) -> list[Path]:
    """A parquet file, or the *.parquet files of a folder (clip-retrieval's metadata/), in natural order."""
    p = Path(metadata)
    if p.is_file():
        return [p]
    files = natural_sorted(f for f in p.glob("*.parquet") if f.is_file()) if p.is_dir() else []
    if not files:
        raise MemtrainError(f"--metadata {p}: {'no *.parquet files in the folder' if p.is_dir() else 'does not exist'}"
                            "; give clip-retrieval's metadata/ folder or a parquet file with one row per vector")
    return files


def _pick(columns: list[str], wanted: str | None, defaults: tuple, where: Path, option: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise MemtrainError(f"{where}: no column {wanted!r} (columns: {', '.join(columns)}); set {option}")
        return wanted
    return next((c for c in defaults if c in columns), None)


def read_metadata(metadata: str | Path, count: int, caption_column: str | None = None,
                  name_column: str | None = None) -> tuple[list[str], list[str], dict]:
    """(captions, file names, provenance) of the `count` rows of the metadata parquet files, row i for vector i.
    Only the two columns are read; the row counts are checked from the files' footers first."""
    files = parquet_files(metadata)
    sizes, schemas = [], []
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise MemtrainError(f"--metadata {f}: not a readable parquet file ({e})") from None
        sizes.append(meta.metadata.num_rows)
        schemas.append(meta.schema_arrow.names)
    if sum(sizes) != count:
        raise MemtrainError(f"--metadata {metadata}: {sum(sizes)} rows in {len(files)} parquet file(s), but the faiss "
                            f"index holds {count} vectors; give the metadata the index was built with (one row per "
                            "vector, in the index's order)")
    captions, names = [], []
    used = {}
    for f, columns, n in zip(files, schemas, sizes, strict=True):
        cap = _pick(columns, caption_column, CAPTION_COLUMNS, f, "--caption-column")
        if cap is None:
            raise MemtrainError(f"{f}: no caption column ({' / '.join(CAPTION_COLUMNS)}; columns: {', '.join(columns)});"
                                " set --caption-column")
        name = _pick(columns, name_column, NAME_COLUMNS, f, "--name-column")
        table = pq.read_table(f, columns=[cap] + ([name] if name else []))
        captions += ["" if c is None else str(c) for c in table.column(cap).to_pylist()]
        start = len(names)
        names += ([str(v) if v is not None else f"row {start + i}" for i, v in enumerate(table.column(name).to_pylist())]
                  if name else [f"row {start + i}" for i in range(n)])
        used = {"caption_column": cap, "name_column": name}
    return captions, names, {"metadata": [str(f) for f in files], **used}


def read_npy_embeddings(path: str | Path, count: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[count, dim] unit rows from a .npy file or a folder of them (natural order), memory-mapped, in chunks."""
    p = Path(path)
    files = [p] if p.is_file() else natural_sorted(p.glob("*.npy")) if p.is_dir() else []
    if not files:
        raise MemtrainError(f"--embeddings {p}: no .npy files; give the embeddings folder the index was built from "
                            "(clip-retrieval's img_emb/) or leave it out to read the vectors from the index")
    parts = []
    for f in files:
        try:
            parts.append(np.load(f, mmap_mode="r"))
        except (OSError, ValueError) as e:
            raise MemtrainError(f"--embeddings {f}: not a .npy array ({e})") from None
        if parts[-1].ndim != 2 or parts[-1].shape[1] != dim:
            raise MemtrainError(f"--embeddings {f}: shape {list(parts[-1].shape)}, the faiss index holds {dim}-d "
                                "vectors; give the embeddings the index was built from")
    total = sum(a.shape[0] for a in parts)
    if total != count:
        raise MemtrainError(f"--embeddings {p}: {total} rows, the faiss index holds {count} vectors")
    out = torch.empty(count, dim, dtype=dtype)
    row = 0
    for a in parts:
        for s in range(0, a.shape[0], _CHUNK):
            block = torch.from_numpy(np.array(a[s:s + _CHUNK], dtype=np.float32))  # a copy of the mapped rows
            out[row:row + len(block)] = F.normalize(block, dim=1).to(dtype)
            row += len(block)
    return out


def reconstruct(index, dtype: torch.dtype, progress: bool = True) -> torch.Tensor:
    """[ntotal, d] unit rows read back from the faiss index (decoded codes for SQ / PQ), in chunks."""
    ivf = ann.faiss.try_extract_index_ivf(index)
    kinds = {type(ann.faiss.downcast_index(i)).__name__ for i in (index, ivf) if i is not None}
    if any("FastScan" in k for k in kinds):  # faiss has no reconstruct for fast-scan codes (it crashes)
        raise MemtrainError(f"this faiss index ({', '.join(sorted(kinds))}) cannot give its vectors back; pass "
                            "--embeddings DIR, the .npy embeddings it was built from")
    try:
        if ivf is not None:
            ivf.make_direct_map()
        out = torch.empty(index.ntotal, index.d, dtype=dtype)
        for s in tqdm(range(0, index.ntotal, _CHUNK), desc="read vectors", disable=not progress, leave=False):
            block = torch.from_numpy(index.reconstruct_n(s, min(_CHUNK, index.ntotal - s)))
            out[s:s + len(block)] = F.normalize(block.float(), dim=1).to(dtype)
    except RuntimeError as e:
        raise MemtrainError(f"this faiss index ({type(index).__name__}) cannot give its vectors back ({str(e)[:160]}); "
                            "pass --embeddings DIR, the .npy embeddings it was built from") from None
    finally:
        if ivf is not None:
            ivf.set_direct_map_type(ann.faiss.DirectMap.NoMap)
    return out


def is_exact_codes(index) -> bool:
    """Whether the index stores the vectors themselves (Flat, HNSW-Flat, IVF-Flat), not compressed codes."""
    ivf = ann.faiss.try_extract_index_ivf(index)
    inner = ann.faiss.downcast_index(ivf if ivf is not None else index)
    if isinstance(inner, ann.faiss.IndexHNSW):
        inner = ann.faiss.downcast_index(inner.storage)
    return isinstance(inner, ann.faiss.IndexFlat | ann.faiss.IndexIVFFlat)


def is_flat(index) -> bool:
    """An exhaustive index: memtrain's own exact search answers the same, so no approximate index is kept."""
    return isinstance(ann.faiss.downcast_index(index), ann.faiss.IndexFlat)


def import_faiss_index(faiss_path: str | Path, metadata: str | Path, out: str | Path, embedding: str,
                       resolution: int, model: str | None = None, embeddings: str | Path | None = None,
                       infos: str | Path | None = None, caption_column: str | None = None,
                       name_column: str | None = None, dtype: torch.dtype = torch.float16,
                       target_recall: float = ann.TARGET_RECALL, progress: bool = True) -> TrainingIndex:
    """Write a memtrain index at `out` from an existing faiss index and its metadata (module docstring), after
    checking the index's dimension against `embedding`'s (with `model`): queries must be embedded as the
    index was. Returns the index."""
    if dtype not in DTYPES.values():
        raise MemtrainError(f"index embeddings must be float16 or float32, got {dtype}")
    if not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise MemtrainError(f"--resolution must be in {MIN_RESOLUTION}..{MAX_RESOLUTION} (the side of the model's "
                            f"images), got {resolution}")
    faiss_file = find_faiss_file(faiss_path)
    check_output(out, "index", {"--from-faiss": faiss_file.parent, "--metadata": metadata, "--embeddings": embeddings,
                                "--model": model})
    index = read_faiss(faiss_file)
    embedder = make_embedder(embedding, model, "cpu")
    if index.d != embedder.dim:
        raise MemtrainError(f"--from-faiss {faiss_file} holds {index.d}-d vectors, but the {embedding} embedder"
                            f"{f' ({model})' if model else ''} gives {embedder.dim}-d ones; give the embedding "
                            "model the index was built with (--embedding, --model)")
    if index.ntotal == 0:
        raise MemtrainError(f"--from-faiss {faiss_file} is empty (0 vectors); nothing to import")
    captions, names, provenance = read_metadata(metadata, index.ntotal, caption_column, name_column)
    about = read_infos(faiss_file, infos)
    if embeddings is not None:
        vectors, source = read_npy_embeddings(embeddings, index.ntotal, index.d, dtype), f"the .npy files of {embeddings}"
    else:
        vectors, source = reconstruct(index, dtype, progress), f"read back from {faiss_file.name} (reconstruct_n)"
        if not is_exact_codes(index):
            print(f"memtrain: warning: {faiss_file.name} stores compressed codes: the vectors read back from it are "
                  "approximations; pass --embeddings DIR (the .npy files it was built from) for exact similarities",
                  file=sys.stderr)
    groups = caption_groups(captions)
    result = TrainingIndex(
        embeddings=vectors, captions=captions, file_names=names, duplicate_caption_groups=groups["normalized"],
        embedding=embedding, resolution=int(resolution),
        meta=dict(model=str(model) if model else None, references="as embedded by the imported index's builder",
                  exact_caption_groups=len(groups["exact"]),
                  imported=dict(faiss=str(faiss_file), faiss_type=type(ann.faiss.downcast_index(index)).__name__,
                                vectors=source, infos={k: about[k] for k in ("index_key", "index_param") if k in about},
                                **provenance)),
    )
    if not is_flat(index):
        result.ann_index, result.ann_file = index, faiss_file
        record, result.ann_held = ann.tune(index, vectors, target_recall, progress=progress)
        result.meta["ann"] = {"factory": about.get("index_key") or type(ann.faiss.downcast_index(index)).__name__,
                              **record}
    result.save(out)
    return result
