"""`memtrain toy-data`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from trainer.io import MemtrainError
from trainer.toy.world import ToyDataConfig, make_toy_data


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy-data",
        help="write the procedural toy dataset (imagefolder + labels) with planted duplicates",
        description="Write OUT/train and OUT/heldout as diffusers imagefolder directories and "
        "OUT/labels.jsonl with each prompt's group: duplicated, singleton, heldout, novel.",
    )
    p.add_argument("out", help="output directory (replaced atomically)")
    defaults = ToyDataConfig()
    for key, value in asdict(defaults).items():
        if isinstance(value, bool):
            p.add_argument(f"--{key.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value,
                           help=f"default {value}")
            continue
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"default {value}")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = ToyDataConfig(**{k: getattr(args, k) for k in asdict(ToyDataConfig())})
    if cfg.n_duplicated < 1:
        raise MemtrainError(f"--n-duplicated must be >= 1, got {cfg.n_duplicated}: the toy data set exists to plant "
                            "duplicated images for the detectors to find, and with none there is nothing to find")
    if cfg.copies < 2:
        raise MemtrainError(f"--copies must be >= 2, got {cfg.copies}: a duplicated image needs at least two copies")
    summary = make_toy_data(args.out, cfg)
    print(json.dumps(summary))
    return 0
