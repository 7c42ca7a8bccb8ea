"""The re-trigger test: do small perturbations of a prompt's text embedding bring a memorized image back?

Implements the attack of Kowalczuk et al., 2025, "Finding Dori: memorization in text-to-image diffusion
models is less local than assumed": search `d` with `||d|| <= eps * ||e||` that maximizes Wen et al.'s
first-step noise magnitude (attacker "noise") or minimizes the known image's denoising loss ("image"),
then generate from `e + d` and measure replication (`attack_section`). Deviation: the optimizer
(PGD-L2, Madry et al., ICLR 2018, from d = 0, lr = 2.5 / steps) is our choice; see docs/methods.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from trainer.core.unet_core import (
    DEFAULT_BATCH_SIZE,
    UNetCore,
    count_evals,
    encode_latents,
    groups,
    prompt_list,
)
from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration
from trainer.measure.replication import RATIO_THRESHOLD, replication_metrics
from trainer.measure.verdict import GU_RATIO, verdict_scores
from trainer.sample.generate import generate_images

ATTACKERS = ("noise", "image")
EVAL_DRAWS_PER_NOISE = 4  # "image": held-out draws for objective_before / objective_after, per n_noise




def _check_eps(eps: float) -> float:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise MemtrainError(f"attack eps must be > 0 (the budget is ||d|| <= eps * ||e||), got {eps!r}")
    return float(eps)


def check_target_images(images, n_prompts: int, what: str = "images") -> torch.Tensor:
    if images is None:
        raise MemtrainError(f'the "image" attacker needs `{what}`: one training image per prompt')
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise MemtrainError(f"{what} must be a tensor [P, 3, H, W] in [0, 1]")
    if len(images) != n_prompts:
        raise MemtrainError(f"{what}: got {len(images)} images for {n_prompts} prompts; pass one per prompt")
    if float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3:
        raise MemtrainError(f"{what} must be pixel values in [0, 1] (got [{images.min():.3f}, {images.max():.3f}])")
    return images


def _generator(seed: int, prompt: int, step: int) -> torch.Generator:
    """Draws of one prompt at one step: independent of how prompts are grouped into batches."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + prompt * 10_007 + step) % 2**63)


class _NoiseObjective:
    """Wen et al.'s first-step score mean_j ||eps(x_T^j, t_1, e) - eps(x_T^j, t_1, c0)|| per embedding."""

    sign = 1.0  # maximized

    def __init__(self, core: UNetCore, n_noise: int, seed: int, num_inference_steps: int):
        self.core = core
        self.n = n_noise
        self.x_T = core.initial_noise(n_noise, seed)
        self.t = int(core.sampling_timesteps(num_inference_steps)[0])
        _, c0 = core.empty()
        self.uncond = core.eps(self.x_T, self.t, c0, e_index=torch.zeros(n_noise, dtype=torch.long))

    def __call__(self, emb: torch.Tensor, rows: range, step: int, grad: bool) -> torch.Tensor:
        g = len(emb)
        x_index = torch.arange(self.n).repeat(g)
        e_index = torch.arange(g).repeat_interleave(self.n)
        cond = self.core.eps(self.x_T, self.t, emb, x_index, e_index, grad=grad)
        return (cond - self.uncond[x_index.to(cond.device)]).flatten(1).norm(dim=1).view(g, self.n).mean(1)


class _ImageObjective:
    """Denoising loss of each prompt's own training-image latent at random (t, noise) draws."""

    sign = -1.0  # minimized

    def __init__(self, core: UNetCore, latents: torch.Tensor, n_noise: int, seed: int):
        self.core, self.latents, self.n, self.seed = core, latents, n_noise, seed

    def __call__(self, emb: torch.Tensor, rows: range, step: int, grad: bool, n: int | None = None):
        n = n or self.n
        core = self.core
        xs, ts, noises = [], [], []
        for p in rows:
            gen = _generator(self.seed, p, step)
            t = torch.randint(0, core.num_train_timesteps, (n,), generator=gen)
            noise = torch.randn((n, *self.latents.shape[1:]), generator=gen).to(core.device)
            xs.append(core.add_noise(self.latents[p].expand(n, -1, -1, -1), noise, t))
            ts.append(t)
            noises.append(noise)
        e_index = torch.arange(len(emb)).repeat_interleave(n)
        pred = core.eps(torch.cat(xs), torch.cat(ts), emb, e_index=e_index, grad=grad)
        return (pred - torch.cat(noises)).pow(2).flatten(1).mean(1).view(len(emb), n).mean(1)

    def evaluate(self, emb: torch.Tensor, rows: range) -> torch.Tensor:
        return self(emb, rows, -1, grad=False, n=EVAL_DRAWS_PER_NOISE * self.n)


