"""Generation from a checkpoint (a diffusers pipeline directory, optionally with LoRA weights).

Sampling is stock `StableDiffusionPipeline` with a DDIM scheduler (50 steps, guidance 7.5 by
default, as in the memorization papers). Generation j of every prompt starts from the noise of
seed `seed + j`, so prompts are compared on the same initial noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.io import MemtrainError, atomic_dir


def load_pipeline(path: str | Path, lora: str | Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Load a diffusers SD pipeline from a local directory (or hub id), with optional LoRA weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=DDIMScheduler.from_config(parts["noise_scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        generators = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        latents = torch.stack([_initial_noise(pipe, g) for g in generators]).to(device, pipe.unet.dtype)
        images = pipe(prompt=[p for p, _ in chunk], latents=latents, num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="pt").images
        out.append(images.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out).clamp(0, 1)


def _initial_noise(pipe, generator: torch.Generator) -> torch.Tensor:
    unet = pipe.unet
    size = unet.config.sample_size
    return torch.randn((unet.config.in_channels, size, size), generator=generator)


def save_images(images: torch.Tensor, names: list[str], out: str | Path) -> None:
    """Write PNGs (and `generations.jsonl` with each file's prompt) into `out`, atomically."""
    from PIL import Image

    with atomic_dir(out) as tmp:
        with open(tmp / "generations.jsonl", "w") as meta:
            for i, (image, name) in enumerate(zip(images, names, strict=True)):
                file = f"{i:05d}.png"
                array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                Image.fromarray(array).save(tmp / file)
                meta.write(json.dumps({"file_name": file, "text": name}) + "\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a checkpoint for a prompt file",
                       description="Generate images with DDIM from a diffusers pipeline directory.")
    p.add_argument("checkpoint", help="diffusers pipeline directory")
    p.add_argument("--lora", help="LoRA weights (directory or pytorch_lora_weights.safetensors)")
    p.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with a `text` field")
    p.add_argument("--out", required=True, help="output directory for PNGs and generations.jsonl")
    p.add_argument("-n", type=int, default=1, help="generations per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_run)


def read_prompts(path: str | Path) -> list[dict]:
    """Plain text (one prompt a line) or JSONL rows with `text` (or `prompt`) and optional labels."""
    path = Path(path)
    if not path.exists():
        raise MemtrainError(f"prompt file {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MemtrainError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
            text = row.get("text", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise MemtrainError(f"{path}, line {i}: needs a non-empty `text` (or `prompt`) string")
            rows.append(dict(row, text=text))
        else:
            rows.append({"text": line.strip()})
    if not rows:
        raise MemtrainError(f"prompt file {path} has no prompts")
    return rows


def _run(args: argparse.Namespace) -> int:
    prompts = [r["text"] for r in read_prompts(args.prompts)]
    pipe = load_pipeline(args.checkpoint, args.lora)
    images = generate_images(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale, args.batch_size)
    save_images(images, [p for p in prompts for _ in range(args.n)], args.out)
    print(json.dumps({"images": len(images), "out": args.out}))
    return 0
