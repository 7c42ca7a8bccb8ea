"""Text alignment for the toy world: does an image show what its caption says?

A deterministic stand-in for CLIP score: every pixel is mapped to the nearest palette colour; each
colour the caption names must cover at least `min_fraction` of the image, and the background (the
most frequent palette colour) must be none of them. The score is the fraction of checks that hold;
shapes and sizes are not checked.
"""

from __future__ import annotations

import re

import torch

from trainer.io import MemtrainError
from trainer.measure.features import QualityFeature, pixel_features
from trainer.toy.world import COLORS

_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
_NAMES = list(COLORS)
_OBJ = r"a (small|large) (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_OBJ}(?: and {_OBJ})?$")


def parse_caption(caption: str) -> list[str]:
    """The object colours of a toy caption ("a large red circle and a small blue ring" -> red, blue)."""
    m = _CAPTION.match(caption.strip())
    colors = [m.group(2)] + ([m.group(5)] if m.group(5) else []) if m else []
    if not colors or any(c not in COLORS for c in colors):
        raise MemtrainError(f"not a toy-world caption: {caption!r}")
    return colors


def palette_fractions(images: torch.Tensor) -> torch.Tensor:
    """[N, len(COLORS)]: the fraction of each image's pixels nearest to each palette colour."""
    pixels = images.float().permute(0, 2, 3, 1).reshape(len(images), -1, 3)
    nearest = torch.cdist(pixels, _PALETTE.expand(len(images), -1, -1)).argmin(dim=2)
    return torch.nn.functional.one_hot(nearest, len(_NAMES)).float().mean(dim=1)


def alignment_scores(images: torch.Tensor, captions: list[str], min_fraction: float = 0.03) -> torch.Tensor:
    """Per-image fraction of caption attributes satisfied (images [N, 3, H, W] in [0, 1])."""
    if len(images) != len(captions):
        raise MemtrainError(f"{len(images)} images but {len(captions)} captions")
    fractions = palette_fractions(images)
    scores = []
    for frac, caption in zip(fractions, captions, strict=True):
        colors = parse_caption(caption)
        checks = [frac[_NAMES.index(c)].item() >= min_fraction for c in colors]
        checks.append(_NAMES[int(frac.argmax())] not in colors)
        scores.append(sum(checks) / len(checks))
    return torch.tensor(scores)


def is_toy_caption_set(captions) -> bool:
    """True when every caption is a toy-world caption."""
    try:
        for caption in dict.fromkeys(captions):
            parse_caption(caption)
    except MemtrainError:
        return False
    return True


def toy_features(images: torch.Tensor) -> torch.Tensor:
    """The "pix8+palette" KID feature [N, 200]: 8x8 area-averaged RGB, then the 8 palette fractions."""
    return torch.cat([pixel_features(images), palette_fractions(images)], dim=1)


TOY_QUALITY = QualityFeature("pix8+palette", "8x8 area-averaged RGB (192) + 8 toy palette fractions",
                             toy_features, alignment_scores, "toy_alignment")
