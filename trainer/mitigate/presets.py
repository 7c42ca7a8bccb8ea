"""Each training-time mitigation on its own, as recipe overrides at the papers' settings."""

from __future__ import annotations

import shlex

from trainer.io import MemtrainError

# Caption randomization at Somepalli et al.'s p = 0.1 (GNI lambda = 0.1), de-duplication at cosine 0.95,
# loss masking (Wen et al.) of the samples over the running 0.9-quantile of ||d(c)|| (`mask`; the authors' fixed
# 2.0 is set for SD's 64x64x4 latents and masks every sample of a smaller model; `mask2:train.loss_mask_threshold=2.0`
# runs it). Used by
# `memtrain compare --alone` and `scripts/bench_train.py --variants`.
PRESETS: dict[str, list[str]] = {
    "rt": ["data.captions.random_token_p=0.1"],
    "rc": ["data.captions.random_caption_p=0.1"],
    "cwr": ["data.captions.word_repeat_p=0.1"],
    "rna": ["data.captions.random_number_p=0.1"],
    "gni": ["data.captions.embedding_noise=0.1"],
    "dedup": ["data.dedup=drop"],
    "reweight": ["data.dedup=reweight"],
    "mask": ["train.loss_mask_quantile=0.9"],
}


def parse_mitigation_specs(specs: list[str], flag: str, reserved: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """[(name, recipe overrides)] of mitigation specs: a preset name (PRESETS, case-insensitive) or
    `NAME:key=value[ key=value]` (your own settings, e.g. `mask3:train.loss_mask_threshold=3.0`).
    Shared by `memtrain compare --alone` and `scripts/bench_train.py --variants`."""
    out: list[tuple[str, list[str]]] = []
    for spec in (s.strip() for s in specs):
        if ":" in spec:
            name, rest = spec.split(":", 1)
            name, overrides = name.strip(), shlex.split(rest)
            if not name or not overrides or any("=" not in o for o in overrides):
                raise MemtrainError(f"{flag} {spec!r}: a custom mitigation is NAME:key=value[ key=value]")
        elif spec.lower() in PRESETS:
            name, overrides = spec.lower(), PRESETS[spec.lower()]
        else:
            raise MemtrainError(f"{flag}: unknown mitigation {spec!r}; valid: {', '.join(PRESETS)} "
                                "or NAME:key=value[ key=value]")
        if name in reserved or name in {n for n, _ in out}:
            if any(n == name and o == overrides for n, o in out):
                continue  # the same spec twice
            raise MemtrainError(f"{flag} {spec!r}: the name {name!r} is taken; give the run another name")
        out.append((name, list(overrides)))
    return out
