"""The guarded-sampling options of `memtrain generate` and `memtrain evaluate`, defined and checked once:
`add_guard_arguments` adds them, `guard_options` checks every value against its range (one
MemtrainError naming the option) and returns the keyword options of `trainer.sample.guard`."""

from __future__ import annotations

import argparse
import math
import sys

from trainer.io import MemtrainError
from trainer.measure.embedders import INDEX_EMBEDDINGS
from trainer.sample.guard import GUARDS
from trainer.sample.guidance import C1_DEFAULT, C3_DEFAULT, WEN_LR, WEN_MAX_ITERS, WEN_TARGET

# option -> (attribute, lowest, highest, lowest allowed?, highest allowed?, what the range means)
RANGES = {
    "--guard-threshold": ("guard_threshold", -1.0, 1.0, False, False, "a cosine similarity in (-1, 1)"),
    "--index-threshold": ("index_threshold", -1.0, 1.0, False, False,
                          "a cosine similarity in (-1, 1) (evaluate)"),
    "--amg-c1": ("amg_c1", 0.0, math.inf, True, False, ">= 0 (0 turns despecification off)"),
    "--amg-c3": ("amg_c3", 0.0, math.inf, True, False, ">= 0 (0 turns the dissimilarity term off)"),
    "--amg-check-every": ("amg_check_every", 1, math.inf, True, False, "an integer >= 1 (1: every step)"),
    "--wen-target": ("wen_target", 0.0, math.inf, False, False, "> 0 (a first-step magnitude)"),
    "--wen-lr": ("wen_lr", 0.0, math.inf, False, False, "> 0"),
    "--wen-max-iters": ("wen_max_iters", 1, math.inf, True, False, "an integer >= 1"),
}


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("guarded sampling")
    g.add_argument("--guard", choices=GUARDS, default="none",
                   help="amg: Anti-Memorization Guidance (Chen et al. 2024, needs --index); wen: optimise the "
                        "prompt embedding first (Wen et al. 2024); none: the stock pipeline (default)")
    g.add_argument("--guard-embedding", choices=INDEX_EMBEDDINGS,
                   help="require the index to be built with this embedding (default: whatever it was built with)")
    g.add_argument("--embedder-path", help="CLIP model directory / SSCD TorchScript file for a clip/sscd index")
    g.add_argument("--guard-threshold", type=float,
                   help="AMG: the similarity at which a clean estimate triggers the guard, in (-1, 1); default: "
                        "the authors' schedule for sscd, the index's calibration (`memtrain index --heldout`) "
                        "for pixels / clip")
    g.add_argument("--amg-c1", type=float, default=C1_DEFAULT,
                   help=f"despecification scale, >= 0 (default {C1_DEFAULT:g}, the authors')")
    g.add_argument("--amg-c3", type=float, default=C3_DEFAULT,
                   help=f"dissimilarity scale, >= 0 (default {C3_DEFAULT:g}, the authors')")
    g.add_argument("--amg-check-every", type=int, default=1,
                   help="check the similarity every k-th step only (default 1: every step, as the paper)")
    g.add_argument("--wen-target", type=float,
                   help=f"first-step magnitude target > 0 (default {WEN_TARGET:g}, or calibrated with --wen-calibrate)")
    g.add_argument("--wen-calibrate", metavar="PROMPTS",
                   help="general prompts: set the target to the 95%% quantile of their first-step magnitude")
    g.add_argument("--wen-lr", type=float, default=WEN_LR, help=f"> 0 (default {WEN_LR:g})")
    g.add_argument("--wen-max-iters", type=int, default=WEN_MAX_ITERS, help=f">= 1 (default {WEN_MAX_ITERS})")


def check_guard_arguments(args: argparse.Namespace, index_has_other_use: bool = False) -> None:
    """One MemtrainError per out-of-range option; a warning when `--index` is given but nothing uses it."""
    for flag, (attr, low, high, low_ok, high_ok, meaning) in RANGES.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        inside = (value > low or (low_ok and value == low)) and (value < high or (high_ok and value == high))
        if not inside or (isinstance(value, float) and math.isnan(value)):
            raise MemtrainError(f"{flag} must be {meaning}, got {value:g}")
    if args.wen_target is not None and args.wen_calibrate:
        raise MemtrainError("give either --wen-target or --wen-calibrate, not both")
    if getattr(args, "index", None) and args.guard != "amg" and not index_has_other_use:
        print(f"memtrain: warning: --index {args.index} is unused without --guard amg (the generations are not "
              "guarded)", file=sys.stderr)


def guard_options(args: argparse.Namespace, index_has_other_use: bool = False) -> dict:
    """Checked keyword options for `trainer.sample.guard.guarded_generate` from the parsed arguments."""
    check_guard_arguments(args, index_has_other_use)
    if args.guard == "amg":
        return dict(threshold=args.guard_threshold, c1=args.amg_c1, c3=args.amg_c3,
                    check_every=args.amg_check_every, embedder_path=args.embedder_path)
    if args.guard == "wen":
        target = args.wen_target if args.wen_target is not None else WEN_TARGET
        return dict(target=target, lr=args.wen_lr, max_iters=args.wen_max_iters, calibrate=args.wen_calibrate)
    return {}
