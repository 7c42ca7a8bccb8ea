"""A cache of the "before" side of `memtrain edit --evaluate`: the `memtrain evaluate` report of the source
checkpoint and its general prompts' generations, reused by every later edit of the same checkpoint with
the same prompt file and evaluation settings instead of being recomputed.

The key is a SHA-256 over what determines that evaluation: the bytes of every file of the checkpoint (and
of the input LoRA), the bytes of the prompt file, a listing (relative path, size, modification time) of the
directories it reads images and models from, the evaluation settings and memtrain's version and sources. An entry is
written atomically and is complete when it exists. Location: `--eval-cache DIR`, else `$MEMTRAIN_CACHE`,
else `$XDG_CACHE_HOME/memtrain` (`~/.cache/memtrain`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import trainer
from trainer import __version__
from trainer.io import MemtrainError, atomic_dir

CACHE_ENV = "MEMTRAIN_CACHE"
ENTRY_REPORT = "eval/report.json"
GENERAL_FILE = "general_before.safetensors"
CHUNK = 1 << 22


def default_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memtrain"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def content_digest(paths: list[str | Path | None], progress: bool = True) -> str:
    """SHA-256 of the bytes of every file under `paths` (files or directories), with their relative names."""
    files = [(Path(p), f) for p in paths if p is not None for f in _files(Path(p))]
    h = hashlib.sha256()
    with tqdm(total=sum(f.stat().st_size for _, f in files), desc="cache key: hashing the model", unit="B",
              unit_scale=True, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for root, f in files:
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
            with f.open("rb") as stream:
                while chunk := stream.read(CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


def listing_digest(path: str | Path | None) -> str | None:
    """SHA-256 of (relative path, size, mtime) of the files under a data or model directory (not their bytes)."""
    if path is None:
        return None
    root = Path(path)
    h = hashlib.sha256(str(root.resolve()).encode())
    for f in _files(root):
        st = f.stat()
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def code_digest() -> str:
    """SHA-256 of memtrain's own Python sources: a changed evaluation code misses the cache."""
    root = Path(trainer.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def evaluation_key(checkpoint: str | Path, lora: str | Path | None, prompts: str | Path, image_root: str | Path,
                   directories: dict[str, str | None], settings: dict, progress: bool = True) -> str:
    """The cache key of evaluating `checkpoint` (+ `lora`) on `prompts` with `settings`; `directories`:
    the other inputs the evaluation reads (training data, CLIP model), by listing."""
    parts = {"memtrain": __version__, "code": code_digest(), "model": content_digest([checkpoint, lora], progress),
             "prompts": content_digest([prompts], progress=False), "images": listing_digest(image_root),
             **{k: listing_digest(v) for k, v in sorted(directories.items())},
             "settings": {k: settings[k] for k in sorted(settings)}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def lookup(root: str | Path, key: str) -> Path | None:
    """The cache entry of `key`, or None."""
    entry = Path(root) / "evaluations" / key
    return entry if (entry / ENTRY_REPORT).is_file() else None


def read_entry(entry: Path, out: Path | None) -> tuple[dict, torch.Tensor | None]:
    """(the cached evaluate report, the cached general generations); copies the report's files into `out`."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(entry / "eval", out)
    try:
        report = json.loads((entry / ENTRY_REPORT).read_text())
        general = load_file(str(entry / GENERAL_FILE))["images"] if (entry / GENERAL_FILE).is_file() else None
    except (OSError, ValueError) as e:
        raise MemtrainError(f"evaluation cache {entry}: unreadable ({e}); delete it and run again") from None
    return report, general


def store(root: str | Path, key: str, eval_dir: Path, general: torch.Tensor | None, about: dict) -> Path:
    """Write the entry of `key` atomically: a copy of `eval_dir`, the general generations, what it is of."""
    entry = Path(root) / "evaluations" / key
    with atomic_dir(entry) as tmp:
        shutil.copytree(eval_dir, tmp / "eval")
        if general is not None:
            save_file({"images": general.detach().cpu().contiguous()}, str(tmp / GENERAL_FILE))
        (tmp / "about.json").write_text(json.dumps(about, indent=2, default=str))
    return entry
