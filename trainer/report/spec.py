"""`EvalSpec`: everything `memtrain evaluate` is asked to do, as one typed spec. A YAML file maps onto it
through `trainer.config` like a training recipe (`memtrain evaluate SPEC.yaml key=value ...`), the
command-line flags map onto the same keys, and the Python `evaluate()` takes it or its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.detect import DETECTORS
from trainer.detect.dori import CONTROL_STEPS, DORI_STEPS
from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR
from trainer.prompts import LabelGroups, check_labels, read_labelled_prompts, rows_from_lists
from trainer.sample.guards import NoGuard

DEFAULT_ATTACK_EPS = (0.05, 0.1, 0.2)


@dataclass
class EvalSpec:
    """One evaluation of a checkpoint (each key is a `memtrain evaluate` flag of the same name, `-` for `_`).

    Inputs: `checkpoint` (a diffusers pipeline directory) and `lora`; `prompts` (a labelled prompt file) or
    the two lists `memorized` / `not_memorized`; `label_groups` (the roles of the prompt file's group names);
    `data` (where file_name paths resolve); `train_data` (the training set replication is measured against);
    `heldout` (never-trained images: the copy verdict's calibration at `fpr` false positives).
    Generations: `n` per prompt of the `groups` rows, DDIM `steps`, `guidance_scale`, `seed`, `batch_size`
    samples per UNet forward, on `device`; `generate` False skips them (no replication or quality).
    Sections: `detectors` (prompt detectors and clid = membership); the copy verdict's `criterion`; quality in
    `quality_feature` (with `clip`, a local CLIPModel; `sscd` adds SSCD similarity); `attack` (dori, bounded)
    with `dori_steps`, `dori_control_steps`, `attack_eps`, `attack_steps`; `index` replication (`index_model`,
    `index_threshold`); `guard` (a name in `trainer.sample.guard.GUARDS`) with its keyword `guard_options`;
    `sections` (names in `trainer.report.evaluate.SECTIONS`) runs only those and the ones they read from
    (default: every section the other keys ask for).
    `out` receives report.json, report.md and the figures; `wandb` logs the summary.
    """

    checkpoint: str | None = None
    prompts: str | None = None
    memorized: str | None = None
    not_memorized: str | None = None
    label_groups: str | None = None
    data: str | None = None
    train_data: str | None = None
    heldout: str | None = None
    lora: str | None = None
    out: str = "runs/evaluate"
    n: int = 2
    batch_size: int = 32
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    device: str | None = None
    generate: bool = True
    groups: str | list[str] = field(default_factory=lambda: ["trigger", "general"])
    detectors: str | list[str] = field(default_factory=lambda: list(DETECTORS))
    fpr: float = DEFAULT_FPR
    criterion: str = "auto"
    sscd: str | None = None
    clip: str | None = None
    quality_feature: Any = None  # a `measure.features.QUALITY_FEATURES` name, "clip", or (Python) a QualityFeature
    attack: bool | str | list[str] = False
    attack_eps: str | float | list[float] = field(default_factory=lambda: list(DEFAULT_ATTACK_EPS))
    attack_steps: int = 20
    dori_steps: int = DORI_STEPS
    dori_control_steps: int = CONTROL_STEPS
    index: str | None = None
    index_model: str | None = None
    index_threshold: float | None = None
    guard: str = NoGuard.name
    guard_options: dict[str, Any] = field(default_factory=dict)
    sections: str | list[str] | None = None
    wandb: bool = False


def check_image(path: Path, where: str, data: Path) -> None:
    if not path.is_file():
        raise MemtrainError(f"{where}: image {path} does not exist (file_name paths resolve under --data {data})")


def read_rows(spec: EvalSpec) -> dict:
    """The prompt rows, their label roles and the image root, each image a row names checked."""
    roles = LabelGroups.load(spec.label_groups)
    if spec.prompts is not None:
        prompts = Path(spec.prompts)
        rows = read_labelled_prompts(prompts, roles)
    else:
        rows = rows_from_lists(spec.memorized, spec.not_memorized)
        prompts = Path(spec.memorized)
    labelled = check_labels(rows, prompts, roles)
    data = Path(spec.data) if spec.data is not None else prompts.parent
    if not data.is_dir():
        raise MemtrainError(f"--data {data}: not a directory (the root that file_name paths resolve under)")
    for r in rows:
        if r.file_name and (r.member is not None or r.label == 1):
            check_image(data / r.file_name, f"{prompts}, line {r.line}", data)
    return {"rows": rows, "labelled": labelled, "prompts": prompts, "data": data, "roles": roles}


def input_paths(spec: EvalSpec) -> dict:
    """The files and directories `evaluate` reads: its output may not hold or lie in any of them."""
    return {"CHECKPOINT": spec.checkpoint, "--prompts": spec.prompts, "--memorized": spec.memorized,
            "--not-memorized": spec.not_memorized, "--lora": spec.lora, "--train-data": spec.train_data,
            "--data": spec.data, "--sscd": spec.sscd, "--clip": spec.clip, "--index": spec.index,
            "--index-model": spec.index_model, "--heldout": spec.heldout}
