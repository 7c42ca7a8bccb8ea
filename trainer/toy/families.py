"""The families world: a second toy world whose training images come in related families.

A dozen procedural "photos" (gradients, a value-noise texture, stripes, soft-edged objects, each
scene with its own colour palette in continuous HSV, unlike the shape world's 8 flat colours) are cut
into 32x32 crops and zoomed views. Each family's crops overlap, so every image has close relatives:
the situation of product photos, art series or LAION near-duplicates, in which the NN1/NN2 ratio of
Gu et al. (2023) is no longer small for a copy. Planted structure as in `world.make_toy_data`:
duplicated crops at Zipf-like counts (`max_copies / rank`, at least `min_copies`), singletons,
held-out crops of the same scenes (related to training crops, never trained: the hard null) and
novel prompts. Captions use the toy vocabulary (the toy base's tokenizer): the first phrase names
the family, the next two the crop, three phrases so no caption parses as a shape-world caption.
Design: docs/toy-world.md, "The families world".
"""

from __future__ import annotations

import colorsys
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.io import MemtrainError, atomic_dir
from trainer.toy.world import COLORS, IMAGE_SIZE, SHAPES, SIZES, write_split

SCENE_SUPERSAMPLE = 4
MIN_SCENE_STD = 0.15  # pixel standard deviation of a scene in [0, 1]; flatter scenes are drawn again


@dataclass
class FamiliesConfig:
    seed: int = 0
    n_families: int = 12  # scenes ("photos"), one colour palette each
    scene_size: int = 80  # side of a scene in pixels; crops are 32-44 px of it, so crops of one scene overlap
    n_duplicated: int = 16  # distinct crops planted as duplicates
    max_copies: int = 64  # copies of the most duplicated crop; the k-th has max_copies / k (Zipf)
    min_copies: int = 4
    n_singletons: int = 256
    n_heldout: int = 64  # crops of the same scenes, never trained on
    n_novel: int = 200
    min_offset: int = 4  # two crops of one scene differ by >= this many px in position or side: related, not copies


def zipf_copies(cfg: FamiliesConfig) -> list[int]:
    """Copies of each duplicated crop: round(max_copies / rank), at least min_copies."""
    return [max(cfg.min_copies, round(cfg.max_copies / k)) for k in range(1, cfg.n_duplicated + 1)]


def _palette(rng: np.random.Generator, n: int = 5) -> np.ndarray:
    """`n` RGB colours in [0, 1] around one base hue (analogous and one complementary accent)."""
    hue = rng.uniform()
    offsets = [0.0, 0.06, -0.07, 0.5, rng.uniform(0.15, 0.35)][:n]
    out = []
    for i, off in enumerate(offsets):
        sat = rng.uniform(0.35, 0.9) if i != 3 else rng.uniform(0.5, 1.0)
        val = rng.uniform(0.25, 0.95)
        out.append(colorsys.hsv_to_rgb((hue + off) % 1.0, sat, val))
    return np.array(out, dtype=np.float32)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: a `cells` x `cells` grid of random values, bicubically upsampled."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img), -1, 1)


