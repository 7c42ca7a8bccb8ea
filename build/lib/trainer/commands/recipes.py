"""`memtrain recipes`: the built-in training recipes, one line each."""

from __future__ import annotations

import argparse

from trainer.config import builtin_recipes, recipe_summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the built-in training recipes",
                       description="List the recipes shipped with memtrain; `memtrain train NAME` runs one.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipes = builtin_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")
    return 0
