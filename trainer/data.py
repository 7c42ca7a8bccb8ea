"""Training data: image-caption rows from an imagefolder directory, webdataset tar shards or parquet files
(`trainer.data_shards`) or a `datasets` dataset, the per-sample transforms, and a deterministic epoch sampler.

Every random choice for a sample (crop, flip, which caption, caption randomization) comes from
an RNG seeded by (seed, epoch, index), and the epoch order from (seed, epoch): a run is the same
whatever the number of processes, and a resumed run is the same as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from trainer.data_shards import ShardImage, read_shards, shard_files
from trainer.io import MemtrainError, read_jsonl_objects
from trainer.prompts import PromptRow


@dataclass
class Rows:
    """Image sources (paths or PIL images) and caption lists, plus where they came from."""

    images: list
    captions: list[list[str]]
    source: str
    names: list[str]  # per row, what an error message should name (file name or row index)


def _read_metadata(root: Path) -> tuple[Path, list[dict]]:
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.exists():
        return jsonl, read_jsonl_objects(jsonl)
    if csv_path.exists():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of a name
            rows = [dict(r, _line=i) for i, r in enumerate(csv.DictReader(f), 2)]
        return csv_path, rows
    raise MemtrainError(f"{root} has no metadata.jsonl or metadata.csv (diffusers imagefolder format)")


def _caption_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise MemtrainError(f"{where}: the caption must be a string or a non-empty list of strings, got {value!r}")
    if not all(v.strip() for v in value):
        raise MemtrainError(f"{where}: empty caption; fill it in or drop the row")
    return list(value)


def load_rows(path: str, caption_column: str = "text", image_column: str = "image", split: str = "train",
              max_samples: int | None = None) -> Rows:
    """Read image-caption rows.

    A local directory with `metadata.jsonl`/`metadata.csv` is read as a diffusers imagefolder
    (`file_name` + caption column) by this function, so errors name the exact line; any other
    local directory is `datasets.load_from_disk`, and a name is `datasets.load_dataset(name)`. Webdataset
    tar shards and parquet files with image bytes (a brace pattern, a glob, a file or a directory of them)
    are read by `data_shards`: images stay in their shards until opened.
    """
    shards = shard_files(path)
    if shards is not None:
        images, raw, names = read_shards(shards, caption_column, image_column, max_samples)
        if not images:
            raise MemtrainError(f"data.path {path}: the shards hold no samples")
        return Rows(images, [_caption_list(c, n) for c, n in zip(raw, names, strict=True)], str(path), names)
    root = Path(path)
    if root.is_dir() and ((root / "metadata.jsonl").exists() or (root / "metadata.csv").exists()):
        meta, rows = _read_metadata(root)
        if max_samples:
            rows = rows[:max_samples]
        if not rows:
            raise MemtrainError(f"{meta} has no rows")
        images, captions, names = [], [], []
        for row in rows:
            where = f"{meta}, line {row['_line']}"
            if "file_name" not in row:
                raise MemtrainError(f"{where}: no `file_name` field")
            if caption_column not in row:
                columns = sorted(k for k in row if k != "_line")
                raise MemtrainError(f"{where}: no caption column `{caption_column}` (columns: {columns}); "
                                    "set data.caption_column")
            if not isinstance(row["file_name"], str) or not row["file_name"].strip():
                raise MemtrainError(f"{where}: `file_name` must be a path string, got {row['file_name']!r}")
            file = root / row["file_name"]
            if root.resolve() not in file.resolve().parents:
                raise MemtrainError(f"{where}: `file_name` {row['file_name']!r} points outside the dataset "
                                    f"directory {root}; file names are relative to it")
            images.append(file)
            captions.append(_caption_list(row[caption_column], where))
            names.append(f"{where} ({row['file_name']})")
        return Rows(images, captions, str(meta), names)

    try:
        if root.is_dir():
            ds = datasets.load_from_disk(str(root))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise MemtrainError(f"cannot load dataset {path!r} (split {split!r}): {e}") from None
    for column, key in ((caption_column, "caption_column"), (image_column, "image_column")):
        if column not in ds.column_names:
            raise MemtrainError(f"dataset {path!r} has no column `{column}` (columns: {ds.column_names}); "
                                f"set data.{key}")
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    names = [f"{path}, row {i}" for i in range(len(ds))]
    captions = [_caption_list(c, names[i]) for i, c in enumerate(ds[caption_column])]
    return Rows(list(ds[image_column]), captions, path, names)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grayscale (PIL modes I;16* and I, as PNG stores them) is scaled to 8 bits first:
    PIL's own convert("RGB") clips those values at 255, so any 16-bit image would turn (nearly) white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


CHECK_SAMPLE = 1000  # check_images decodes every image of a set this small, a sample of a larger one
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def decode_error(name: str, error: Exception) -> MemtrainError:
    if isinstance(error, Image.DecompressionBombError):
        return MemtrainError(f"{name}: image is too large to decode safely ({error}); resize it to at most "
                             f"{Image.MAX_IMAGE_PIXELS} pixels or remove it")
    return MemtrainError(f"{name}: image cannot be decoded ({error}); replace or remove it")


def open_image(source, name: str) -> Image.Image:
    """The image of a row (a path, PIL image or `datasets` image dict) as 8-bit RGB (`to_rgb`)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, dict) and "path" in source:  # datasets Image(decode=False)
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    try:
        if isinstance(source, ShardImage):
            source = io.BytesIO(source.read())
        with Image.open(source) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise MemtrainError(f"{name}: image file is missing") from None
    except DECODE_ERRORS as e:
        raise decode_error(name, e) from None


