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


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
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
