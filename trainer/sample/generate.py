"""Generation from a checkpoint (a diffusers pipeline directory, optionally with LoRA weights).

Sampling is stock `StableDiffusionPipeline` with a DDIM scheduler (50 steps, guidance 7.5 by
default, as in the memorization papers). Generation j of every prompt starts from the noise of
seed `seed + j`, so prompts are compared on the same initial noise.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.core.unet_core import initial_latents


@torch.no_grad()
def generate_images(pipe, prompts: list[str], n: int = 1, seed: int = 0, steps: int = 50,
                    guidance_scale: float = 7.5, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major (prompt i, generation j at i*n+j)."""
    jobs = [(p, seed + j) for p in prompts for j in range(n)]
    out = []
    bar = tqdm(total=len(jobs), desc="generate", disable=not progress, dynamic_ncols=True)
    device = pipe.device
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        latents = initial_latents(pipe.unet, [s for _, s in chunk]).to(device, pipe.unet.dtype)
        images = pipe(prompt=[p for p, _ in chunk], latents=latents, num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="pt").images
        out.append(images.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out).clamp(0, 1)
