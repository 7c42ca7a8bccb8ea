"""`memtrain toy-data`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

from trainer.io import MemtrainError
from trainer.toy.families import FamiliesConfig, make_families_data
from trainer.toy.world import ToyDataConfig, make_toy_data

WORLDS = {"shapes": (ToyDataConfig, make_toy_data), "families": (FamiliesConfig, make_families_data)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy-data",
        help="write a procedural toy dataset (imagefolder + labels) with planted duplicates",
        description="Write OUT/train and OUT/heldout as diffusers imagefolder directories and "
        "OUT/labels.jsonl with each prompt's group: duplicated, singleton, heldout, novel. "
        "--world shapes (default): flat shapes; --world families: crops of a dozen procedural photos, "
        "so every image has related images (docs/toy-world.md).",
    )
    p.add_argument("out", help="output directory (replaced atomically)")
    p.add_argument("--world", choices=tuple(WORLDS), default="shapes", help="which toy world (default shapes)")
    seen: set[str] = set()
    for world, (config, _) in WORLDS.items():
        for key, value in asdict(config()).items():
            flag = f"--{key.replace('_', '-')}"
            shared = all(key in asdict(c()) for c, _ in WORLDS.values())
            note = f"default {value}" if shared else f"--world {world} only; default {value}"
            if key in seen:
                continue
            seen.add(key)
            if isinstance(value, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=note)
            else:
                p.add_argument(flag, type=int, default=None, help=note)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config, make = WORLDS[args.world]
    keys = {f.name for f in fields(config)}
    for world, (other, _) in WORLDS.items():
        for f in fields(other):
            if f.name not in keys and getattr(args, f.name) is not None:
                raise MemtrainError(f"--{f.name.replace('_', '-')} belongs to --world {world}, not --world {args.world}; "
                                    "see `memtrain toy-data --help`")
    cfg = config(**{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    if cfg.n_duplicated < 1:
        raise MemtrainError(f"--n-duplicated must be >= 1, got {cfg.n_duplicated}: the toy data set exists to plant "
                            "duplicated images for the detectors to find, and with none there is nothing to find")
    for key in ("copies", "min_copies"):
        if getattr(cfg, key, 2) < 2:
            raise MemtrainError(f"--{key.replace('_', '-')} must be >= 2, got {getattr(cfg, key)}: a duplicated "
                                "image needs at least two copies")
    if getattr(cfg, "max_copies", 2) < getattr(cfg, "min_copies", 2):
        raise MemtrainError(f"--max-copies ({cfg.max_copies}) must be >= --min-copies ({cfg.min_copies})")
    summary = make(args.out, cfg)
    print(json.dumps(summary))
    return 0
