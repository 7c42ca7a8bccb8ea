"""Work shared by the processes of `accelerate launch` (or torchrun): each process takes a contiguous share
of the items (`split_work`), computes their results, and every process receives all results in the
original order (`gather_in_order`). Accelerate's `PartialState` does the bookkeeping; on a single process
(no launcher) the share is everything and nothing is exchanged.

Shares are cut between whole units of `unit` items (e.g. one UNet batch), so every batch holds the same
items as on one process and the numbers do not change with the number of processes. Every process must
call these functions in the same order (they are collective); only the main process writes outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

T = TypeVar("T")
R = TypeVar("R")


def runs_on_cpu() -> bool:
    """True when accelerate will run this process on the CPU: ACCELERATE_USE_CPU is set (`accelerate launch
    --cpu`) or the machine has no accelerator, as `Accelerator` decides (without setting up any state)."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()


def process_state() -> PartialState:
    """Accelerate's process state, on the CPU (gloo) when `runs_on_cpu()`."""
    return PartialState(cpu=runs_on_cpu())


def num_processes() -> int:
    return process_state().num_processes


def is_main_process() -> bool:
    return process_state().is_main_process


def process_device() -> torch.device:
    """This process's accelerator (its own GPU under `accelerate launch`, else cuda / mps / cpu)."""
    return process_state().device


def split_work(items: Sequence[T], unit: int = 1) -> list[T]:
    """This process's contiguous share of `items`, cut only between whole units of `unit` items
    (earlier processes take one unit more when they do not divide evenly; a share may be empty)."""
    unit = max(1, int(unit))
    units = [list(items[i : i + unit]) for i in range(0, len(items), unit)]
    with process_state().split_between_processes(units) as mine:
        return [item for chunk in mine for item in chunk]


def gather_in_order(results: Sequence[R]) -> list[R]:
    """The results of every process's share, concatenated in process order (the order of `split_work`),
    on every process. Results are pickled between processes: keep tensors on the CPU."""
    if num_processes() == 1:
        return list(results)
    return gather_object(list(results))


def across_processes(work: Callable[[list[T]], Sequence[R]], items: Sequence[T], unit: int = 1) -> list[R]:
    """`work(items)` computed in shares by all processes: `work` returns one result per item of its share."""
    share = split_work(items, unit)
    results = work(share) if share else []
    if len(results) != len(share):
        raise ValueError(f"across_processes: {len(share)} items but {len(results)} results")
    return gather_in_order(results)


def sum_over_processes(value: int | float) -> int | float:
    """The sum of one number from every process (e.g. the UNet evaluations each one counted)."""
    return sum(gather_in_order([value]))


def main_process_value(value: T) -> T:
    """The main process's `value` on every process (e.g. the path it wrote to); a synchronisation point."""
    return gather_in_order([value])[0]


def on_main_process(context: AbstractContextManager[T]) -> AbstractContextManager[T | None]:
    """`context` (e.g. `atomic_dir(out)`) entered on the main process only; elsewhere a context yielding None."""
    return context if is_main_process() else contextlib.nullcontext()