def check_images(rows: Rows, sample: int = CHECK_SAMPLE, seed: int = 0) -> None:
    """Fail at start-up, naming the file, on a missing, corrupt or oversized image. A set of at most `sample`
    images is decoded whole (PIL verify); a larger one costs one stat per image file (each must exist) and
    decodes `sample` rows drawn with `seed`; any other bad image fails, named, when it is read (`open_image`)."""
    n = len(rows.images)
    if n > sample:
        for source, name in zip(rows.images, rows.names, strict=True):
            if isinstance(source, str | Path) and not os.path.exists(source):
                raise MemtrainError(f"{name}: image file is missing")
    picked = range(n) if n <= sample else sorted(random.Random(f"check/{seed}").sample(range(n), sample))
    for i in picked:
        source, name = rows.images[i], rows.names[i]
        if isinstance(source, Image.Image):
            continue
        try:
            with Image.open(io.BytesIO(source.read()) if isinstance(source, ShardImage) else source) as im:
                im.verify()
        except FileNotFoundError:
            raise MemtrainError(f"{name}: image file is missing") from None
        except DECODE_ERRORS as e:
            raise decode_error(name, e) from None


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"memtrain/{seed}/{epoch}/{index}")


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """`image` with its short side resized to `resolution` (bilinear); unchanged when already square at it."""
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BILINEAR)
    return image


def crop_and_flip(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                  rng: random.Random) -> tuple[Image.Image, tuple[int, int, bool]]:
    """The crop (center or random) of a resized image, maybe flipped; and the view (left, top, flipped)."""
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, (left, top, flipped)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> [-1, 1] CHW float32."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, crop (center or random), maybe flip; to [-1, 1] CHW."""
    image, _ = crop_and_flip(resize_short_side(image, resolution), resolution, center_crop, random_flip, rng)
    return pil_to_tensor(image)


