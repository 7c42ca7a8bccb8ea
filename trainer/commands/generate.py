"""`memtrain generate`: DDIM generations of a checkpoint for a prompt file, optionally guarded against
replicating training images (`--guard amg|wen`, `trainer.sample.guidance`); guarded runs also write
`guard_records.jsonl` (per image: steps intervened, max similarity, nearest training image)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from trainer.core.components import load_pipeline
from trainer.core.distributed import is_main_process, process_device
from trainer.io import MemtrainError, atomic_dir, check_output
from trainer.measure.embedders import INDEX_EMBEDDINGS
from trainer.prompts import read_prompts
from trainer.sample.generate import generate_images
from trainer.sample.guard import GUARDS, guarded_generate, load_index
from trainer.sample.guidance import (
    C1_DEFAULT,
    C2_DEFAULT,
    C3_DEFAULT,
    WEN_LR,
    WEN_MAX_ITERS,
    WEN_TARGET,
    calibrate_wen_target,
)


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
    add_guard_arguments(p)
    p.set_defaults(func=_run)


def read_paths(args: argparse.Namespace) -> dict:
    """The files and directories `generate` reads: its --out may not hold or lie in any of them."""
    return {"CHECKPOINT": args.checkpoint, "--prompts": args.prompts, "--lora": args.lora, "--index": args.index,
            "--embedder-path": args.embedder_path, "--wen-calibrate": args.wen_calibrate}


def _run(args: argparse.Namespace) -> int:
    for flag, value in (("-n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    prompts = [r["text"] for r in read_prompts(args.prompts)]  # a bad prompt file is named first
    check_output(args.out, "generate", read_paths(args))
    if args.index and args.guard != "amg" and is_main_process():
        print(f"memtrain generate: warning: --index {args.index} is used only by --guard amg; it is ignored here",
              file=sys.stderr)
    if args.guard != "none":
        return run_guarded(args)
    pipe = load_pipeline(args.checkpoint, args.lora, device=process_device())
    images = generate_images(pipe, prompts, args.n, args.seed, args.steps, args.guidance_scale, args.batch_size,
                             progress=is_main_process(), across_processes=True)
    save_images(images, [p for p in prompts for _ in range(args.n)], args.out, read_paths(args))
    if is_main_process():
        print(json.dumps({"images": len(images), "out": args.out}))
    return 0


# ---------------------------------------------------------------- guarded sampling


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("guarded sampling")
    g.add_argument("--guard", choices=GUARDS, default="none",
                   help="amg: Anti-Memorization Guidance (Chen et al. 2024, needs --index); wen: optimise the "
                        "prompt embedding first (Wen et al. 2024); none: the stock pipeline (default)")
    g.add_argument("--index", help="training-image index directory (`memtrain index`), for --guard amg")
    g.add_argument("--guard-embedding", choices=INDEX_EMBEDDINGS,
                   help="require the index to be built with this embedding (default: whatever it was built with)")
    g.add_argument("--embedder-path", help="CLIP model directory / SSCD TorchScript file for a clip/sscd index")
    g.add_argument("--guard-threshold", type=float,
                   help="AMG similarity threshold lambda (constant); default: the paper's schedule for sscd, "
                        "0.85 for pixels; required for clip")
    g.add_argument("--amg-c1", type=float, default=C1_DEFAULT, help=f"despecification scale (default {C1_DEFAULT:g})")
    g.add_argument("--amg-c2", type=float, default=C2_DEFAULT,
                   help=f"caption-deduplication scale (default {C2_DEFAULT:g})")
    g.add_argument("--amg-c3", type=float, default=C3_DEFAULT, help=f"dissimilarity scale (default {C3_DEFAULT:g})")
    g.add_argument("--amg-check-every", type=int, default=1,
                   help="check the similarity every k-th step only (default 1: every step, as the paper)")
    g.add_argument("--wen-target", type=float,
                   help=f"first-step magnitude target (default {WEN_TARGET:g}, or calibrated with --wen-calibrate)")
    g.add_argument("--wen-calibrate", metavar="PROMPTS",
                   help="general prompts: set the target to the 95%% quantile of their first-step magnitude")
    g.add_argument("--wen-lr", type=float, default=WEN_LR)
    g.add_argument("--wen-max-iters", type=int, default=WEN_MAX_ITERS)


def guard_options(args: argparse.Namespace, pipe) -> dict:
    """Keyword options for `guarded_generate` from the parsed arguments."""
    if args.guard == "amg":
        return dict(threshold=args.guard_threshold, c1=args.amg_c1, c2=args.amg_c2, c3=args.amg_c3,
                    check_every=args.amg_check_every, embedder_path=args.embedder_path)
    if args.guard == "wen":
        if args.wen_target is not None and args.wen_calibrate:
            raise MemtrainError("give either --wen-target or --wen-calibrate, not both")
        target = args.wen_target if args.wen_target is not None else WEN_TARGET
        if args.wen_calibrate:
            general = [r["text"] for r in read_prompts(args.wen_calibrate)]
            target = calibrate_wen_target(pipe, general, 0.95, args.seed, args.steps)
        return dict(target=target, lr=args.wen_lr, max_iters=args.wen_max_iters)
    return {}




def run_guarded(args: argparse.Namespace) -> int:
    if args.guard == "amg" and not args.index:
        raise MemtrainError("--guard amg needs --index INDEX (a training-image index built by `memtrain index`)")
    prompts = [r["text"] for r in read_prompts(args.prompts)]
    pipe = load_pipeline(args.checkpoint, args.lora, device=process_device())
    index = load_index(args.index, pipe, args.guard_embedding) if args.guard == "amg" else None
    options = guard_options(args, pipe)
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
