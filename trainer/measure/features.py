"""Image embeddings and quality features: pixel / pHash / CLIP / SSCD embeddings (near-duplicates,
replication), KID, CLIP score. CLIP and SSCD weights are user-supplied local files; nothing is downloaded."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.fft import dctn
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

from trainer.data import open_image, to_rgb
from trainer.io import MemtrainError

EMBEDDINGS = ("pixels", "phash", "clip", "sscd")


PIXEL_SIDE = 8


FLAT_STD = 2.0 / 255.0


SSCD_SIZE = 288


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_embedding(image: Image.Image, side: int = PIXEL_SIDE) -> np.ndarray:
    """Per-channel mean-centred, L2-normalised side x side RGB thumbnail (+ 6 colour dims for flat images)."""
    x = np.asarray(to_rgb(image).resize((side, side), Image.Resampling.BOX), dtype=np.float64) / 255.0
    x = x.reshape(-1, 3)
    rgb = x.mean(axis=0)
    centred = (x - rgb).reshape(-1)
    out = np.zeros(centred.size + 6, dtype=np.float32)
    if centred.std() < FLAT_STD:
        colour = np.concatenate([rgb, 1.0 - rgb])
        out[centred.size :] = colour / np.linalg.norm(colour)
    else:
        out[: centred.size] = centred / np.linalg.norm(centred)
    return out


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (bit 63 is the DC coefficient's)."""
    gray = np.asarray(to_rgb(image).convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(gray, norm="ortho")[:8, :8].reshape(-1)
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_embedding(image: Image.Image) -> np.ndarray:
    h = phash(image)
    bits = np.array([(h >> (63 - k)) & 1 for k in range(64)], dtype=np.float32)
    return (2.0 * bits - 1.0) / 8.0


def check_model_path(path: str | None, flag: str, what: str) -> Path:
    if not path:
        raise MemtrainError(f"--embedding {flag} needs --{flag} PATH ({what}); nothing is downloaded")
    p = Path(path)
    if not p.exists():
        raise MemtrainError(f"--{flag} {path}: no such file or directory ({what})")
    return p


def load_clip(path: str | Path):
    """(model, processor, kind) from a local CLIPModel / CLIPVisionModelWithProjection directory."""
    p = check_model_path(str(path), "clip", "a local CLIP model directory")
    config = p / "config.json"
    if not p.is_dir() or not config.exists():
        raise MemtrainError(f"--clip {p}: not a transformers model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise MemtrainError(f"{config}: not valid JSON ({e.msg})") from None
    try:
        if model_type == "clip":
            model, kind = CLIPModel.from_pretrained(p, local_files_only=True), "clip"
            image_size = model.config.vision_config.image_size
        elif model_type == "clip_vision_model":
            model, kind = CLIPVisionModelWithProjection.from_pretrained(p, local_files_only=True), "vision"
            image_size = model.config.image_size
        else:
            raise MemtrainError(
                f"{config}: model_type {model_type!r} is not a CLIP model (want clip or clip_vision_model)"
            )
        if (p / "preprocessor_config.json").exists():
            processor = CLIPImageProcessor.from_pretrained(p, local_files_only=True)
        else:
            processor = CLIPImageProcessor(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            )
    except (OSError, ValueError) as e:
        raise MemtrainError(f"--clip {p}: cannot load the CLIP model ({e})") from None
    return model.eval(), processor, kind


def load_sscd(path: str | Path):
    p = check_model_path(str(path), "sscd", "an SSCD TorchScript file")
    try:
        with warnings.catch_warnings():  # SSCD ships as TorchScript; torch >= 2.10 flags jit as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise MemtrainError(f"--sscd {p}: cannot load it as a TorchScript model ({e})") from None


def sscd_batch(images: list[Image.Image]) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for im in images:
        arr = (
            np.asarray(im.resize((SSCD_SIZE, SSCD_SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        )
        out.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
    return torch.stack(out)


def default_names(images: Sequence) -> list[str]:
    return [str(s) if isinstance(s, str | Path) else f"image {i}" for i, s in enumerate(images)]


def embed_images(
    images: Sequence,
    names: Sequence[str] | None = None,
    embedding: str = "pixels",
    clip: str | Path | None = None,
    sscd: str | Path | None = None,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(n, d) float32 L2-normalised embeddings of images (PIL images, paths or `datasets` image dicts)."""
    if embedding not in EMBEDDINGS:
        raise MemtrainError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    names = list(names) if names is not None else default_names(images)
    bar = dict(desc=f"embed ({embedding})", disable=not progress, unit="img")
    if embedding in ("pixels", "phash"):
        fn = pixel_embedding if embedding == "pixels" else phash_embedding
        rows = [fn(open_image(s, n)) for s, n in tqdm(list(zip(images, names, strict=True)), **bar)]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 1), np.float32)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if embedding == "clip":
        model, processor, kind = load_clip(clip)
    else:
        model, processor, kind = load_sscd(sscd), None, "sscd"
    model = model.to(device)
    chunks = []
    with torch.inference_mode(), tqdm(total=len(names), **bar) as pbar:
        for start in range(0, len(names), batch_size):
            batch = [
                open_image(s, n)
                for s, n in zip(
                    images[start : start + batch_size], names[start : start + batch_size], strict=True
                )
            ]
            if kind == "sscd":
                out = model(sscd_batch(batch).to(device))
            else:
                pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
                if kind == "clip":
                    out = clip_image_embedding(model, pixels)
                else:
                    out = model(pixel_values=pixels).image_embeds
            chunks.append(torch.nn.functional.normalize(out.float().reshape(len(batch), -1), dim=1).cpu())
            pbar.update(len(batch))
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 1), np.float32)


FEATURE_SIDE = 8


def clip_image_embedding(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """A CLIPModel's projected image embedding (transformers 4.x returns a tensor, 5.x an output object)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def to_pil(images: torch.Tensor) -> list:
    arrays = (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def sscd_similarity(model, generated: torch.Tensor, references: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Per generation, the max cosine of SSCD descriptors to any reference image (SSCD preprocessing of
    `dedup`: 288 x 288, ImageNet normalisation)."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pil = to_pil(images[start : start + batch_size])
                out = model(sscd_batch(pil)).float().reshape(len(pil), -1)
                chunks.append(torch.nn.functional.normalize(out, dim=1))
        return torch.cat(chunks)

    return (embed(generated) @ embed(references).T).max(dim=1).values.double().numpy()


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The "pix8" feature [N, 192] of images in [0, 1]: 8x8 area-averaged RGB."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), FEATURE_SIDE).flatten(1)


@dataclass(frozen=True)
class QualityFeature:
    """How the general scenario scores image quality: a KID feature space and, optionally, a per-image
    text-alignment score in [0, 1] (reported as `alignment_key`). Chosen by name (`QUALITY_FEATURES`)."""

    name: str
    description: str
    features: Callable[[torch.Tensor], torch.Tensor]
    alignment: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None
    alignment_key: str | None = None


PIXELS = QualityFeature("pix8", "8x8 area-averaged RGB (192 values)", pixel_features)
# name -> feature, as `memtrain evaluate --quality-feature NAME` chooses them; `clip` needs a CLIP model (--clip)
QUALITY_FEATURES: dict[str, QualityFeature] = {"pix8": PIXELS}


def choose_quality_feature(choice: str | QualityFeature | None, clip_scorer=None,
                           batch_size: int = 32) -> QualityFeature:
    """The quality feature named by `choice` (a QUALITY_FEATURES name or `clip`), or `choice` itself; None:
    CLIP with a CLIP model, else pix8. A MemtrainError names the unknown choice and the known ones."""
    if isinstance(choice, QualityFeature):
        return choice
    if choice is None:
        choice = "clip" if clip_scorer is not None else "pix8"
    if choice == "clip":
        if clip_scorer is None:
            raise MemtrainError("--quality-feature clip needs a CLIP model (--clip DIR)")
        return clip_quality_feature(clip_scorer, batch_size)
    if choice not in QUALITY_FEATURES:
        raise MemtrainError(f"--quality-feature: unknown {choice!r}; choose from {', '.join([*QUALITY_FEATURES, 'clip'])}")
    return QUALITY_FEATURES[choice]


def clip_quality_feature(scorer, batch_size: int = 32) -> QualityFeature:
    """KID in the CLIP image-embedding space of a local CLIPModel (`load_clip_scorer`)."""
    model, processor, _ = scorer
    device = next(model.parameters()).device

    def features(images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = processor(images=to_pil(images[start : start + batch_size]), return_tensors="pt")
                embedding = clip_image_embedding(model, pixels["pixel_values"].to(device))
                out.append(torch.nn.functional.normalize(embedding.float(), dim=1).cpu())
        return torch.cat(out)

    return QualityFeature("clip", "CLIP image embeddings (L2-normalised)", features)


def kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between feature sets x [m, d] and y [n, d] with the KID kernel (x.y / d + 1)^3
    (Binkowski et al. 2018), on the full sets (no subsets); needs m, n >= 2."""
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise MemtrainError(f"KID needs at least 2 samples on each side, got {m} and {n}")
    x, y = x.double(), y.double()

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def load_clip_scorer(path: str | Path):
    """(model, image processor, tokenizer) of a local full CLIPModel directory for the CLIP score."""
    model, processor, kind = load_clip(path)
    if kind != "clip":
        raise MemtrainError(f"--clip {path}: the CLIP score needs a full CLIPModel (text and vision towers); "
                            "this directory holds a vision-only model")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MemtrainError(f"--clip {path}: no usable CLIP tokenizer files (vocab.json, merges.txt) ({e})") from None
    return model, processor, tokenizer


def clip_scores(scorer, images: torch.Tensor, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """CLIP score per image: 100 * max(cos(image embedding, caption embedding), 0)."""
    model, processor, tokenizer = scorer
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    out = []

    def features(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pil = to_pil(images[start : start + batch_size])
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
            text = tokenizer(list(captions[start : start + batch_size]), padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt")
            img = clip_image_embedding(model, pixels)
            txt = features(model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=1)
            out.append(100 * cos.clamp_min(0))
    return torch.cat(out).double().numpy()
