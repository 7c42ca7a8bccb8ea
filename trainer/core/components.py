"""Load a Stable Diffusion checkpoint's components, check that they fit together, add LoRA, and build a
sampling pipeline over them. One home for every "open a diffusers checkpoint" path."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
)

from trainer.io import MemtrainError

LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_DOWN = ("lora.down", "lora_A", "lora_linear_layer.down")
_UP = ("lora.up", "lora_B", "lora_linear_layer.up")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A MemtrainError for a device string torch does not know or one this machine does not have."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise MemtrainError(f"{flag} {device}: not a torch device ({e}); use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MemtrainError(f"{flag} {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                            f"leave {flag} out or use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise MemtrainError(f"{flag} {device}: MPS is not available on this machine; leave {flag} out or use cpu")


def check_weight_files(model: Path, what: str) -> None:
    """A MemtrainError naming the first empty (0-byte) weight file of local model directory `model`."""
    for file in sorted(model.rglob("*")):
        if file.suffix in WEIGHT_SUFFIXES and file.is_file() and file.stat().st_size == 0:
            raise MemtrainError(f"{what}: {file} is empty (0 bytes); copy or export the model again")


def check_model_folders(model: Path, what: str) -> None:
    """A MemtrainError naming the first part of a local pipeline directory that is missing: tokenizer/,
    text_encoder/, unet/ and scheduler/ always, vae/ when model_index.json lists it."""
    try:
        listed = json.loads((model / "model_index.json").read_text())
    except (OSError, ValueError):
        listed = {}
    listed = listed if isinstance(listed, dict) else {}
    vae = isinstance(listed.get("vae"), list) and listed["vae"][:1] != [None]
    for name in ("tokenizer", "text_encoder", "unet", "scheduler", *(("vae",) if vae else ())):
        if not (model / name).is_dir():
            raise MemtrainError(f"{what}: no {name}/ folder in {model}; copy it from the model's source (a diffusers "
                                "pipeline directory has tokenizer, text_encoder, unet, scheduler and vae)")


def refused_archive(directory: Path) -> Path | None:
    """The first pickled torch file under `directory` that `torch.load(weights_only=True)` refuses (it holds
    more than tensors, e.g. a planted pickle that would run code; nothing of it is executed)."""
    for file in sorted(Path(directory).rglob("*")):
        if file.is_file() and file.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            try:
                torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return file
            except Exception:  # noqa: BLE001 - damaged in another way: the loader's own error names it
                continue
    return None


def pickle_error(directory: Path, what: str, error: Exception) -> MemtrainError:
    """One MemtrainError for an UnpicklingError raised while loading from `directory`, naming the file."""
    file = refused_archive(directory) or directory
    return MemtrainError(f"{what}: {file} holds more than tensors and is refused unread (torch.load(weights_only="
                         f"True): {str(error).splitlines()[0]}); replace it with the original or a .safetensors file")


def load_error(directory: Path, what: str, error: Exception) -> MemtrainError:
    """One MemtrainError for a failed pipeline load: a refused pickle named (`pickle_error`), else the loader's
    own message."""
    if isinstance(error, pickle.UnpicklingError) or (directory.is_dir() and refused_archive(directory)):
        return pickle_error(directory, what, error)
    return MemtrainError(f"{what}: cannot load a Stable Diffusion pipeline ({error})")


def check_dimensions(path: str, text_encoder, unet, vae) -> None:
    """The parts of a pipeline must fit together; say which ones don't."""
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise MemtrainError(
            f"model.pretrained={path}: unet.cross_attention_dim={unet.config.cross_attention_dim} does not match "
            f"text_encoder.hidden_size={text_encoder.config.hidden_size}; the text encoder is from another model"
        )
    channels = vae.config.latent_channels if vae is not None else 3
    if vae is None and unet.config.in_channels != channels:
        raise MemtrainError(f"model.pretrained={path}: no vae/ folder, and unet.in_channels={unet.config.in_channels} "
                            "wants a VAE's latents (a pixel-space UNet takes 3); copy vae/ from the model's source")
    if unet.config.in_channels != channels:
        raise MemtrainError(
            f"model.pretrained={path}: unet.in_channels={unet.config.in_channels} but the "
            f"{'VAE latents' if vae is not None else 'images (no VAE)'} have {channels} channels"
        )


def check_resolution(resolution: int | None, vae, path: str) -> None:
    """Images must be a multiple of the VAE's downsampling factor, or the pipeline cannot generate at that size."""
    factor = vae_factor(vae)
    if resolution is not None and resolution % factor:
        below, above = resolution // factor * factor, (resolution // factor + 1) * factor
        raise MemtrainError(f"recipe: `data.resolution`={resolution} is not a multiple of the VAE factor {factor} "
                            f"(2**(len(vae.block_out_channels) - 1)) of model.pretrained={path}; use "
                            f"{above}" + (f" or {below}" if below >= 8 else ""))


def vae_factor(vae) -> int:
    """The VAE's spatial downsampling factor (8 for SD); 1 without a VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def native_resolution(unet, vae) -> int:
    return unet.config.sample_size * vae_factor(vae)


def load_pipeline(path: str | Path, lora: str | Path | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Load a diffusers SD pipeline from a local directory (or hub id), with optional LoRA weights (checked to
    belong to the pipeline's base model, `check_lora_base`)."""
    check_device(device)
    local = Path(path)
    if local.exists() and not (local / "model_index.json").exists():
        raise MemtrainError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    if local.is_dir():
        check_model_folders(local, str(path))
        check_weight_files(local, str(path))
    lora_path = lora_file(lora) if lora is not None else None
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # diffusers wraps a refused pickle in an OSError
        raise load_error(local, str(path), e) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_path is not None:
        check_lora_base(pipe, lora_path)
        load_lora_weights(pipe, str(lora_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class _UNetOnlyLoraNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to CLIPTextModel" not in record.getMessage()


def load_lora_weights(pipe, lora) -> None:
    """`pipe.load_lora_weights(lora)` (a file, directory or state dict), without diffusers' notice that the LoRA
    has no text-encoder keys: memtrain's LoRAs (training, unlearn, UCE) are UNet-only by design."""
    logger, notice = logging.getLogger("diffusers.loaders.lora_base"), _UNetOnlyLoraNotice()
    logger.addFilter(notice)
    try:
        pipe.load_lora_weights(lora)
    finally:
        logger.removeFilter(notice)


def pipeline_from_components(parts: dict):
    """A StableDiffusionPipeline over live training components (for validation images)."""
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=DDIMScheduler.from_config(parts["noise_scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1) or 1)


def lora_file(lora: str | Path) -> Path:
    """The LoRA weights file `lora` names (a file, or a directory holding pytorch_lora_weights.safetensors)."""
    path = Path(lora)
    if not path.exists():
        raise MemtrainError(f"--lora {lora}: no such file or directory")
    if path.is_dir():
        path = path / LORA_FILE
        if not path.is_file():
            raise MemtrainError(f"--lora {lora}: the directory has no {LORA_FILE}")
    if path.stat().st_size == 0:
        raise MemtrainError(f"--lora {path}: the file is empty (0 bytes); pass the LoRA weights file")
    return path


def check_lora_base(pipe, lora: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA's state dict (diffusers' reading of it), after checking it belongs to `pipe`'s base model:
    every module it names exists in the UNet / text encoder and its shapes match that module's weight."""
    path = lora_file(lora)
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
