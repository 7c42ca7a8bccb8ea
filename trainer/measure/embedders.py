"""Differentiable image embedders (pixels, gradients, CLIP, SSCD): torch functions of the pixels, so generation-time
guidance (AMG: Chen et al., CVPR 2024, "Towards memorization-free diffusion models") can take the
gradient of a similarity to the training images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.io import MemtrainError
from trainer.measure.features import (
    FLAT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_SIDE,
    SSCD_SIZE,
    load_clip,
    load_sscd,
)
from trainer.measure.replication import image_gradients

INDEX_EMBEDDINGS = ("pixels", "gradients", "clip", "sscd")  # the differentiable embeddings an index can be built with
GRADIENT_SIDE = 16  # the thumbnail whose gradients the `gradients` embedding holds: 6 * 15 * 15 = 1350 values


@dataclass
class ImageEmbedder:
    """One embedding kind as a differentiable function: images [N, 3, H, W] in [0, 1] -> [N, dim]
    float32 rows of unit norm. Model weights are frozen; gradients flow to the images."""

    kind: str
    dim: int
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    device: torch.device | None = None  # None: run where the images are (pixels)
    path: str | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MemtrainError(
                f"{self.kind} embedder: images must be [N, 3, H, W] in [0, 1], got {list(images.shape)}"
            )
        if self.device is not None:
            images = images.to(self.device)
        if images.shape[0] == 0:
            return images.new_zeros((0, self.dim), dtype=torch.float32)
        out = self.fn(images).float().reshape(images.shape[0], -1)
        return F.normalize(out, dim=1)


def _box_weights(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """[n_out, n_in] rows of PIL's BOX resampling coefficients (Resample.c: for a downscale, the input
    pixels whose centres fall in the output cell (a, b], equally weighted; for an upscale, nearest)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    x = torch.arange(n_in, dtype=torch.float64) + 0.5
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    t = (x[None] - centre[:, None]) / support
    w = ((t > -0.5) & (t <= 0.5)).double()
    return (w / w.sum(1, keepdim=True)).to(device=device, dtype=dtype)


def pixel_descriptor(images: torch.Tensor, side: int = PIXEL_SIDE) -> torch.Tensor:
    """trainer.measure.features.pixel_embedding as a torch function of [N, 3, H, W] images in [0, 1]: [N, 3 side^2 + 6]."""
    x = images.float()
    n, _, h, w = x.shape
    thumb = torch.einsum(
        "ih,nchw,jw->nijc",
        _box_weights(h, side, x.device, x.dtype),
        x,
        _box_weights(w, side, x.device, x.dtype),
    ).reshape(n, side * side, 3)  # row-major (y, x, channel), as numpy's HWC thumbnail
    rgb = thumb.mean(dim=1)
    centred = (thumb - rgb[:, None]).reshape(n, -1)
    flat = centred.std(dim=1, unbiased=False) < FLAT_STD
    zeros_pattern, zeros_colour = centred.new_zeros(centred.shape), centred.new_zeros((n, 6))
    pattern = torch.cat([F.normalize(centred, dim=1), zeros_colour], dim=1)
    colour = torch.cat([zeros_pattern, F.normalize(torch.cat([rgb, 1.0 - rgb], dim=1), dim=1)], dim=1)
    return torch.where(flat[:, None], colour, pattern)


def gradient_descriptor(images: torch.Tensor, side: int = GRADIENT_SIDE) -> torch.Tensor:
    """The copy verdict's `image_gradients` of a `side` x `side` box thumbnail, centred: [N, 6 (side - 1)^2].

    Its cosine similarity is high when two images have their edges and textures in the same places
    (a copy), lower for related images that share colours and layout (another crop, a recolouring);
    the thumbnail keeps an index of millions of images small and tolerates resampling noise."""
    x = images.float()
    _, _, h, w = x.shape
    thumb = torch.einsum("ih,nchw,jw->ncij", _box_weights(h, side, x.device, x.dtype), x,
                         _box_weights(w, side, x.device, x.dtype))
    return (image_gradients(thumb.clamp(0, 1)) * 2 - 1).flatten(1)


def _size_field(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resize_mode(resample) -> str:
    # PIL / transformers resample codes: 0 nearest, 2 bilinear, 3 bicubic
    return {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(
        int(getattr(resample, "value", resample)), "bicubic"
    )


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _centre_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < height or w < width:  # as the processor does: pad with zeros to the crop size
        x = F.pad(
            x,
            (
                (max(width - w, 0) + 1) // 2,
                max(width - w, 0) // 2,
                (max(height - h, 0) + 1) // 2,
                max(height - h, 0) // 2,
            ),
        )
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def _clip_embedder(path: str, device: torch.device) -> ImageEmbedder:
    model, processor, kind = load_clip(path)
    model = model.to(device).requires_grad_(False)
    dtype = next(model.parameters()).dtype
    mean = torch.tensor(processor.image_mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    mode = _resize_mode(processor.resample)
    size, crop = processor.size, processor.crop_size

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        h, w = x.shape[-2:]
        if getattr(processor, "do_resize", True):
            short = _size_field(size, "shortest_edge")
            if short:  # transformers' get_resize_output_image_size(default_to_square=False)
                out = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            else:
                out = (_size_field(size, "height"), _size_field(size, "width"))
            x = _resize(x, out, mode)
        if getattr(processor, "do_center_crop", True):
            x = _centre_crop(x, _size_field(crop, "height"), _size_field(crop, "width"))
        if getattr(processor, "do_normalize", True):
            x = (x - mean) / std
        x = x.to(dtype)
        if kind == "clip":
            out = model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return model(pixel_values=x).image_embeds

    cfg = model.config
    dim = cfg.projection_dim
    return ImageEmbedder("clip", dim, fn, device, str(path))


def _sscd_embedder(path: str, device: torch.device) -> ImageEmbedder:
    model = load_sscd(path).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), (SSCD_SIZE, SSCD_SIZE), "bilinear")
        return model((x - mean) / std)

    with torch.no_grad():
        dim = fn(torch.zeros(1, 3, SSCD_SIZE, SSCD_SIZE, device=device)).reshape(1, -1).shape[1]
    return ImageEmbedder("sscd", dim, fn, device, str(path))


def make_embedder(kind: str, path: str | None = None, device=None) -> ImageEmbedder:
    """The `pixels`, `gradients`, `clip` (local CLIPModel directory) or `sscd` (local TorchScript file) embedder."""
    if kind not in INDEX_EMBEDDINGS:
        raise MemtrainError(f"unknown embedding {kind!r}; choose one of {', '.join(INDEX_EMBEDDINGS)}")
    if kind == "pixels":
        return ImageEmbedder("pixels", 3 * PIXEL_SIDE * PIXEL_SIDE + 6, pixel_descriptor, None, None)
    if kind == "gradients":
        return ImageEmbedder("gradients", 6 * (GRADIENT_SIDE - 1) ** 2, gradient_descriptor, None, None)
    what = "a local CLIP model directory" if kind == "clip" else "an SSCD TorchScript file"
    if not path:
        raise MemtrainError(f"the {kind} embedding needs --model PATH ({what}); nothing is downloaded")
    if not Path(path).exists():
        raise MemtrainError(f"--model {path}: no such file or directory ({what})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _clip_embedder(path, device) if kind == "clip" else _sscd_embedder(path, device)