def retrigger_attack(
    pipe,
    prompts: list[str],
    eps: float,
    attacker: str = "noise",
    images: torch.Tensor | None = None,
    steps: int = 20,
    lr: float | None = None,
    n_noise: int = 2,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_inference_steps: int = 50,
) -> dict:
    """Search a text-embedding perturbation per prompt that re-triggers it (module docstring).

    `pipe`: a StableDiffusionPipeline (or a `trainer.core.unet_core` components dict). `images`
    [P, 3, H, W] in [0, 1]: each prompt's memorized training image (attacker "image" only).
    `num_inference_steps` fixes the first DDIM timestep of the "noise" objective.
    Returns {"embeddings": [P, 77, D] e + d on the model's device and dtype, "delta_norm_ratio": [P]
    ||d|| / ||e||, "objective_before" / "objective_after": [P] (float64, CPU), "unet_evals",
    "seconds"}. Cost: about steps * n_noise UNet evals (with backward) per prompt.
    """
    prompts = prompt_list(prompts)
    eps = _check_eps(eps)
    if attacker not in ATTACKERS:
        raise MemtrainError(f"attacker must be one of {ATTACKERS}, got {attacker!r}")
    if int(steps) < 1 or int(n_noise) < 1:
        raise MemtrainError(f"attack steps and n_noise must be >= 1, got steps={steps}, n_noise={n_noise}")
    if lr is not None and not lr > 0:
        raise MemtrainError(f"attack lr must be > 0, got {lr}")
    steps, n_noise = int(steps), int(n_noise)
    step_size = float(lr) if lr is not None else 2.5 / steps
    start = time.perf_counter()
    with count_evals() as counter:
        core = UNetCore(pipe, batch_size)
        table, index, _ = core.encode_prompts(prompts)
        e_all = table[index].float()
        if attacker == "image":
            images = check_target_images(images, len(prompts))
            latents = encode_latents(pipe, images * 2 - 1, seed=seed, batch_size=batch_size)
            objective = _ImageObjective(core, latents, n_noise, seed)
        else:
            objective = _NoiseObjective(core, n_noise, seed, num_inference_steps)
        out = torch.empty_like(e_all)
        before = torch.empty(len(prompts), dtype=torch.float64)
        after = torch.empty(len(prompts), dtype=torch.float64)
        per_group = max(1, core.batch_size // n_noise)
        for sl in groups(len(prompts), per_group):
            rows = range(sl.start, sl.stop)
            e = e_all[sl]
            radius = eps * e.flatten(1).norm(dim=1)
            alpha = (step_size * radius).view(-1, 1, 1)
            d = torch.zeros_like(e, requires_grad=True)
            best_d, best = d.detach().clone(), None
            for step in range(steps):
                value = objective(e + d, rows, step, grad=True)
                (grad,) = torch.autograd.grad(value.sum(), d)
                value = value.detach()
                if best is None:
                    best = value.clone()
                    if attacker == "noise":
                        before[sl] = value.double().cpu()
                elif attacker == "noise":
                    better = value > best
                    best = torch.where(better, value, best)
                    best_d[better] = d.detach()[better]
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1)
                d = d.detach() + objective.sign * alpha * grad / norm
                scale = (radius / d.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
                d = (d * scale.view(-1, 1, 1)).requires_grad_(True)
            d = d.detach()
            if attacker == "noise":
                value = objective(e + d, rows, steps, grad=False)
                better = value > best
                best_d[better] = d[better]
                after[sl] = torch.where(better, value, best).double().cpu()
                d = best_d
            else:
                before[sl] = objective.evaluate(e, rows).double().cpu()
                after[sl] = objective.evaluate(e + d, rows).double().cpu()
            out[sl] = e + d
    ratio = (out - e_all).flatten(1).norm(dim=1) / e_all.flatten(1).norm(dim=1)
    return {
        "embeddings": out.to(core.dtype),
        "delta_norm_ratio": ratio.double().cpu(),
        "objective_before": before,
        "objective_after": after,
        "unet_evals": counter.unet_evals,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def generate_from_embeddings(
    pipe,
    embeddings: torch.Tensor,
    n: int = 1,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 32,
    output_type: str = "pt",
) -> torch.Tensor:
    """Images [P * n, 3, H, W] in [0, 1] sampled from text embeddings [P, 77, D], prompt-major.

    The stock pipeline is called with `prompt_embeds=` and the empty caption's embedding as
    `negative_prompt_embeds`; generation j starts from the x_T of seed + j, as in
    `trainer.sample.generate.generate_images`, so unperturbed embeddings reproduce its images.
    `output_type="latent"` returns the final latents instead (not clamped).
    """
    if not torch.is_tensor(embeddings) or embeddings.dim() != 3:
        raise MemtrainError("embeddings must be a tensor [P, 77, D] of text-encoder outputs")
    if int(n) < 1:
        raise MemtrainError(f"n (generations per prompt) must be >= 1, got {n}")
    core = UNetCore(pipe, batch_size)
    if embeddings.shape[-1] != core.cross_attention_dim:
        raise MemtrainError(
            f"embeddings have width {embeddings.shape[-1]} but the UNet expects {core.cross_attention_dim}"
        )
    n = int(n)
    _, empty = core.empty()
    x_T = core.initial_noise(n, seed)
    jobs = len(embeddings) * n
    out = []
    for sl in groups(jobs, batch_size):
        rows = torch.arange(sl.start, sl.stop)
        emb = embeddings[rows // n].to(core.device, core.dtype)
        latents = x_T[rows % n].to(core.device, core.dtype)
        result = pipe(
            prompt_embeds=emb,
            negative_prompt_embeds=empty.expand(len(rows), -1, -1),
            latents=latents,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type=output_type,
        ).images
        out.append(result.float().cpu())
    images = torch.cat(out)
    return images if output_type == "latent" else images.clamp(0, 1)


def _replication(generated: torch.Tensor, references: torch.Tensor, n_prompts: int,
                 calibration: Calibration = GU_RATIO, sscd_model=None, batch_size: int = 32) -> dict:
    m = replication_metrics(generated, references)
    scores = verdict_scores(generated, references, calibration, sscd_model, batch_size)
    flags = torch.from_numpy(calibration.flags(scores)).float()
    return {
        "replication": float(flags.mean()),
        "mean_l2": float(m["l2"].mean()),
        "ratio_1_3": float(m["ratio_memorized"].float().mean()),
        "per_prompt": flags.view(n_prompts, -1).mean(1).tolist(),
    }


def attack_section(
    pipe,
    prompts: list[str],
    images: torch.Tensor | None,
    references: torch.Tensor,
    eps_values: Sequence[float] = (0.05, 0.1, 0.2),
    n: int = 1,
    seed: int = 0,
    steps: int = 20,
    lr: float | None = None,
    n_noise: int = 2,
    sample_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    calibration: Calibration = GU_RATIO,
    sscd_model=None,
    keep_generations: bool = False,
) -> dict:
    """The report's re-trigger section (JSON-serialisable): replication at each eps of the plain prompt
    and of both attackers, plus UNet evals and seconds per attacker.

    `images` [P, 3, H, W]: each prompt's memorized training image (None skips the "image" attacker);
    `references`: the deduplicated training images replication is measured against, by the report's copy
    verdict `calibration` (default Gu et al.'s NN1/NN2 ratio < 1/3; `sscd_model` for an SSCD verdict;
    `trainer.measure.verdict.verdict_scores`). Replication of the plain prompt does not depend on eps
    and is measured once. `steps` is the attack budget, `sample_steps` the DDIM steps of the
    generations (n per prompt, seeds seed + j as `memtrain generate`); with `keep_generations` each
    attacker's generations stay in its row as "_generated" (a tensor, for the report's figure).
    """
    prompts = prompt_list(prompts)
    eps_values = [_check_eps(e) for e in eps_values]
    if not eps_values:
        raise MemtrainError("eps_values is empty: pass at least one attack budget")
    if images is not None:
        check_target_images(images, len(prompts))
    plain = generate_images(pipe, prompts, n, seed, sample_steps, guidance_scale, batch_size, progress=False)
    plain_row = _replication(plain, references, len(prompts), calibration, sscd_model, batch_size)
    totals = {a: {"unet_evals": 0, "seconds": 0.0} for a in ATTACKERS}
    rows = []
    for eps in eps_values:
        row = {"eps": eps, "plain": plain_row["replication"]}
        for attacker in ATTACKERS:
            if attacker == "image" and images is None:
                row[attacker] = None
                continue
            res = retrigger_attack(pipe, prompts, eps, attacker, images if attacker == "image" else None, steps,
                                   lr, n_noise, seed, batch_size)
            gen = generate_from_embeddings(pipe, res["embeddings"], n, seed, sample_steps, guidance_scale,
                                           batch_size)
            row[attacker] = {
                **_replication(gen, references, len(prompts), calibration, sscd_model, batch_size),
                "objective_before": float(res["objective_before"].mean()),
                "objective_after": float(res["objective_after"].mean()),
                "max_delta_norm_ratio": float(res["delta_norm_ratio"].max()),
                "unet_evals": res["unet_evals"],
                "seconds": res["seconds"],
                **({"_generated": gen} if keep_generations else {}),
            }
            totals[attacker]["unet_evals"] += res["unet_evals"]
            totals[attacker]["seconds"] += res["seconds"]
        rows.append(row)
    if images is None:
        totals.pop("image")
    return {
        "prompts": len(prompts),
        "n": n,
        "steps": steps,
        "n_noise": n_noise,
        "ratio_threshold": RATIO_THRESHOLD,
        "criterion": calibration.describe(),
        "calibration": calibration.to_dict(),
        "plain": plain_row,
        "rows": rows,
        "attackers": totals,
    }
