"""`memtrain train`: the Accelerate fine-tuning loop for diffusers Stable Diffusion checkpoints.

Follows diffusers' `train_text_to_image.py` / `train_text_to_image_lora.py`, with min-SNR weighting
(Hang et al., ICCV 2023, "Efficient diffusion training via min-SNR weighting strategy") and per-sample
losses so that loss masking (Wen et al., ICLR 2024, "Detecting, explaining, and mitigating
memorization in diffusion models") and de-duplication weights compose with it. Deviation: noise,
timesteps and VAE draws of micro-step m come from (seed, m) for the global batch, so N processes and
resumed runs equal one uninterrupted process (docs/recipes.md, "Determinism").
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import wandb
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from trainer import data as data_lib
from trainer.config import dump_recipe, to_dict
from trainer.core import distributed, run_lock
from trainer.core.checkpoints import (
    EMA_STATE,
    check_resume_compatible,
    ema_state,
    export,
    list_checkpoints,
    load_training_state,
    read_checkpoint_state,
    read_checkpoint_tensors,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
)
from trainer.core.components import (
    add_lora,
    frozen_dtype,
    load_components,
    native_resolution,
    pipeline_from_components,
)
from trainer.core.run_lock import acquire, check_fresh_or_resumed, check_unlocked, clear_earlier_run, release
from trainer.core.unet_core import posterior_latents
from trainer.io import MemtrainError, TrainingInterrupted, check_output_dir
from trainer.mitigate.captions import add_embedding_noise, augment_caption, token_pool
from trainer.mitigate.dedup import apply_dedup_policy
from trainer.mitigate.loss_mask import LOSS_MASK_STATE, LossMask, memorization_mask
from trainer.recipe import TrainRecipe
from trainer.report.plots import save_image_grid
from trainer.sample.generate import generate_images
from trainer.tracking import JsonlTracker, logged_loss, truncate_metrics, wandb_dir
from trainer.training.launch import check_launch, check_precision
from trainer.training.monitor import MONITOR_STATE, Monitor, MonitorState

# DDP's notice, once per process, that a 1x1 convolution's gradient (oneDNN's layout) has other strides on its
# size-1 dimensions than its bucket view: the same memory order, so nothing to act on
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

# ---------------------------------------------------------------- the loss


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 2_654_435_761 + micro_step) % 2**63)


def global_slice(accelerator: Accelerator, per_process: int, actual: int) -> slice:
    start = accelerator.process_index * per_process
    return slice(start, start + actual)


def diffusion_loss(batch: dict, parts: dict, recipe: TrainRecipe, generator: torch.Generator, rows: slice,
                   global_batch: int, weight_dtype: torch.dtype,
                   loss_mask: LossMask | None = None) -> tuple[torch.Tensor, dict]:
    """Per-sample denoising loss of one micro-batch (mean over the batch is the training loss). With
    `loss_mask`, samples with ||d(c)|| at or over their threshold are masked; the per-sample magnitudes and
    timesteps are returned in `stats["magnitudes"]`, `stats["timesteps"]` (for `loss_mask.record`)."""
    unet, text_encoder, vae, scheduler = parts["unet"], parts["text_encoder"], parts["vae"], parts["noise_scheduler"]
    opt = recipe.train
    pixels = batch["pixel_values"].to(weight_dtype)
    device = pixels.device
    shape = (global_batch,) + ((vae.config.latent_channels,) if vae is not None else (pixels.shape[1],))
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    spatial = (pixels.shape[2] // factor, pixels.shape[3] // factor)
    # all randomness of this micro-step, drawn for the global batch on the CPU
    posterior_noise = torch.randn(shape + spatial, generator=generator)[rows]
    noise = torch.randn(shape + spatial, generator=generator)[rows]
    offset = torch.randn(shape + (1, 1), generator=generator)[rows]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (global_batch,), generator=generator)[rows]
    noise, offset, timesteps = noise.to(device), offset.to(device), timesteps.to(device)

    with torch.no_grad():
        if vae is not None:
            dist = vae.encode(pixels).latent_dist
            latents = posterior_latents(vae, dist.mean, dist.std, posterior_noise.to(device, dist.mean.dtype))
        else:
            latents = pixels
    latents = latents.float()
    if opt.noise_offset:
        noise = noise + opt.noise_offset * offset
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = contextlib.nullcontext() if recipe.model.train_text_encoder else torch.no_grad()
    with context:
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    if recipe.data.captions.embedding_noise:  # GNI (Somepalli et al. 2023): c + lambda * N(0, I)
        gni = torch.randn((global_batch,) + tuple(hidden.shape[1:]), generator=generator)[rows]
        hidden = add_embedding_noise(hidden, recipe.data.captions.embedding_noise, noise=gni)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise MemtrainError(f"prediction type {scheduler.config.prediction_type!r} is not supported")
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    stats = {}
    weights = torch.ones_like(per_sample)
    if opt.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=opt.snr_gamma)
        weights = clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)
    if loss_mask is not None:
        keep, magnitude = memorization_mask(unet, noisy, timesteps, hidden, parts["empty_hidden"],
                                            loss_mask.thresholds(timesteps), pred, scheduler)
        weights = weights * keep
        stats["masked"] = (1 - keep).sum()
        stats["noise_magnitude"] = magnitude.mean()
        stats["magnitudes"], stats["timesteps"] = magnitude, timesteps
    loss = (per_sample * weights).sum() / per_sample.numel()
    return loss, stats


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
    directory is locked for the run (trainer/core/run_lock.py); a resume continues exactly (docs/recipes.md)."""
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
                                           seed=opt.seed, caption_fn=caption_fn)
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


