"""The shared loop of guarded sampling over `trainer.core.unet_core`: the stock DDIM + classifier-free-guidance
loop with an optional per-step guard that may only add to the guided prediction of the rows it fires on,
and the VAE decode of its estimates. The guards: `trainer.sample.amg` (Chen et al., CVPR 2024) and
`trainer.sample.wen` (Wen et al., ICLR 2024); what a guard is: `trainer.sample.guards`.
"""

from __future__ import annotations

import torch

from trainer.core.unet_core import UNetCore
from trainer.io import MemtrainError


def decode_images(core: UNetCore, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of (x0) latents to images [B, 3, H, W] in [0, 1] (float32), keeping autograd if any."""
    vae = core.parts.vae
    if vae is None:
        raise MemtrainError("guarded sampling needs a pipeline with a VAE")
    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(z, return_dict=False)[0].float()
    return (images / 2 + 0.5).clamp(0, 1)


def _guided(eps: torch.Tensor, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eps_uncond, eps_cond, eps_hat) from predictions stacked [uncond batch, cond batch] (the stock order)."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond, eps_cond, eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def cfg_requests(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and embedding indices for [uncond rows 0..b-1, cond rows 0..b-1] over a table cat([uncond, cond])."""
    return torch.arange(b).repeat(2), torch.arange(2 * b)


def sample_latents(
    core: UNetCore,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guard=None,
) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance from x_T `latents` [B, C, H, W]; returns x_0 latents.

    `cond` / `uncond` are the text-encoder outputs [B, L, D] (negative prompt or c0 for `uncond`).
    All 2B predictions of a step go through the core in one request list (the core's batch_size
    decides the forwards; the stock pipeline makes one forward of 2B). `guard` may add guidance to
    the rows where it fires (its `guide`, e.g. `trainer.sample.amg.AMGGuard.guide`).
    """
    if guidance_scale <= 1.0:
        raise MemtrainError(f"guarded sampling needs classifier-free guidance (guidance_scale > 1), got {guidance_scale}")
    scheduler = core.ddim(num_inference_steps)
    b = len(latents)
    table = torch.cat([uncond, cond]).to(core.device, core.dtype)
    x_index, e_index = cfg_requests(b)
    latents = latents.to(core.device, torch.float32)
    for step, t in enumerate(scheduler.timesteps):
        eps = core.eps(latents, int(t), table, x_index, e_index)
        eps_uncond, eps_cond, eps_hat = _guided(eps, guidance_scale)
        if guard is not None:
            eps_hat = guard.guide(step, int(t), latents, eps_uncond, eps_cond, eps_hat, table, guidance_scale)
        latents = scheduler.step(eps_hat, t, latents, return_dict=False)[0]
    return latents
