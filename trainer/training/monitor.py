"""The memorization monitor: scores a fixed probe every `monitor.every_steps` steps during training.

Implements CLiD (Zhai et al., NeurIPS 2024, "Membership inference on text-to-image diffusion models
via conditional likelihood discrepancy"; members vs held-out pairs) and the first-step noise magnitude
(Wen et al., ICLR 2024, "Detecting, explaining, and mitigating memorization in diffusion models";
member captions vs novel prompts), logged under `monitor/` to every tracker. Probe, alarm and files:
docs/recipes.md, "The memorization monitor". Deviation: CLiD's alpha is fixed and its scaler is fitted
on the held-out probe of the same call, since training has no shadow split.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import wandb
from accelerate.utils import broadcast_object_list

from trainer import data as data_lib
from trainer.core.components import pipeline_from_components
from trainer.core.unet_core import count_evals, encode_latents
from trainer.detect.clid import clid_features, clid_th_scores
from trainer.detect.prompt import noise_magnitude
from trainer.io import MemtrainError, write_json
from trainer.measure.metrics import auroc, tpr_at_fpr
from trainer.measure.replication import l2_matrix
from trainer.mitigate.dedup import dedup_weights, row_groups
from trainer.plots import save_curves
from trainer.prompts import LabelGroups, read_labelled_prompts, read_prompts
from trainer.sample.generate import generate_images
from trainer.training.checkpoints import list_checkpoints

PREFIX = "monitor/"
CURVES = ("clid_auc", "clid_tpr_at_1fpr", "noise_auc", "noise_tpr_at_1fpr")
NEAREST_POOL = 256  # training images searched for the nearest neighbour of a table generation
NEAREST_SIZE = 64  # ... at this (or the generation's, if smaller) resolution
TABLE_STEPS = 50  # DDIM steps of a table generation (guidance 7.5)


# ---------------------------------------------------------------- checkpointed state


MONITOR_STATE = "monitor_state"  # checkpoint file (JSON) of the history, alarms and training seconds


class MonitorState:
    """What a checkpoint keeps of the monitor: the history of its calls, its alarms and the training
    wall time so far. Also registered (without a monitor) when resuming a checkpoint that has it,
    so the history survives a segment run with the monitor off."""

    def __init__(self):
        self.history: list[dict] = []
        self.alarms: list[dict] = []
        self.train_seconds_before = 0.0
        self._t0: float | None = None

    def begin(self) -> None:
        """Start the training clock (just before the loop)."""
        self._t0 = time.perf_counter()

    def train_seconds(self) -> float:
        return self.train_seconds_before + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "alarms": [dict(a) for a in self.alarms],
                "train_seconds": self.train_seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.alarms = [dict(a) for a in state.get("alarms", [])]
        self.train_seconds_before = float(state.get("train_seconds", 0.0))
        if self._t0 is not None:
            self._t0 = time.perf_counter()


# ---------------------------------------------------------------- the probe


def _choose(n: int, count: int, seed: int, salt: str) -> list[int]:
    return sorted(random.Random(f"memtrain/monitor/{seed}/{salt}").sample(range(n), count))


def distinct_rows(rows: data_lib.Rows, threshold: float) -> list[int]:
    """Index of the first row of each near-duplicate group (and of every ungrouped row), in row
    order: the rows the `drop` de-duplication policy keeps (`dedup.apply_dedup_policy`)."""
    return np.flatnonzero(dedup_weights(row_groups(rows, threshold, False), len(rows.images), "drop")).tolist()


def _load_images(rows: data_lib.Rows, index: list[int], resolution: int) -> torch.Tensor:
    out = []
    for i in index:
        image = data_lib.open_image(rows.images[i], rows.names[i])
        out.append(data_lib.image_to_tensor(image, resolution, True, False, random.Random(0)))
    return torch.stack(out)


def load_heldout(cfg, data_cfg) -> tuple[data_lib.Rows, dict[str, str]]:
    """The held-out pairs of `monitor.heldout`, and a caption -> group map when it is a labels file."""
    key = "monitor.heldout"
    path = Path(cfg.heldout)
    if path.suffix == ".jsonl" and path.is_file():
        # a labelled prompt file, read as `memtrain evaluate` reads it: held-out pairs are its non-members
        # (`member: 0`, or group heldout with a file_name); a file without roles is all held-out pairs
        roles = LabelGroups.load(cfg.label_groups, "`monitor.label_groups`")
        try:
            rows = read_labelled_prompts(path, roles)
        except MemtrainError as e:
            raise MemtrainError(f"`{key}`: {e}") from None
        labels = {r.text: r.group for r in rows if r.group is not None}
        if any(r.member is not None for r in rows):
            rows = [r for r in rows if r.member == 0]
        images, captions, names = [], [], []
        for r in rows:
            where = f"{path}, line {r.line}"
            if r.file_name is None:
                raise MemtrainError(f"`{key}`: {where}: a held-out row needs the `file_name` of its image")
            images.append(path.parent / r.file_name)
            captions.append([r.text])
            names.append(f"{where} ({r.file_name})")
        if not images:
            raise MemtrainError(f"`{key}`={cfg.heldout}: no held-out pairs (rows with `member: 0` or group "
                                "\"heldout\", and a file_name); the monitor needs never-trained image-caption pairs")
        return data_lib.Rows(images, captions, str(path), names), labels
    if not path.exists() and (path.is_absolute() or cfg.heldout.startswith(".")):
        raise MemtrainError(f"`{key}`={cfg.heldout}: no such file or directory")
    try:
        rows = data_lib.load_rows(cfg.heldout, data_cfg.caption_column, data_cfg.image_column, cfg.heldout_split)
    except MemtrainError as e:
        raise MemtrainError(f"`{key}`={cfg.heldout}: {e}") from None
    except OSError as e:  # e.g. not a local path, and the Hub is unreachable or offline
        raise MemtrainError(f"`{key}`={cfg.heldout}: cannot load held-out pairs ({e})") from None
    return rows, {}


def load_novel(cfg) -> tuple[list[str], dict[str, str]]:
    key = "monitor.novel_prompts"
    try:
        rows = read_prompts(cfg.novel_prompts)
    except MemtrainError as e:
        raise MemtrainError(f"`{key}`: {e}") from None
    labels = {r["text"]: r["group"] for r in rows if "group" in r}
    novel = LabelGroups.load(cfg.label_groups, "`monitor.label_groups`").not_memorized
    if any("group" in r for r in rows):
        rows = [r for r in rows if r.get("group") in novel]
        if not rows:
            raise MemtrainError(f"`{key}`={cfg.novel_prompts}: no rows with group {' or '.join(novel) or '(none)'} "
                                f"(the not_memorized groups of {cfg.label_groups or 'trainer/label_groups.yaml'}, "
                                "`monitor.label_groups`)")
    return [r["text"] for r in rows], labels


# ---------------------------------------------------------------- the monitor


class Monitor(MonitorState):
    """The fixed probe plus the history; `run` at a step, `finish` at the end of training."""

    def __init__(self, cfg, seed: int, out: Path, train_rows: data_lib.Rows, member_index: list[int],
                 member_images: torch.Tensor, heldout_rows: data_lib.Rows, heldout_index: list[int],
                 heldout_images: torch.Tensor, novel: list[str], labels: dict[str, str]):
        super().__init__()
        self.cfg, self.seed, self.out = cfg, int(seed), Path(out)
        self.train_rows, self.member_index, self.member_images = train_rows, member_index, member_images
        self.member_captions = [train_rows.captions[i][0] for i in member_index]
        self.member_groups = [labels.get(c, "member") for c in self.member_captions]
        self.heldout_rows, self.heldout_index, self.heldout_images = heldout_rows, heldout_index, heldout_images
        self.heldout_captions = [heldout_rows.captions[i][0] for i in heldout_index]
        self.novel = novel
        self.stopped = False
        self.alarm: dict | None = None
        self._latents: torch.Tensor | None = None  # the VAE is frozen: probe latents are encoded once
        self._pool: tuple | None = None

    @classmethod
    def from_recipe(cls, recipe, rows: data_lib.Rows, resolution: int) -> Monitor:
        """Build the probe; every problem with it is a MemtrainError naming the key, before training."""
        cfg, seed = recipe.monitor, recipe.train.seed
        n = len(rows.images)
        if cfg.members > n:
            raise MemtrainError(f"`monitor.members`={cfg.members} is larger than the training data "
                                f"({n} rows in {rows.source}); use at most {n}")
        candidates = distinct_rows(rows, recipe.data.dedup_threshold) if cfg.distinct_members else list(range(n))
        if cfg.members > len(candidates):
            raise MemtrainError(f"`monitor.members`={cfg.members} is larger than the distinct training images "
                                f"({len(candidates)} of the {n} rows in {rows.source} after grouping near-duplicates "
                                f"at data.dedup_threshold={recipe.data.dedup_threshold}); use at most "
                                f"{len(candidates)} or set monitor.distinct_members=false")
        heldout, labels = load_heldout(cfg, recipe.data)
        if cfg.heldout_count > len(heldout.images):
            raise MemtrainError(f"`monitor.heldout_count`={cfg.heldout_count} is larger than the held-out data "
                                f"({len(heldout.images)} pairs in {heldout.source}); use at most {len(heldout.images)}")
        heldout_index = _choose(len(heldout.images), cfg.heldout_count, seed, "heldout")
        if cfg.novel_prompts:
            novel, novel_labels = load_novel(cfg)
            labels = {**labels, **novel_labels}
        else:
            novel = [heldout.captions[i][0] for i in heldout_index]
        if cfg.novel_count > len(novel):
            source = cfg.novel_prompts or "the held-out probe captions (monitor.novel_prompts is not set)"
            raise MemtrainError(f"`monitor.novel_count`={cfg.novel_count} is larger than the novel prompts "
                                f"({len(novel)} in {source}); use at most {len(novel)}")
        novel = [novel[i] for i in _choose(len(novel), cfg.novel_count, seed, "novel")]
        member_index = [candidates[i] for i in _choose(len(candidates), cfg.members, seed, "members")]
        sub = data_lib.Rows([heldout.images[i] for i in heldout_index], [heldout.captions[i] for i in heldout_index],
                            heldout.source, [heldout.names[i] for i in heldout_index])
        data_lib.check_images(sub)
        heldout_images = _load_images(heldout, heldout_index, resolution)
        member_images = _load_images(rows, member_index, resolution)
        return cls(cfg, seed, Path(recipe.output.dir), rows, member_index, member_images, heldout, heldout_index,
                   heldout_images, novel, labels)

    # ---- when

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.cfg.every_steps == 0 or step == max_steps

    # ---- what

    def measure(self, components: dict) -> dict:
        """The monitor's numbers for the current weights (no tracker, no history)."""
        cfg = self.cfg
        if self._latents is None:
            images = torch.cat([self.member_images, self.heldout_images])
            self._latents = encode_latents(components, images, self.seed, cfg.batch_size).cpu()
        m = len(self.member_captions)
        features = clid_features(components, self._latents, self.member_captions + self.heldout_captions,
                                 seed=self.seed, batch_size=cfg.batch_size, is_latents=True)
        scores = clid_th_scores(features, features[m:], cfg.clid_alpha)
        labels = np.r_[np.ones(m), np.zeros(len(scores) - m)]
        # x_T is shared by every prompt, so its unconditional prediction is evaluated once (identical values)
        magnitude = noise_magnitude(components, self.member_captions + self.novel, n=1, steps="first",
                                    seed=self.seed, batch_size=cfg.batch_size, reuse_uncond=True).numpy()
        mag_labels = np.r_[np.ones(m), np.zeros(len(self.novel))]
        values = {
            "clid_auc": auroc(scores, labels),
            "clid_tpr_at_1fpr": tpr_at_fpr(scores, labels, 0.01),
            "clid_mean_member": float(scores[:m].mean()),
            "clid_mean_heldout": float(scores[m:].mean()),
            "noise_auc": auroc(magnitude, mag_labels),
            "noise_tpr_at_1fpr": tpr_at_fpr(magnitude, mag_labels, 0.01),
            "noise_mean_member": float(magnitude[:m].mean()),
            "noise_mean_novel": float(magnitude[m:].mean()),
        }
        groups = np.asarray(self.member_groups)
        for group in sorted(set(self.member_groups) - {"member"}):
            values[f"clid_mean_{group}"] = float(scores[:m][groups == group].mean())
            values[f"noise_mean_{group}"] = float(magnitude[:m][groups == group].mean())
        return values

    def run(self, step: int, parts: dict, accelerator) -> dict:
        """Measure, log to every tracker, check the alarm. Main process only (others return {})."""
        if not accelerator.is_main_process:
            return {}
        start = time.perf_counter()
        unet = accelerator.unwrap_model(parts["unet"])
        text_encoder = accelerator.unwrap_model(parts["text_encoder"])
        components = dict(unet=unet, text_encoder=text_encoder, tokenizer=parts["tokenizer"], vae=parts["vae"],
                          noise_scheduler=parts["noise_scheduler"])
        modes = unet.training, text_encoder.training
        unet.eval()
        text_encoder.eval()
        wandb_tracker = next((t for t in accelerator.trackers if t.name == "wandb"), None)
        table, table_evals = None, 0
        try:
            with torch.random.fork_rng(devices=[]), count_evals() as counter:
                values = self.measure(components)
                if wandb_tracker is not None and self.cfg.table_generations and parts["vae"] is not None:
                    table, table_evals = self._table(step, components)
        finally:
            unet.train(modes[0])
            text_encoder.train(modes[1])
        entry = {"step": int(step), **values, "seconds": time.perf_counter() - start,
                 "unet_evals": counter.unet_evals + table_evals}
        self.history.append(entry)
        accelerator.log({PREFIX + k: v for k, v in entry.items() if k != "step"}, step=step)
        if table is not None:
            wandb_tracker.log({PREFIX + "generations": table}, step=step)
        self._check_alarm(entry)
        return entry

    def _check_alarm(self, entry: dict) -> None:
        cfg = self.cfg
        value = entry.get(cfg.alarm_metric)
        if cfg.alarm_threshold is None or value is None or value < cfg.alarm_threshold:
            return
        alarm = {"step": entry["step"], "metric": cfg.alarm_metric, "value": value,
                 "threshold": cfg.alarm_threshold, "action": cfg.alarm_action}
        message = (f"memorization alarm at step {entry['step']}: {PREFIX}{cfg.alarm_metric}={value:.4f} "
                   f">= {cfg.alarm_threshold}")
        if cfg.alarm_action == "stop":
            ckpts = list_checkpoints(self.out)
            alarm["last_good_checkpoint"] = str(ckpts[-1]) if ckpts else None
            message += (f"; stopping without saving a checkpoint or exporting (last good checkpoint: "
                        f"{alarm['last_good_checkpoint'] or 'none, the base model'})")
            self.stopped, self.alarm = True, alarm
        self.alarms.append(alarm)
        print(f"memtrain train: warning: {message}", file=sys.stderr, flush=True)

    def stop_requested(self, accelerator) -> bool:
        """The main process's stop decision, on every process (call at the same step everywhere)."""
        if self.cfg.alarm_threshold is None or self.cfg.alarm_action != "stop":
            return False

        flag = broadcast_object_list([self.stopped])
        self.stopped = bool(flag[0])
        return self.stopped

    # ---- the W&B table of probe generations

    def _nearest_pool(self, size: int, prompts_rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        if self._pool is None or self._pool[0] != size:
            n = len(self.train_rows.images)
            others = [i for i in _choose(n, min(n, NEAREST_POOL), self.seed, "nearest") if i not in prompts_rows]
            index = (list(dict.fromkeys(prompts_rows)) + others)[: max(NEAREST_POOL, len(prompts_rows))]
            images = (_load_images(self.train_rows, index, size) + 1) / 2
            self._pool = (size, images, index)
        return self._pool[1], self._pool[2]

    def _table(self, step: int, components: dict):
        """(W&B table, UNet evals spent generating it: 2 per DDIM step per prompt)."""
        rows = {}
        for caption, row in zip(self.member_captions, self.member_index, strict=True):
            rows.setdefault(caption, row)
        prompts = list(rows)[: self.cfg.table_generations]
        pipe = pipeline_from_components(components)
        images = generate_images(pipe, prompts, n=1, seed=self.seed, steps=TABLE_STEPS, progress=False)
        size = min(NEAREST_SIZE, images.shape[-1])
        small = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        pool, index = self._nearest_pool(size, [rows[p] for p in prompts])
        distances = l2_matrix(small, pool)
        best = distances.argmin(dim=1)
        table = wandb.Table(columns=["step", "prompt", "generation", "nearest training image", "nearest caption",
                                     "l2", "own image is nearest"])

        def picture(x: torch.Tensor):
            return wandb.Image((x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))

        for i, prompt in enumerate(prompts):
            j = int(best[i])
            table.add_data(step, prompt, picture(images[i]), picture(pool[j]),
                           self.train_rows.captions[index[j]][0], float(distances[i, j]), index[j] == rows[prompt])
        return table, 2 * TABLE_STEPS * len(prompts)

    # ---- the end

    def summary(self) -> dict:
        seconds = sum(h["seconds"] for h in self.history)
        train_seconds = self.train_seconds()
        return {
            "calls": len(self.history),
            "seconds": seconds,
            "seconds_per_call": seconds / len(self.history) if self.history else None,
            "unet_evals": sum(h.get("unet_evals", 0) for h in self.history),
            "train_seconds": train_seconds,
            "fraction_of_training": seconds / train_seconds if train_seconds > 0 else None,
            "alarm": self.alarm,
        }

    def describe_probe(self) -> dict:
        return {
            "members": [{"row": i, "name": self.train_rows.names[i], "caption": c, "group": g} for i, c, g in
                        zip(self.member_index, self.member_captions, self.member_groups, strict=True)],
            "heldout": [{"row": i, "name": self.heldout_rows.names[i], "caption": c} for i, c in
                        zip(self.heldout_index, self.heldout_captions, strict=True)],
            "novel": list(self.novel),
        }

    def finish(self, accelerator, out: Path) -> dict | None:
        """Write OUT/monitor.json and OUT/monitor.png, and the W&B curves chart; return the cost summary
        (None on the other processes, which hold no history)."""
        if not accelerator.is_main_process:
            return None
        summary = self.summary()

        out = Path(out)
        write_json({"config": asdict(self.cfg), "probe": self.describe_probe(), "history": self.history,
                    "alarms": self.alarms, "alarm": self.alarm, "cost": summary}, out / "monitor.json")
        if self.history:
            steps = [h["step"] for h in self.history]
            series = {name: (steps, [h[name] for h in self.history]) for name in CURVES}
            thresholds = ({f"alarm ({self.cfg.alarm_metric})": self.cfg.alarm_threshold}
                          if self.cfg.alarm_threshold is not None else None)
            save_curves(out / "monitor.png", series, "memorization monitor", "AUC / TPR at 1% FPR (members +)",
                        thresholds=thresholds)
            for tracker in accelerator.trackers:
                if tracker.name == "wandb":
                    chart = wandb.plot.line_series(xs=steps, ys=[series[n][1] for n in CURVES], keys=list(CURVES),
                                                   title="memorization monitor", xname="step")
                    tracker.log({PREFIX + "curves": chart}, step=steps[-1])
        return summary
