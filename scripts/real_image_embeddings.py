"""Embeddings of real photos for the index and dedup benchmarks (`bench_index.py --vectors`, `bench_dedup.py
--vectors`), made on this machine without downloading anything.

The only real photos on disk are scikit-learn's sample images (china.jpg, flower.jpg) and matplotlib's
sample_data/grace_hopper.jpg. From them: N random crops (a RandomResizedCrop as torchvision's: 8%-100% of the
area, aspect 3/4-4/3), each flipped with probability 1/2 and jittered in brightness and contrast (+-20%), resized
to --side pixels (antialiased bilinear), then embedded with the project's embedders (`pixels`, `gradients`;
CLIP and SSCD weights are not on this machine). Overlapping crops of the same photo are the near-duplicates a
scraped set holds. This is NOT LAION and NOT CLIP: three photos, so the vectors are far more clustered than a
real set's, and the embedders are the toy-scale ones.

    OMP_NUM_THREADS=1 python scripts/real_image_embeddings.py --n 100000 --kind pixels --out /tmp/real-pixels.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.measure.embedders import make_embedder  # noqa: E402


def photos() -> dict[str, torch.Tensor]:
    """The real photos on disk: {name: [3, H, W] float in [0, 1]}."""
    found = load_sample_images()
    images = {Path(f).name: img for f, img in zip(found.filenames, found.images, strict=True)}
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    images[hopper.name] = np.asarray(Image.open(hopper).convert("RGB"))
    return {k: torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1).float() / 255 for k, v in images.items()}


def random_crop(photo: torch.Tensor, side: int, rng: np.random.Generator) -> torch.Tensor:
    """One augmented view of `photo`: RandomResizedCrop(side, scale=(0.08, 1), ratio=(3/4, 4/3)), flip, jitter."""
    _, h, w = photo.shape
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(h, w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[:, y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop.flip(2)
    crop = F.interpolate(crop[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = crop.mean()
    crop = (crop - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
    return crop.clamp(0, 1)


def embed_crops(n: int, kind: str, side: int, seed: int, batch: int = 512) -> tuple[torch.Tensor, dict]:
    images = photos()
    names = list(images)
    embedder = make_embedder(kind)
    rng = np.random.default_rng(seed)
    out = torch.empty(n, embedder.dim, dtype=torch.float16)
    for s in tqdm(range(0, n, batch), desc=f"crops ({kind})", unit="batch"):
        views = [random_crop(images[names[rng.integers(len(names))]], side, rng) for _ in range(min(batch, n - s))]
        with torch.no_grad():
            out[s:s + len(views)] = embedder(torch.stack(views)).half()
    return out, {"photos": ",".join(names), "kind": kind, "side": str(side), "seed": str(seed), "n": str(n)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--kind", choices=("pixels", "gradients"), default="pixels")
    ap.add_argument("--side", type=int, default=64, help="crop side in pixels before embedding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="safetensors file to write ({'embeddings': [n, d] float16})")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    emb, meta = embed_crops(args.n, args.kind, args.side, args.seed)
    meta["embed_seconds"] = f"{time.perf_counter() - t0:.1f}"
    save_file({"embeddings": emb}, args.out, metadata=meta)
    print(f"{args.out}: {list(emb.shape)} {args.kind} embeddings of {args.n} crops of {meta['photos']} "
          f"in {meta['embed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
