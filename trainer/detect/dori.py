"""DoRI: find a text embedding that makes the model reproduce a known training image.

Implements the attack of Kowalczuk et al., ICML 2026, "Finding DoRI: Discovery of Retained Images in
Diffusion Models" (arXiv 2507.16880, code github.com/sprintml/finding_dori): the whole text-encoder output
`y` [77, D] of a prompt (every token position) is the free variable, started from the prompt's own
embedding (or N(0, I), or another prompt's), and moved by Adam (lr 0.1, 50 steps) to minimise the
denoising loss ||eps - eps_theta(x_t, t, y)||^2 of the image's latent, with a batch of 8 (noise, t) pairs
drawn anew at every step (t uniform over the training timesteps), so the embedding re-triggers the image
from any starting noise. An image not memorized takes > 500 steps (the paper's control); `dori_section`
measures both as steps-to-copy curves with the report's copy verdict.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from trainer.core.unet_core import DEFAULT_BATCH_SIZE, UNetCore, count_evals, encode_latents, groups
from trainer.detect.attack import check_target_images, generate_from_embeddings
from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration
from trainer.measure.replication import replication_metrics, vae_roundtrip
from trainer.measure.verdict import GU_RATIO, verdict_scores

DORI_STEPS = 50  # the paper's budget
DORI_LR = 0.1  # Adam
DORI_BATCH = 8  # (noise, t) pairs per step
CONTROL_STEPS = 500  # non-memorized images need more than this (the paper's appendix)
CURVE = (0, 10, 25, 50, 100, 250, 500)  # checkpoints of the steps-to-copy curve


def _draws(seed: int, prompt: int, step: int, batch: int, shape: tuple, timesteps: int):
    """(t, noise) of one prompt at one step: independent of how prompts are grouped into batches."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + prompt * 10_007 + step) % 2**63)
    return torch.randint(0, timesteps, (batch,), generator=gen), torch.randn((batch, *shape), generator=gen)


def initial_embeddings(pipe, n: int, init: str | Sequence[str] = "random", seed: int = 0,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The starting points [n, 77, D] (float32): the prompts' own embeddings (a list of n prompts), or
    "random": N(0, I) drawn from `seed` (the paper's random initialisation)."""
    core = UNetCore(pipe, batch_size)
    if isinstance(init, str):
        if init != "random":
            raise MemtrainError(f'DoRI init must be "random" or a list of prompts, got {init!r}')
        length = int(core.parts.tokenizer.model_max_length)
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, length, core.cross_attention_dim), generator=gen).to(core.device)
    if len(init) != n:
        raise MemtrainError(f"DoRI init: got {len(init)} prompts for {n} images; pass one per image")
    table, index, _ = core.encode_prompts(list(init))
    return table[index].float()


