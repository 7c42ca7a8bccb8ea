"""What a sampling guard is: a class that declares its own options and, per batch, may change the prompt
embeddings before sampling and add to the guided prediction at every DDIM step.

A guard subclasses `Guard`, sets `name`, `help`, `options` (its `Option`s: flag, keyword, default, range)
and `needs_index`, takes `(pipe, index=None, embedder=None, **options)` and implements `start`; one line
in `trainer.sample.guard.GUARDS` registers it. `memtrain generate` and `memtrain evaluate` then offer it
under `--guard NAME` with its options (`trainer.commands.guard_options` builds the argparse group), and
the guard section of the report runs it. `NoGuard` is the stock sampler ("none").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from trainer.core.components import model_resolution
from trainer.io import MemtrainError


@dataclass(frozen=True)
class Option:
    """One command-line option of a guard: `--flag` sets the keyword `keyword` of the guard's constructor.

    The value must lie in [low, high] (each end included when `*_ok`), described by `meaning` in the error
    message; `default` None leaves the guard's own default (and the option out of the report);
    `reads_file`: the value is an input path."""

    flag: str
    keyword: str
    type: type = float
    default: Any = None
    help: str = ""
    low: float = -math.inf
    high: float = math.inf
    low_ok: bool = True
    high_ok: bool = True
    meaning: str = ""
    metavar: str | None = None
    reads_file: bool = False  # the value names an input file or directory (an output may not replace it)

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag (`--amg-c1` -> `amg_c1`)."""
        return self.flag.lstrip("-").replace("-", "_")

    def check(self, value) -> None:
        """One MemtrainError when `value` (not None, a number) is outside the option's range."""
        if value is None or not isinstance(value, int | float):
            return
        inside = ((value > self.low or (self.low_ok and value == self.low))
                  and (value < self.high or (self.high_ok and value == self.high)))
        if not inside or (isinstance(value, float) and math.isnan(value)):
            raise MemtrainError(f"{self.flag} must be {self.meaning}, got {value:g}")


@dataclass
class GuardRun:
    """A guard's state for one batch: the (possibly changed) conditional embeddings, the per-step guard
    (an object with `guide(step, t, latents, eps_uncond, eps_cond, eps_hat, table, guidance_scale)`, or None)
    and `records()`, one dict per image once sampling is done."""

    cond: torch.Tensor
    step: Any
    records: Callable[[], list[dict]]


class Guard:
    """A sampling guard (module docstring). Subclasses set the class attributes and implement `start`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs_index: ClassVar[bool] = False
    trigger: str | None = None  # where the guard's firing threshold came from, for the report

    @classmethod
    def checked(cls, values: dict) -> dict:
        """The guard's keyword options from {keyword: value}, each checked against its range; None values
        are dropped (the guard's default applies). Subclasses add cross-option checks."""
        for option in cls.options:
            option.check(values.get(option.keyword))
        return {k: v for k, v in values.items() if v is not None}

    def setup(self, seed: int, steps: int) -> None:
        """Before a run of generations with these seeds and steps (e.g. a calibration); default nothing."""

    def start(self, core, prompts: list[str], cond: torch.Tensor, latents: torch.Tensor, n: int,
              num_inference_steps: int, negative_prompt) -> GuardRun:
        raise NotImplementedError

    def summarize(self, records: list[dict], steps: int) -> dict:
        """Guard-specific figures of a group's records for the report's guard section; default none."""
        return {}


class NoGuard(Guard):
    """The stock sampler through the same DDIM loop: the baseline a guard is compared with."""

    name = "none"
    help = "the stock pipeline (default)"

    def __init__(self, pipe=None, index=None, embedder=None):
        pass

    def start(self, core, prompts, cond, latents, n, num_inference_steps, negative_prompt) -> GuardRun:
        return GuardRun(cond, None, lambda: [{"guard": "none", "intervened": False} for _ in range(len(cond))])


def check_index(index, pipe, embedding: str | None = None, where: str = "index", guard: str = "") -> None:
    """One MemtrainError per problem: no or empty index, other resolution than the model's, other embedding
    (`guard`: the name of the guard that needs it, for the message)."""
    if index is None:
        raise MemtrainError(f"--guard {guard or '...'} needs a training-image index: pass --index INDEX (built by "
                            "`memtrain index`)")
    if len(index.embeddings) == 0:
        raise MemtrainError(f"{where}: the index is empty; rebuild it from the training data with `memtrain index`")
    want = model_resolution(pipe)
    if index.resolution is not None and int(index.resolution) != want:
        raise MemtrainError(
            f"{where}: built at resolution {index.resolution} but the model generates {want}x{want} images; "
            f"rebuild it with `memtrain index ... --resolution {want}`"
        )
    if embedding is not None and index.embedding != embedding:
        raise MemtrainError(
            f"{where}: built with the {index.embedding!r} embedding, not {embedding!r}; rebuild it with "
            f"`--embedding {embedding}` or drop the embedding option"
        )
