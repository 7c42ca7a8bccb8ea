"""The inference-time mitigation of Wen et al. (ICLR 2024, "Detecting, explaining, and mitigating
memorization in diffusion models") as a guard: before sampling, each prompt's text embedding is optimised
until the first-step magnitude ||eps(x_T, c) - eps(x_T, c0)|| over its generations falls to a target (AdamW,
the BOS row frozen); sampling then runs on the optimised embedding. Formulas: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.core.unet_core import UNetCore, prompt_list
from trainer.io import MemtrainError
from trainer.prompts import read_prompts
from trainer.sample.guards import Guard, GuardRun, Option
from trainer.sample.guidance import cfg_requests

WEN_TARGET = 3.0  # Wen et al.'s default target for SD 1.4
WEN_LR, WEN_MAX_ITERS = 0.05, 10


def first_step_magnitude(
    core: UNetCore, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor, t0: int, grad: bool = False,
    eps_uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """||eps(x_T^j, t0, c_j) - eps(x_T^j, t0, c0)|| per row j (cond [M, L, D], uncond [1 or M, L, D], x_T [M, ...]).

    `eps_uncond`: the unconditional predictions, when already known (they do not depend on `cond`, so an
    optimisation of `cond` evaluates them once)."""
    m = len(x_T)
    if eps_uncond is not None:
        eps_cond = core.eps(x_T, t0, cond, torch.arange(m), torch.arange(m), grad=grad)
        return (eps_cond - eps_uncond).flatten(1).norm(dim=1)
    uncond = uncond.expand(m, -1, -1) if len(uncond) == 1 else uncond
    table = torch.cat([uncond.to(cond.device, cond.dtype), cond])
    x_index, e_index = cfg_requests(m)
    eps = core.eps(x_T, t0, table, x_index, e_index, grad=grad)
    eps_uncond, eps_cond = eps.chunk(2)
    return (eps_cond - eps_uncond).flatten(1).norm(dim=1)


@dataclass
class WenRecord:
    prompt: str
    magnitude_before: float
    magnitude_after: float
    iterations: int
    target: float

    def as_dict(self) -> dict:
        return {"guard": "wen", "intervened": self.iterations > 0, **self.__dict__}


def optimize_embedding(
    core: UNetCore, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor, t0: int,
    target: float = WEN_TARGET, lr: float = WEN_LR, max_iters: int = WEN_MAX_ITERS,
) -> tuple[torch.Tensor, list[float]]:
    """Wen et al.'s loop for ONE prompt: cond [1, L, D] over its generations' x_T [n, ...].

    Loss = mean over the n generations of the first-step magnitude; AdamW(lr); BOS row gradient
    zeroed; stops as soon as the loss is <= target (checked before every step, and once after the
    last). Returns (embedding [1, L, D], the loss before each check).
    """
    emb = cond.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([emb], lr=lr)
    losses: list[float] = []
    m = len(x_T)
    uncond_rows = (uncond.expand(m, -1, -1) if len(uncond) == 1 else uncond).to(core.device, core.dtype)
    eps_uncond = core.eps(x_T, t0, uncond_rows, torch.arange(m), torch.arange(m))  # constant: evaluated once
    with torch.enable_grad():
        for it in range(int(max_iters) + 1):
            loss = first_step_magnitude(
                core, emb.to(core.dtype).expand(m, -1, -1), uncond, x_T, t0, grad=True, eps_uncond=eps_uncond
            ).mean()
            losses.append(float(loss.detach()))
            if losses[-1] <= target or it == max_iters:
                break
            optimizer.zero_grad()
            loss.backward()
            emb.grad[:, 0] = 0.0  # BOS
            optimizer.step()
    return emb.detach().to(cond.dtype), losses


def _encode(pipe, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [P, L, D], uncond [P, L, D]) from the pipeline's own `encode_prompt` (empty negative prompt)."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True)
    return cond, uncond


def mitigate_prompt_embedding(
    pipe, prompts: str | Sequence[str], target: float = WEN_TARGET, lr: float = WEN_LR,
    max_iters: int = WEN_MAX_ITERS, seed: int = 0, latents: torch.Tensor | None = None,
    num_inference_steps: int = 50, batch_size: int = 16,
) -> tuple[torch.Tensor, list[dict]]:
    """Wen et al.'s inference-time mitigation: optimised prompt embeddings [P, L, D] and a record per prompt.

    The first-step magnitude is measured on x_T = `latents` (prompt-major [P * n, C, H, W]: prompt i
    is optimised over its own n generations), or by default on the x_T of seed `seed` shared by all
    prompts (the detectors' convention), at the first DDIM timestep of `num_inference_steps`.
    """
    prompts = prompt_list(prompts)
    core = UNetCore(pipe, batch_size)
    cond, uncond = _encode(pipe, prompts, core.device)
    if latents is None:
        x_T = core.initial_noise(1, seed).repeat(len(prompts), 1, 1, 1)
    else:
        x_T = latents.to(core.device, torch.float32)
    if len(x_T) % len(prompts):
        raise MemtrainError(f"latents: {len(x_T)} rows is not a multiple of {len(prompts)} prompts")
    n = len(x_T) // len(prompts)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    out, records = [], []
    for i, prompt in enumerate(prompts):
        emb, losses = optimize_embedding(
            core, cond[i : i + 1], uncond[i : i + 1], x_T[i * n : (i + 1) * n], t0, target, lr, max_iters
        )
        out.append(emb)
        records.append(WenRecord(prompt, losses[0], losses[-1], len(losses) - 1, float(target)).as_dict())
    return torch.cat(out), records


def calibrate_wen_target(
    pipe, general_prompts: Sequence[str], quantile: float = 0.95, seed: int = 0,
    num_inference_steps: int = 50, batch_size: int = 16,
) -> float:
    """The `quantile` of the first-step magnitude over general (non-memorized) prompts, on the x_T of `seed`."""
    prompts = list(general_prompts)
    if not prompts:
        raise MemtrainError("calibrate_wen_target needs at least one general prompt")
    if not 0.0 < quantile <= 1.0:
        raise MemtrainError(f"quantile must be in (0, 1], got {quantile}")
    core = UNetCore(pipe, batch_size)
    cond, uncond = _encode(pipe, prompts, core.device)
    x_T = core.initial_noise(1, seed).repeat(len(prompts), 1, 1, 1)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    with torch.no_grad():
        magnitudes = first_step_magnitude(core, cond, uncond, x_T, t0)
    return float(torch.quantile(magnitudes.double().cpu(), quantile))


class Wen(Guard):
    """Wen et al.'s mitigation (module docstring): `target` first-step magnitude (or, with `calibrate`, a
    prompt file of general prompts, the 95% quantile of theirs on the run's seed and steps), AdamW `lr`, at
    most `max_iters` steps per prompt."""

    name = "wen"
    help = "optimise the prompt embedding first (Wen et al. 2024)"
    options = (
        Option("--wen-target", "target", help=f"first-step magnitude target > 0 (default {WEN_TARGET:g}, or "
               "calibrated with --wen-calibrate)", low=0.0, low_ok=False, meaning="> 0 (a first-step magnitude)"),
        Option("--wen-calibrate", "calibrate", str, metavar="PROMPTS", reads_file=True,
               help="general prompts: set the target to the 95%% quantile of their first-step magnitude"),
        Option("--wen-lr", "lr", float, WEN_LR, f"> 0 (default {WEN_LR:g})", low=0.0, low_ok=False, meaning="> 0"),
        Option("--wen-max-iters", "max_iters", int, WEN_MAX_ITERS, f">= 1 (default {WEN_MAX_ITERS})", low=1,
               meaning="an integer >= 1"),
    )

    def __init__(self, pipe, index=None, embedder=None, target: float = WEN_TARGET, lr: float = WEN_LR,
                 max_iters: int = WEN_MAX_ITERS, calibrate: str | None = None):
        self.pipe, self.calibrate = pipe, calibrate
        self.settings = dict(target=float(target), lr=float(lr), max_iters=int(max_iters))

    @classmethod
    def checked(cls, values: dict) -> dict:
        values = super().checked(values)
        if "target" in values and values.get("calibrate"):
            raise MemtrainError("give either --wen-target or --wen-calibrate, not both")
        return {"target": WEN_TARGET, **values}

    def setup(self, seed: int, steps: int) -> None:
        """With `calibrate`: the target from the general prompts' first-step magnitudes."""
        if self.calibrate:
            general = [r["text"] for r in read_prompts(self.calibrate)]
            self.settings["target"] = calibrate_wen_target(self.pipe, general, 0.95, seed, steps)

    def start(self, core, prompts, cond, latents, n, num_inference_steps, negative_prompt) -> GuardRun:
        if negative_prompt is not None:
            raise MemtrainError(f"guard {self.name} optimises against the empty caption: negative_prompt is not "
                                "supported")
        optimized, records = mitigate_prompt_embedding(self.pipe, prompts, latents=latents.float(),
                                                       num_inference_steps=num_inference_steps,
                                                       batch_size=2 * len(cond), **self.settings)
        per_image = [dict(rec) for rec in records for _ in range(n)]
        return GuardRun(optimized.repeat_interleave(n, dim=0).to(cond.dtype), None, lambda: per_image)

    def summarize(self, records: list[dict], steps: int) -> dict:
        return {"mean_iterations": float(np.mean([r["iterations"] for r in records]))}
