"""`EditSpec`: everything `memtrain edit` is asked to do, as one typed spec. A YAML file maps onto it through
`trainer.config` like a training recipe (`memtrain edit EDIT SPEC.yaml key=value ...`), the command-line flags
map onto the same keys (the method's own flags onto `options`), and `trainer.report.edit_run.run_edit` takes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.detect import DETECTORS
from trainer.detect.dori import DORI_STEPS
from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR
from trainer.prompts import read_prompts


@dataclass
class EditSpec:
    """One edit of a checkpoint (each key is a `memtrain edit` flag of the same name, `-` for `_`).

    The edit: `method` (a name in `trainer.edit.registry.EDITS`) with its own keyword `options`; `checkpoint`
    (a diffusers pipeline directory, never modified) and `lora` (fused in first); prompt files `memorized`
    (to remove), `anchors` (what they produce instead) and `preserved` (kept as they are); `out` receives the
    edited pipeline or LoRA with edit.json / edit.md. `seed`, `batch_size` samples per UNet forward, `device`.
    `evaluate` (a labelled prompt file) compares `memtrain evaluate` before and after, with `data`,
    `train_data`, `heldout`, `fpr`, `eval_n` generations per prompt of `eval_steps` DDIM steps,
    `guidance_scale`, `clip`, `quality_feature`, `eval_detectors`, the re-trigger tests `eval_attack`
    (`eval_attack_eps`, `eval_attack_steps`, `eval_dori_steps`, `eval_dori_control_steps`) and the source's
    evaluation cached in `eval_cache` (unless `no_eval_cache`); `wandb` logs edit.json's numbers.
    """

    method: str | None = None
    checkpoint: str | None = None
    memorized: str | None = None
    anchors: str | None = None
    preserved: str | None = None
    lora: str | None = None
    out: str | None = None
    evaluate: str | None = None
    data: str | None = None
    train_data: str | None = None
    heldout: str | None = None
    fpr: float = DEFAULT_FPR
    eval_n: int = 2
    eval_steps: int = 50
    guidance_scale: float = 7.5
    clip: str | None = None
    quality_feature: str | None = None
    eval_detectors: str = ",".join(DETECTORS)
    eval_attack: str | None = None
    eval_attack_eps: str = "0.1"
    eval_attack_steps: int = 20
    eval_dori_steps: int = DORI_STEPS
    eval_dori_control_steps: int = 0
    eval_cache: str | None = None
    no_eval_cache: bool = False
    wandb: bool = False
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def read_texts(path: str | None, flag: str) -> list[str]:
    """The prompts of file `path` (none for None); errors name the flag."""
    if path is None:
        return []
    if not Path(path).exists():
        raise MemtrainError(f"{flag} {path}: no such file")
    try:
        return [r["text"] for r in read_prompts(path)]
    except MemtrainError as e:
        raise MemtrainError(f"{flag}: {e}") from None


def parameters(spec: EditSpec, options: dict | None = None) -> dict:
    """edit.json's `parameters`: every spec key but the method, the source and the output, with the method's
    options (`options`, checked and complete; default the spec's own) flat beside them."""
    skip = {"method", "checkpoint", "out", "options"}
    return {**{k: v for k, v in dataclasses.asdict(spec).items() if k not in skip},
            **(spec.options if options is None else options)}
