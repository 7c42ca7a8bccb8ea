"""Logging through accelerate trackers: W&B and TensorBoard when asked, a JSONL file always."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import wandb
from accelerate.tracking import GeneralTracker

from trainer.io import MemtrainError, atomic_file


class JsonlTracker(GeneralTracker):
    """An accelerate tracker that appends one JSON object per `log` call to `metrics.jsonl`.

    Accelerate calls trackers on the main process only. The constructor must not touch
    `PartialState` (accelerate's `on_main_process` would), since it runs before the Accelerator
    decides how many processes there are.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"
        self._file = None  # opened at the first write, so a run that fails its checks leaves nothing

    @property
    def tracker(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        return self._file

    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        scalars = {k: _plain(v) for k, v in values.items() if _plain(v) is not None}
        # process_time: this process's CPU seconds; beside `time` it shows how much the run waited for a core
        row = {"step": step, "time": time.time(), "process_time": time.process_time(), **scalars}
        self.tracker.write(json.dumps(row) + "\n")
        self.tracker.flush()

    def finish(self):
        if self._file is not None:
            self._file.close()


def _plain(value: Any):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool | int | float | str):
        return value
    return None


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the rows of a resumed run's `metrics.jsonl` up to `step` (the checkpoint's), so the steps it trains
    again are not logged twice; a line cut short by a crash is dropped. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (not isinstance(row.get("step"), int) or row["step"] <= step):
            kept.append(line)
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept))


def wandb_dir(out: Path) -> str:
    """Where W&B writes its run files: WANDB_DIR when set, else the output directory."""
    return os.environ.get("WANDB_DIR") or str(out)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logged_loss(path: str | Path, step: int) -> float | None:
    """The loss a `metrics.jsonl` holds for `step`, or None."""
    rows = read_jsonl(path) if Path(path).exists() else []
    return next((r.get("loss") for r in rows if r.get("step") == step), None)


def start_wandb_run(out: Path, config: dict, job_type: str, name: str):
    """An offline-capable W&B run for a one-shot command (WANDB_MODE, WANDB_DIR, WANDB_PROJECT are respected;
    without WANDB_DIR its files go into `out`)."""
    directory = wandb_dir(out)
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "memtrain"), job_type=job_type, dir=directory,
                          config=config, name=name)
    except Exception as e:  # wandb raises its own error types (no login, no network)
        raise MemtrainError(f"--wandb: cannot start a W&B run ({e}); WANDB_MODE=offline logs without an account")\
            from None


def log_wandb_summary(run, values: dict[str, float], out: Path, files: list[str]) -> None:
    """Log flat numbers and every PNG of `files` (relative to `out`) as `figures/<name>`."""
    logged: dict = dict(values)
    for name in files:
        if name.endswith(".png"):
            logged[f"figures/{name[:-4]}"] = wandb.Image(str(out / name))
    run.log(logged)


def flat_config(config: dict) -> dict:
    """A nested recipe dict as one level of dotted keys, values the trackers accept (others as strings)."""
    flat = {}

    def walk(prefix: str, node):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            else:
                flat[key] = v if isinstance(v, int | float | str | bool) else str(v)

    walk("", config)
    return flat
