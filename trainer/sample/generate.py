"""Generation from a checkpoint (a diffusers pipeline directory, optionally with LoRA weights).

Sampling is stock `StableDiffusionPipeline` with a DDIM scheduler (50 steps, guidance 7.5 by
default, as in the memorization papers). Generation j of every prompt starts from the noise of
seed `seed + j`, so prompts are compared on the same initial noise. With `across_processes=True`
the batches are shared by the processes of `accelerate launch` (`trainer.core.distributed`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.core import distributed
from trainer.core.unet_core import initial_latents


@torch.no_grad()
def generate_images(pipe, prompts: list[str], n: int = 1, seed: int = 0, steps: int = 50,
                    guidance_scale: float = 7.5, batch_size: int = 32, progress: bool = True,
                    across_processes: bool = False) -> torch.Tensor:
    """Images [len(prompts) * n, 3, H, W] in [0, 1], prompt-major (prompt i, generation j at i*n+j).

    `across_processes`: every process renders a share of whole batches and all receive every image
    (each process must call it); the images are those of one process."""
    jobs = [(p, seed + j) for p in prompts for j in range(n)]

    def render(share: list[tuple[str, int]]) -> list[torch.Tensor]:
        out = []
        bar = tqdm(total=len(share), desc="generate", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            latents = initial_latents(pipe.unet, [s for _, s in chunk]).to(pipe.device, pipe.unet.dtype)
            images = pipe(prompt=[p for p, _ in chunk], latents=latents, num_inference_steps=steps,
                          guidance_scale=guidance_scale, output_type="pt").images
            out.extend(images.float().cpu())
            bar.update(len(chunk))
        bar.close()
        return out

    images = distributed.across_processes(render, jobs, batch_size) if across_processes else render(jobs)
    return torch.stack(images).clamp(0, 1)
