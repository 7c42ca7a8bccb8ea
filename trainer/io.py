"""Small I/O helpers: the one user-facing error type, atomic writes (temp path, then rename), and the one
rule for output folders: a command replaces a folder only when its manifest (`.memtrain-manifest.json`)
says this command wrote everything in it and no input lies in it (`check_replaceable`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


class MemtrainError(Exception):
    """A user-facing error: the message names the file, row or key and says what to do."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where it stopped and how to resume."""


MANIFEST = ".memtrain-manifest.json"


def _walk_files(directory: Path) -> Iterator[str]:
    for root, dirs, names in os.walk(directory):
        base = Path(root)
        for path in [base / n for n in names] + [base / d for d in dirs if (base / d).is_symlink()]:
            name = path.relative_to(directory).as_posix()
            if name != MANIFEST:
                yield name


def output_files(directory: str | Path) -> list[str]:
    """Every file (and symlink) under `directory` as a sorted relative POSIX path, the manifest left out;
    symlinked directories are entries, not followed."""
    return sorted(_walk_files(Path(directory)))


def write_manifest(directory: str | Path, command: str, files: list[str] | None = None) -> None:
    """`directory/.memtrain-manifest.json`: the command and the files it wrote (default: all there now). An
    entry ending in "/" owns a whole sub-directory (commands that write as they go: demo, compare)."""
    files = output_files(directory) if files is None else list(files)
    write_json({"tool": "memtrain", "command": command, "files": files}, Path(directory) / MANIFEST)


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of an earlier memtrain output, or None when there is none or it is not one."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("tool") == "memtrain" and isinstance(manifest.get("files"), list)
    return manifest if ok else None


def _owned(file: str, listed: set[str]) -> bool:
    return file in listed or any(file.startswith(entry) for entry in listed if entry.endswith("/"))


def check_replaceable(out: str | Path, command: str, inputs: dict[str, str | Path | None] | None = None,
                      flag: str = "--out") -> None:
    """The one rule for every command that writes an output directory: `out` may be replaced only when it is
    absent, empty, or holds nothing but `memtrain COMMAND`'s own earlier output (its manifest lists every file
    there), and never when an input (a file or directory of `inputs`, {what: path}) lies in it. Otherwise a
    MemtrainError naming the directory and the input or foreign file. `atomic_dir(out, command)` applies it."""
    inputs = inputs or {}
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise MemtrainError(f"{flag} {out}: exists and is not a directory; choose another {flag}")
    target = out.resolve()
    for name, source in inputs.items():
        if source is not None and Path(source).exists() and target in Path(source).resolve().parents:
            raise MemtrainError(f"{flag} {out}: holds the input {name} {source}, which replacing {out} would "
                                f"delete; choose another {flag}")
    manifest = read_manifest(out)
    if manifest is None:  # the first file found is enough to refuse (no walk of a large folder)
        first = next(_walk_files(out), None)
        if first is None:
            return
        raise MemtrainError(f"{flag} {out}: holds {first} and no {MANIFEST} of an earlier `memtrain {command}`; "
                            f"replacing it would delete it: choose another {flag} or remove {out}")
    files = output_files(out)
    if not files:
        return
    if manifest.get("command") != command:
        raise MemtrainError(f"{flag} {out}: holds the output of `memtrain {manifest.get('command')}`, not of "
                            f"`memtrain {command}`; choose another {flag} or remove {out}")
    listed = {str(f) for f in manifest["files"]}
    foreign = [f for f in files if not _owned(f, listed)]
    if foreign:
        raise MemtrainError(f"{flag} {out}: holds {foreign[0]}, which `memtrain {command}` did not write (not in "
                            f"{MANIFEST}); replacing {out} would delete it: choose another {flag} or move it away")


def check_output(out: str | Path, command: str, inputs: dict[str, str | Path | None], flag: str = "--out") -> None:
    """What a command checks before loading anything: `out` lies outside its inputs (`check_not_inside`) and
    may be replaced (`check_replaceable`)."""
    check_not_inside(out, inputs, flag)
    check_replaceable(out, command, inputs, flag)


def claim_output(out: str | Path, command: str, entries: list[str], inputs: dict[str, str | Path | None],
                 flag: str = "--out") -> Path:
    """For a command that writes `out` as it goes (demo, compare): `check_output`, then a manifest naming the
    `entries` it will write ("name/" for a sub-directory), so a rerun, even after an interruption, may replace them."""
    check_output(out, command, inputs, flag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, command, entries)
    return out


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


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def is_write_failure(error: BaseException) -> bool:
    """A full disk, quota, file-size limit or read-only file system, as OSError or as safetensors reports it."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return isinstance(error, SafetensorError) and "os error" in str(error).lower()


@contextlib.contextmanager
def atomic_dir(out: str | Path, command: str | None = None, inputs: dict[str, str | Path | None] | None = None,
               flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it is removed.

    `command`: the memtrain command writing `out`. An existing `out` is replaced only under the rule of
    `check_replaceable` (checked here again, at the moment of replacing), and the new directory gets a
    manifest of the files the command wrote, which lets a later run of the same command replace it."""
    out = Path(out)
    if command is not None:
        check_replaceable(out, command, inputs, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if command is not None:
            write_manifest(tmp, command)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(e):
            raise MemtrainError(f"writing into {out} failed ({e}); nothing was written to {out}: free disk space (or "
                                "choose another output directory) and run again") from None
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
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):  # a leading BOM is skipped
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
