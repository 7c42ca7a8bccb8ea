"""`memtrain train`: the Accelerate fine-tuning loop for diffusers Stable Diffusion checkpoints.

Follows diffusers' `train_text_to_image.py` / `train_text_to_image_lora.py`, with min-SNR weighting
(Hang et al., ICCV 2023, "Efficient diffusion training via min-SNR weighting strategy") and per-sample
losses so that loss masking (Wen et al., ICLR 2024, "Detecting, explaining, and mitigating
memorization in diffusion models") and de-duplication weights compose with it. Deviation: noise,
timesteps and VAE draws of micro-step m come from (seed, m) for the global batch, so N processes and
resumed runs equal one uninterrupted process (docs/recipes.md, "Determinism").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import wandb
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from trainer import data as data_lib
from trainer.config import dump_recipe, to_dict
from trainer.core import distributed
from trainer.core.components import native_resolution, pipeline_from_components
from trainer.io import TrainingInterrupted, check_output_dir
from trainer.mitigate.captions import augment_caption, token_pool
from trainer.mitigate.dedup import apply_dedup_policy
from trainer.mitigate.loss_mask import LOSS_MASK_STATE
from trainer.plots import save_image_grid
from trainer.recipe import TrainRecipe
from trainer.sample.generate import generate_images
from trainer.tracking import JsonlTracker, flat_config, logged_loss, wandb_dir
from trainer.training import run_lock
from trainer.training.checkpoints import (
    EMA_STATE,
    check_resume_compatible,
    ema_state,
    export,
    list_checkpoints,
    load_training_state,
    read_checkpoint_state,
    read_checkpoint_tensors,
    resolve_resume,
    save_checkpoint,
)
from trainer.training.launch import check_launch, check_precision
from trainer.training.loss import diffusion_loss, global_slice, step_generator
from trainer.training.model import TrainingSetup, load_components, prepare_training
from trainer.training.monitor import MONITOR_STATE, Monitor, MonitorState
from trainer.training.run_lock import (
    check_fresh_or_resumed,
    check_unlocked,
    output_dir_lock,
    prepare_output_dir,
)

# DDP's notice, once per process, that a 1x1 convolution's gradient (oneDNN's layout) has other strides on its
# size-1 dimensions than its bucket view: the same memory order, so nothing to act on
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

# ---------------------------------------------------------------- validation images


def validation_images(accelerator: Accelerator, recipe: TrainRecipe, parts: dict, step: int, out: Path) -> None:
    prompts = recipe.log.validation_prompts
    if not prompts or not accelerator.is_main_process or parts["vae"] is None:
        return

    unet = accelerator.unwrap_model(parts["unet"])
    pipe = pipeline_from_components(dict(parts, unet=unet, text_encoder=accelerator.unwrap_model(parts["text_encoder"])))
    was_training = unet.training
    unet.eval()
    images = generate_images(pipe, prompts, n=recipe.log.validation_images, seed=recipe.train.seed, progress=False)
    unet.train(was_training)
    path = out / "validation" / f"step-{step:06d}.png"
    save_image_grid(path, images, [p[:40] for p in prompts for _ in range(recipe.log.validation_images)])
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({"validation": [wandb.Image(str(path))]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.numpy(), step, dataformats="NCHW")


# ---------------------------------------------------------------- the loop


def train(recipe: TrainRecipe) -> dict:
    """Run a recipe; return a summary (steps, steps trained by this call, final loss, export path). The output
    directory is locked for the run (trainer/training/run_lock.py); a resume continues exactly (docs/recipes.md)."""
    recipe.validate()
    opt = recipe.train
    out = Path(recipe.output.dir)
    # ---- everything that can be wrong with the inputs is checked before anything is written
    inputs = {"data.path": recipe.data.path, "model.pretrained": recipe.model.pretrained}
    check_output_dir(out, "output.dir", inputs)
    run_lock.check_inputs_kept(out, inputs)
    check_unlocked(out)
    check_fresh_or_resumed(out, recipe.checkpoint.resume, recipe.output.overwrite)
    parts = load_components(recipe)
    tokenizer = parts["tokenizer"]
    rows = data_lib.load_rows(recipe.data.path, recipe.data.caption_column, recipe.data.image_column,
                              recipe.data.split, recipe.data.max_samples)
    data_lib.check_images(rows)
    resolution = recipe.data.resolution or native_resolution(parts["unet"], parts["vae"])
    caption_fn, rows, weights = make_caption_fn_and_weights(recipe, rows, tokenizer)
    dataset = data_lib.CaptionImageDataset(rows, resolution, recipe.data.center_crop, recipe.data.random_flip,
                                           seed=opt.seed, caption_fn=caption_fn, cache=recipe.data.cache)
    sampler = data_lib.EpochSampler(len(dataset), opt.seed, weights, data_lib.shard_ids(rows))
    monitor = None
    if recipe.monitor.every_steps:
        monitor = Monitor.from_recipe(recipe, rows, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler,
                                         collate_fn=data_lib.make_collate(tokenizer),
                                         num_workers=opt.dataloader_num_workers)
    resume_path = resolve_resume(recipe, out)
    if recipe.output.overwrite and resume_path is not None and out.resolve() in resume_path.resolve().parents:
        resume_path = None  # output.overwrite deletes the earlier run, its checkpoints included: a fresh start

    trackers = [JsonlTracker(recipe.log.run_name or out.name, out / "logs")] + list(recipe.log.trackers)
    check_precision(recipe, distributed.runs_on_cpu())
    accelerator = Accelerator(
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        mixed_precision=opt.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        step_scheduler_with_optimizer=True,
    )
    try:
        check_launch(accelerator, recipe)
        global_step, allowed = 0, {}
        if resume_path is not None:
            global_step, allowed = check_resume_compatible(resume_path, recipe, accelerator.num_processes)
        with output_dir_lock(accelerator, out):
            if accelerator.is_main_process:
                prepare_output_dir(recipe, out, global_step)
            accelerator.wait_for_everyone()
            summary = _train_loop(recipe, accelerator, parts, dataset, sampler, loader, resume_path, global_step, monitor)
            return dict(summary, allowed_changes=allowed) if allowed else summary
    finally:
        # the Accelerator state is a process-wide singleton: clear it so another recipe (with another
        # mixed precision, say) can run in the same Python process, e.g. from the Python API
        AcceleratorState._reset_state()


def interrupted(out: Path, step: int) -> TrainingInterrupted:
    complete = list_checkpoints(out)
    where = (f"the last complete checkpoint is {complete[-1]}; resume with checkpoint.resume=latest" if complete
             else "no checkpoint was saved yet")
    return TrainingInterrupted(f"interrupted at step {step}; {where}")


@dataclass
class Run:
    """What the loop carries from step to step: the recipe, the prepared parts and setup, the counters."""

    recipe: TrainRecipe
    accelerator: Accelerator
    parts: dict
    setup: TrainingSetup
    monitor: Monitor | None
    monitor_state: MonitorState | None
    global_step: int
    micro_step: int
    running: list = field(default_factory=list)
    last_logged: dict = field(default_factory=dict)
    posteriors: dict | None = None  # the VAE posterior cache (data.cache)

    @property
    def out(self) -> Path:
        return Path(self.recipe.output.dir)

    @property
    def stopped(self) -> bool:
        return self.monitor is not None and self.monitor.stopped


def _train_loop(recipe: TrainRecipe, accelerator: Accelerator, parts: dict, dataset, sampler, loader,
                resume_path: Path | None, global_step: int, monitor=None) -> dict:
    opt = recipe.train
    out = Path(recipe.output.dir)
    set_seed(opt.seed)
    setup = prepare_training(recipe, accelerator, parts, loader)
    loader = setup.loader
    monitor_state = restore_state(accelerator, recipe, setup, resume_path, monitor)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    accelerator.init_trackers(recipe.log.project, config=flat_config(to_dict(recipe)),
                              init_kwargs={"wandb": {"name": recipe.log.run_name or out.name,
                                                     "dir": wandb_dir(out)}})

    accum = opt.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(loader) / accum)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * accum
    num_epochs = math.ceil(opt.max_steps / updates_per_epoch)
    # an epoch's last update may take fewer than `accum` micro-batches
    run = Run(recipe, accelerator, parts, setup, monitor, monitor_state, global_step,
              micro_step=first_epoch * len(loader) + skip_batches, posteriors={} if recipe.data.cache else None)
    resumed_step = global_step
    if global_step >= opt.max_steps:
        num_epochs = first_epoch  # a finished run resumed: nothing to train
        if accelerator.is_main_process:
            warnings.warn(f"{resume_path} is at train.max_steps={opt.max_steps}: the run is already complete, "
                          "nothing to train", stacklevel=2)

    progress = tqdm(total=opt.max_steps, initial=global_step, desc="train", disable=not (
        recipe.log.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    parts["unet"].train()
    if recipe.model.train_text_encoder:
        parts["text_encoder"].train()
    if monitor_state is not None:
        monitor_state.begin()
    try:
        for epoch in range(first_epoch, num_epochs):
            dataset.epoch = epoch
            batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader
            # the prepared loader sets its sampler's epoch from its own iteration counter when iteration starts,
            # and that counter starts at 0 in a new process: set it, not only the sampler, so a resumed run
            # draws epoch e's order (skip_first_batches returns a new loader, hence after it)
            sampler.set_epoch(epoch)
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            for batch in batches:
                stats = train_step(run, batch)
                if not accelerator.sync_gradients:
                    continue
                if after_update(run, epoch, stats, progress):
                    break
            if run.global_step >= opt.max_steps or run.stopped:
                break
    except KeyboardInterrupt:
        raise interrupted(out, run.global_step) from None
    progress.close()
    return finish(run, resumed_step)


def restore_state(accelerator: Accelerator, recipe: TrainRecipe, setup: TrainingSetup, resume_path: Path | None,
                  monitor: Monitor | None) -> MonitorState | None:
    """Load a resumed run's optimizer, scheduler, EMA and loss-mask state; return the monitor state the
    checkpoints carry (the monitor's history rides in them as JSON; a run with the monitor off carries a
    resumed history)."""
    loss_mask = setup.loss_mask
    if resume_path is not None:
        load_training_state(accelerator, resume_path, setup.optimizer, setup.lr_scheduler, setup.lr, recipe,
                            setup.ema)
    if resume_path is not None and loss_mask is not None:
        loss_mask.resume(read_checkpoint_tensors(resume_path, LOSS_MASK_STATE), resume_path, accelerator.is_main_process)
    saved = read_checkpoint_state(resume_path, MONITOR_STATE) if resume_path is not None else None
    monitor_state = monitor if monitor is not None else MonitorState() if saved is not None else None
    if saved is not None:
        monitor_state.load_state_dict(saved)
    return monitor_state


def train_step(run: Run, batch: dict) -> dict:
    """One micro-batch: loss, backward, optimizer step under gradient accumulation; returns the gathered
    statistics (the loss is appended to `run.running`)."""
    accelerator, opt, setup, loss_mask = run.accelerator, run.recipe.train, run.setup, run.setup.loss_mask
    with accelerator.accumulate(run.parts["unet"]):
        generator = step_generator(opt.seed, run.micro_step)
        rows_slice = global_slice(accelerator, opt.batch_size, batch["pixel_values"].shape[0])
        threshold = loss_mask.logged_threshold() if loss_mask is not None else None
        loss, stats = diffusion_loss(batch, run.parts, run.recipe, generator, rows_slice,
                                     opt.batch_size * accelerator.num_processes, setup.weight_dtype, loss_mask,
                                     run.posteriors)
        accelerator.backward(loss)
        if accelerator.sync_gradients and opt.max_grad_norm > 0:
            accelerator.clip_grad_norm_(setup.params, opt.max_grad_norm)
        setup.optimizer.step()
        setup.lr_scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
    run.micro_step += 1
    if loss_mask is not None:  # every process records the same global magnitudes
        loss_mask.record(accelerator.gather(stats.pop("magnitudes").detach()),
                         accelerator.gather(stats.pop("timesteps").detach()))
        if threshold is not None:
            stats["mask_threshold"] = threshold
    run.running.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
    for k, v in stats.items():
        if k == "mask_threshold":
            continue
        stats[k] = accelerator.gather(v.detach().reshape(1)).sum().item() if k == "masked" else (
            accelerator.gather(v.detach().reshape(1)).mean().item())
    return stats


def after_update(run: Run, epoch: int, stats: dict, progress) -> bool:
    """After an optimizer update: EMA, logging, the monitor, checkpoints, validation images. True ends the
    epoch (the last step, or the monitor's alarm)."""
    recipe, accelerator, setup, opt = run.recipe, run.accelerator, run.setup, run.recipe.train
    if setup.ema is not None:
        setup.ema.step(accelerator.unwrap_model(run.parts["unet"]).parameters())
    run.global_step += 1
    step = run.global_step
    progress.update(1)
    if step % recipe.log.every_steps == 0 or step == opt.max_steps:
        run.last_logged = {"loss": sum(run.running) / len(run.running),
                           "lr": setup.lr_scheduler.get_last_lr()[0], "epoch": epoch, **stats}
        accelerator.log(run.last_logged, step=step)
        progress.set_postfix(loss=f"{run.last_logged['loss']:.4f}")
        run.running = []
    if run.monitor is not None and run.monitor.due(step, opt.max_steps):
        run.monitor.run(step, run.parts, accelerator)
        if run.monitor.stop_requested(accelerator):  # alarm: keep the last good checkpoint, save nothing
            return True
    if step % recipe.checkpoint.every_steps == 0 or (recipe.checkpoint.at_end and step == opt.max_steps):
        state, tensors = {}, {}
        if run.monitor_state is not None:
            state[MONITOR_STATE] = run.monitor_state.state_dict()
        if setup.ema is not None:
            state[EMA_STATE], tensors[EMA_STATE] = ema_state(setup.ema)
        if setup.loss_mask is not None and setup.loss_mask.adaptive:
            tensors[LOSS_MASK_STATE] = setup.loss_mask.state_dict()
        save_checkpoint(accelerator, recipe, run.out, step, state, tensors)
    if recipe.log.validation_every and step % recipe.log.validation_every == 0:
        validation_images(accelerator, recipe, run.parts, step, run.out)
    return step >= opt.max_steps


def finish(run: Run, resumed_step: int) -> dict:
    """Final validation images, the monitor's report and the export; every process tears down together."""
    recipe, accelerator, out, global_step = run.recipe, run.accelerator, run.out, run.global_step
    accelerator.wait_for_everyone()
    trained = global_step > resumed_step
    if trained and (not recipe.log.validation_every or global_step % recipe.log.validation_every):
        validation_images(accelerator, recipe, run.parts, global_step, out)
    monitored = run.monitor.finish(accelerator, out) if run.monitor is not None else None
    exported = None
    if not run.stopped:  # a finished run resumed exports only what is missing
        existing = out / recipe.export
        exported = existing if not trained and existing.is_dir() else export(
            accelerator, recipe, run.parts, run.setup.ema, out)
    # every process tears down together: a process that destroys its process group while the main one still
    # writes the monitor report or the export can hang on exit
    accelerator.wait_for_everyone()
    release_wrappers(accelerator, run.parts)
    accelerator.end_training()
    loss = run.last_logged.get("loss") if trained else logged_loss(out / "logs" / "metrics.jsonl", global_step)
    summary = {"steps": global_step, "new_steps": global_step - resumed_step, "loss": loss,
               "export": str(exported) if exported else None, "output_dir": str(out)}
    return dict(summary, monitor=monitored) if monitored is not None else summary


def release_wrappers(accelerator: Accelerator, parts: dict) -> None:
    """Drop the DDP wrappers (and Accelerate's references to them) before the process group is destroyed. Else
    the last reference to the group is a wrapper's Reducer, whose dealloc destroys the group with the GIL held,
    while gloo's worker thread, freeing the last collective's tensors, waits for the GIL: a deadlock at exit
    (pytorch/pytorch#56297). The group's own binding releases the GIL when it is destroyed."""
    for key in ("unet", "text_encoder"):
        if parts.get(key) is not None:
            parts[key] = accelerator.unwrap_model(parts[key])
    accelerator.free_memory()


def make_caption_fn_and_weights(recipe: TrainRecipe, rows: data_lib.Rows, tokenizer):
    """The per-sample caption choice (with caption randomization when enabled) and the
    de-duplication sampling weights (None when every row is drawn once per epoch)."""
    caps = recipe.data.captions
    augment = None
    if caps.enabled:
        pool = token_pool(tokenizer)

        def augment(captions, rng):
            return augment_caption(captions, caps, rng, pool)

    dropout = recipe.data.caption_dropout

    def caption_fn(captions: list[str], rng) -> str:
        if dropout and rng.random() < dropout:
            return ""
        return augment(captions, rng) if augment else captions[0]

    weights = None
    if recipe.data.dedup != "none":
        rows, weights = apply_dedup_policy(rows, recipe.data.dedup, recipe.data.dedup_threshold)
    return caption_fn, rows, weights
