"""Guarded generation as a drop-in for diffusers' `StableDiffusionPipeline`, the guard registry `GUARDS`,
and the batch entry point `guarded_generate` used by `memtrain generate --guard` and `memtrain evaluate --guard`.

`GuardedPipeline.from_pipe(pipe, index=..., guard=NAME, **options)` wraps a pipeline (LoRA, float16 and
v-prediction included) and samples with `trainer.sample.guidance`'s DDIM loop (eta 0, the papers' sampler),
guarded by the registered guard NAME (`trainer.sample.guards`: a class declaring its options; AMG, Chen et
al., CVPR 2024; Wen et al., ICLR 2024); `__call__` returns the usual output with `guard_records` set on it.
Formulas and defaults: docs/methods.md, "Guarded sampling".
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
from trainer.measure.index import TrainingIndex
from trainer.sample.amg import AMG
from trainer.sample.generate import generate_images
from trainer.sample.guards import Guard, NoGuard, check_index
from trainer.sample.guidance import decode_images, sample_latents
from trainer.sample.wen import Wen

# Every guard by name: a class declaring its options (`trainer.sample.guards.Guard`); one line adds one.
GUARDS: dict[str, type[Guard]] = {NoGuard.name: NoGuard, AMG.name: AMG, Wen.name: Wen}


def make_guard(name: str, pipe, index: TrainingIndex | None = None, embedder=None, **options) -> Guard:
    """The registered guard `name` for `pipe` (its `index` and the index's `embedder` when it uses them)."""
    if name not in GUARDS:
        raise MemtrainError(f"guard must be one of {', '.join(GUARDS)}, got {name!r}")
    return GUARDS[name](pipe, index, embedder, **options)


def load_index(path: str | Path, pipe, embedding: str | None = None) -> TrainingIndex:
    """The training-image index at `path`, checked against the model (`check_index`) and `embedding`."""
    if not Path(path).exists():
        raise MemtrainError(f"--index {path}: no such index; build one with `memtrain index DATA --out {path}`")
    index = TrainingIndex.load(path, embedding=embedding, resolution=model_resolution(pipe))
    check_index(index, pipe, embedding, where=f"--index {path}")
    return index


class GuardedPipeline:
    """A StableDiffusionPipeline whose sampling is guarded by `guard` against replicating training images."""

    def __init__(self, pipe, guard: Guard, batch_size: int | None = None):
        self.pipe, self.guard, self.batch_size = pipe, guard, batch_size

    @classmethod
    def from_pipe(cls, pipe, index: TrainingIndex | None = None, *, guard: str | Guard, batch_size: int | None = None,
                  **options) -> GuardedPipeline:
        """Wrap `pipe` (diffusers' `from_pipe` convention: same components, no copies) with the guard named
        `guard` (`GUARDS`) built with `index` and its `options`, or with a built `Guard`."""
        if not isinstance(guard, Guard):
            guard = make_guard(guard, pipe, index, **options)
        return cls(pipe, guard, batch_size)

    @property
    def trigger(self) -> str | None:
        return self.guard.trigger

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

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
        run = self.guard.start(core, prompts, cond, latents, n, num_inference_steps, negative_prompt)
        x0 = sample_latents(core, run.cond, uncond, latents, num_inference_steps, guidance_scale, run.step)
        records = run.records()
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
    guard: str | Guard | GuardedPipeline = NoGuard.name, index: TrainingIndex | None = None, batch_size: int = 32,
    progress: bool = True, across_processes: bool = False, **options,
) -> tuple[torch.Tensor, list[dict]]:
    """Images [len(prompts) * n, 3, H, W] in [0, 1] (prompt-major, generation j from seed + j, as
    `trainer.sample.generate.generate_images`) and one guard record per image (with its prompt and seed).

    `guard`: a registered guard's name (built with `index` and `options`), a `Guard` or a `GuardedPipeline`;
    "none" (the default) is the stock pipeline (`generate_images`), the baseline a guard is compared with.
    `across_processes`: the batches are shared by the processes of `accelerate launch`, as in `generate_images`.
    """
    if isinstance(guard, str) and guard == NoGuard.name:
        images = generate_images(pipe, list(prompts), n, seed, steps, guidance_scale, batch_size, progress,
                                 across_processes)
        records = [{"guard": NoGuard.name, "intervened": False, "prompt": p, "seed": seed + j}
                   for p in prompts for j in range(n)]
        return images, records
    guarded = guard if isinstance(guard, GuardedPipeline) else GuardedPipeline.from_pipe(pipe, index, guard=guard,
                                                                                          **options)
    guarded.guard.setup(seed, steps)  # e.g. Wen et al.'s target from general prompts (`--wen-calibrate`)
    jobs = [(p, seed + j) for p in prompts for j in range(n)]
    core = UNetCore(pipe)

    def render(share: list[tuple[str, int]]) -> list[tuple[torch.Tensor, dict]]:
        out = []
        bar = tqdm(total=len(share), desc=f"generate ({guarded.guard.name})", disable=not progress, dynamic_ncols=True)
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


__all__ = ["GUARDS", "GuardedPipeline", "guarded_generate", "make_guard", "check_index", "model_resolution",
           "decode_images"]
