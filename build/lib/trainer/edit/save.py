"""Loading a checkpoint for an edit and writing the edited result, never touching the source.

An edit reads a diffusers pipeline directory (optionally with a LoRA, which must belong to that
base: every module it names exists with the right shapes; it is fused into the weights before the
edit) and writes either a whole pipeline directory (safetensors) or `pytorch_lora_weights.safetensors`,
each atomically (`trainer.io.atomic_dir` / `atomic_file`). The output may not be the source, lie
inside it or contain it, and an existing non-empty output directory is replaced only when it is an
earlier `memtrain edit` output (it has an `edit.json` written by memtrain).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline

from trainer.core.components import load_pipeline
from trainer.io import MemtrainError, atomic_dir, atomic_file, write_json

LORA_FILE = "pytorch_lora_weights.safetensors"
EDIT_TOOL = "memtrain edit"
_DOWN = ("lora.down", "lora_A", "lora_linear_layer.down")
_UP = ("lora.up", "lora_B", "lora_linear_layer.up")


def check_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise MemtrainError(f"checkpoint {checkpoint}: no such directory (want a diffusers pipeline directory)")
    if not (path / "model_index.json").is_file():
        raise MemtrainError(f"checkpoint {checkpoint}: not a diffusers pipeline directory (no model_index.json)")
    return path


def _lora_file(lora: str | Path) -> Path:
    path = Path(lora)
    if not path.exists():
        raise MemtrainError(f"--lora {lora}: no such file or directory")
    if path.is_dir():
        path = path / LORA_FILE
        if not path.is_file():
            raise MemtrainError(f"--lora {lora}: the directory has no {LORA_FILE}")
    return path


def check_lora_base(pipe, lora: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA's state dict (diffusers' reading of it), after checking it belongs to `pipe`'s base model:
    every module it names exists in the UNet / text encoder and its shapes match that module's weight."""
    path = _lora_file(lora)
    try:
        loaded = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as e:  # diffusers raises ValueError / KeyError / safetensors errors for foreign files
        raise MemtrainError(f"--lora {path}: not a LoRA file diffusers can read ({e})") from None
    state = loaded[0] if isinstance(loaded, tuple) else loaded
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    modules = {prefix: dict(model.named_modules()) for prefix, model in components.items()}
    if not state:
        raise MemtrainError(f"--lora {path}: holds no LoRA weights")
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in modules or ".lora" not in rest:
            raise MemtrainError(f"--lora {path}: key {key!r} names no UNet / text-encoder LoRA weight; is it a "
                                "Stable Diffusion 1.x/2.x LoRA?")
        name = rest[: rest.index(".lora")]
        module = modules[prefix].get(name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise MemtrainError(f"--lora {path}: {prefix} has no module {name!r}; the LoRA was trained on another "
                                "base model than the checkpoint")
        part = rest[len(name) + 1 :]
        if part.startswith(_DOWN) and value.shape[1] != weight.shape[1]:
            bad = f"input size {value.shape[1]} != {weight.shape[1]}"
        elif part.startswith(_UP) and value.shape[0] != weight.shape[0]:
            bad = f"output size {value.shape[0]} != {weight.shape[0]}"
        else:
            continue
        raise MemtrainError(f"--lora {path}: {prefix}.{name}: {bad}; the LoRA was trained on another base model "
                            "than the checkpoint")
    return state


def load_for_edit(checkpoint: str | Path, lora: str | Path | None = None, device: str | None = None):
    """The checkpoint's pipeline (DDIM scheduler, float32) with the LoRA, if any, fused into its weights."""
    path = check_checkpoint(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(path, None, device=device)
    if lora is not None:
        check_lora_base(pipe, lora)
        pipe.load_lora_weights(str(_lora_file(lora)))
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


def is_edit_output(path: Path) -> bool:
    marker = path / "edit.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("tool") == EDIT_TOOL
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


def check_output(out: str | Path, source: str | Path) -> Path:
    """`out` as a Path, after refusing outputs that would modify the source or clobber unrelated files."""
    out_path, src = Path(out), Path(source)
    o, s = out_path.resolve(), src.resolve()
    if o == s or s in o.parents:
        raise MemtrainError(f"--out {out}: is {'the source' if o == s else 'inside the source'} {source}; edits "
                            "never modify their source: choose a new directory")
    if o in s.parents:
        raise MemtrainError(f"--out {out}: contains the source {source}; choose a directory outside it")
    if out_path.exists():
        if not out_path.is_dir():
            raise MemtrainError(f"--out {out}: exists and is not a directory")
        if any(out_path.iterdir()) and not is_edit_output(out_path):
            raise MemtrainError(f"--out {out}: exists, is not empty and is not an earlier `memtrain edit` output; "
                                "choose a new directory or remove it")
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


def save_edited_pipeline(pipe, out: str | Path, source: str | Path, report: dict | None = None) -> Path:
    """Write the edited pipeline to `out` atomically, with `edit.json` (`report`, marked as a memtrain edit)."""
    out = check_output(out, source)
    with atomic_dir(out) as tmp:
        write_pipeline(pipe, tmp, source)
        write_json({"tool": EDIT_TOOL, "source": str(source), **(report or {})}, tmp / "edit.json")
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
