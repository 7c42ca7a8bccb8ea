"""The schema of a training recipe (`memtrain train RECIPE.yaml key=value ...`).

Every key is documented here and in docs/recipes.md; `recipes/*.yaml` set them. Defaults follow
diffusers' `train_text_to_image.py` / `train_text_to_image_lora.py` unless said otherwise.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.io import MemtrainError
from trainer.mitigate.captions import CaptionAugConfig


@dataclass
class LoraSection:
    rank: int = 0  # 0 = full UNet fine-tune; > 0 = LoRA adapters of this rank (peft)
    alpha: int | None = None  # lora_alpha; default = rank (diffusers' example)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class ModelSection:
    pretrained: str = ""  # diffusers-format SD 1.x/2.x directory or hub id
    revision: str | None = None
    variant: str | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler's own
    lora: LoraSection = field(default_factory=LoraSection)
    train_text_encoder: bool = False  # full fine-tunes only


@dataclass
class DataSection:
    path: str = ""  # imagefolder directory (metadata.jsonl / .csv), webdataset .tar / parquet shards (directory, file,
    # glob or brace pattern), `datasets` save_to_disk dir, or hub name
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"  # a string or a list of strings per row
    caption_dropout: float = 0.0  # p of training on the empty caption (keeps classifier-free guidance working)
    resolution: int | None = None  # None: the model's native resolution
    center_crop: bool = False
    random_flip: bool = False
    max_samples: int | None = None
    # keep each image decoded and resized, and the frozen VAE's posterior of each crop, in memory after their
    # first use (exact; memory grows with the data set: for small data sets, docs/recipes.md)
    cache: bool = False
    captions: CaptionAugConfig = field(default_factory=CaptionAugConfig)  # see trainer/mitigate/captions.py
    dedup: Literal["none", "drop", "reweight"] = "none"
    dedup_threshold: float = 0.95


@dataclass
class OptimSection:
    seed: int = 0
    batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    scale_lr: bool = False  # lr *= batch_size * accumulation * processes
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 recommended
    noise_offset: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0
    loss_mask_threshold: float | None = None  # Wen et al.: drop samples with ||d(c)|| >= this fixed value (2.0)
    loss_mask_quantile: float | None = None  # adaptive: drop samples over this quantile of the running ||d(c)|| (0.9)
    loss_mask_window: int = 1000  # per-sample ||d(c)|| values (all processes) the quantile is taken over; warm-up
    loss_mask_timestep_bins: int = 10  # the quantile is taken per timestep range (||d(c)|| grows as t falls)


@dataclass
class CheckpointSection:
    every_steps: int = 500
    total_limit: int | None = None
    resume: str | None = None  # "latest" or a checkpoint directory
    at_end: bool = False  # also save a checkpoint at the last step (when it is not a multiple of every_steps)
    allow_changes: list[str] = field(default_factory=list)  # recipe keys a resume may change (docs/recipes.md, Resume)


@dataclass
class LogSection:
    trackers: list[str] = field(default_factory=list)  # "wandb", "tensorboard"; JSONL is always written
    project: str = "memtrain"
    run_name: str | None = None
    every_steps: int = 10
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0: only at the end
    validation_images: int = 1  # images per prompt
    progress: bool = True


@dataclass
class OutputSection:
    dir: str = "runs/train"
    export: Literal["auto", "pipeline", "lora", "none"] = "auto"  # auto: lora if lora.rank > 0
    overwrite: bool = False  # a new run into a dir holding an earlier run deletes that run's outputs first


@dataclass
class MonitorSection:
    """The memorization monitor (trainer/training/monitor.py): CLiD membership inference (Zhai et al.,
    NeurIPS 2024) and the noise magnitude of Wen et al. (ICLR 2024) on a fixed probe; optional alarm."""

    every_steps: int = 0  # 0 = off; > 0 = run the monitor every this many optimizer steps (and at the end)
    members: int = 32  # member probe: training rows drawn once from train.seed
    distinct_members: bool = True  # draw members among distinct images (one row per near-duplicate group)
    heldout: str | None = None  # held-out (non-member) pairs: imagefolder dir, toy labels.jsonl, or a dataset
    heldout_split: str = "test"  # split of a `datasets` held-out dataset (e.g. heldout = data.path)
    heldout_count: int = 32
    novel_prompts: str | None = None  # text / JSONL prompt file (JSONL rows with `group` keep the not_memorized groups); None: held-out captions
    label_groups: str | None = None  # YAML roles of the labelled files' group names (as `memtrain evaluate --label-groups`); None: trainer/label_groups.yaml
    novel_count: int = 32
    clid_alpha: float = 0.5  # CLiD_th weight of S(mean D) vs S(L); fixed, scaler fitted on the held-out probe
    batch_size: int = 16  # samples per UNet forward inside the monitor
    alarm_metric: Literal["clid_auc", "clid_tpr_at_1fpr", "noise_auc", "noise_tpr_at_1fpr"] = "clid_auc"
    alarm_threshold: float | None = None  # alarm when alarm_metric >= this (in [0, 1]); None: no alarm
    alarm_action: Literal["warn", "stop"] = "warn"  # stop: end training, keep the last checkpoint, skip export
    table_generations: int = 4  # W&B only: probe generations logged beside their nearest training image

    def validate(self, prefix: str = "monitor") -> None:
        """Raise MemtrainError naming the key of a bad value (checks that need no data)."""
        if self.every_steps < 0:
            raise MemtrainError(f"recipe: `{prefix}.every_steps` must be >= 0 (0 = off), got {self.every_steps}")
        for name in ("members", "heldout_count", "novel_count", "batch_size"):
            if getattr(self, name) < 1:
                raise MemtrainError(f"recipe: `{prefix}.{name}` must be >= 1, got {getattr(self, name)}")
        if self.table_generations < 0:
            raise MemtrainError(f"recipe: `{prefix}.table_generations` must be >= 0, got {self.table_generations}")
        if not 0.0 <= self.clid_alpha <= 1.0:
            raise MemtrainError(f"recipe: `{prefix}.clid_alpha` must be in [0, 1], got {self.clid_alpha}")
        if self.alarm_threshold is not None and not 0.0 <= self.alarm_threshold <= 1.0:
            raise MemtrainError(
                f"recipe: `{prefix}.alarm_threshold` must be in [0, 1] ({self.alarm_metric} is an AUC or a TPR), "
                f"got {self.alarm_threshold}"
            )
        if self.every_steps and not self.heldout:
            raise MemtrainError(
                f"recipe: `{prefix}.heldout` is required when `{prefix}.every_steps` > 0: the monitor compares "
                "training members with held-out (never trained on) pairs; set it to an imagefolder directory, "
                "a toy labels.jsonl or a dataset with such pairs"
            )


# What a resume may change: keys that do not change the training trajectory (docs/recipes.md, "Resume").
FREE_SECTIONS = ("checkpoint", "log", "output", "monitor")
FREE_KEYS = ("train.gradient_checkpointing", "train.dataloader_num_workers", "data.cache")
# schedules whose learning rate does not depend on train.max_steps: a resume may extend (or shorten) the run
LENGTH_FREE_SCHEDULERS = ("constant", "constant_with_warmup")
# keys a checkpoint's weights fix: a resume cannot change them, even when allowed
FIXED_KEYS = ("model.lora.rank", "model.lora.target_modules", "model.train_text_encoder", "train.ema")
PATH_KEYS = ("model.pretrained", "data.path")  # compared as resolved paths when they exist on this machine


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, dotted) if isinstance(value, dict) else {dotted: value})
    return flat


@dataclass
class TrainRecipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    output: OutputSection = field(default_factory=OutputSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)

    def validate(self) -> None:
        """Checks that need no model or data; run before anything is loaded."""
        if not self.model.pretrained:
            raise MemtrainError("recipe: `model.pretrained` is required (a diffusers model directory or hub id)")
        if not self.data.path:
            raise MemtrainError("recipe: `data.path` is required (an imagefolder directory or a dataset)")
        positive = {
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train.max_steps": self.train.max_steps,
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "log.every_steps": self.log.every_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise MemtrainError(f"recipe: `{key}` must be >= 1, got {value}")
        at_least = {  # key: (value, smallest allowed)
            "train.lr_warmup_steps": (self.train.lr_warmup_steps, 0),
            "train.dataloader_num_workers": (self.train.dataloader_num_workers, 0),
            "train.seed": (self.train.seed, 0),
            "log.validation_images": (self.log.validation_images, 1),
            "log.validation_every": (self.log.validation_every, 0),
        }
        if self.data.resolution is not None:
            at_least["data.resolution"] = (self.data.resolution, 8)
        if self.data.max_samples is not None:
            at_least["data.max_samples"] = (self.data.max_samples, 1)
        if self.model.lora.alpha is not None:
            at_least["model.lora.alpha"] = (self.model.lora.alpha, 1)
        for key, (value, smallest) in at_least.items():
            if value < smallest:
                raise MemtrainError(f"recipe: `{key}` must be >= {smallest}, got {value}")
        if self.train.seed > 2**32 - 1:  # numpy's seed range (accelerate.set_seed seeds numpy too)
            raise MemtrainError(f"recipe: `train.seed` must be <= 2**32 - 1 = {2**32 - 1}, got {self.train.seed}")
        if self.train.snr_gamma is not None and self.train.snr_gamma <= 0:
            raise MemtrainError(f"recipe: `train.snr_gamma` must be > 0 (5.0 is recommended) or null (off), "
                                f"got {self.train.snr_gamma}")
        if self.train.noise_offset < 0:
            raise MemtrainError(f"recipe: `train.noise_offset` must be >= 0 (0 = off; 0.1 is common), "
                                f"got {self.train.noise_offset}")
        if self.train.max_grad_norm < 0:
            raise MemtrainError(f"recipe: `train.max_grad_norm` must be >= 0 (0 = no clipping), got {self.train.max_grad_norm}")
        for key, value in (("train.adam_beta1", self.train.adam_beta1), ("train.adam_beta2", self.train.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise MemtrainError(f"recipe: `{key}` must be in [0, 1), got {value}")
        if self.train.adam_epsilon <= 0 or self.train.adam_weight_decay < 0:
            raise MemtrainError("recipe: `train.adam_epsilon` must be > 0 and `train.adam_weight_decay` >= 0, got "
                                f"{self.train.adam_epsilon} and {self.train.adam_weight_decay}")
        if self.train.learning_rate <= 0:
            raise MemtrainError(f"recipe: `train.learning_rate` must be > 0, got {self.train.learning_rate}")
        if self.model.lora.rank < 0:
            raise MemtrainError(f"recipe: `model.lora.rank` must be >= 0, got {self.model.lora.rank}")
        if self.model.lora.rank > 0 and self.model.train_text_encoder:
            raise MemtrainError("recipe: `model.train_text_encoder` is only supported for full fine-tunes (lora.rank=0)")
        if self.model.lora.rank > 0 and self.train.ema:
            raise MemtrainError("recipe: `train.ema` is for full fine-tunes; set train.ema=false with LoRA")
        if self.checkpoint.total_limit is not None and self.checkpoint.total_limit < 1:
            raise MemtrainError(f"recipe: `checkpoint.total_limit` must be >= 1, got {self.checkpoint.total_limit}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise MemtrainError(f"recipe: `train.ema_decay` must be in [0, 1), got {self.train.ema_decay}")
        if self.train.loss_mask_threshold is not None and self.train.loss_mask_threshold <= 0:
            raise MemtrainError(
                f"recipe: `train.loss_mask_threshold` must be > 0 (Wen et al. use 2.0), got {self.train.loss_mask_threshold}"
            )
        if self.train.loss_mask_quantile is not None:
            if self.train.loss_mask_threshold is not None:
                raise MemtrainError("recipe: `train.loss_mask_threshold` and `train.loss_mask_quantile` are both set; "
                                    "keep one (the fixed threshold or the adaptive quantile)")
            if not 0.0 < self.train.loss_mask_quantile < 1.0:
                raise MemtrainError("recipe: `train.loss_mask_quantile` must be in (0, 1) (0.9 masks the top 10%), "
                                    f"got {self.train.loss_mask_quantile}")
        if self.train.loss_mask_timestep_bins < 1:
            raise MemtrainError("recipe: `train.loss_mask_timestep_bins` must be >= 1 (1 = one quantile over all "
                                f"timesteps), got {self.train.loss_mask_timestep_bins}")
        if self.train.loss_mask_window < 2:
            raise MemtrainError(f"recipe: `train.loss_mask_window` must be >= 2, got {self.train.loss_mask_window}")
        if not 0.0 < self.data.dedup_threshold <= 1.0:
            raise MemtrainError(f"recipe: `data.dedup_threshold` must be in (0, 1], got {self.data.dedup_threshold}")
        if not 0.0 <= self.data.caption_dropout <= 1.0:
            raise MemtrainError(f"recipe: `data.caption_dropout` must be in [0, 1], got {self.data.caption_dropout}")
        self.data.captions.validate("data.captions")
        self.monitor.validate("monitor")
        self._validate_allow_changes()
        unknown = set(self.log.trackers) - {"wandb", "tensorboard"}
        if unknown:
            raise MemtrainError(f"recipe: `log.trackers` knows wandb and tensorboard, not {sorted(unknown)}")

    def trajectory(self, num_processes: int) -> dict[str, Any]:
        """Every key that changes the training trajectory, by dotted name (what a checkpoint records and a
        resume compares). `train.batch_size` is the batch of all processes together: N processes equal one
        process at the same global batch (docs/recipes.md, "Determinism"), so a resume may re-split it."""
        flat = {key: value for key, value in _flatten(asdict(self)).items()
                if key.split(".")[0] not in FREE_SECTIONS and key not in FREE_KEYS}
        flat["train.batch_size"] = self.train.batch_size * num_processes
        unused = ["train.max_steps"] if self.train.lr_scheduler in LENGTH_FREE_SCHEDULERS else []
        unused += [] if self.model.lora.rank else [key for key in flat if key.startswith("model.lora.") and
                                                    key != "model.lora.rank"]
        unused += [] if self.train.ema else ["train.ema_decay"]
        unused += [] if self.data.dedup != "none" else ["data.dedup_threshold"]
        for key in unused:  # keys that do not act in this recipe
            del flat[key]
        for key in PATH_KEYS:
            if flat[key] and Path(flat[key]).exists():
                flat[key] = str(Path(flat[key]).resolve())
        return flat

    def _validate_allow_changes(self) -> None:
        checked = [key for key in _flatten(asdict(self)) if key.split(".")[0] not in FREE_SECTIONS
                   and key not in FREE_KEYS]
        for key in self.checkpoint.allow_changes:
            if key not in checked:
                close = difflib.get_close_matches(key, checked, n=1, cutoff=0.6)
                hint = f"did you mean `{close[0]}`? " if close else ""
                raise MemtrainError(f"recipe: `checkpoint.allow_changes`: {key!r} is not a key a resume checks; {hint}"
                                    f"(sections {', '.join(FREE_SECTIONS)} may always change)")
            if key in FIXED_KEYS:
                raise MemtrainError(f"recipe: `checkpoint.allow_changes`: {key} cannot change on resume (the "
                                    "checkpoint's weights are shaped by it); start a new output.dir")

    @property
    def export(self) -> str:
        if self.output.export == "auto":
            return "lora" if self.model.lora.rank > 0 else "pipeline"
        return self.output.export
