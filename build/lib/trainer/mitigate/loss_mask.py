"""Training-time loss masking: samples whose text-conditional noise magnitude
||eps(x_t, t, c) - eps(x_t, t, c0)|| at their own timestep is >= a threshold are dropped from the loss
(one extra no-grad unconditional UNet forward per sample).

Implements Wen et al., ICLR 2024, "Detecting, explaining, and mitigating memorization in diffusion
models". Deviation: no default threshold; the authors' 2.0 is for SD's 64x64x4 latents and the norm
grows with the latent size.
"""

from __future__ import annotations

import torch

from trainer.core.unet_core import to_epsilon


def conditional_magnitude(cond: torch.Tensor, uncond: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                          scheduler) -> torch.Tensor:
    """||d(c)|| per sample from two raw UNet outputs at the noisy latents, in epsilon units (`to_epsilon`)."""
    alphas, kind = scheduler.alphas_cumprod, scheduler.config.prediction_type
    x = noisy.detach().float()
    d = to_epsilon(cond.detach().float(), x, timesteps, alphas, kind) - to_epsilon(uncond.float(), x, timesteps, alphas, kind)
    return d.flatten(1).norm(dim=1)


@torch.no_grad()
def memorization_mask(unet, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                      empty_hidden: torch.Tensor, threshold: float, cond_pred: torch.Tensor,
                      scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep weights in {0, 1}, magnitudes) for one micro-batch; `cond_pred` is the training forward."""
    uncond = unet(noisy, timesteps, empty_hidden.expand(len(noisy), -1, -1).to(hidden.dtype), return_dict=False)[0]
    magnitude = conditional_magnitude(cond_pred, uncond, noisy, timesteps, scheduler)
    return (magnitude < threshold).float(), magnitude
