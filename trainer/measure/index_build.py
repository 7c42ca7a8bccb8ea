"""Building a training-image index (`memtrain index DATA --out INDEX`, `trainer.measure.index`): the rows of
DATA embedded in parts, shared by the processes of `accelerate launch` and resumable, then the approximate
index (`trainer.measure.ann`) when it is wanted.

The rows are cut into parts of `part_rows` (default 4096); each process embeds its contiguous share of the parts
(`core.distributed.split_work`), `batch_size` images at a time from each part's first row, and writes each
finished part to `.OUT.parts/part-NNNNNN.safetensors` next to the index (a temporary name, then renamed), so the
result does not depend on the number of processes. The main process merges the parts in order. A run started
again after a crash, with the same data and settings (`parts.json` records them), embeds only the missing
parts; the parts are removed once the index is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.core.distributed import is_main_process, main_process_value, process_state, split_work
from trainer.data import DECODE_ERRORS, Rows, decode_error, image_to_tensor, load_rows, open_image
from trainer.data_shards import ShardImage, shard_files
from trainer.io import MemtrainError, check_output, is_write_failure
from trainer.measure import ann
from trainer.measure.embedders import make_embedder
from trainer.measure.groups import caption_groups
from trainer.measure.index import DTYPES, TrainingIndex
from trainer.measure.index_data import data_fingerprint, row_file_names
from trainer.measure.replication import vae_roundtrip

MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096  # --resolution: a batch holds batch_size x 3 x side^2 floats
PART_ROWS = 4096
_KEY_FILE = "parts.json"


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.parts"


def _part_file(work: Path, part: int) -> Path:
    return work / f"part-{part:06d}.safetensors"


def _prepare(work: Path, key: dict) -> None:
    """On the main process: keep the parts of an interrupted run with the same `key`, remove any others."""
    if (work / _KEY_FILE).exists() and json.loads((work / _KEY_FILE).read_text()) != key:
        remove_parts(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / _KEY_FILE).write_text(json.dumps(key, sort_keys=True))


def remove_parts(work: Path) -> None:
    """Remove the parts directory: only the files this module writes, then the directory if it is empty."""
    if not work.is_dir():
        return
    for f in [*work.glob("part-*.safetensors"), *work.glob(".part-*.tmp"), work / _KEY_FILE]:
        f.unlink(missing_ok=True)
    if not any(work.iterdir()):
        work.rmdir()


@torch.no_grad()
def _embed_part(rows: Rows, start: int, stop: int, embedder, resolution: int, batch_size: int,
                dtype: torch.dtype, bar, vae=None) -> torch.Tensor:
    out = torch.empty((stop - start, embedder.dim), dtype=dtype)
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        batch = torch.stack([image_to_tensor(open_image(rows.images[i], rows.names[i]), resolution, True, False, None)
                             for i in range(s, e)])
        batch = (batch + 1.0) / 2.0
        if vae is not None:  # the image as the model's VAE reproduces it
            batch = vae_roundtrip(SimpleNamespace(vae=vae), batch, batch_size)
        out[s - start : e - start] = embedder(batch).to(device="cpu", dtype=dtype)
        bar.update(e - s)
    return out


def embed_rows(rows: Rows, embedder, resolution: int, batch_size: int, dtype: torch.dtype, out: str | Path,
               key: dict, desc: str, progress: bool = True, part_rows: int = PART_ROWS,
               vae=None) -> torch.Tensor | None:
    """[N, d] embeddings of every row on the main process (None on the others), computed in parts by all
    processes; parts already in `parts_dir(out)` from an interrupted run with the same `key` are reused."""
    n, work = len(rows.images), parts_dir(out)
    parts = list(range(math.ceil(n / part_rows)))
    if is_main_process():
        _prepare(work, key)
    main_process_value(0)  # every process sees the prepared directory
    state = process_state()
    todo = [p for p in split_work(parts) if not _part_file(work, p).exists()]
    rows_todo = sum(min(part_rows, n - p * part_rows) for p in todo)
    label = f"{desc} [process {state.process_index + 1}/{state.num_processes}]" if state.num_processes > 1 else desc
    with tqdm(total=rows_todo, desc=label, unit="img", disable=not progress, position=state.process_index) as bar:
        for p in todo:
            start = p * part_rows
            emb = _embed_part(rows, start, min(start + part_rows, n), embedder, resolution, batch_size, dtype, bar,
                              vae)
            tmp = work / f".part-{p:06d}.tmp"
            try:
                save_file({"embeddings": emb.contiguous()}, str(tmp))
            except (OSError, SafetensorError) as e:
                if not is_write_failure(e):
                    raise
                remove_parts(work)
                raise MemtrainError(f"writing into {out} failed ({e}); nothing was written to {out}: free disk space "
                                    "(or choose another output directory) and run again") from None
            os.replace(tmp, _part_file(work, p))
    main_process_value(0)  # every part is written
    if not is_main_process():
        return None
    return torch.cat([load_file(str(_part_file(work, p)))["embeddings"] for p in parts])


# ---------------------------------------------------------------- the index


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


def _check_build_options(batch_size: int, part_rows: int, dtype: torch.dtype, resolution: int | None) -> None:
    if batch_size < 1:
        raise MemtrainError(f"--batch-size must be >= 1, got {batch_size}")
    if part_rows < 1:
        raise MemtrainError(f"--part-rows must be >= 1, got {part_rows}")
    if dtype not in DTYPES.values():
        raise MemtrainError(f"--dtype must be float16 or float32, got {dtype}")
    if resolution is not None and not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise MemtrainError(f"--resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] (the side images are "
                            f"embedded at), got {resolution}")


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
    vae=None,
    vae_path: str | None = None,
) -> TrainingIndex | None:
    """Embed every training image of `data` (imagefolder with metadata.jsonl/csv, webdataset tar or parquet
    shards, or a `datasets` save_to_disk directory) at `resolution` and write the index to `out` (atomically).
    With `vae` (the model's AutoencoderKL, from `vae_path`), each image is embedded as the VAE reproduces
    it (`vae_roundtrip`): what a generation can at best be, as the copy verdict's references are.

    Images are opened, resized and embedded `batch_size` at a time and then dropped: memory holds one
    batch of images plus the [N, d] embedding matrix being built. Under `accelerate launch` the processes
    embed shares of the rows (`embed_rows`; finished parts survive a crash) and the main process writes
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
    _check_build_options(batch_size, part_rows, dtype, resolution)
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
    file_names = row_file_names(rows.images, root)
    fingerprint = data_fingerprint(rows.images, file_names)
    work = parts_dir(out)
    key = dict(fingerprint=fingerprint, embedding=embedding, model=str(path), resolution=int(resolution),
               dtype=str(dtype), batch_size=batch_size, part_rows=part_rows, vae=str(vae_path))
    emb = embed_rows(rows, embedder, resolution, batch_size, dtype, out, key, f"index ({embedding})", progress,
                     part_rows, vae)
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
            references=f"through the VAE of {vae_path}" if vae is not None else "as stored",
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