def render_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """One procedural photo [size, size, 3] in [0, 1]: gradient, texture, stripes and objects in one palette."""
    s = size * SCENE_SUPERSAMPLE
    pal = _palette(rng)
    # background: a linear gradient between two palette colours at a random angle
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * 1.2 + 0.5, 0, 1)[..., None]
    a, b = rng.choice(len(pal), 2, replace=False)
    base = (1 - t) * pal[a] + t * pal[b]
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # objects: ellipses, rectangles and polygons in palette colours, some large, most mid-sized
    for _ in range(int(rng.integers(10, 16))):
        color = tuple(int(c * 255) for c in pal[rng.integers(len(pal))] * rng.uniform(0.8, 1.15))
        r = rng.uniform(0.04, 0.2) * s
        cx, cy = rng.uniform(0, s, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r * rng.uniform(0.5, 1)], fill=color)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1), cx + r * rng.uniform(0.3, 1), cy + r], fill=color)
        else:
            k = int(rng.integers(3, 7))
            phi = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, k, endpoint=False)
            rad = r * rng.uniform(0.6, 1.2, k)
            draw.polygon([(cx + q * np.cos(p), cy + q * np.sin(p)) for p, q in zip(phi, rad, strict=True)], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=SCENE_SUPERSAMPLE * 0.6))  # soft edges, as in a photo
    out = np.asarray(img, dtype=np.float32) / 255
    # texture: multiplicative value noise at two scales, and faint stripes at a random frequency and angle
    tex = 0.12 * _value_noise(rng, s, int(rng.integers(4, 8))) + 0.1 * _value_noise(rng, s, int(rng.integers(16, 28)))
    beta = rng.uniform(0, np.pi)
    freq = rng.uniform(6, 14)
    stripes = 0.05 * np.sin(2 * np.pi * freq * (np.cos(beta) * xx + np.sin(beta) * yy))
    out = np.clip(out * (1 + tex + stripes)[..., None], 0, 1)
    small = Image.fromarray((out * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def _contrasted_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A scene with pixel standard deviation >= MIN_SCENE_STD: a flat, dark scene would make its crops
    near-identical whatever their offset, and held-out crops copies rather than relatives."""
    for _ in range(100):
        scene = render_scene(rng, size)
        if scene.std() >= MIN_SCENE_STD:
            return scene
    raise MemtrainError(f"toy-data: no scene with contrast >= {MIN_SCENE_STD} in 100 draws; try another --seed")


def crop(scene: np.ndarray, rng: random.Random, taken: list[tuple[int, int, int]],
         min_offset: int) -> Image.Image:
    """A view of `scene`: a square of side 32-44 px at a random position, resized to 32 x 32, whose
    position or side differs by at least `min_offset` px from every box in `taken` (then added to it)."""
    size = scene.shape[0]
    for _ in range(10_000):
        side = rng.randint(IMAGE_SIZE, min(size, IMAGE_SIZE * 11 // 8))
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        if all(max(abs(x - a), abs(y - b), abs(side - c)) >= min_offset for a, b, c in taken):
            break
    else:
        raise MemtrainError(f"toy-data: cannot cut {len(taken) + 1} crops {min_offset} px apart from one "
                            f"{size} px scene; ask for fewer images, more families or a larger --scene-size")
    taken.append((x, y, side))
    img = Image.fromarray((scene[y:y + side, x:x + side] * 255).round().astype(np.uint8))
    if side != IMAGE_SIZE:
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return img


def _phrases() -> list[str]:
    return [f"a {size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES]


def make_families_data(out: str | Path, cfg: FamiliesConfig | None = None) -> dict:
    """Write `out/train`, `out/heldout` (imagefolders), `out/scenes`, `out/labels.jsonl`; return a summary.

    labels.jsonl has the shape world's schema (text, group, copies, file_name) plus `member`
    (1 trained, 0 held out) and `family` (the scene a crop is cut from; the family a novel prompt names).
    """
    cfg = cfg or FamiliesConfig()
    for key in ("n_families", "n_duplicated", "n_singletons", "n_heldout", "n_novel", "min_copies"):
        if getattr(cfg, key) < (1 if key == "n_families" else 0):
            raise MemtrainError(f"toy-data: --{key.replace('_', '-')} must be >= {int(key == 'n_families')}, "
                                f"got {getattr(cfg, key)}")
    if cfg.scene_size < IMAGE_SIZE * 11 // 8:
        raise MemtrainError(f"toy-data: --scene-size must be >= {IMAGE_SIZE * 11 // 8} (the largest view), "
                            f"got {cfg.scene_size}")
    phrases = _phrases()
    per_family = cfg.n_duplicated + cfg.n_singletons + cfg.n_heldout + cfg.n_novel
    if cfg.n_families > len(phrases) or per_family > cfg.n_families * len(phrases) ** 2 // 2:
        raise MemtrainError(f"toy-data: cannot name {per_family} images in {cfg.n_families} families "
                            "with distinct captions; ask for fewer")
    nrng = np.random.default_rng(cfg.seed)
    rng = random.Random(cfg.seed)
    scenes = [_contrasted_scene(nrng, cfg.scene_size) for _ in range(cfg.n_families)]
    family_phrase = rng.sample(phrases, cfg.n_families)
    taken: set[str] = set()
    boxes: list[list[tuple[int, int, int]]] = [[] for _ in scenes]

    def caption(family: int) -> str:
        while True:
            text = " and ".join([family_phrase[family], *rng.sample(phrases, 2)])
            if text not in taken:
                taken.add(text)
                return text

    labels: list[dict] = []
    train_rows: list[tuple[str, str, Image.Image]] = []
    for i, copies in enumerate(zipf_copies(cfg)):
        fam = i % cfg.n_families
        image = crop(scenes[fam], rng, boxes[fam], cfg.min_offset)
        text = caption(fam)
        for j in range(copies):
            train_rows.append((f"images/dup{i:04d}_{j:03d}.png", text, image))
        labels.append(dict(text=text, group="duplicated", copies=copies, file_name=f"train/images/dup{i:04d}_000.png",
                           member=1, family=fam))
    for i in range(cfg.n_singletons):
        fam = i % cfg.n_families
        text = caption(fam)
        train_rows.append((f"images/single{i:05d}.png", text, crop(scenes[fam], rng, boxes[fam], cfg.min_offset)))
        labels.append(dict(text=text, group="singleton", copies=1, file_name=f"train/{train_rows[-1][0]}",
                           member=1, family=fam))
    held_rows = []
    for i in range(cfg.n_heldout):
        fam = i % cfg.n_families
        held_rows.append((f"images/held{i:05d}.png", caption(fam), crop(scenes[fam], rng, boxes[fam], cfg.min_offset)))
        labels.append(dict(text=held_rows[-1][1], group="heldout", copies=0, file_name=f"heldout/{held_rows[-1][0]}",
                           member=0, family=fam))
    for i in range(cfg.n_novel):
        labels.append(dict(text=caption(i % cfg.n_families), group="novel", copies=0, file_name=None,
                           family=i % cfg.n_families))
    random.Random(cfg.seed + 1).shuffle(train_rows)  # duplicates spread through the metadata, as in a crawl

    with atomic_dir(out) as tmp:
        write_split(tmp / "train", train_rows)
        write_split(tmp / "heldout", held_rows)
        (tmp / "scenes").mkdir()
        for k, scene in enumerate(scenes):
            Image.fromarray((scene * 255).round().astype(np.uint8)).save(tmp / "scenes" / f"scene{k:02d}.png")
        with open(tmp / "labels.jsonl", "w") as f:
            for row in labels:
                f.write(json.dumps(row) + "\n")
        with open(tmp / "config.json", "w") as f:
            json.dump(dict(asdict(cfg), world="families"), f, indent=2)
    return dict(out=str(out), world="families", train_images=len(train_rows), heldout=len(held_rows),
                novel=cfg.n_novel, duplicated=cfg.n_duplicated, singletons=cfg.n_singletons,
                families=cfg.n_families, copies=zipf_copies(cfg))
