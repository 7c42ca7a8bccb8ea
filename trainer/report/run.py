"""What the sections of `memtrain evaluate` share: `EvalRun`, the inputs read once (spec, pipeline, prompt rows,
index, scorers) and what earlier sections leave for later ones (generations, held-out images, the copy
verdict); and `Section`, one entry of the section registry (`trainer.report.evaluate.SECTIONS`): a name,
`run(run)` that computes the section into `run.report`, `render(report)` that writes its Markdown, and
`enabled(run)`, whether the spec asks for it, and `needs`, the sections it reads from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.measure.calibration import Calibration
from trainer.prompts import LabelGroups, PromptRow
from trainer.report.spec import EvalSpec


@dataclass
class EvalRun:
    """The state of one evaluation (module docstring); sections read the inputs and add to `report`,
    `cost`, `notes` and `figures`."""

    spec: EvalSpec
    pipe: Any
    rows: list[PromptRow]
    labelled: bool
    prompts: Path
    data: Path
    roles: LabelGroups
    resolution: int
    progress: bool
    detectors: list[str]
    groups: list[str]
    attacks: list[str]
    attack_eps: list[float] | None
    guard: str | None
    calibration: dict | None = None  # an earlier report's verdict, reused (`sections.replication_verdict`)
    sscd_model: Any = None
    clip_scorer: Any = None
    training_index: Any = None
    embedder: Any = None
    index_criterion: Calibration | None = None
    report: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    generated: torch.Tensor | None = None  # the stock generations of `gen_rows` (n each, prompt-major)
    gen_rows: list[PromptRow] = field(default_factory=list)
    gen_groups: list[str] = field(default_factory=list)  # the group of each generation
    heldout_set: torch.Tensor | None = None
    feature: Any = None  # the quality feature (`measure.features.QualityFeature`)

    @property
    def references(self) -> torch.Tensor | None:
        """The training images replication was measured against (when the replication section ran)."""
        return self.figures["replicated"][1] if "replicated" in self.figures else None

    @property
    def verdict(self) -> Calibration | None:
        """The report's copy verdict (when the replication section set one)."""
        return Calibration.from_dict(self.report["verdict"]["calibration"]) if "verdict" in self.report else None


@dataclass(frozen=True)
class Section:
    """One report section (module docstring)."""

    name: str
    run: Callable[[EvalRun], None]
    render: Callable[[dict], list[str]] | None = None
    enabled: Callable[[EvalRun], bool] = lambda run: True
    needs: tuple[str, ...] = ()  # the sections whose results it reads (run with it when the spec selects sections)
