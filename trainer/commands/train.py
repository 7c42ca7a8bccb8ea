"""`memtrain train RECIPE [key=value ...]`."""

from __future__ import annotations

import argparse
import json

from accelerate import PartialState

from trainer.config import describe_keys, dump_recipe, load_recipe
from trainer.recipe import TrainRecipe
from trainer.training.loop import train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a diffusers SD checkpoint from a YAML recipe (full or LoRA)",
        description="Fine-tune a Stable Diffusion checkpoint. RECIPE is a YAML file (see recipes/); "
        "overrides are key.sub=value pairs, e.g. train.max_steps=200 model.lora.rank=8.\n\n"
        "Several processes: `train.batch_size` is per process, so the global batch is train.batch_size x processes "
        "x train.gradient_accumulation_steps (halve train.batch_size on 2 processes to keep a 1-process run's "
        "batch). Several GPUs: run under `accelerate launch` (recipes/accelerate/*.yaml). Several CPU processes "
        "(gloo): `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 "
        "-m trainer.cli train RECIPE` (docs/multi-gpu.md).\n\nSections: model (pretrained, prediction_type, "
        "lora.rank/alpha/target_modules, train_text_encoder), data (path, caption_column, resolution, "
        "center_crop, random_flip, captions.*, dedup), train (batch_size, gradient_accumulation_steps, "
        "max_steps, learning_rate, lr_scheduler, snr_gamma, noise_offset, ema, mixed_precision, "
        "gradient_checkpointing, loss_mask_quantile, loss_mask_threshold), checkpoint (every_steps, total_limit, resume, at_end, "
        "allow_changes: a resume refuses a changed recipe unless allowed), "
        "log (trackers, validation_prompts), output (dir, export, overwrite), monitor (every_steps, members, heldout, "
        "novel_prompts, alarm_threshold, alarm_action: memorization curves, see docs/recipes.md). "
        "Every key is documented in docs/recipes.md.",
    )
    p.epilog = "recipe keys (key = default):\n" + "\n".join(describe_keys(TrainRecipe))
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(TrainRecipe, args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_recipe(recipe))
        return 0
    summary = train(recipe)
    if PartialState().is_main_process:  # under torchrun / accelerate launch, one summary
        print(json.dumps(summary))
    return 0
