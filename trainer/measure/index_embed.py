"""Embedding a training set for `memtrain index`, shared by the processes of `accelerate launch` and resumable.

The rows are cut into parts of `part_rows` (default 4096); each process embeds its contiguous share of the parts
(`core.distributed.split_work`), `batch_size` images at a time from each part's first row, and writes each
finished part to `.OUT.parts/part-NNNNNN.safetensors` next to the index (a temporary name, then renamed), so the
result does not depend on the number of processes. The main process merges the parts in order. A run started
again after a crash, with the same data and settings (`parts.json` records them), embeds only the missing
parts; the parts are removed once the index is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trainer.core.distributed import is_main_process, main_process_value, process_state, split_work
from trainer.data import Rows, image_to_tensor, open_image
from trainer.io import MemtrainError, is_write_failure

PART_ROWS = 4096
_KEY_FILE = "parts.json"


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.parts"


def _part_file(work: Path, part: int) -> Path:
    return work / f"part-{part:06d}.safetensors"


def _prepare(work: Path, key: dict) -> None:
    """On the main process: keep the parts of an interrupted run with the same `key`, remove any others."""
    if (work / _KEY_FILE).exists() and json.loads((work / _KEY_FILE).read_text()) != key:
        remove_parts(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / _KEY_FILE).write_text(json.dumps(key, sort_keys=True))


def remove_parts(work: Path) -> None:
    """Remove the parts directory: only the files this module writes, then the directory if it is empty."""
    if not work.is_dir():
        return
    for f in [*work.glob("part-*.safetensors"), *work.glob(".part-*.tmp"), work / _KEY_FILE]:
        f.unlink(missing_ok=True)
    if not any(work.iterdir()):
        work.rmdir()


@torch.no_grad()
def _embed_part(rows: Rows, start: int, stop: int, embedder, resolution: int, batch_size: int,
                dtype: torch.dtype, bar) -> torch.Tensor:
    out = torch.empty((stop - start, embedder.dim), dtype=dtype)
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        batch = torch.stack([image_to_tensor(open_image(rows.images[i], rows.names[i]), resolution, True, False, None)
                             for i in range(s, e)])
        out[s - start : e - start] = embedder((batch + 1.0) / 2.0).to(device="cpu", dtype=dtype)
        bar.update(e - s)
    return out


def embed_rows(rows: Rows, embedder, resolution: int, batch_size: int, dtype: torch.dtype, out: str | Path,
               key: dict, desc: str, progress: bool = True, part_rows: int = PART_ROWS) -> torch.Tensor | None:
    """[N, d] embeddings of every row on the main process (None on the others), computed in parts by all
    processes; parts already in `parts_dir(out)` from an interrupted run with the same `key` are reused."""
    n, work = len(rows.images), parts_dir(out)
    parts = list(range(math.ceil(n / part_rows)))
    if is_main_process():
        _prepare(work, key)
    main_process_value(0)  # every process sees the prepared directory
    state = process_state()
    todo = [p for p in split_work(parts) if not _part_file(work, p).exists()]
    rows_todo = sum(min(part_rows, n - p * part_rows) for p in todo)
    label = f"{desc} [process {state.process_index + 1}/{state.num_processes}]" if state.num_processes > 1 else desc
    with tqdm(total=rows_todo, desc=label, unit="img", disable=not progress, position=state.process_index) as bar:
        for p in todo:
            start = p * part_rows
            emb = _embed_part(rows, start, min(start + part_rows, n), embedder, resolution, batch_size, dtype, bar)
            tmp = work / f".part-{p:06d}.tmp"
            try:
                save_file({"embeddings": emb.contiguous()}, str(tmp))
            except (OSError, SafetensorError) as e:
                if not is_write_failure(e):
                    raise
                remove_parts(work)
                raise MemtrainError(f"writing into {out} failed ({e}); nothing was written to {out}: free disk space "
                                    "(or choose another output directory) and run again") from None
            os.replace(tmp, _part_file(work, p))
    main_process_value(0)  # every part is written
    if not is_main_process():
        return None
    return torch.cat([load_file(str(_part_file(work, p)))["embeddings"] for p in parts])
