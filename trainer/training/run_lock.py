"""One training run per output directory: `OUT/.memtrain.lock` names the run that writes there, and a new
run does not write into an earlier run's directory unless told to resume or overwrite it.

The lock is a JSON file (pid, host, start time, command) created atomically (written to a temp file, then
hard-linked to its name, which fails if it exists). A lock whose pid is dead on this host is stale (a
`kill -9`, a power cut) and is taken over with a warning; a live one is a MemtrainError naming its owner.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.io import MemtrainError
from trainer.recipe import TrainRecipe
from trainer.tracking import truncate_metrics
from trainer.training.checkpoints import remove_leftovers

LOCK_NAME = ".memtrain.lock"
# what `memtrain train` writes into its output directory (all that `output.overwrite=true` clears)
RUN_OUTPUTS = ("recipe.yaml", "logs", "checkpoints", "validation", "pipeline", "lora", "monitor.json",
               "monitor.png", "wandb")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def read_lock(out: Path) -> dict | None:
    """The lock's JSON (with `path`), or None when there is none; an unreadable lock is a MemtrainError."""
    path = Path(out) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        raise MemtrainError(f"output.dir: {path} is unreadable; if no memtrain run is writing to {out}, delete it") \
            from None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        raise MemtrainError(f"output.dir: {path} is not a memtrain lock; if no run is writing to {out}, delete it")
    return dict(owner, path=str(path))


def is_stale(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"])


def check_unlocked(out: Path) -> None:
    """A MemtrainError when a live run holds `out` (reads only; `run_lock` takes the lock)."""
    owner = read_lock(out)
    if owner is not None and not is_stale(owner):
        raise MemtrainError(
            f"output.dir {out} is in use by another memtrain run (pid {owner['pid']} on host {owner.get('host')}, "
            f"started {owner.get('started')}: {owner.get('command')}); wait for it, stop it, or choose a new "
            f"output.dir (if that run is gone, delete {owner['path']})"
        )


def _try_create(out: Path) -> bool:
    content = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.tmp-", dir=out)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.link(tmp, out / LOCK_NAME)  # atomic, fails if the lock exists
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire(out: Path) -> None:
    """Take the lock of `out` (created if missing); take over a stale one with a warning."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not _try_create(out):
            _take_over(out)
    except OSError as e:  # not a directory, read-only, no permission
        raise MemtrainError(f"output.dir {out}: cannot write there ({e.strerror}); choose a writable output.dir") \
            from None


def _take_over(out: Path) -> None:
    for _ in range(3):
        if _try_create(out):
            return
        owner = read_lock(out)
        if owner is None:  # released meanwhile
            continue
        check_unlocked(out)
        warnings.warn(f"output.dir {out}: taking over the lock of run pid {owner['pid']} on {owner.get('host')}, "
                      "which is no longer running", stacklevel=2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / LOCK_NAME)
    raise MemtrainError(f"output.dir {out}: cannot take {out / LOCK_NAME}; another run keeps creating it")


def release(out: Path) -> None:
    """Remove the lock if this process holds it."""
    with contextlib.suppress(MemtrainError):
        owner = read_lock(out)
        if owner is not None and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / LOCK_NAME)


def holds_earlier_run(out: Path) -> bool:
    out = Path(out)
    return (out / "recipe.yaml").exists() or (out / "logs" / "metrics.jsonl").exists() or (
        (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()))


def check_fresh_or_resumed(out: Path, resume: str | None, overwrite: bool) -> None:
    """A new run (no `checkpoint.resume`) into a directory holding an earlier run is refused unless
    `output.overwrite`: it would delete that run's checkpoints and append to its metrics."""
    if resume is None and not overwrite and holds_earlier_run(out):
        raise MemtrainError(
            f"output.dir {out} holds an earlier training run; continue it with checkpoint.resume=latest, "
            "choose a new output.dir, or set output.overwrite=true to delete it and start afresh"
        )


def check_inputs_kept(out: Path, inputs: dict[str, str | None]) -> None:
    """A MemtrainError when an input (e.g. model.pretrained = OUT/pipeline of an earlier run) lies in what this
    run writes into `out` (RUN_OUTPUTS: replaced by the export, cleared by output.overwrite)."""
    for name in RUN_OUTPUTS:
        target = (Path(out) / name).resolve()
        for key, source in inputs.items():
            if source is None or not Path(source).exists():
                continue
            resolved = Path(source).resolve()
            if resolved == target or target in resolved.parents:
                raise MemtrainError(f"output.dir {out}: the input {key} {source} lies in {Path(out) / name}, which "
                                    "this run replaces; choose another output.dir or copy the input elsewhere")


def clear_earlier_run(out: Path) -> None:
    """Delete what an earlier `memtrain train` wrote into `out` (and nothing else)."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextlib.contextmanager
def output_dir_lock(accelerator: Accelerator, out: Path) -> Iterator[None]:
    """The main process holds `OUT/.memtrain.lock` while the block runs; when it
    cannot take it, every process raises the same MemtrainError."""
    refusal = [None]
    if accelerator.is_main_process:
        try:
            acquire(out)
        except MemtrainError as e:
            refusal = [str(e)]
    broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise MemtrainError(refusal[0])
    try:
        yield
    finally:
        if accelerator.is_main_process:
            release(out)


def prepare_output_dir(recipe: TrainRecipe, out: Path, resumed_step: int) -> None:
    """Clear an earlier run (output.overwrite), the temp dirs of an interrupted one, and on resume the metrics
    rows of the steps that will be trained again."""
    if recipe.output.overwrite:  # a resume of a checkpoint inside `out` was turned into a fresh start
        clear_earlier_run(out)
    remove_leftovers(out)
    if recipe.checkpoint.resume is not None:
        truncate_metrics(out / "logs" / "metrics.jsonl", resumed_step)
