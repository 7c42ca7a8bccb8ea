"""`memtrain generate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from trainer.core.components import load_pipeline
from trainer.io import atomic_dir
from trainer.prompts import read_prompts
from trainer.sample.generate import generate_images


def save_images(images: torch.Tensor, names: list[str], out: str | Path) -> None:
    """Write PNGs (and `generations.jsonl` with each file's prompt) into `out`, atomically."""

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


def _run(args: argparse.Namespace) -> int:
    prompts = [r["text"] for r in read_prompts(args.prompts)]
    pipe = load_pipeline(args.checkpoint, args.lora)
    images = generate_images(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale, args.batch_size)
    save_images(images, [p for p in prompts for _ in range(args.n)], args.out)
    print(json.dumps({"images": len(images), "out": args.out}))
    return 0
