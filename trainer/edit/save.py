"""Loading a checkpoint for an edit and writing the edited result, never touching the source.

An edit reads a diffusers pipeline directory (optionally with a LoRA, which must belong to that
base: every module it names exists with the right shapes; it is fused into the weights before the
edit) and writes either a whole pipeline directory (safetensors) or `pytorch_lora_weights.safetensors`,
each atomically (`trainer.io.atomic_dir` / `atomic_file`). The output may not be the source, lie
inside it or contain it, and an existing non-empty output directory is replaced only when it holds
nothing but an earlier `memtrain edit` output and none of the edit's inputs (`trainer.io.check_replaceable`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

from trainer.core.components import LORA_FILE, check_lora_base, load_lora_weights, load_pipeline, lora_file
from trainer.core.distributed import on_main_process
from trainer.io import MemtrainError, atomic_dir, atomic_file, check_output, write_json

EDIT_TOOL = "memtrain edit"


def check_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise MemtrainError(f"checkpoint {checkpoint}: no such directory (want a diffusers pipeline directory)")
    if not (path / "model_index.json").is_file():
        raise MemtrainError(f"checkpoint {checkpoint}: not a diffusers pipeline directory (no model_index.json)")
    return path


def load_for_edit(checkpoint: str | Path, lora: str | Path | None = None, device: str | None = None):
    """The checkpoint's pipeline (DDIM scheduler, float32) with the LoRA, if any, fused into its weights."""
    path = check_checkpoint(checkpoint)
    lora_path = lora_file(lora) if lora is not None else None  # a missing or empty LoRA fails before loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(path, None, device=device)
    if lora_path is not None:
        check_lora_base(pipe, lora_path)
        load_lora_weights(pipe, str(lora_path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    return pipe


def snapshot(unet) -> dict[str, torch.Tensor]:
    """A CPU copy of the UNet's state dict (what `changed_weights` compares against)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}


def changed_weights(before: dict[str, torch.Tensor], unet) -> dict[str, int]:
    """{parameter: number of changed entries} for every UNet parameter that differs from `before`."""
    out = {}
    for name, value in unet.state_dict().items():
        old = before.get(name)
        if old is None or old.shape != value.shape:
            out[name] = value.numel()
            continue
        count = int((value.detach().cpu() != old).sum())
        if count:
            out[name] = count
    return out


def check_edit_output(out: str | Path, source: str | Path, inputs: dict | None = None) -> Path:
    """`out` as a Path, after refusing outputs that would modify the source or replace anything but an earlier
    `memtrain edit` output (`trainer.io.check_replaceable`; `inputs`: the other files the edit reads)."""
    out_path, src = Path(out), Path(source)
    o, s = out_path.resolve(), src.resolve()
    if o == s or s in o.parents:
        raise MemtrainError(f"--out {out}: is {'the source' if o == s else 'inside the source'} {source}; edits "
                            "never modify their source: choose a new directory")
    if o in s.parents:
        raise MemtrainError(f"--out {out}: contains the source {source}; choose a directory outside it")
    check_output(out_path, "edit", {"CHECKPOINT": source, **(inputs or {})})
    return out_path


def write_pipeline(pipe, directory: str | Path, source: str | Path) -> None:
    """Save the whole pipeline (safetensors) into `directory`, keeping the source's own scheduler (the
    edit samples with DDIM, the saved checkpoint keeps what it shipped with)."""
    directory, source = Path(directory), Path(source)
    pipe.save_pretrained(directory, safe_serialization=True)
    if (source / "scheduler").is_dir():
        shutil.rmtree(directory / "scheduler", ignore_errors=True)
        shutil.copytree(source / "scheduler", directory / "scheduler")
        index = json.loads((directory / "model_index.json").read_text())
        source_index = json.loads((source / "model_index.json").read_text())
        if "scheduler" in source_index:
            index["scheduler"] = source_index["scheduler"]
            (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def save_edited(pipe, out: str | Path, source: str | Path, report: dict, lora_state: dict | None = None,
                inputs: dict | None = None, files: dict | None = None) -> Iterator[Path | None]:
    """Write an edit's result into `out` atomically, refusing outputs that would modify the source or replace
    anything but an earlier edit (`check_edit_output`): the LoRA `lora_state` (`save_lora`) or else the whole
    pipeline (`write_pipeline`), and `files` ({name: JSON value}). Yields the temporary directory for what goes
    beside the weights (None on the other processes of `accelerate launch`, which write nothing); on leaving,
    `report` (as the caller left it) is written as edit.json, marked as a memtrain edit, and the directory
    renamed to `out`. The one save path of `memtrain edit` and the Python API."""
    check_edit_output(out, source, inputs)
    with on_main_process(atomic_dir(Path(out), "edit", {"CHECKPOINT": source, **(inputs or {})})) as tmp:
        if tmp is not None:
            if lora_state is not None:
                save_lora(lora_state, tmp)
            else:
                write_pipeline(pipe, tmp, source)
            for name, value in (files or {}).items():
                write_json(value, tmp / name)
        del pipe, lora_state  # written: the caller's evaluation need not hold the model twice
        yield tmp
        if tmp is not None:
            content = {"tool": EDIT_TOOL, **report}
            content.setdefault("source", str(source))
            write_json(content, tmp / "edit.json")


def lora_changes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """{module weight: entries of the merged update up @ down that are non-zero} of a diffusers-format LoRA."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for down, up in (("lora.down", "lora.up"), ("lora_A", "lora_B")):
            for part, role in ((down, "down"), (up, "up")):
                if f".{part}." in key:
                    pairs.setdefault(key[: key.index(f".{part}.")], {})[role] = value
    out = {}
    for module, p in pairs.items():
        if "down" in p and "up" in p:
            update = p["up"].double().flatten(1) @ p["down"].double().flatten(1)
            out[f"{module.removeprefix('unet.')}.weight"] = int((update != 0).sum())
    return out


def save_lora(state_dict: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write a diffusers-format LoRA state dict as `out/pytorch_lora_weights.safetensors` (or to `out`
    itself when it names a .safetensors file), atomically; `pipe.load_lora_weights(out)` reads it."""
    out = Path(out)
    file = out if out.suffix == ".safetensors" else out / LORA_FILE
    if not state_dict:
        raise MemtrainError(f"{out}: the LoRA state dict is empty; nothing to save")
    # diffusers' LoRA files name each layer under its pipeline component ("unet.<module>...")
    prefixed = all(k.startswith(("unet.", "text_encoder.")) for k in state_dict)
    tensors = {(k if prefixed else f"unet.{k}"): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_file(file, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata={"format": "pt"}))
    return file
