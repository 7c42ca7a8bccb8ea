"""Sharded training sets: webdataset tar shards and parquet files with image bytes (img2dataset's
`webdataset` and `parquet` output formats), read without unpacking them.

A sample's image is a reference into its shard (`TarImage`: the tar member's byte offset and size, found
with the standard `tarfile` module; `ParquetImage`: row group and row, read with pyarrow, the reader
`datasets` itself uses): only the captions are read up front, an image's bytes when it is opened. So the
training loop keeps its map-style dataset, its deterministic epoch sampler (`data.EpochSampler`, which
visits shards one after another in an order drawn from (seed, epoch)) and its exact resume: a checkpoint's
step fixes the epoch, the shard and the offset in it. `datasets`' streaming `IterableDataset` is not used
for training because its `state_dict` drops the shuffle buffer on resume (huggingface/datasets#7444),
which would make a resumed run differ from an uninterrupted one.
"""

from __future__ import annotations

import functools
import glob
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from trainer.io import MemtrainError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")  # webdataset extensions / img2dataset parquet columns
CAPTION_KEYS = ("txt", "caption", "text")
SHARD_SUFFIXES = (".tar", ".parquet")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True, slots=True)
class TarImage:
    """One image stored in a webdataset tar shard: `size` bytes at byte `offset` of `shard`."""

    shard: str
    key: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True, slots=True)
class ParquetImage:
    """One image stored in a parquet file: row `row` of row group `row_group`, column `column`."""

    shard: str
    key: str
    column: str
    row_group: int
    row: int

    def read(self) -> bytes:
        value = _row_group_images(self.shard, self.column, self.row_group)[self.row]
        if isinstance(value, dict):  # a `datasets` Image column stored as {bytes, path}
            value = value.get("bytes")
        if not value:
            raise MemtrainError(f"{self.shard}, row {self.key}: no image bytes in column `{self.column}`; "
                                "drop the row (img2dataset: keep only status == success)")
        return value


ShardImage = TarImage | ParquetImage


@functools.lru_cache(maxsize=2)
def _row_group_images(shard: str, column: str, row_group: int) -> list:
    """One row group's image column: samples are read shard by shard, so a small cache reads each once."""
    return pq.ParquetFile(shard).read_row_group(row_group, columns=[column]).column(0).to_pylist()


