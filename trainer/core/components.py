"""Load a Stable Diffusion checkpoint's components, check that they fit together, add LoRA, and build a
sampling pipeline over them. One home for every "open a diffusers checkpoint" path."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.io import MemtrainError
from trainer.recipe import TrainRecipe


def load_components(recipe: TrainRecipe) -> dict:
    """Tokenizer, text encoder, optional VAE, UNet and DDPM noise scheduler of `model.pretrained`."""
    m = recipe.model
    path = m.pretrained
    local = Path(path)
    if local.exists() and not (local / "model_index.json").exists() and not (local / "unet").exists():
        raise MemtrainError(f"model.pretrained={path}: not a diffusers pipeline directory (no model_index.json)")
    kw = dict(revision=m.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=m.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=m.variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except OSError as e:
        raise MemtrainError(f"model.pretrained={path}: cannot load a Stable Diffusion pipeline ({e})") from None
    vae = None
    if not local.exists() or (local / "vae").exists():
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=m.variant, **kw)
    if tokenizer.model_max_length > 1000:  # tokenizers saved without it report a huge sentinel
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    if m.prediction_type is not None:
        scheduler.register_to_config(prediction_type=m.prediction_type)
    check_dimensions(path, text_encoder, unet, vae)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, noise_scheduler=scheduler)


def check_dimensions(path: str, text_encoder, unet, vae) -> None:
    """The parts of a pipeline must fit together; say which ones don't."""
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise MemtrainError(
            f"model.pretrained={path}: unet.cross_attention_dim={unet.config.cross_attention_dim} does not match "
            f"text_encoder.hidden_size={text_encoder.config.hidden_size}; the text encoder is from another model"
        )
    channels = vae.config.latent_channels if vae is not None else 3
    if unet.config.in_channels != channels:
        raise MemtrainError(
            f"model.pretrained={path}: unet.in_channels={unet.config.in_channels} but the "
            f"{'VAE latents' if vae is not None else 'images (no VAE)'} have {channels} channels"
        )


def native_resolution(unet, vae) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return unet.config.sample_size * factor


def add_lora(unet, recipe: TrainRecipe) -> None:
    lora = recipe.model.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                        init_lora_weights="gaussian", target_modules=lora.target_modules)
    try:
        unet.add_adapter(config)
    except ValueError as e:
        raise MemtrainError(f"model.lora.target_modules={lora.target_modules}: {e}") from None


def load_pipeline(path: str | Path, lora: str | Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Load a diffusers SD pipeline from a local directory (or hub id), with optional LoRA weights."""
    local = Path(path)
    if local.exists() and not (local / "model_index.json").exists():
        raise MemtrainError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise MemtrainError(f"{path}: cannot load a Stable Diffusion pipeline ({e})") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        if not Path(lora).exists():
            raise MemtrainError(f"--lora {lora}: no such file or directory")
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_from_components(parts: dict):
    """A StableDiffusionPipeline over live training components (for validation images)."""
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=DDIMScheduler.from_config(parts["noise_scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1) or 1)
