"""Training-time caption randomization, applied per sample when the sample is drawn.

Implements MC, RC, RT, CWR, RNA and GNI from Somepalli et al., NeurIPS 2023, "Understanding and
mitigating copying in diffusion models"; each is off by default, the paper's p = 0.1 when enabled.
`augment_caption` applies them in the order MC, RC (which short-circuits), RT, CWR, RNA, every draw
from `rng` (a method with p = 0 makes none); GNI is applied by the training step. Deviation: RNA's
count of random numbers is configurable (`random_number_count`, default 1 as in the paper).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

import torch

from trainer.io import MemtrainError

RANDOM_NUMBER_HIGH = 100_000  # RNA draws integers in [0, RANDOM_NUMBER_HIGH)
PAPER_P = 0.1  # Somepalli et al.'s probability when a method is enabled (the recipes' value)


@dataclass
class CaptionAugConfig:
    """Caption randomization settings (the recipe's `data.captions` section). All off by default;
    set a probability to 0.1 (the paper's value) to enable a method."""

    multiple_captions: bool = False  # MC
    random_caption_p: float = 0.0  # RC
    random_caption_tokens: int = 4
    random_token_p: float = 0.0  # RT
    random_token_count: int = 2
    word_repeat_p: float = 0.0  # CWR
    word_repeat_count: int = 2
    random_number_p: float = 0.0  # RNA
    random_number_count: int = 1
    embedding_noise: float = 0.0  # GNI lambda

    @classmethod
    def from_obj(cls, obj: Any) -> CaptionAugConfig:
        """Copy the matching attributes of any object (e.g. the recipe's CaptionSection)."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})

    def validate(self, prefix: str = "data.captions") -> None:
        """Raise MemtrainError naming the key (e.g. `data.captions.random_token_p`) of a bad value."""
        if not isinstance(self.multiple_captions, bool):
            raise MemtrainError(
                f"`{prefix}.multiple_captions` must be true or false, got {self.multiple_captions!r}"
            )
        for name in (
            "random_caption_p",
            "random_token_p",
            "word_repeat_p",
            "random_number_p",
            "embedding_noise",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                what = "lambda" if name == "embedding_noise" else "a probability"
                raise MemtrainError(f"`{prefix}.{name}` is {what} and must be in [0, 1], got {value!r}")
        for name in (
            "random_caption_tokens",
            "random_token_count",
            "word_repeat_count",
            "random_number_count",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemtrainError(f"`{prefix}.{name}` must be an integer >= 1, got {value!r}")

    @property
    def enabled(self) -> bool:
        """Whether `augment_caption` can change anything (GNI is separate)."""
        return bool(
            self.multiple_captions
            or self.random_caption_p
            or self.random_token_p
            or self.word_repeat_p
            or self.random_number_p
        )


_DEFAULTS = CaptionAugConfig()


def _get(cfg: Any, name: str):
    # duck-typed so the recipe's CaptionSection (which has no count fields) works directly
    return getattr(cfg, name, getattr(_DEFAULTS, name))


def token_pool(tokenizer) -> list[str]:
    """The random-token pool: whole-word entries of the tokenizer's vocabulary (ending in "</w>"),
    with "</w>" stripped, ASCII-alphabetic and at least 2 letters long, special tokens excluded, in
    token-id order. Single characters are left out so that the byte-level symbols every CLIP
    vocabulary carries do not dominate a small vocabulary; non-ASCII entries are byte-level
    fragments, not words."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    pool: list[str] = []
    seen: set[str] = set()
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token in special or not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if len(word) >= 2 and word.isascii() and word.isalpha() and word not in seen:
            seen.add(word)
            pool.append(word)
    return pool


def _pool_draw(pool: list[str], k: int, rng: random.Random, method: str) -> list[str]:
    if not pool:
        raise MemtrainError(
            f"caption randomization ({method}) needs random tokens, but the tokenizer vocabulary has no "
            "whole-word alphabetic tokens; disable the method or use the model's real tokenizer"
        )
    return [pool[rng.randrange(len(pool))] for _ in range(k)]


def _insert(words: list[str], new: list[str], rng: random.Random) -> None:
    for token in new:
        words.insert(rng.randint(0, len(words)), token)


def augment_caption(captions: list[str] | str, cfg: Any, rng: random.Random, pool: list[str]) -> str:
    """One training caption for a sample: MC, then RC (which short-circuits), RT, CWR, RNA.

    `cfg` is a CaptionAugConfig or anything with the same attribute names (missing counts take the
    defaults). Exactly reproducible from `rng`'s state; see the module docstring for the draws.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not captions:
        raise MemtrainError("augment_caption: the sample has no caption")
    caption = captions[rng.randrange(len(captions))] if _get(cfg, "multiple_captions") else captions[0]

    p = _get(cfg, "random_caption_p")
    if p > 0 and rng.random() < p:  # RC
        return " ".join(_pool_draw(pool, _get(cfg, "random_caption_tokens"), rng, "random_caption_p"))

    original = caption.split()
    words = list(original)
    changed = False
    p = _get(cfg, "random_token_p")
    if p > 0 and rng.random() < p:  # RT
        _insert(words, _pool_draw(pool, _get(cfg, "random_token_count"), rng, "random_token_p"), rng)
        changed = True
    p = _get(cfg, "word_repeat_p")
    if p > 0 and rng.random() < p and original:  # CWR
        repeats = [original[rng.randrange(len(original))] for _ in range(_get(cfg, "word_repeat_count"))]
        _insert(words, repeats, rng)
        changed = True
    p = _get(cfg, "random_number_p")
    if p > 0 and rng.random() < p:  # RNA
        numbers = [str(rng.randrange(RANDOM_NUMBER_HIGH)) for _ in range(_get(cfg, "random_number_count"))]
        _insert(words, numbers, rng)
        changed = True
    return " ".join(words) if changed else caption


def add_embedding_noise(
    embeddings: torch.Tensor, scale: float, generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """GNI (Somepalli et al. 2023): `c + scale * N(0, I)`, scale (lambda) in [0, 1]; returns `embeddings`
    itself when scale is 0.

    The noise is `noise` when given (the training loop draws it for the global batch), else drawn in
    float32 on the generator's device (the global RNG when `generator` is None); it is cast to the
    embeddings' dtype and device.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 <= scale <= 1.0:
        raise MemtrainError(f"`data.captions.embedding_noise` (GNI lambda) must be in [0, 1], got {scale!r}")
    if scale == 0:
        return embeddings
    if noise is None:
        device = generator.device if generator is not None else embeddings.device
        noise = torch.randn(embeddings.shape, generator=generator, dtype=torch.float32, device=device)
    return embeddings + scale * noise.to(device=embeddings.device, dtype=embeddings.dtype)
