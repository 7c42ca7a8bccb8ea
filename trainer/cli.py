"""The `memtrain` console command. Each verb lives in its own module exposing `add_parser(subparsers)`;
the parser's `func(args) -> int | None` runs it. User errors (`MemtrainError`) print one line and exit 2;
Ctrl-C prints one line and exits 130."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer.io import MemtrainError
from trainer.measure.features import QUALITY_FEATURES
from trainer.toy.checker import TOY_QUALITY

# verb modules, in the order `memtrain --help` lists them
COMMANDS = ["demo", "compare", "toy_data", "recipes", "train", "generate", "evaluate", "dedup", "index", "edit"]


def build_parser() -> argparse.ArgumentParser:
    QUALITY_FEATURES.setdefault("toy", TOY_QUALITY)  # the toy world's feature, by name (`--quality-feature toy`)
    parser = argparse.ArgumentParser(
        prog="memtrain",
        description="Fine-tune Stable Diffusion models without memorizing the training data: "
        "train with mitigations, detect and measure memorization, edit released checkpoints, guard generation. "
        "`memtrain COMMAND --help` explains each.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"trainer.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MemtrainError as e:
        print(f"memtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"memtrain {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
