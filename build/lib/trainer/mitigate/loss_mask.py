"""Training-time loss masking (Wen et al., ICLR 2024, "Detecting, explaining, and mitigating
memorization in diffusion models", METHODS.md §1.1).

During fine-tuning, the text-conditional noise magnitude ||eps(x_t, t, c) - eps(x_t, t, c0)|| of
each sample is computed at its own training timestep without gradients; samples with a magnitude
>= the threshold (the authors' 2.0 for SD at 64x64x4 latents) are dropped from the loss. The norm
is over the whole flattened latent, so it grows with the latent size: on the toy model (8x8x8
latents, 32x fewer elements than SD's) the norm is on another scale; set the
threshold for your model (`memtrain evaluate` reports the magnitudes of your prompts).

Cost: one extra no-grad UNet forward (the unconditional branch) per sample; the conditional
prediction is the training forward itself.
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
