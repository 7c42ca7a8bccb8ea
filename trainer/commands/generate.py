"""`memtrain generate`: DDIM generations of a checkpoint for a prompt file, optionally guarded against
replicating training images (`--guard NAME`, a guard of `trainer.sample.guard.GUARDS`); guarded runs also write
`guard_records.jsonl` (per image: steps intervened, max similarity, nearest training image)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from trainer.commands.guard_options import add_guard_arguments, guard_options, guard_paths, index_guards
from trainer.core.components import load_pipeline
from trainer.core.distributed import is_main_process, process_device
from trainer.io import MemtrainError, atomic_dir, check_output
from trainer.prompts import read_prompts
from trainer.sample.generate import generate_images
from trainer.sample.guard import GUARDS, guarded_generate, load_index
from trainer.sample.guards import NoGuard


def write_images(images: torch.Tensor, names: list[str], directory: Path) -> None:
    """PNGs `00000.png`, ... and `generations.jsonl` (each file's prompt) into an existing directory."""
    with open(directory / "generations.jsonl", "w") as meta:
        for i, (image, name) in enumerate(zip(images, names, strict=True)):
            file = f"{i:05d}.png"
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(array).save(directory / file)
            meta.write(json.dumps({"file_name": file, "text": name}) + "\n")


def save_images(images: torch.Tensor, names: list[str], out: str | Path, inputs: dict | None = None) -> None:
    """`write_images` into `out`, atomically (on the main process only; other processes of a launch return);
    `out` is replaced only under `io.check_replaceable`'s rule (`inputs`: the files it must not delete)."""
    if not is_main_process():
        return
    with atomic_dir(out, "generate", inputs) as tmp:
        write_images(images, names, tmp)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a checkpoint for a prompt file",
                       description="Generate images with DDIM from a diffusers pipeline directory. Under "
                       "accelerate launch the processes share the batches and the main process writes.")
    p.add_argument("checkpoint", help="diffusers pipeline directory")
    p.add_argument("--lora", help="LoRA weights (directory or pytorch_lora_weights.safetensors)")
    p.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with a `text` field")
    p.add_argument("--out", required=True, help="output directory for PNGs and generations.jsonl")
    p.add_argument("-n", type=int, default=1, help="generations per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--index", help="training-image index directory (`memtrain index`), for --guard "
                   f"{' / '.join(index_guards())}")
    add_guard_arguments(p)
    p.set_defaults(func=_run)


def read_paths(args: argparse.Namespace) -> dict:
    """The files and directories `generate` reads: its --out may not hold or lie in any of them."""
    return {"CHECKPOINT": args.checkpoint, "--prompts": args.prompts, "--lora": args.lora, "--index": args.index,
            **guard_paths(vars(args))}


def _run(args: argparse.Namespace) -> int:
    for flag, value in (("-n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    prompts = [r["text"] for r in read_prompts(args.prompts)]  # a bad prompt file is named first
    options = guard_options(args)
    check_output(args.out, "generate", read_paths(args))
    if args.guard != NoGuard.name:
        return run_guarded(args, options)
    pipe = load_pipeline(args.checkpoint, args.lora, device=process_device())
    images = generate_images(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale, args.batch_size,
                             progress=is_main_process(), across_processes=True)
    save_images(images, [p for p in prompts for _ in range(args.n)], args.out, read_paths(args))
    if is_main_process():
        print(json.dumps({"images": len(images), "out": args.out}))
    return 0


# ---------------------------------------------------------------- guarded sampling


def run_guarded(args: argparse.Namespace, options: dict | None = None) -> int:
    needs_index = GUARDS[args.guard].needs_index
    if needs_index and not args.index:
        raise MemtrainError(f"--guard {args.guard} needs --index INDEX (a training-image index built by `memtrain index`)")
    prompts = [r["text"] for r in read_prompts(args.prompts)]
    pipe = load_pipeline(args.checkpoint, args.lora, device=process_device())
    index = load_index(args.index, pipe, args.guard_embedding) if needs_index else None
    options = guard_options(args) if options is None else options
    images, records = guarded_generate(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale,
                                       args.guard, index, args.batch_size, is_main_process(), True, **options)
    if not is_main_process():
        return 0
    with atomic_dir(args.out, "generate", read_paths(args)) as tmp:
        write_images(images, [p for p in prompts for _ in range(args.n)], tmp)
        with open(tmp / "guard_records.jsonl", "w") as f:
            for i, rec in enumerate(records):
                f.write(json.dumps({"file_name": f"{i:05d}.png", **rec}) + "\n")
    intervened = sum(bool(r.get("intervened")) for r in records)
    print(json.dumps({"images": len(images), "out": str(args.out), "guard": args.guard,
                      "intervened": intervened, "intervened_fraction": intervened / max(1, len(records))}))
    return 0
