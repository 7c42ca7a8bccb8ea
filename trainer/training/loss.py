"""The per-sample denoising loss of one micro-batch, with min-SNR weighting (Hang et al., ICCV 2023,
"Efficient diffusion training via min-SNR weighting strategy"), GNI (Somepalli et al. 2023) and loss
masking (Wen et al., ICLR 2024). All randomness of micro-step m is drawn from (seed, m) for the global
batch on the CPU, so N processes and resumed runs equal one uninterrupted process."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import compute_snr

from trainer.core.unet_core import posterior_latents
from trainer.io import MemtrainError
from trainer.mitigate.captions import add_embedding_noise
from trainer.mitigate.loss_mask import LossMask, memorization_mask
from trainer.recipe import TrainRecipe


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 2_654_435_761 + micro_step) % 2**63)


def global_slice(accelerator: Accelerator, per_process: int, actual: int) -> slice:
    start = accelerator.process_index * per_process
    return slice(start, start + actual)


def vae_posterior(vae, pixels: torch.Tensor, views: list | None = None,
                  cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the frozen VAE's posterior q(z | x) of each image. With `cache` (`data.cache`), each
    view (row, crop, flip) is encoded once and its mean and std kept for later epochs: exact, as the VAE is
    frozen, and the latent is still a fresh posterior sample each step (as kohya-ss sd-scripts'
    `--cache_latents`, which caches one sample instead)."""
    if cache is None:
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std
    missing = [i for i, view in enumerate(views) if view not in cache]
    if missing:
        dist = vae.encode(pixels[missing]).latent_dist
        # the memory layout the encoder returned (oneDNN's is channels-last): the UNet then sees the same tensors
        # as without the cache, and rounds the same way
        layout = (torch.channels_last if dist.std.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        for j, i in enumerate(missing):
            cache[views[i]] = (dist.mean[j].clone(), dist.std[j].clone(), layout)
    layout = cache[views[0]][2]
    return (torch.stack([cache[v][0] for v in views]).contiguous(memory_format=layout),
            torch.stack([cache[v][1] for v in views]).contiguous(memory_format=layout))


def diffusion_loss(batch: dict, parts: dict, recipe: TrainRecipe, generator: torch.Generator, rows: slice,
                   global_batch: int, weight_dtype: torch.dtype, loss_mask: LossMask | None = None,
                   posteriors: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Per-sample denoising loss of one micro-batch (mean over the batch is the training loss). With
    `loss_mask`, samples with ||d(c)|| at or over their threshold are masked; the per-sample magnitudes and
    timesteps are returned in `stats["magnitudes"]`, `stats["timesteps"]` (for `loss_mask.record`).
    `posteriors`: the VAE posterior cache of `vae_posterior` (None: encode every step)."""
    unet, text_encoder, vae, scheduler = parts["unet"], parts["text_encoder"], parts["vae"], parts["noise_scheduler"]
    opt = recipe.train
    pixels = batch["pixel_values"].to(weight_dtype)
    device = pixels.device
    shape = (global_batch,) + ((vae.config.latent_channels,) if vae is not None else (pixels.shape[1],))
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    spatial = (pixels.shape[2] // factor, pixels.shape[3] // factor)
    # all randomness of this micro-step, drawn for the global batch on the CPU
    posterior_noise = torch.randn(shape + spatial, generator=generator)[rows]
    noise = torch.randn(shape + spatial, generator=generator)[rows]
    offset = torch.randn(shape + (1, 1), generator=generator)[rows]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,), generator=generator)[rows]
    noise, offset, timesteps = noise.to(device), offset.to(device), timesteps.to(device)

    with torch.no_grad():
        if vae is not None:
            mean, std = vae_posterior(vae, pixels, batch.get("views"), posteriors)
            latents = posterior_latents(vae, mean, std, posterior_noise.to(device, mean.dtype))
        else:
            latents = pixels
    latents = latents.float()
    if opt.noise_offset:
        noise = noise + opt.noise_offset * offset
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = contextlib.nullcontext() if recipe.model.train_text_encoder else torch.no_grad()
    with context:
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    if recipe.data.captions.embedding_noise:  # GNI (Somepalli et al. 2023): c + lambda * N(0, I)
        gni = torch.randn((global_batch,) + tuple(hidden.shape[1:]), generator=generator)[rows]
        hidden = add_embedding_noise(hidden, recipe.data.captions.embedding_noise, noise=gni)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise MemtrainError(f"prediction type {scheduler.config.prediction_type!r} is not supported")
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    stats = {}
    weights = torch.ones_like(per_sample)
    if opt.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=opt.snr_gamma)
        weights = clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)
    if loss_mask is not None:
        keep, magnitude = memorization_mask(unet, noisy, timesteps, hidden, parts["empty_hidden"],
                                            loss_mask.thresholds(timesteps), pred, scheduler)
        weights = weights * keep
        stats["masked"] = (1 - keep).sum()
        stats["noise_magnitude"] = magnitude.mean()
        stats["magnitudes"], stats["timesteps"] = magnitude, timesteps
    loss = (per_sample * weights).sum() / per_sample.numel()
    return loss, stats
