"""A tiny Stable-Diffusion-shaped model: the same diffusers classes as SD 1.x, scaled down.

`build_tokenizer` makes a CLIP BPE tokenizer offline from a word list (every word becomes a
single token, built from byte-level merges exactly like the real CLIP vocabulary), and
`build_components` creates randomly initialised AutoencoderKL / CLIPTextModel /
UNet2DConditionModel / DDIMScheduler of the requested width. `save_pipeline` writes a directory
that `StableDiffusionPipeline.from_pretrained` loads with no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trainer.io import atomic_dir

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD 1.x noise schedule (scaled_linear, 1000 steps) with "trailing" timestep spacing (999, 979, ..., 19
# at 50 steps; Lin et al., WACV 2024, "Common diffusion noise schedules and sample steps are flawed").
# Deviation: SD uses "leading" spacing; see docs/toy-world.md, "Sampler".
TOY_BASE = Path(str(resources.files("trainer.toy") / "toy_base"))  # the committed toy base model
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="trailing",
)


def build_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds all 512 byte symbols plus every word in `words`.

    Unknown words still tokenize (into bytes), as in real CLIP. Built with `vocab=`/`merges=`
    because transformers 5.x ignores `vocab_file=`.
    """
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words if w}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merge = (current, nxt)
            current = current + nxt
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


@dataclass
class TinySize:
    """Widths of the tiny model. The defaults are the committed toy base's."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 64)  # two downsamples: 32x32x3 -> 8x8 latents
    latent_channels: int = 8  # deviation: SD uses 4 (docs/toy-world.md)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4


def build_components(tokenizer: CLIPTokenizer, size: TinySize | None = None, seed: int = 0) -> dict:
    """Randomly initialised SD-shaped components (vae, text_encoder, tokenizer, unet, scheduler)."""
    size = size or TinySize()
    torch.manual_seed(seed)
    n_vae = len(size.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=size.latent_channels,
        norm_num_groups=16,
        sample_size=size.image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.text_dim,
            intermediate_size=size.text_dim * 4,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_unet = len(size.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (n_vae - 1),
        in_channels=size.latent_channels,
        out_channels=size.latent_channels,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=size.text_dim,
        attention_head_dim=size.attention_head_dim,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def make_pipeline(components: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_pipeline(components: dict, out: str | Path) -> Path:
    """Write a diffusers pipeline directory (safetensors) atomically: temp dir, then rename."""
    with atomic_dir(out) as tmp:
        make_pipeline(components).save_pretrained(tmp, safe_serialization=True)
    return Path(out)