@contextlib.contextmanager
def output_dir_lock(accelerator: Accelerator, out: Path) -> Iterator[None]:
    """The main process holds `OUT/.memtrain.lock` (trainer/core/run_lock.py) while the block runs; when it
    cannot take it, every process raises the same MemtrainError."""
    refusal = [None]
    if accelerator.is_main_process:
        try:
            acquire(out)
        except MemtrainError as e:
            refusal = [str(e)]
    broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise MemtrainError(refusal[0])
    try:
        yield
    finally:
        if accelerator.is_main_process:
            release(out)


def prepare_output_dir(recipe: TrainRecipe, out: Path, resumed_step: int) -> None:
    """Clear an earlier run (output.overwrite), the temp dirs of an interrupted one, and on resume the metrics
    rows of the steps that will be trained again."""
    if recipe.output.overwrite:  # a resume of a checkpoint inside `out` was turned into a fresh start
        clear_earlier_run(out)
    remove_leftovers(out)
    if recipe.checkpoint.resume is not None:
        truncate_metrics(out / "logs" / "metrics.jsonl", resumed_step)


def interrupted(out: Path, step: int) -> TrainingInterrupted:
    complete = list_checkpoints(out)
    where = (f"the last complete checkpoint is {complete[-1]}; resume with checkpoint.resume=latest" if complete
             else "no checkpoint was saved yet")
    return TrainingInterrupted(f"interrupted at step {step}; {where}")