class CaptionImageDataset(torch.utils.data.Dataset):
    """Rows -> {pixel_values, caption, index, view}; the epoch is set by the training loop. With `cache`, each
    image is decoded and resized once (kept in memory as 8-bit RGB); `view` = (index, left, top, flipped) names
    the crop a sample took, the key of the loop's VAE posterior cache (`data.cache`)."""

    def __init__(self, rows: Rows, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 seed: int = 0, caption_fn: Callable[[list[str], random.Random], str] | None = None,
                 cache: bool = False):
        self.rows, self.resolution = rows, resolution
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.caption_fn = caption_fn or (lambda captions, rng: captions[0])
        self.epoch = 0
        self.resized = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows.images)

    def resized_image(self, index: int) -> Image.Image:
        if self.resized is not None and index in self.resized:
            return self.resized[index]
        image = resize_short_side(open_image(self.rows.images[index], self.rows.names[index]), self.resolution)
        if self.resized is not None:
            self.resized[index] = image
        return image

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.epoch, index)
        image, view = crop_and_flip(self.resized_image(index), self.resolution, self.center_crop, self.random_flip,
                                    rng)
        return {"pixel_values": pil_to_tensor(image), "caption": self.caption_fn(self.rows.captions[index], rng),
                "index": index, "view": (index, *view)}


def shard_ids(rows: Rows) -> torch.Tensor | None:
    """[N] the shard of each row (numbered in order of first appearance), or None when no row lives in a shard."""
    if not rows.images or not isinstance(rows.images[0], ShardImage):
        return None
    numbers: dict[str, int] = {}
    return torch.tensor([numbers.setdefault(s.shard, len(numbers)) for s in rows.images])


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation of the dataset drawn from (seed, epoch); with `weights`, a weighted draw with
    replacement of the same length (used by the `reweight` de-duplication policy). With `shards` (the
    shard of each row, `shard_ids`), the draw is then ordered shard by shard, the shards in an order drawn
    from (seed, epoch): a sharded set is read one shard at a time, each sample of an epoch still drawn once."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, shards: torch.Tensor | None = None):
        self.n, self.seed, self.weights, self.shards, self.epoch = n, seed, weights, shards, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        if self.shards is not None:
            rank = torch.randperm(int(self.shards.max()) + 1, generator=g)
            order = order[torch.sort(rank[self.shards[order]], stable=True).indices]
        return iter(order.tolist())


def make_collate(tokenizer) -> Callable[[list[dict]], dict]:
    def collate(examples: list[dict]) -> dict:
        captions = [e["caption"] for e in examples]
        ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": ids,
            "index": torch.tensor([e["index"] for e in examples]),
            "views": [e["view"] for e in examples],
            "captions": captions,
        }

    return collate


def load_images(paths: Sequence, names: Sequence[str], resolution: int, desc: str = "load images",
                progress: bool = True) -> torch.Tensor:
    """Images [N, 3, r, r] in [0, 1]: short side resized to `resolution`, center crop (as training)."""
    out = [image_to_tensor(open_image(p, n), resolution, True, False, random.Random(0))
           for p, n in tqdm(list(zip(paths, names, strict=True)), desc=desc, disable=not progress, leave=False)]
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return ((torch.stack(out) + 1) / 2).clamp(0, 1)


def find_training_images(train_data: str | None, data: Path, rows: Sequence[PromptRow]) -> tuple[list, list[str], str] | None:
    """(paths, names, description) of the training images replication is measured against: the rows of
    `train_data` (any `load_rows` source), else the images of the member rows of the prompt file."""
    if train_data is not None:
        try:
            found = load_rows(str(train_data))
        except OSError as e:  # e.g. not a local path, and the Hub is unreachable or offline
            raise MemtrainError(f"--train-data {train_data}: cannot load the training set ({e})") from None
        return list(found.images), list(found.names), f"{found.source} ({len(found.images)} rows)"
    member_files = {}
    for r in rows:
        if r.file_name and (r.member == 1 or r.label == 1):
            member_files.setdefault(data / r.file_name, f"line {r.line} ({r.file_name})")
    if member_files:
        return list(member_files), list(member_files.values()), f"the {len(member_files)} member images of the prompt file"
    return None
