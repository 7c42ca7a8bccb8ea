"""Guarded generation as a drop-in for diffusers' `StableDiffusionPipeline`, and the batch entry point
`guarded_generate` used by `memtrain generate --guard` and `memtrain evaluate --guard`.

`GuardedPipeline.from_pipe(pipe, index=..., guard="amg" | "wen" | "none", **options)` wraps a pipeline
(LoRA, float16 and v-prediction included) and samples with `trainer.sample.guidance`'s DDIM loop (eta 0,
the papers' sampler: AMG, Chen et al., CVPR 2024; Wen et al., ICLR 2024); `__call__` returns the usual
output with `guard_records` set on it. Formulas and defaults: docs/methods.md, "Guarded sampling".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from trainer.core import distributed
from trainer.core.components import model_resolution
from trainer.core.unet_core import UNetCore
from trainer.io import MemtrainError
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.prompts import read_prompts
from trainer.sample.generate import generate_images
from trainer.sample.guidance import (
    C1_DEFAULT,
    C3_DEFAULT,
    SSCD_THRESHOLD,
    WEN_LR,
    WEN_MAX_ITERS,
    WEN_TARGET,
    AMGConfig,
    AMGGuard,
    SimilarityScale,
    Threshold,
    calibrate_wen_target,
    decode_images,
    mitigate_prompt_embedding,
    sample_latents,
)

GUARDS = ("none", "amg", "wen")
# The pixel embedding's trigger when the index is not calibrated: a constant set on the toy world
# (docs/methods.md), named as uncalibrated in every record and report that uses it.
PIXEL_FALLBACK = 0.85


def amg_trigger(index, threshold=None) -> tuple[Threshold, SimilarityScale]:
    """(lambda_t on the SSCD scale, the map of the index's similarities onto it) for AMG.

    `threshold`: a `Threshold` is used as is, on the embedder's own scale (identity map); a number is the
    similarity at which a clean estimate triggers (the authors' schedule scaled to it); None: SSCD keeps
    the authors' schedule, an index calibrated with `memtrain index --heldout` triggers at its calibrated
    threshold, an uncalibrated pixel index at the toy-world constant 0.85 (named as such)."""
    if isinstance(threshold, Threshold):
        return threshold, SimilarityScale(source=f"constant threshold {threshold}")
    if isinstance(threshold, int | float):
        return SSCD_THRESHOLD, SimilarityScale(index.null_similarity(), float(threshold),
                                               f"--guard-threshold {float(threshold):g}")
    if threshold is not None:
        raise MemtrainError(f"AMG threshold must be a number or a Threshold, got {threshold!r}")
    if index.embedding == "sscd":
        return SSCD_THRESHOLD, SimilarityScale()
    copy = index.copy_calibration()
    if copy is not None:
        return SSCD_THRESHOLD, SimilarityScale(index.null_similarity(), copy.threshold, copy.describe())
    if index.embedding == "pixels":
        return SSCD_THRESHOLD, SimilarityScale(
            index.null_similarity(), PIXEL_FALLBACK,
            f"uncalibrated: the toy-world constant {PIXEL_FALLBACK:g}; build the index with "
            "`memtrain index DATA --heldout DIR` to calibrate it on your data")
    raise MemtrainError(
        f"no AMG trigger for an uncalibrated {index.embedding!r} index: build it with `memtrain index DATA "
        "--heldout DIR` (held-out images) or pass --guard-threshold")


def check_index(index, pipe, embedding: str | None = None, where: str = "index") -> None:
    """One MemtrainError per problem: empty index, other resolution than the model's, other embedding."""
    if index is None:
        raise MemtrainError("--guard amg needs a training-image index: pass --index INDEX (built by `memtrain index`)")
    if len(index.embeddings) == 0:
        raise MemtrainError(f"{where}: the index is empty; rebuild it from the training data with `memtrain index`")
    want = model_resolution(pipe)
    if index.resolution is not None and int(index.resolution) != want:
        raise MemtrainError(
            f"{where}: built at resolution {index.resolution} but the model generates {want}x{want} images; "
            f"rebuild it with `memtrain index ... --resolution {want}`"
        )
    if embedding is not None and index.embedding != embedding:
        raise MemtrainError(
            f"{where}: built with the {index.embedding!r} embedding, not {embedding!r}; rebuild it with "
            f"`--embedding {embedding}` or drop the embedding option"
        )


def load_index(path: str | Path, pipe, embedding: str | None = None) -> TrainingIndex:
    """The training-image index at `path`, checked against the model (`check_index`) and `embedding`."""
    if not Path(path).exists():
        raise MemtrainError(f"--index {path}: no such index; build one with `memtrain index DATA --out {path}`")
    index = TrainingIndex.load(path, embedding=embedding, resolution=model_resolution(pipe))
    check_index(index, pipe, embedding, where=f"--index {path}")
    return index


class GuardedPipeline:
    """A StableDiffusionPipeline whose sampling is guarded against replicating training images."""

    def __init__(
        self, pipe, index=None, guard: str = "amg", embedder=None, embedder_path=None, threshold=None,
        c1: float = C1_DEFAULT, c3: float = C3_DEFAULT, despecification: bool = True,
        deduplication: bool = True, dissimilarity: bool = True, check_every: int = 1, target: float = WEN_TARGET, lr: float = WEN_LR,
        max_iters: int = WEN_MAX_ITERS, batch_size: int | None = None,
    ):
        if guard not in GUARDS:
            raise MemtrainError(f"guard must be one of {', '.join(GUARDS)}, got {guard!r}")
        self.pipe, self.guard, self.index, self.batch_size = pipe, guard, index, batch_size
        self.amg: AMGConfig | None = None
        self.embedder = embedder
        if guard == "amg":
            check_index(index, pipe)
            lam, scale = amg_trigger(index, threshold)
            self.amg = AMGConfig(lam, c1, c3, despecification, deduplication, dissimilarity, check_every, scale)
            if self.embedder is None:
                path = embedder_path or (index.meta or {}).get("embedder_path")
                self.embedder = make_embedder(index.embedding, path, pipe.device)
        self.trigger = self.amg.scale.source if self.amg else None
        self.wen = dict(target=float(target), lr=float(lr), max_iters=int(max_iters))

    @classmethod
    def from_pipe(cls, pipe, index: TrainingIndex | None = None, guard: str = "amg", **options) -> GuardedPipeline:
        """Wrap `pipe` (diffusers' `from_pipe` convention: same components, no copies)."""
        return cls(pipe, index=index, guard=guard, **options)

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe.encode_prompt(captions, self.pipe.device, 1, False)[0]

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        output_type: str = "pil", num_images_per_prompt: int = 1, negative_prompt: str | list[str] | None = None,
        return_dict: bool = True, **unused,
    ):
        if unused:
            raise MemtrainError(f"GuardedPipeline does not support {', '.join(sorted(unused))}")
        pipe = self.pipe
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = int(num_images_per_prompt)
        device = pipe.device
        cond, uncond = pipe.encode_prompt(prompts, device, n, True, negative_prompt)
        b = len(cond)
        res = model_resolution(pipe)
        shape = (b, pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
        if latents is None:  # as `prepare_latents` draws them; DDIM's init_noise_sigma is 1
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        elif tuple(latents.shape) != shape:
            raise MemtrainError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        core = UNetCore(pipe, self.batch_size or 2 * b)
        guard = None
        records: list[dict] = [{"guard": "none", "intervened": False} for _ in range(b)]
        if self.guard == "amg":
            guard = AMGGuard(core, self.index, self.embedder, self._encode, self.amg, b)
        elif self.guard == "wen":
            x_T = latents.float()
            if negative_prompt is not None:
                raise MemtrainError("guard wen optimises against the empty caption: negative_prompt is not supported")
            optimized, wen_records = mitigate_prompt_embedding(
                pipe, prompts, latents=x_T, num_inference_steps=num_inference_steps, batch_size=2 * b, **self.wen
            )
            cond = optimized.repeat_interleave(n, dim=0).to(cond.dtype)
            records = [dict(rec) for rec in wen_records for _ in range(n)]
        x0 = sample_latents(core, cond, uncond, latents, num_inference_steps, guidance_scale, guard)
        if guard is not None:
            records = [r.as_dict() for r in guard.records]
        if output_type == "latent":
            images = x0
        else:
            vae = pipe.vae
            image = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            images = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * b)
        out = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
        out.guard_records = records
        return out if return_dict else (images, None)


def guarded_generate(
    pipe, prompts: Sequence[str], n: int = 1, seed: int = 0, steps: int = 50, guidance_scale: float = 7.5,
    guard: str | GuardedPipeline = "amg", index: TrainingIndex | None = None, batch_size: int = 32,
    progress: bool = True, across_processes: bool = False, **options,
) -> tuple[torch.Tensor, list[dict]]:
    """Images [len(prompts) * n, 3, H, W] in [0, 1] (prompt-major, generation j from seed + j, as
    `trainer.sample.generate.generate_images`) and one guard record per image (with its prompt and seed).

    `guard="none"` is the stock pipeline (`generate_images`), the baseline a guard is compared with.
    `across_processes`: the batches are shared by the processes of `accelerate launch`, as in `generate_images`.
    """
    if guard == "none":
        images = generate_images(pipe, list(prompts), n, seed, steps, guidance_scale, batch_size, progress,
                                 across_processes)
        records = [{"guard": "none", "intervened": False, "prompt": p, "seed": seed + j}
                   for p in prompts for j in range(n)]
        return images, records
    if options.get("calibrate"):  # Wen et al.'s target from general prompts (`--wen-calibrate`)
        general = [r["text"] for r in read_prompts(options["calibrate"])]
        options["target"] = calibrate_wen_target(pipe, general, 0.95, seed, steps)
    options.pop("calibrate", None)
    guarded = guard if isinstance(guard, GuardedPipeline) else GuardedPipeline.from_pipe(pipe, index, guard, **options)
    jobs = [(p, seed + j) for p in prompts for j in range(n)]
    core = UNetCore(pipe)

    def render(share: list[tuple[str, int]]) -> list[tuple[torch.Tensor, dict]]:
        out = []
        bar = tqdm(total=len(share), desc=f"generate ({guarded.guard})", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            x_T = torch.cat([core.initial_noise(1, s) for _, s in chunk])
            result = guarded([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                             latents=x_T.to(pipe.unet.dtype), output_type="pt")
            out += [(image, dict(r, prompt=p, seed=s)) for image, r, (p, s)
                    in zip(result.images.float().cpu(), result.guard_records, chunk, strict=True)]
            bar.update(len(chunk))
        bar.close()
        return out

    pairs = distributed.across_processes(render, jobs, batch_size) if across_processes else render(jobs)
    return torch.stack([image for image, _ in pairs]).clamp(0, 1), [record for _, record in pairs]


__all__ = ["GuardedPipeline", "guarded_generate", "check_index", "model_resolution", "decode_images"]