def _train_loop(recipe: TrainRecipe, accelerator: Accelerator, parts: dict, dataset, sampler, loader,
                resume_path: Path | None, global_step: int, monitor=None) -> dict:
    opt = recipe.train
    out = Path(recipe.output.dir)
    set_seed(opt.seed)
    unet, text_encoder, vae, tokenizer = parts["unet"], parts["text_encoder"], parts["vae"], parts["tokenizer"]

    # ---- model
    weight_dtype = frozen_dtype(recipe)
    if vae is not None:
        vae.requires_grad_(False)
        vae.to(accelerator.device)  # already in weight_dtype (load_components); a dtype here makes diffusers warn
    text_encoder.requires_grad_(recipe.model.train_text_encoder)
    if not recipe.model.train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    if recipe.model.lora.rank > 0:
        unet.requires_grad_(False)
        add_lora(unet, recipe)
    if opt.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if opt.ema:
        ema = EMAModel(unet.parameters(), decay=opt.ema_decay, model_cls=type(unet), model_config=unet.config,
                       foreach=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    if recipe.model.train_text_encoder:
        params += list(text_encoder.parameters())
    lr = opt.learning_rate
    if opt.scale_lr:
        lr *= opt.batch_size * opt.gradient_accumulation_steps * accelerator.num_processes
    # one fused kernel over all parameters instead of a Python loop (CPU and CUDA have it)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.adam_weight_decay, eps=opt.adam_epsilon,
                                  fused=accelerator.device.type in ("cpu", "cuda"))

    try:
        lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer,
                                     num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=opt.max_steps * accelerator.num_processes)
    except ValueError as e:
        raise MemtrainError(f"recipe: `train.lr_scheduler`: {e}") from None
    if recipe.model.train_text_encoder:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    parts.update(unet=unet, text_encoder=text_encoder)
    if ema is not None:
        ema.to(accelerator.device)
    loss_mask = LossMask.from_recipe(opt, parts["noise_scheduler"].config.num_train_timesteps)
    if loss_mask is not None:
        empty = tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt")
        with torch.no_grad():
            parts["empty_hidden"] = text_encoder(empty.input_ids.to(accelerator.device), return_dict=False)[0]

    if resume_path is not None:
        load_training_state(accelerator, resume_path, optimizer, lr_scheduler, lr, recipe, ema)
    if resume_path is not None and loss_mask is not None:
        loss_mask.resume(read_checkpoint_tensors(resume_path, LOSS_MASK_STATE), resume_path, accelerator.is_main_process)
    # the monitor's history rides in the checkpoints as JSON; a run with the monitor off carries a resumed history
    saved = read_checkpoint_state(resume_path, MONITOR_STATE) if resume_path is not None else None
    monitor_state = monitor if monitor is not None else MonitorState() if saved is not None else None
    if saved is not None:
        monitor_state.load_state_dict(saved)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    accelerator.init_trackers(recipe.log.project, config=flat_config(recipe),
                              init_kwargs={"wandb": {"name": recipe.log.run_name or out.name,
                                                     "dir": wandb_dir(out)}})

    accum = opt.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(loader) / accum)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * accum
    num_epochs = math.ceil(opt.max_steps / updates_per_epoch)
    global_batch = opt.batch_size * accelerator.num_processes
    # an epoch's last update may take fewer than `accum` micro-batches
    micro_step = first_epoch * len(loader) + skip_batches
    resumed_step = global_step
    if global_step >= opt.max_steps:
        num_epochs = first_epoch  # a finished run resumed: nothing to train
        if accelerator.is_main_process:
            warnings.warn(f"{resume_path} is at train.max_steps={opt.max_steps}: the run is already complete, "
                          "nothing to train", stacklevel=2)

    progress = tqdm(total=opt.max_steps, initial=global_step, desc="train", disable=not (
        recipe.log.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    unet.train()
    if recipe.model.train_text_encoder:
        text_encoder.train()
    running, last_logged = [], {}
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
                with accelerator.accumulate(unet):
                    generator = step_generator(opt.seed, micro_step)
                    rows_slice = global_slice(accelerator, opt.batch_size, batch["pixel_values"].shape[0])
                    threshold = loss_mask.logged_threshold() if loss_mask is not None else None
                    loss, stats = diffusion_loss(batch, parts, recipe, generator, rows_slice, global_batch, weight_dtype,
                                                 loss_mask)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and opt.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, opt.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_step += 1
                if loss_mask is not None:  # every process records the same global magnitudes
                    loss_mask.record(accelerator.gather(stats.pop("magnitudes").detach()),
                                     accelerator.gather(stats.pop("timesteps").detach()))
                    if threshold is not None:
                        stats["mask_threshold"] = threshold
                running.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
                for k, v in stats.items():
                    if k == "mask_threshold":
                        continue
                    stats[k] = accelerator.gather(v.detach().reshape(1)).sum().item() if k == "masked" else (
                        accelerator.gather(v.detach().reshape(1)).mean().item())
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(accelerator.unwrap_model(unet).parameters())
                global_step += 1
                progress.update(1)
                if global_step % recipe.log.every_steps == 0 or global_step == opt.max_steps:
                    last_logged = {"loss": sum(running) / len(running), "lr": lr_scheduler.get_last_lr()[0],
                                   "epoch": epoch, **stats}
                    accelerator.log(last_logged, step=global_step)
                    progress.set_postfix(loss=f"{last_logged['loss']:.4f}")
                    running = []
                if monitor is not None and monitor.due(global_step, opt.max_steps):
                    monitor.run(global_step, parts, accelerator)
                    if monitor.stop_requested(accelerator):  # alarm: keep the last good checkpoint, save nothing
                        break
                if global_step % recipe.checkpoint.every_steps == 0 or (
                    recipe.checkpoint.at_end and global_step == opt.max_steps):
                    state, tensors = {}, {}
                    if monitor_state is not None:
                        state[MONITOR_STATE] = monitor_state.state_dict()
                    if ema is not None:
                        state[EMA_STATE], tensors[EMA_STATE] = ema_state(ema)
                    if loss_mask is not None and loss_mask.adaptive:
                        tensors[LOSS_MASK_STATE] = loss_mask.state_dict()
                    save_checkpoint(accelerator, recipe, out, global_step, state, tensors)
                if recipe.log.validation_every and global_step % recipe.log.validation_every == 0:
                    validation_images(accelerator, recipe, parts, global_step, out)
                if global_step >= opt.max_steps:
                    break
            if global_step >= opt.max_steps or (monitor is not None and monitor.stopped):
                break
    except KeyboardInterrupt:
        raise interrupted(out, global_step) from None
    progress.close()
    accelerator.wait_for_everyone()
    trained = global_step > resumed_step
    if trained and (not recipe.log.validation_every or global_step % recipe.log.validation_every):
        validation_images(accelerator, recipe, parts, global_step, out)
    monitored = monitor.finish(accelerator, out) if monitor is not None else None
    exported = None
    if not (monitor is not None and monitor.stopped):  # a finished run resumed exports only what is missing
        existing = out / recipe.export
        exported = existing if not trained and existing.is_dir() else export(accelerator, recipe, parts, ema, out)
    # every process tears down together: a process that destroys its process group while the main one still
    # writes the monitor report or the export can hang on exit
    accelerator.wait_for_everyone()
    accelerator.end_training()
    loss = last_logged.get("loss") if trained else logged_loss(out / "logs" / "metrics.jsonl", global_step)
    summary = {"steps": global_step, "new_steps": global_step - resumed_step, "loss": loss,
               "export": str(exported) if exported else None, "output_dir": str(out)}
    return dict(summary, monitor=monitored) if monitored is not None else summary


def flat_config(recipe: TrainRecipe) -> dict:
    flat = {}

    def walk(prefix: str, node):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            else:
                flat[key] = v if isinstance(v, int | float | str | bool) else str(v)

    walk("", to_dict(recipe))
    return flat


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
