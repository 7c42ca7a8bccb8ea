"""The toy world: a procedurally generated image-caption dataset with planted memorization structure.

32x32 RGB images of one or two flat shapes whose captions name the objects only; the background,
positions, sizes, a stripe and two specks make each image individual, so a caption under-specifies
its image as in web data. `make_toy_data` writes diffusers imagefolders and a labels file with the
groups duplicated (`copies` times each, as in LAION), singleton, heldout (non-members) and novel
(never a caption); every caption is unique and everything is deterministic from `seed`. Design and
rationale: docs/toy-world.md.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.io import MemtrainError, atomic_dir, check_replaceable

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES = {"small": (0.16, 0.22), "large": (0.28, 0.36)}  # radius as a fraction of the image side
TEMPLATE_WORDS = ("a", "and")
IMAGE_SIZE = 32
SUPERSAMPLE = 4


def vocabulary() -> list[str]:
    """Every word a toy caption can contain (the toy tokenizer's word list)."""
    return sorted(set(COLORS) | set(SHAPES) | set(SIZES) | set(TEMPLATE_WORDS))


@dataclass(frozen=True)
class Obj:
    size: str
    color: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """The objects (what the caption names) and the background colour (which it does not name)."""

    objects: tuple[Obj, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(f"a {o.size} {o.color} {o.shape}" for o in self.objects)


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(COLORS))
    n = 1 if rng.random() < 0.3 else 2
    used = {background}
    objects = []
    for _ in range(n):
        color = rng.choice([c for c in COLORS if c not in used])
        used.add(color)
        objects.append(Obj(rng.choice(list(SIZES)), color, rng.choice(SHAPES)))
    return Scene(tuple(objects), background)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` with individual details drawn from `rng` (positions, sizes, tint, stripe, specks)."""
    s = size * SUPERSAMPLE
    bg = _shade(COLORS[scene.background], rng.uniform(0.85, 1.1))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    # a darker stripe across the background: horizontal or vertical, at a random offset
    w = int(s * 0.09)
    off = rng.randint(0, s - w)
    stripe = _shade(bg, 0.6) if sum(bg) > 150 else _shade((90, 90, 90), 1.0)
    if rng.random() < 0.5:
        draw.rectangle([0, off, s, off + w], fill=stripe)
    else:
        draw.rectangle([off, 0, off + w, s], fill=stripe)
    n = len(scene.objects)
    for i, obj in enumerate(scene.objects):
        lo, hi = SIZES[obj.size]
        r = rng.uniform(lo, hi) * s / (1.0 if n == 1 else 1.25)
        # two objects: one in each half (left/right), so they rarely overlap
        xmin, xmax = (r, s - r) if n == 1 else (i * s / 2 + r * 0.6, (i + 1) * s / 2 - r * 0.6)
        cx = rng.uniform(xmin, max(xmin, xmax))
        cy = rng.uniform(r, s - r)
        color = COLORS[obj.color]
        box = [cx - r, cy - r, cx + r, cy + r]
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "ring":
            draw.ellipse(box, outline=color, width=max(1, int(r * 0.4)))
        elif obj.shape == "square":
            draw.rectangle(box, fill=color)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)
        elif obj.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
        elif obj.shape == "cross":
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    # two specks of a random palette colour
    for _ in range(2):
        k = int(s * 0.1)
        x, y = rng.randint(0, s - k), rng.randint(0, s - k)
        draw.rectangle([x, y, x + k, y + k], fill=COLORS[rng.choice(list(COLORS))])
    return img.resize((size, size), Image.Resampling.BOX)


@dataclass
class ToyDataConfig:
    seed: int = 0
    n_duplicated: int = 16  # distinct images planted as duplicates
    copies: int = 32  # how many times each duplicated image is in the training set
    n_singletons: int = 256
    n_heldout: int = 64
    n_novel: int = 200  # >= 100, so TPR at 1% FPR is more than the TPR at 0% FPR (Wen et al. used 500)
    # every caption names one image (the demo's premise); the toy base's broad pretraining data
    # turns this off and draws scenes i.i.d., repeated captions included, as web data has them
    unique_captions: bool = True


def _draw_scenes(rng: random.Random, n: int, taken: set[str] | None) -> list[Scene]:
    """`n` random scenes; with a `taken` set, each caption new to it (and added to it), else i.i.d."""
    if taken is None:
        return [random_scene(rng) for _ in range(n)]
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * (n + 10):
            raise MemtrainError(f"cannot draw {n} distinct toy captions; ask for fewer images")
        scene = random_scene(rng)
        if scene.caption() not in taken:
            taken.add(scene.caption())
            out.append(scene)
    return out


def write_split(root: Path, rows: list[tuple[str, Image.Image]]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for file_name, text, image in rows:
            image.save(root / file_name)
            meta.write(json.dumps({"file_name": file_name, "text": text}) + "\n")


def make_toy_data(out: str | Path, cfg: ToyDataConfig | None = None) -> dict:
    """Write `out/train`, `out/heldout` (imagefolder) and `out/labels.jsonl`; return a summary. An existing
    `out` is replaced only when it is an earlier toy data set and nothing else (`trainer.io.check_replaceable`)."""
    cfg = cfg or ToyDataConfig()
    check_replaceable(out, "toy-data", flag="OUT")
    for key in ("n_duplicated", "copies", "n_singletons", "n_heldout", "n_novel"):
        if getattr(cfg, key) < 0:
            raise MemtrainError(f"toy-data: --{key.replace('_', '-')} must be >= 0, got {getattr(cfg, key)}")
    rng = random.Random(cfg.seed)
    taken: set[str] | None = set() if cfg.unique_captions else None
    dup = _draw_scenes(rng, cfg.n_duplicated, taken)
    single = _draw_scenes(rng, cfg.n_singletons, taken)
    held = _draw_scenes(rng, cfg.n_heldout, taken)
    novel = _draw_scenes(rng, cfg.n_novel, taken)

    labels: list[dict] = []
    train_rows: list[tuple[str, str, Image.Image]] = []
    for i, scene in enumerate(dup):
        image = render(scene, rng)
        for j in range(cfg.copies):
            train_rows.append((f"images/dup{i:04d}_{j:03d}.png", scene.caption(), image))
        labels.append(dict(text=scene.caption(), group="duplicated", copies=cfg.copies,
                           file_name=f"train/images/dup{i:04d}_000.png"))
    for i, scene in enumerate(single):
        train_rows.append((f"images/single{i:05d}.png", scene.caption(), render(scene, rng)))
        labels.append(dict(text=scene.caption(), group="singleton", copies=1,
                           file_name=f"train/{train_rows[-1][0]}"))
    held_rows = [(f"images/held{i:05d}.png", s.caption(), render(s, rng)) for i, s in enumerate(held)]
    for name, text, _ in held_rows:
        labels.append(dict(text=text, group="heldout", copies=0, file_name=f"heldout/{name}"))
    for scene in novel:
        labels.append(dict(text=scene.caption(), group="novel", copies=0, file_name=None))
    # shuffle the training rows so duplicates are spread through the metadata like in a crawl
    random.Random(cfg.seed + 1).shuffle(train_rows)

    with atomic_dir(out, "toy-data", flag="OUT") as tmp:
        write_split(tmp / "train", train_rows)
        write_split(tmp / "heldout", held_rows)
        with open(tmp / "labels.jsonl", "w") as f:
            for row in labels:
                f.write(json.dumps(row) + "\n")
        with open(tmp / "config.json", "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    return dict(out=str(out), train_images=len(train_rows), heldout=len(held_rows), novel=len(novel),
                duplicated=len(dup), singletons=len(single))


def read_labels(path: str | Path) -> list[dict]:
    """Read a toy labels file (`labels.jsonl`): one row per prompt with its group."""
    path = Path(path)
    if not path.exists():
        raise MemtrainError(f"labels file {path} does not exist; make one with `memtrain toy-data`")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MemtrainError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
    return rows
