"""Training checkpoints: save (atomically, every rank), find, resume (with a compatibility check and a
check of the files) and export (a diffusers pipeline directory or LoRA weights). A failed write (a full
disk) is a MemtrainError naming the file and the last complete checkpoint, which it leaves intact."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.components import pickle_error
from trainer.io import MemtrainError, atomic_dir
from trainer.recipe import TrainRecipe

CHECKPOINT_INFO = "memtrain_checkpoint.json"


def checkpoint_info(recipe: TrainRecipe, num_processes: int) -> dict:
    """What a checkpoint records of its recipe: every key that changes the training trajectory."""
    return {"recipe": recipe.trajectory(num_processes)}


# what checkpoints written before `recipe` was recorded hold, by the recipe key each stands for
LEGACY_INFO = {"model": "model.pretrained", "lora_rank": "model.lora.rank", "lora_target_modules":
               "model.lora.target_modules", "train_text_encoder": "model.train_text_encoder", "ema": "train.ema"}


def recorded_recipe(info: dict, recipe: TrainRecipe, num_processes: int) -> tuple[dict, dict]:
    """(recorded, current) trajectory keys of a checkpoint's info and of `recipe`, over the same keys."""
    current = recipe.trajectory(num_processes)
    if "recipe" in info:
        return info["recipe"], current
    recorded = {key: info[old] for old, key in LEGACY_INFO.items() if old in info}
    if "model.pretrained" in recorded and Path(recorded["model.pretrained"]).exists():
        recorded["model.pretrained"] = str(Path(recorded["model.pretrained"]).resolve())
    current = {key: current[key] for key in recorded if key in current}
    if "global_batch" in info:  # recorded as batch x processes x accumulation
        recorded["train.batch_size"] = info["global_batch"]
        current["train.batch_size"] = (recipe.train.batch_size * num_processes
                                       * recipe.train.gradient_accumulation_steps)
    return recorded, current


