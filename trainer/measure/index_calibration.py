"""The copy threshold of a training-image index calibrated on held-out images (`memtrain index DATA
--heldout DIR [--fpr 0.01] [--vae PIPE]`), for `evaluate --index` replication and the AMG trigger
(Chen et al., CVPR 2024) of embedders without a published schedule (pixels, CLIP).

The null is each held-out image's top-1 cosine similarity to the index (images never trained on, so
their nearest training image is not a copy); the threshold flags at most `fpr` of them
(`trainer.measure.calibration.calibrate`). With `--vae PIPE` the held-out images go through the model's
VAE (encode to the posterior mean and decode), as a generation comes out of its decoder, and so do the
index's training images (the copy verdict's references); the positives are then the training images as
stored, a lower bound on a decoded copy's similarity. Without `--vae` the recall is not measured: a
training image against its own row scores 1 by construction, and against its nearest other row it
measures near-duplicates in the data, not copies.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL

from trainer.data import load_images, load_rows
from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR, calibrate
from trainer.measure.embedders import ImageEmbedder
from trainer.measure.index import TrainingIndex
from trainer.measure.replication import vae_roundtrip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_POSITIVES = 1024  # training images sent through the VAE for the recall (evenly spaced rows): a cost bound


def image_sources(path: str | Path, flag: str) -> tuple[list, list[str]]:
    """(sources, names) of an imagefolder (metadata.jsonl/csv) or of every image file under a directory."""
    root = Path(path)
    if not root.is_dir():
        raise MemtrainError(f"{flag} {path}: not a directory of images")
    if (root / "metadata.jsonl").exists() or (root / "metadata.csv").exists():
        rows = load_rows(str(root))
        return list(rows.images), list(rows.names)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MemtrainError(f"{flag} {path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl")
    return files, [p.relative_to(root).as_posix() for p in files]


def load_vae(path: str | Path, device) -> AutoencoderKL:
    folder = Path(path) / "vae"
    if not (folder / "config.json").is_file():
        raise MemtrainError(f"--vae {path}: no vae/config.json; give the diffusers pipeline directory of the model")
    return AutoencoderKL.from_pretrained(str(folder)).to(device or "cpu").eval()


@torch.no_grad()
def _embed(embedder: ImageEmbedder, images: torch.Tensor, vae, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if vae is not None:
            x = vae_roundtrip(SimpleNamespace(vae=vae), x, batch_size)
        out.append(embedder(x).float().cpu())
    return torch.cat(out)


def calibrate_index(index: TrainingIndex, heldout: str | Path, embedder: ImageEmbedder, fpr: float = DEFAULT_FPR,
                    vae: str | Path | None = None, batch_size: int = 64, progress: bool = True,
                    device=None, autoencoder: AutoencoderKL | None = None) -> TrainingIndex:
    """Set `index.calibration` (module docstring) and return the index; `autoencoder`: the VAE of `vae`
    when the caller has loaded it already."""
    sources, names = image_sources(heldout, "--heldout")
    if autoencoder is None and vae is not None:
        autoencoder = load_vae(vae, device)
    held = _embed(embedder, load_images(sources, names, index.resolution, "held-out images", progress),
                  autoencoder, batch_size)
    null = index.search(held, k=1)[0][:, 0].double().numpy()
    metric = f"top-1 cosine similarity ({index.embedding} index)"
    positives, positive_name = None, "training images (recall not measured: pass --vae PIPE)"
    if autoencoder is not None:
        rows = load_rows(index.meta["data"])
        picks = np.unique(np.linspace(0, len(rows.images) - 1, min(MAX_POSITIVES, len(rows.images))).round()
                          .astype(int))
        train = load_images([rows.images[i] for i in picks], [rows.names[i] for i in picks], index.resolution,
                            "training images", progress)
        stored = index.meta.get("references", "as stored") != "as stored"  # the index went through the VAE
        positives = index.search(_embed(embedder, train, None if stored else autoencoder, batch_size),
                                 k=1)[0][:, 0].double().numpy()
        positive_name = ("training images as stored (a lower bound on a decoded copy's)" if stored
                         else "training images through the model's VAE")
    copy = calibrate(null, metric, True, fpr, positives, positive_name)
    mean_held = torch.nn.functional.normalize(held, dim=1).double().mean(0)
    null_similarity = float(mean_held @ index.embeddings.double().mean(0))
    index.calibration = {"copy": copy.to_dict(), "null_similarity": null_similarity, "heldout": str(heldout),
                         "vae": str(vae) if vae else None, "heldout_median": float(np.median(null))}
    return index
