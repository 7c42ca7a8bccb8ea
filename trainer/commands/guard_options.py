"""The guarded-sampling options of `memtrain generate` and `memtrain evaluate`, built from the guards'
own declarations (`trainer.sample.guard.GUARDS`, each guard's `options`): `add_guard_arguments` adds one
argparse group, `guard_options` checks every value against its range (one MemtrainError naming the option)
and returns the chosen guard's keyword options."""

from __future__ import annotations

import argparse
import sys

from trainer.io import MemtrainError
from trainer.measure.embedders import INDEX_EMBEDDINGS
from trainer.sample.guard import GUARDS
from trainer.sample.guards import NoGuard, Option

# evaluate's own index option, checked with the guards' (it shares their range rule)
INDEX_THRESHOLD = Option("--index-threshold", "index_threshold", low=-1.0, high=1.0, low_ok=False, high_ok=False,
                         meaning="a cosine similarity in (-1, 1) (evaluate)")


def index_guards() -> list[str]:
    """The guards that search a training-image index (`--index`)."""
    return [name for name, guard in GUARDS.items() if guard.needs_index]


def guard_paths(values: dict) -> dict:
    """{flag: value} of the guard options that name input files (an output may not replace them), from
    {argparse dest: value}."""
    return {o.flag: values.get(o.dest) for guard in GUARDS.values() for o in guard.options if o.reads_file}


def add_guard_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The guard group: `--guard`, `--guard-embedding` and every registered guard's options (`defaults`
    False leaves unset options out of the parsed arguments, for commands whose spec holds the defaults)."""
    g = parser.add_argument_group("guarded sampling")
    others = [name for name in GUARDS if name != NoGuard.name]
    g.add_argument("--guard", choices=GUARDS, default=NoGuard.name if defaults else argparse.SUPPRESS,
                   help="; ".join(f"{name}: {GUARDS[name].help}" for name in [*others, NoGuard.name]))
    g.add_argument("--guard-embedding", choices=INDEX_EMBEDDINGS,
                   help="require the index to be built with this embedding (default: whatever it was built with)")
    for guard in GUARDS.values():
        for option in guard.options:
            g.add_argument(option.flag, type=option.type, help=option.help, metavar=option.metavar,
                           default=option.default if defaults else argparse.SUPPRESS)


def checked_guard_options(guard: str, options: dict | None = None, flags: dict | None = None) -> dict:
    """The keyword options of guard `guard`: `flags` (argparse dest -> value, the guard options given on the
    command line) over `options` (e.g. a spec's `guard_options`) over each declared default. Every guard's
    values are range-checked (one MemtrainError naming the option), as is an unknown key of `options`."""
    options, flags = options or {}, flags or {}
    if guard not in GUARDS:
        raise MemtrainError(f"--guard must be one of {', '.join(GUARDS)}, got {guard!r}")
    known = [o.keyword for o in GUARDS[guard].options]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MemtrainError(f"guard_options: unknown key {', '.join(unknown)} for guard {guard} (its options: "
                            f"{', '.join(known) or 'none'})")
    chosen = {}
    for name, cls in GUARDS.items():
        given = options if name == guard else {}
        values = cls.checked({o.keyword: flags.get(o.dest, given.get(o.keyword, o.default)) for o in cls.options})
        chosen = values if name == guard else chosen
    return chosen


def guard_options(args: argparse.Namespace, index_has_other_use: bool = False) -> dict:
    """Checked keyword options of the chosen guard (`--guard`) from the parsed arguments (`checked_guard_options`),
    and a warning when `--index` is given but nothing uses it."""
    INDEX_THRESHOLD.check(getattr(args, INDEX_THRESHOLD.dest, None))
    chosen = checked_guard_options(args.guard, flags=vars(args))
    if getattr(args, "index", None) and not GUARDS[args.guard].needs_index and not index_has_other_use:
        print(f"memtrain: warning: --index {args.index} is unused without --guard {' / '.join(index_guards())} "
              "(the generations are not guarded)", file=sys.stderr)
    return chosen
