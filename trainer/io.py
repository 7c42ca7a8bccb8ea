"""Small I/O helpers: atomic writes (temp path, then rename) and the one user-facing error type."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class MemtrainError(Exception):
    """A user-facing error: the message names the file, row or key and says what to do."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where it stopped and how to resume."""


def check_replaceable(out: str | Path, marker: str, flag: str = "--out") -> None:
    """A MemtrainError unless `out` is absent, an empty directory, or an earlier output holding `marker`:
    a command never replaces a directory it did not write (a training run, a dataset, a checkpoint)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise MemtrainError(f"{flag} {out}: exists and is not a directory; choose a new output directory")
    if any(out.iterdir()) and not (out / marker).exists():
        raise MemtrainError(f"{flag} {out}: exists and holds something else (no {marker}); it would be replaced: "
                            "choose a new output directory")


def check_output_dir(out: str | Path, key: str = "--out", inputs: dict[str, str | Path | None] | None = None) -> None:
    """A MemtrainError unless directory `out` can be created and written (it, or the nearest existing parent)
    and lies outside the `inputs` directories (`check_not_inside`): run before any model is loaded. The write
    probe is a temporary directory, removed at once."""
    check_not_inside(out, inputs or {}, key)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemtrainError(f"{key}={out}: exists and is not a directory; choose another output directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MemtrainError(f"{key}={out}: {existing} is a file, not a directory; choose another output directory")
    try:
        tempfile.TemporaryDirectory(prefix=".memtrain-write-probe-", dir=existing).cleanup()
    except OSError as e:
        raise MemtrainError(f"{key}={out}: cannot write into {existing} ({e.strerror}); choose a writable output "
                            "directory or fix its permissions") from None


def check_not_inside(out: str | Path, inputs: dict[str, str | Path | None], flag: str = "--out") -> None:
    """A MemtrainError when output directory `out` is one of the input directories `inputs` ({what: path})
    or lies inside one: no command writes into its input."""
    target = Path(out).resolve()
    for name, source in inputs.items():
        if source is None or not Path(source).is_dir():
            continue
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise MemtrainError(f"{flag} {out}: inside the input {name} {source}; a command never writes into its "
                                "input: choose an output directory elsewhere")


@contextlib.contextmanager
def atomic_dir(out: str | Path, replaces: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed.

    `replaces`: the file that marks an earlier output of the same command; an existing `out` without it
    is refused (`check_replaceable`) rather than deleted."""
    out = Path(out)
    if replaces is not None:
        check_replaceable(out, replaces)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(out: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling file for writing; it is renamed onto `out` only on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(obj: Any, out: str | Path) -> None:
    with atomic_file(out) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def read_jsonl_objects(path: str | Path, prefix: str = "") -> list[dict]:
    """The JSON objects of a JSONL file, each with its line number as `_line` (blank lines skipped); a
    malformed line is a MemtrainError naming the file and line (after `prefix`, e.g. the recipe key)."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemtrainError(f"{prefix}{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MemtrainError(f"{prefix}{path}, line {i}: each line must be a JSON object")
        rows.append(dict(row, _line=i))
    return rows