def _expand_braces(pattern: str) -> list[str]:
    """`shard-{000..009}.tar` -> the ten names (numeric ranges keep their zero padding), as webdataset."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for i in range(int(lo), int(hi) + 1) for name in _expand_braces(f"{head}{i:0{width}d}{tail}")]


def shard_files(path: str) -> list[Path] | None:
    """The shards of `path` when it names webdataset tar shards or parquet files (a brace pattern such as
    `data/{00000..00099}.tar`, a glob, one file, or a directory holding .tar or .parquet files and no
    imagefolder metadata or `datasets` save_to_disk files); None for any other source."""
    text = str(path)
    if _BRACE.search(text) or any(c in text for c in "*?["):
        names = sorted({n for p in _expand_braces(text) for n in (glob.glob(p) if any(c in p for c in "*?[") else [p])})
        missing = [n for n in names if not Path(n).is_file()]
        if missing or not names:
            raise MemtrainError(f"data.path {text}: shard {missing[0] if missing else text} does not exist "
                                f"({len(missing) or 1} of {len(names) or 1} missing); fix the pattern or the shard range")
        files = [Path(n) for n in names]
    elif Path(text).is_file() and text.endswith(SHARD_SUFFIXES):
        files = [Path(text)]
    elif Path(text).is_dir():
        root = Path(text)
        if any((root / f).exists() for f in ("metadata.jsonl", "metadata.csv", "dataset_info.json",
                                             "dataset_dict.json", "state.json")):
            return None
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not files:
            return None
    else:
        return None
    kinds = {f.suffix for f in files}
    if not kinds <= set(SHARD_SUFFIXES):
        raise MemtrainError(f"data.path {text}: shards must be .tar or .parquet files, got {sorted(kinds)}")
    if len(kinds) > 1:
        raise MemtrainError(f"data.path {text} mixes .tar and .parquet shards; point it at one kind")
    return files


def _first(keys, present, where: str, what: str, option: str) -> str:
    for key in keys:
        if key in present:
            return key
    raise MemtrainError(f"{where}: no {what} (found {sorted(present)}); set {option} to the one that holds it")


def _tar_samples(shard: Path, caption_column: str, image_column: str) -> tuple[list, list, list]:
    """(images, captions, names) of one tar shard: members grouped by key (the name up to its first dot)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot and not base.startswith("."):
                    samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = member
            images, captions, names = [], [], []
            for key, members in samples.items():
                where = f"{shard}, sample {key}"
                image = _first((image_column, *IMAGE_KEYS), members, where, "image member", "data.image_column")
                if caption_column in members or any(k in members for k in CAPTION_KEYS):
                    text_key = _first((caption_column, *CAPTION_KEYS), members, where, "caption", "data.caption_column")
                    caption = tar.extractfile(members[text_key]).read().decode("utf-8").strip()
                elif "json" in members:
                    info = json.loads(tar.extractfile(members["json"]).read())
                    caption = info.get(caption_column, info.get("caption")) if isinstance(info, dict) else None
                    if caption is None:
                        raise MemtrainError(f"{where}: no `{caption_column}` or `caption` in {key}.json and no .txt "
                                            "member; set data.caption_column")
                else:
                    raise MemtrainError(f"{where}: no caption (.txt or .json member; found {sorted(members)}); "
                                        "set data.caption_column")
                info = members[image]
                images.append(TarImage(str(shard), key, info.offset_data, info.size))
                captions.append(caption)
                names.append(where)
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemtrainError(f"{shard}: cannot read the tar shard ({e}); an uncompressed .tar (webdataset) "
                            "is needed") from None
    return images, captions, names


def _parquet_samples(shard: Path, caption_column: str, image_column: str) -> tuple[list, list, list]:
    """(images, captions, names) of one parquet file: only its caption (and key) columns are read."""
    try:
        file = pq.ParquetFile(shard)
    except (OSError, ValueError) as e:
        raise MemtrainError(f"{shard}: cannot read the parquet file ({e})") from None
    columns = set(file.schema_arrow.names)
    where = str(shard)
    image = _first((image_column, *IMAGE_KEYS), columns, where, "image column", "data.image_column")
    caption = _first((caption_column, *CAPTION_KEYS), columns, where, "caption column", "data.caption_column")
    read = [caption] + (["key"] if "key" in columns else [])
    table = file.read(columns=read)
    captions = table.column(caption).to_pylist()
    keys = [str(k) for k in table.column("key").to_pylist()] if "key" in columns else None
    images, names, row = [], [], 0
    for group in range(file.num_row_groups):
        for i in range(file.metadata.row_group(group).num_rows):
            key = keys[row] if keys else str(row)
            images.append(ParquetImage(str(shard), key, image, group, i))
            names.append(f"{shard}, row {row}" + (f" (key {key})" if keys else ""))
            row += 1
    return images, captions, names


def read_shards(files: list[Path], caption_column: str = "text", image_column: str = "image",
                max_samples: int | None = None, progress: bool = True) -> tuple[list, list, list[str]]:
    """(image references, raw captions, names) of every sample of the shards, in shard order."""
    read = _tar_samples if files[0].suffix == ".tar" else _parquet_samples
    images, captions, names = [], [], []
    for shard in tqdm(files, desc="read shards", unit="shard", disable=not progress or len(files) < 8, leave=False):
        i, c, n = read(shard, caption_column, image_column)
        images += i
        captions += c
        names += n
        if max_samples and len(images) >= max_samples:
            break
    if max_samples:
        images, captions, names = images[:max_samples], captions[:max_samples], names[:max_samples]
    return images, captions, names