def list_checkpoints(out: Path) -> list[Path]:
    ckpts = [p for p in (out / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(accelerator: Accelerator, recipe: TrainRecipe, out: Path, step: int,
                    state: dict[str, dict] | None = None, tensors: dict[str, dict] | None = None) -> Path:
    """`accelerator.save_state` on every rank into a temp dir, renamed once all ranks are done. `state`:
    extra JSON documents and `tensors` extra safetensors files (name -> dict), read back with
    `read_checkpoint_state` / `read_checkpoint_tensors`: nothing a resume loads is a pickle of ours.
    Older checkpoints beyond `checkpoint.total_limit` are removed only once the new one is complete."""
    root = out / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    what = f"checkpoint {final.name}"
    _raise_on_any_process(accelerator, tmp, _attempt(what, tmp, out, lambda: accelerator.save_state(str(tmp))))
    failure = None
    if accelerator.is_main_process:
        failure = _attempt(what, tmp, out, lambda: _write_extras(tmp, recipe, accelerator.num_processes, step,
                                                                 state or {}, tensors or {}))
    _raise_on_any_process(accelerator, tmp, failure)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        limit = recipe.checkpoint.total_limit
        older = [c for c in list_checkpoints(out) if c != final]
        if limit is not None and len(older) >= limit:
            for old in older[: len(older) - limit + 1]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _write_extras(tmp: Path, recipe: TrainRecipe, num_processes: int, step: int, state: dict[str, dict],
                  tensors: dict[str, dict]) -> None:
    info = dict(checkpoint_info(recipe, num_processes), step=step)
    (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
    for name, document in state.items():
        (tmp / f"{name}.json").write_text(json.dumps(document))
    for name, named_tensors in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in named_tensors.items()}, str(tmp / f"{name}.safetensors"))


def _attempt(what: str, directory: Path, out: Path, write) -> str | None:
    """None when `write()` succeeds, else the message of its failure (`clear_write_failure`)."""
    try:
        with clear_write_failure(what, directory, out):
            write()
    except MemtrainError as e:
        return str(e)
    return None


def _raise_on_any_process(accelerator: Accelerator, tmp: Path, failure: str | None) -> None:
    """A collective: every process raises when one failed to write (none waits forever at a barrier)."""
    failed = accelerator.gather(torch.tensor([failure is not None], device=accelerator.device))
    if failed.any():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise MemtrainError(failure or f"{tmp.name}: another process failed to write its part; the last complete "
                                        "checkpoint is intact (resume with checkpoint.resume=latest)")


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch.save reports a failed write as RuntimeError


def _newest_file(directory: Path) -> Path | None:
    files = [p for p in Path(directory).rglob("*") if p.is_file()] if Path(directory).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


@contextlib.contextmanager
def clear_write_failure(what: str, directory: Path, out: Path, remove: bool = False) -> Iterator[None]:
    """Turn a failed write into `directory` (full disk, quota, read-only) into one MemtrainError naming the
    file being written (the newest there) and the last complete checkpoint; `remove`: delete `directory`."""
    try:
        yield
    except WRITE_ERRORS as e:
        failed = _newest_file(directory) or directory
        if remove:
            shutil.rmtree(directory, ignore_errors=True)
        complete = list_checkpoints(out)
        intact = (f"the last complete checkpoint {complete[-1]} is intact (resume with checkpoint.resume=latest)"
                  if complete else "no complete checkpoint was written yet")
        raise MemtrainError(f"{what}: writing {failed} failed ({e}); {intact}; free disk space and run again") \
            from None


def remove_leftovers(out: Path) -> None:
    """Delete the temp directories of checkpoint writes and exports that an interrupted run left behind."""
    for leftover in [*(out / "checkpoints").glob(".checkpoint-*.tmp"), *out.glob(".pipeline.*-*"),
                     *out.glob(".lora.*-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def check_checkpoint_files(path: Path) -> None:
    """A MemtrainError naming the first damaged file of a checkpoint (empty, truncated or not what its name
    says), checked by reading only headers and archive directories, before anything is loaded."""
    damaged = None
    for file in sorted(Path(path).iterdir()):
        if not file.is_file():
            continue
        if file.stat().st_size == 0:
            damaged = f"{file} is empty"
        elif file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own error types on a damaged header
                damaged = f"{file} is not a readable safetensors file ({e})"
        elif file.suffix in (".bin", ".pkl", ".pt"):  # torch.save archives are zip files
            try:
                zipfile.ZipFile(file).close()
            except (zipfile.BadZipFile, OSError) as e:
                damaged = f"{file} is not a readable torch archive ({e})"
        if damaged:
            raise MemtrainError(f"checkpoint.resume: {damaged}; the checkpoint is damaged: resume from an earlier "
                                "checkpoint (checkpoint.resume=PATH), delete this one, or start a new output.dir")


RNG_STATE_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}  # what accelerate restores


def check_random_states(path: Path) -> None:
    """Load every process's RNG state file as accelerate will (weights_only): accelerate swallows a file it
    refuses and resumes without the RNG state, which is not the exact resume promised; here it is an error."""
    for file in sorted(Path(path).glob("random_states_*.pkl")):
        try:
            states = accelerate_load(file)
            missing = RNG_STATE_KEYS - set(states) if isinstance(states, dict) else RNG_STATE_KEYS
            if missing:
                raise ValueError(f"it holds no {', '.join(sorted(missing))}")
        except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... on a bad file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MemtrainError(f"checkpoint.resume: {file} cannot be loaded safely ({reason}); the checkpoint is "
                                "damaged or was altered: resume from an earlier checkpoint (checkpoint.resume=PATH), "
                                "delete this one, or start a new output.dir") from None


def apply_recipe_hyperparameters(optimizer, lr_scheduler, lr: float, recipe: TrainRecipe) -> None:
    """`accelerator.load_state` restores the optimizer's hyperparameters and the schedule's base learning rate
    from the checkpoint; set this recipe's instead, so a change `checkpoint.allow_changes` allowed takes effect
    (unchanged values are set to what they were). The schedule's position is the checkpoint's."""
    opt = recipe.train
    for group in optimizer.param_groups:
        group.update(initial_lr=lr, betas=(opt.adam_beta1, opt.adam_beta2), weight_decay=opt.adam_weight_decay,
                     eps=opt.adam_epsilon)
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if isinstance(schedule, LambdaLR):  # every diffusers schedule
        schedule.base_lrs = [lr] * len(schedule.base_lrs)
        rates = [base * f(schedule.last_epoch) for base, f in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)]
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        schedule._last_lr = rates


def read_checkpoint_state(path: Path, name: str) -> dict | None:
    """A JSON document saved with `save_checkpoint(state={name: ...})`, or None when the checkpoint has none."""
    file = Path(path) / f"{name}.json"
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MemtrainError(f"checkpoint.resume: {file} is not valid JSON ({e.msg}); the checkpoint is damaged") from None


def read_checkpoint_tensors(path: Path, name: str) -> dict | None:
    """Tensors saved with `save_checkpoint(tensors={name: ...})`, or None when the checkpoint has none."""
    file = Path(path) / f"{name}.safetensors"
    if not file.exists():
        return None
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise MemtrainError(f"checkpoint.resume: {file} cannot be read ({e}); the checkpoint is damaged") from None


def resolve_resume(recipe: TrainRecipe, out: Path) -> Path | None:
    resume = recipe.checkpoint.resume
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(out)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not path.is_dir():
        raise MemtrainError(f"checkpoint.resume={resume}: no such checkpoint directory")
    if not (path / CHECKPOINT_INFO).exists():
        raise MemtrainError(f"checkpoint.resume={resume}: not a memtrain checkpoint directory (no {CHECKPOINT_INFO})")
    return path


def check_resume_compatible(path: Path, recipe: TrainRecipe, num_processes: int) -> tuple[int, dict]:
    """(the checkpoint's step, the recipe changes `checkpoint.allow_changes` allowed: key -> [old, new]), after
    checking that every other trajectory key matches the recipe's and that the files are readable."""
    try:
        info = json.loads((path / CHECKPOINT_INFO).read_text())
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MemtrainError(f"checkpoint.resume: {path / CHECKPOINT_INFO} is damaged ({e}); resume from an earlier "
                            "checkpoint (checkpoint.resume=PATH) or start a new output.dir") from None
    if step > recipe.train.max_steps:
        raise MemtrainError(f"checkpoint.resume: {path} is at step {step}, past train.max_steps="
                            f"{recipe.train.max_steps}; raise train.max_steps or start a new output.dir")
    recorded, current = recorded_recipe(info, recipe, num_processes)
    changed = {key: [recorded.get(key), current.get(key)] for key in sorted(set(recorded) & set(current))
               if recorded.get(key) != current.get(key)}
    refused = [key for key in changed if key not in recipe.checkpoint.allow_changes]
    if refused:
        listed = ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in refused)
        batch = " (train.batch_size counts all processes)" if "train.batch_size" in refused else ""
        raise MemtrainError(
            f"checkpoint.resume: {path} was trained with another recipe: {listed}{batch}; resume with the same "
            f"values, allow the change with checkpoint.allow_changes=[{','.join(refused)}], or start a new output.dir")
    check_checkpoint_files(path)
    check_random_states(path)
    return step, changed