def dori_attack(pipe, images: torch.Tensor | None, init: torch.Tensor, steps: int = DORI_STEPS, lr: float = DORI_LR,
                batch: int = DORI_BATCH, seed: int = 0, record: Sequence[int] = (),
                batch_size: int = DEFAULT_BATCH_SIZE, latents: torch.Tensor | None = None) -> dict:
    """Optimise one embedding per image (module docstring). `images` [P, 3, H, W] in [0, 1], or their `latents`
    [P, C, h, w] (scaled, as the UNet sees them); `init` [P, 77, D] (`initial_embeddings`). `record`: steps
    whose embeddings are kept (0 = the start). Only the embeddings get gradients (the UNet's stay untouched).

    Returns {"embeddings": [P, 77, D] after `steps`, "recorded": {step: [P, 77, D]}, "loss_start" /
    "loss_end": [P] mean denoising loss of the first / last step's draws, "unet_evals", "seconds"}.
    Cost: steps * batch UNet evaluations with backward per image.
    """
    if latents is None:
        images = check_target_images(images, len(init))
    elif len(latents) != len(init):
        raise MemtrainError(f"DoRI: got {len(latents)} latents for {len(init)} embeddings; pass one per embedding")
    steps, batch = int(steps), int(batch)
    if steps < 0 or batch < 1 or not lr > 0:
        raise MemtrainError(f"DoRI wants steps >= 0, batch >= 1, lr > 0; got steps={steps}, batch={batch}, lr={lr}")
    record = sorted({int(s) for s in record if 0 <= int(s) <= steps})
    start = time.perf_counter()
    with count_evals() as counter:
        core = UNetCore(pipe, batch_size)
        if latents is None:
            latents = encode_latents(pipe, images * 2 - 1, seed=seed, batch_size=batch_size)
        latents = latents.detach().float().to(core.device)
        shape, T = tuple(latents.shape[1:]), core.num_train_timesteps
        out = init.detach().float().clone().to(core.device)
        recorded = {s: torch.empty_like(out) for s in record}
        first = torch.full((len(out),), float("nan"), dtype=torch.float64)
        last = first.clone()
        for sl in groups(len(out), max(1, core.batch_size // batch)):
            y = out[sl].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([y], lr=float(lr))
            for step in range(steps + 1):
                if step in recorded:
                    recorded[step][sl] = y.detach()
                if step == steps:
                    break
                draws = [_draws(seed, p, step, batch, shape, T) for p in range(sl.start, sl.stop)]
                t = torch.cat([d[0] for d in draws])
                noise = torch.cat([d[1] for d in draws]).to(core.device)
                rows = torch.arange(sl.start, sl.stop).repeat_interleave(batch)
                x_t = core.add_noise(latents[rows.to(latents.device)], noise, t)
                pred = core.eps(x_t, t, y, e_index=(rows - sl.start), grad=True)
                loss = (pred - noise).pow(2).flatten(1).mean(1).view(-1, batch).mean(1)
                # Adam is per element: each prompt's embedding moves by its own loss
                (y.grad,) = torch.autograd.grad(loss.sum(), y)
                optimizer.step()
                if step == 0:
                    first[sl] = loss.detach().double().cpu()
                last[sl] = loss.detach().double().cpu()
            out[sl] = y.detach()
    return {"embeddings": out.to(core.dtype), "recorded": recorded, "loss_start": first, "loss_end": last,
            "unet_evals": counter.unet_evals, "seconds": time.perf_counter() - start}


def own_copies(generated: torch.Tensor, references: torch.Tensor, own: torch.Tensor, n: int,
               calibration: Calibration = GU_RATIO, sscd_model=None, batch_size: int = 32) -> np.ndarray:
    """[P, n] bool: generation j of prompt p is a copy (the verdict `calibration`) whose nearest reference is the
    prompt's own image `own[p]` (an index into `references`)."""
    flags = calibration.flags(verdict_scores(generated, references, calibration, sscd_model, batch_size))
    nearest = replication_metrics(generated, references)["nn_index"].cpu().numpy()
    return (np.asarray(flags, bool) & (nearest == np.repeat(own.cpu().numpy(), n))).reshape(-1, n)


def own_references(pipe, images: torch.Tensor, references: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Each training image's index in `references` (the unique training images through the model's VAE): the
    nearest to its own VAE round trip, so a relative nearer to the stored image than its reconstruction is
    (families of near-identical images) is not taken for it."""
    return replication_metrics(vae_roundtrip(pipe, images, batch_size), references)["nn_index"]


def dori_curve(pipe, images: torch.Tensor, init: torch.Tensor, references: torch.Tensor, own: torch.Tensor,
               steps: int, curve: Sequence[int] = CURVE, n: int = 1, seed: int = 0, lr: float = DORI_LR,
               batch: int = DORI_BATCH, sample_steps: int = 50, guidance_scale: float = 7.5,
               batch_size: int = DEFAULT_BATCH_SIZE, calibration: Calibration = GU_RATIO, sscd_model=None,
               keep_generations: bool = False) -> dict:
    """DoRI for `steps`, with n generations (seeds seed + j) from the embeddings at each checkpoint of `curve`
    (and at `steps`) judged by `own_copies`. Returns {"checkpoints", "replication": share of generations that
    copy at each checkpoint, "prompts_copied": share of prompts with a copy, "steps_to_copy": per prompt the
    first checkpoint with a copy (None: none within `steps`), "own" (the targeted images' indices in
    `references`), "loss_start", "loss_end", "unet_evals", "seconds"} (JSON-ready); with `keep_generations`
    also "_generated": the last checkpoint's generations [P * n, 3, H, W] (a tensor, for the report's figure)."""
    checkpoints = sorted({int(s) for s in curve if 0 <= int(s) <= steps} | {int(steps)})
    res = dori_attack(pipe, images, init, steps, lr, batch, seed, checkpoints, batch_size)
    start, evals = time.perf_counter(), res["unet_evals"]
    copied = []
    for s in checkpoints:
        gen = generate_from_embeddings(pipe, res["recorded"][s], n, seed, sample_steps, guidance_scale, batch_size)
        copied.append(own_copies(gen, references, own, n, calibration, sscd_model, batch_size))
    passes = 2 if guidance_scale > 1 else 1  # the pipeline's samples, counted by hand (it bypasses the core)
    evals += len(checkpoints) * len(images) * n * sample_steps * passes
    hit = np.stack(copied)  # [checkpoints, P, n]
    steps_to_copy = [next((checkpoints[i] for i in range(len(checkpoints)) if hit[i, p].any()), None)
                     for p in range(hit.shape[1])]
    return {"checkpoints": checkpoints, "replication": hit.mean((1, 2)).tolist(),
            "prompts_copied": hit.any(2).mean(1).tolist(), "steps_to_copy": steps_to_copy,
            "per_prompt_final": hit[-1].mean(1).tolist(), "own": own.tolist(),
            "loss_start": res["loss_start"].tolist(), "loss_end": res["loss_end"].tolist(),
            "unet_evals": evals, "seconds": round(res["seconds"] + time.perf_counter() - start, 2),
            **({"_generated": gen} if keep_generations else {})}


def dori_section(pipe, texts: Sequence[str], images: torch.Tensor, control_texts: Sequence[str],
                 control_images: torch.Tensor | None, references: torch.Tensor, n: int = 1, seed: int = 0,
                 steps: int = DORI_STEPS, control_steps: int = CONTROL_STEPS, lr: float = DORI_LR,
                 batch: int = DORI_BATCH, curve: Sequence[int] = CURVE, sample_steps: int = 50,
                 guidance_scale: float = 7.5, batch_size: int = DEFAULT_BATCH_SIZE,
                 calibration: Calibration = GU_RATIO, sscd_model=None, keep_generations: bool = False) -> dict:
    """The report's DoRI section (JSON-ready but for `keep_generations`, `dori_curve`): each memorized prompt's
    embedding optimised towards its own training image for `steps` and, as the false-positive control, each
    non-memorized member image's (its own caption's embedding as start) for `control_steps`; copies judged by the report's verdict `calibration`
    against `references`, and counted only when the nearest reference is the targeted image."""
    own = own_references(pipe, images, references, batch_size)
    kw = dict(curve=curve, n=n, seed=seed, lr=lr, batch=batch, sample_steps=sample_steps,
              guidance_scale=guidance_scale, batch_size=batch_size, calibration=calibration, sscd_model=sscd_model,
              keep_generations=keep_generations)
    memorized = dori_curve(pipe, images, initial_embeddings(pipe, len(texts), texts, seed, batch_size),
                           references, own, steps, **kw)
    section = {"prompts": len(texts), "n": n, "steps": steps, "lr": lr, "batch": batch, "init": "prompt",
               "criterion": calibration.describe(), "texts": list(texts), "memorized": memorized, "control": None}
    if control_images is not None and len(control_images):
        own_c = own_references(pipe, control_images, references, batch_size)
        section["control"] = dori_curve(pipe, control_images,
                                        initial_embeddings(pipe, len(control_texts), control_texts, seed, batch_size),
                                        references, own_c, control_steps, **kw)
        section["control"]["texts"] = list(control_texts)
        section["control_steps"] = control_steps
    section["unet_evals"] = memorized["unet_evals"] + (section["control"] or {}).get("unet_evals", 0)
    section["seconds"] = round(memorized["seconds"] + (section["control"] or {}).get("seconds", 0.0), 2)
    return section
