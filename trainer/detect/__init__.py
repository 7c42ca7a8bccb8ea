"""Memorization detectors: small functions over the batched UNet core (`trainer.core.unet_core`).

`PROMPT_DETECTORS` is the registry `memtrain evaluate` runs: a name, a title and a function
`(pipe, prompts, seed, batch_size) -> {"scores": [P] tensor, ...extra per-prompt arrays}` calling a
detector with its paper's defaults (n = 1, the 50-step DDIM schedule). Adding a detector is one
function here plus one entry in `PROMPT_DETECTORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.detect.clid import (
    clid_features,
    clid_th_scores,
    clid_vec_classifier,
    clid_vec_scores,
    fit_clid_alpha,
)
from trainer.detect.prompt import (
    ANISOTROPY_WEIGHTS,
    AnisotropyScores,
    TokenAttribution,
    anisotropy,
    attention_entropy,
    default_g_cos,
    model_family,
    noise_magnitude,
    token_attribution,
)

DETECTOR_STEPS = 50  # the detectors' DDIM schedule (first step t = 981 on SD 1.x / 2.x, 999 with "trailing" spacing)


@dataclass(frozen=True)
class PromptDetector:
    title: str
    score: Callable[..., dict]
    unet_evals_per_prompt: int  # the method's count at n = 1 (the report measures the actual count)


def _wen_first(pipe, prompts, seed, batch_size) -> dict:
    return {"scores": noise_magnitude(pipe, prompts, n=1, steps="first", num_inference_steps=DETECTOR_STEPS,
                                      seed=seed, batch_size=batch_size)}


def _wen_first10(pipe, prompts, seed, batch_size) -> dict:
    return {"scores": noise_magnitude(pipe, prompts, n=1, steps=10, num_inference_steps=DETECTOR_STEPS,
                                      seed=seed, batch_size=batch_size)}


def _anisotropy(pipe, prompts, seed, batch_size) -> dict:
    result = anisotropy(pipe, prompts, n=1, seed=seed, num_inference_steps=DETECTOR_STEPS, batch_size=batch_size)
    return {"scores": result.M, "N": result.N, "C": result.C}


def _entropy(pipe, prompts, seed, batch_size) -> dict:
    return {"scores": attention_entropy(pipe, prompts, n=1, num_inference_steps=DETECTOR_STEPS, seed=seed,
                                        batch_size=batch_size)}


PROMPT_DETECTORS: dict[str, PromptDetector] = {
    "noise": PromptDetector("noise magnitude (Wen, first step)", _wen_first, 2),
    "noise10": PromptDetector("noise magnitude (Wen, first 10 steps)", _wen_first10, 20),
    "anisotropy": PromptDetector("anisotropy M (Asthana & Belagiannis)", _anisotropy, 4),
    "entropy": PromptDetector("attention entropy (Ren, first step)", _entropy, 1),
}
MEMBERSHIP_DETECTORS = ("clid",)
DETECTORS = (*PROMPT_DETECTORS, *MEMBERSHIP_DETECTORS)

__all__ = [
    "ANISOTROPY_WEIGHTS", "AnisotropyScores", "DETECTORS", "DETECTOR_STEPS", "MEMBERSHIP_DETECTORS",
    "PROMPT_DETECTORS", "PromptDetector", "TokenAttribution", "anisotropy", "attention_entropy", "clid_features",
    "clid_th_scores", "clid_vec_classifier", "clid_vec_scores", "default_g_cos", "fit_clid_alpha",
    "model_family", "noise_magnitude", "token_attribution",
]