def export(accelerator: Accelerator, recipe: TrainRecipe, parts: dict, ema, out: Path) -> Path | None:
    """Write `out/pipeline` (a full diffusers pipeline) or `out/lora` (pytorch_lora_weights.safetensors)."""
    kind = recipe.export
    if kind == "none" or not accelerator.is_main_process:
        return None

    unet = accelerator.unwrap_model(parts["unet"])
    if kind == "lora":
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        target = out / "lora"
        with atomic_dir(target) as tmp, clear_write_failure("export", tmp, out):
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
        return target
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    target = out / "pipeline"
    overrides = {"unet": unet, "text_encoder": accelerator.unwrap_model(parts["text_encoder"])}
    pipe = DiffusionPipeline.from_pretrained(recipe.model.pretrained, revision=recipe.model.revision,
                                             variant=recipe.model.variant, **overrides)
    with atomic_dir(target) as tmp, clear_write_failure("export", tmp, out):
        pipe.save_pretrained(tmp, safe_serialization=True)
    if ema is not None:
        ema.restore(unet.parameters())
    return target


EMA_STATE = "ema_state"  # checkpoint files of the EMA weights: shadow parameters (safetensors) + settings (JSON)


def ema_state(ema: EMAModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON settings, tensors) of diffusers' EMAModel: saved without pickle, so a resume runs no code."""
    settings = ema.state_dict()
    shadow = settings.pop("shadow_params")
    return settings, {str(i): t for i, t in enumerate(shadow)}


def load_ema_state(ema: EMAModel, checkpoint: Path) -> None:
    settings = read_checkpoint_state(checkpoint, EMA_STATE)
    tensors = read_checkpoint_tensors(checkpoint, EMA_STATE)
    if settings is None or tensors is None or len(tensors) != len(ema.shadow_params):
        raise MemtrainError(f"checkpoint.resume: {checkpoint} has no EMA weights for this model ({EMA_STATE}.json and "
                            f"{EMA_STATE}.safetensors); resume with train.ema=false or start a new output.dir")
    device = ema.shadow_params[0].device
    ema.load_state_dict({**settings, "shadow_params": [tensors[str(i)].to(device) for i in range(len(tensors))]})


def load_training_state(accelerator: Accelerator, path: Path, optimizer, lr_scheduler, lr: float, recipe: TrainRecipe,
                        ema: EMAModel | None) -> None:
    """Resume from `path`: accelerate's state (models, optimizer, schedule, RNGs), then this recipe's
    hyperparameters (`apply_recipe_hyperparameters`) and the EMA weights with the recipe's decay."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise MemtrainError(f"checkpoint.resume: cannot load {path} into this model: {e}") from None
    except pickle.UnpicklingError as e:
        raise pickle_error(path, "checkpoint.resume", e) from None
    apply_recipe_hyperparameters(optimizer, lr_scheduler, lr, recipe)
    if ema is not None:
        load_ema_state(ema, path)
        ema.decay = recipe.train.ema_decay  # load_state_dict restores the checkpoint's
