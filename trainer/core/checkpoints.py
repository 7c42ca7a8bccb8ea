"""Training checkpoints: save (atomically, every rank), find, resume (with a compatibility check and a
check of the files) and export (a diffusers pipeline directory or LoRA weights). A failed write (a full
disk) is a MemtrainError naming the file and the last complete checkpoint, which it leaves intact."""

from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.io import MemtrainError, atomic_dir
from trainer.recipe import TrainRecipe

CHECKPOINT_INFO = "memtrain_checkpoint.json"


def checkpoint_info(recipe: TrainRecipe, num_processes: int) -> dict:
    return {
        "model": recipe.model.pretrained,
        "lora_rank": recipe.model.lora.rank,
        "lora_target_modules": recipe.model.lora.target_modules,
        "train_text_encoder": recipe.model.train_text_encoder,
        "ema": recipe.train.ema,
        "global_batch": recipe.train.batch_size * num_processes * recipe.train.gradient_accumulation_steps,
    }


def same_path(a, b) -> bool:
    """True when two model paths name the same existing directory (a trailing slash, a symlink, ./ apart)."""
    a, b = Path(str(a)), Path(str(b))
    return a.exists() and b.exists() and a.resolve() == b.resolve()


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


def check_resume_compatible(path: Path, recipe: TrainRecipe, num_processes: int) -> int:
    """The checkpoint's step, after checking its settings match the recipe's and its files are readable."""
    try:
        info = json.loads((path / CHECKPOINT_INFO).read_text())
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MemtrainError(f"checkpoint.resume: {path / CHECKPOINT_INFO} is damaged ({e}); resume from an earlier "
                            "checkpoint (checkpoint.resume=PATH) or start a new output.dir") from None
    if step > recipe.train.max_steps:
        raise MemtrainError(f"checkpoint.resume: {path} is at step {step}, past train.max_steps="
                            f"{recipe.train.max_steps}; raise train.max_steps or start a new output.dir")
    expected = checkpoint_info(recipe, num_processes)
    for key, value in expected.items():
        if key in info and info[key] != value and not (key == "model" and same_path(info[key], value)):
            raise MemtrainError(
                f"checkpoint.resume: {path} was trained with {key}={info[key]!r} but this recipe has {value!r}; "
                "resume with the same settings or start a new output.dir"
            )
    check_checkpoint_files(path)
    return step


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
