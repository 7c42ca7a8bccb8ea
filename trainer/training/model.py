"""The model a training run fine-tunes: its parts loaded from `model.pretrained` in the recipe's dtypes, the
LoRA adapter added to its UNet (`model.lora`), and its optimizer, LR schedule and EMA copy, prepared with
Accelerate as diffusers' `train_text_to_image.py` does."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.core.components import (
    check_dimensions,
    check_model_folders,
    check_resolution,
    check_weight_files,
    load_error,
)
from trainer.io import MemtrainError
from trainer.mitigate.loss_mask import LossMask
from trainer.recipe import TrainRecipe


def frozen_dtype(recipe: TrainRecipe) -> torch.dtype:
    """The dtype of the frozen parts (VAE, text encoder unless trained) under `train.mixed_precision`."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[recipe.train.mixed_precision]


def load_components(recipe: TrainRecipe) -> dict:
    """Tokenizer, text encoder, optional VAE, UNet and DDPM noise scheduler of `model.pretrained`."""
    m = recipe.model
    path = m.pretrained
    local = Path(path)
    if local.exists() and not (local / "model_index.json").exists() and not (local / "unet").exists():
        raise MemtrainError(f"model.pretrained={path}: not a diffusers pipeline directory (no model_index.json)")
    if local.is_dir():
        check_model_folders(local, f"model.pretrained={path}")
        check_weight_files(local, f"model.pretrained={path}")
        if recipe.export == "pipeline" and not (local / "model_index.json").exists():
            raise MemtrainError(f"model.pretrained={path}: no model_index.json, which output.export=pipeline needs "
                                "to write a pipeline; add it (from the model's source) or set output.export=lora "
                                "(with model.lora.rank > 0) or none")
    kw = dict(revision=m.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=m.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=m.variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        vae = None
        if not local.exists() or (local / "vae").exists():  # loaded in the training dtype: the loop only moves it
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=m.variant, dtype=frozen_dtype(recipe),
                                                **kw)
    except (OSError, pickle.UnpicklingError) as e:  # diffusers wraps a refused pickle in an OSError
        raise load_error(local, f"model.pretrained={path}", e) from None
    if tokenizer.model_max_length > 1000:  # tokenizers saved without it report a huge sentinel
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    if m.prediction_type is not None:
        scheduler.register_to_config(prediction_type=m.prediction_type)
    check_dimensions(path, text_encoder, unet, vae)
    check_resolution(recipe.data.resolution, vae, path)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, noise_scheduler=scheduler)


def add_lora(unet, recipe: TrainRecipe) -> None:
    lora = recipe.model.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                        init_lora_weights="gaussian", target_modules=lora.target_modules)
    try:
        unet.add_adapter(config)
    except ValueError as e:
        raise MemtrainError(f"model.lora.target_modules={lora.target_modules}: {e}") from None


@dataclass
class TrainingSetup:
    """What `prepare_training` hands the loop: the prepared optimizer, scheduler and loader, the trained
    parameters, the EMA copy and the loss mask (None when off)."""

    weight_dtype: torch.dtype
    params: list
    lr: float
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: object
    ema: EMAModel | None
    loss_mask: LossMask | None


def prepare_training(recipe: TrainRecipe, accelerator: Accelerator, parts: dict, loader) -> TrainingSetup:
    """Freeze what is not trained, add the LoRA adapter, build EMA, AdamW and the LR schedule, prepare them with
    `accelerator` (the prepared UNet and text encoder replace those in `parts`) and the loss mask."""
    opt = recipe.train
    unet, text_encoder, vae, tokenizer = parts["unet"], parts["text_encoder"], parts["vae"], parts["tokenizer"]
    weight_dtype = frozen_dtype(recipe)
    if vae is not None:
        vae.requires_grad_(False)
        vae.to(accelerator.device)  # already in weight_dtype (load_components); a dtype here makes diffusers warn
    text_encoder.requires_grad_(recipe.model.train_text_encoder)
    if not recipe.model.train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    if recipe.model.lora.rank > 0:
        unet.requires_grad_(False)
        add_lora(unet, recipe)
    if opt.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if opt.ema:
        ema = EMAModel(unet.parameters(), decay=opt.ema_decay, model_cls=type(unet), model_config=unet.config,
                       foreach=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if recipe.model.train_text_encoder:
        params += list(text_encoder.parameters())
    lr = opt.learning_rate
    if opt.scale_lr:
        lr *= opt.batch_size * opt.gradient_accumulation_steps * accelerator.num_processes
    # one fused kernel over all parameters instead of a Python loop (CPU and CUDA have it)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.adam_weight_decay, eps=opt.adam_epsilon,
                                  fused=accelerator.device.type in ("cpu", "cuda"))

    try:
        lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer,
                                     num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=opt.max_steps * accelerator.num_processes)
    except ValueError as e:
        raise MemtrainError(f"recipe: `train.lr_scheduler`: {e}") from None
    if recipe.model.train_text_encoder:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    parts.update(unet=unet, text_encoder=text_encoder)
    if ema is not None:
        ema.to(accelerator.device)
    loss_mask = LossMask.from_recipe(opt, parts["noise_scheduler"].config.num_train_timesteps)
    if loss_mask is not None:
        empty = tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt")
        with torch.no_grad():
            parts["empty_hidden"] = text_encoder(empty.input_ids.to(accelerator.device), return_dict=False)[0]

    return TrainingSetup(weight_dtype, params, lr, optimizer, lr_scheduler, loader, ema, loss_mask)
