"""The math of guarded sampling over `trainer.core.unet_core`: the stock DDIM + classifier-free-guidance
loop with an optional per-step guard that may only add to the guided prediction of the rows it fires on.

Implements Anti-Memorization Guidance (Chen, Liu & Xu, CVPR 2024, "Towards memorization-free diffusion
models") and the inference-time prompt-embedding mitigation of Wen et al. (ICLR 2024, "Detecting,
explaining, and mitigating memorization in diffusion models"). The index and embedder are arguments
(duck-typed). Deviations: AMG's c2 and c3 are our choices, `check_every` > 1 skips checks to save VAE
decodes, and the pixel embedding's threshold is calibrated on the toy world. Formulas: docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from trainer.core.unet_core import UNetCore, prompt_list
from trainer.io import MemtrainError

C1_DEFAULT = 13.0  # Chen et al.: s1 = clip(13 sigma_t, 0, s0 - 1) (capped at 6.5 for s0 = 7.5)
C2_DEFAULT = 13.0  # not recovered from the paper: same as c1 (s2 is capped at s0 - s1 - 1)
C3_DEFAULT = 10000.0  # not recovered from the paper: our choice (see docs/methods.md); the scale depends on the embedder
WEN_TARGET = 3.0  # Wen et al.'s default target for SD 1.4
WEN_LR, WEN_MAX_ITERS = 0.05, 10


@dataclass(frozen=True)
class Threshold:
    """lambda_t = base + amplitude * exp(-rate * t) (t the training timestep, 0..999)."""

    base: float
    amplitude: float = 0.0
    rate: float = 0.005

    def __call__(self, t: int) -> float:
        return self.base + self.amplitude * math.exp(-self.rate * float(t))


SSCD_THRESHOLD = Threshold(0.3, 0.1, 0.005)  # Chen et al., for SSCD cosine similarity
# For the "pixels" embedding: a constant calibrated on the toy world (deviation; docs/methods.md).
# Recalibrate on your own held-out images.
PIXEL_THRESHOLD = Threshold(0.85, 0.0, 0.0)
DEFAULT_THRESHOLDS = {"sscd": SSCD_THRESHOLD, "pixels": PIXEL_THRESHOLD}


def as_threshold(value, embedding: str | None = None) -> Threshold:
    """A `Threshold` from a number (constant lambda), a (base, amplitude, rate) tuple, or the embedding's default."""
    if isinstance(value, Threshold):
        return value
    if value is None:
        if embedding in DEFAULT_THRESHOLDS:
            return DEFAULT_THRESHOLDS[embedding]
        raise MemtrainError(
            f"no default AMG threshold for the {embedding!r} embedding: pass --guard-threshold "
            f"(known defaults: {', '.join(DEFAULT_THRESHOLDS)})"
        )
    if isinstance(value, (int, float)):
        return Threshold(float(value))
    try:
        return Threshold(*(float(v) for v in value))
    except (TypeError, ValueError):
        raise MemtrainError(
            f"AMG threshold must be a number or (base, amplitude, rate), got {value!r}"
        ) from None


# ---------------------------------------------------------------- shared pieces


def decode_images(core: UNetCore, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of (x0) latents to images [B, 3, H, W] in [0, 1] (float32), keeping autograd if any."""
    vae = core.parts.vae
    if vae is None:
        raise MemtrainError("guarded sampling needs a pipeline with a VAE")
    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(z, return_dict=False)[0].float()
    return (images / 2 + 0.5).clamp(0, 1)


def _guided(eps: torch.Tensor, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eps_uncond, eps_cond, eps_hat) from predictions stacked [uncond batch, cond batch] (the stock order)."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond, eps_cond, eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _cfg_requests(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and embedding indices for [uncond rows 0..b-1, cond rows 0..b-1] over a table cat([uncond, cond])."""
    return torch.arange(b).repeat(2), torch.arange(2 * b)


def sample_latents(
    core: UNetCore,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guard: AMGGuard | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance from x_T `latents` [B, C, H, W]; returns x_0 latents.

    `cond` / `uncond` are the text-encoder outputs [B, L, D] (negative prompt or c0 for `uncond`).
    All 2B predictions of a step go through the core in one request list (the core's batch_size
    decides the forwards; the stock pipeline makes one forward of 2B). `guard` may add guidance to
    the rows where it fires (`AMGGuard.guide`).
    """
    if guidance_scale <= 1.0:
        raise MemtrainError(f"guarded sampling needs classifier-free guidance (guidance_scale > 1), got {guidance_scale}")
    scheduler = core.ddim(num_inference_steps)
    b = len(latents)
    table = torch.cat([uncond, cond]).to(core.device, core.dtype)
    x_index, e_index = _cfg_requests(b)
    latents = latents.to(core.device, torch.float32)
    for step, t in enumerate(scheduler.timesteps):
        eps = core.eps(latents, int(t), table, x_index, e_index)
        eps_uncond, eps_cond, eps_hat = _guided(eps, guidance_scale)
        if guard is not None:
            eps_hat = guard.guide(step, int(t), latents, eps_uncond, eps_cond, eps_hat, table, guidance_scale)
        latents = scheduler.step(eps_hat, t, latents, return_dict=False)[0]
    return latents


# ---------------------------------------------------------------- AMG


@dataclass
class AMGConfig:
    threshold: Threshold = SSCD_THRESHOLD
    c1: float = C1_DEFAULT
    c2: float = C2_DEFAULT
    c3: float = C3_DEFAULT
    despecification: bool = True
    deduplication: bool = True
    dissimilarity: bool = True
    check_every: int = 1  # 1 = the paper (every step); k > 1 checks only every k-th step (cheaper)


@dataclass
class GuardRecord:
    """What the guard saw for one image."""

    steps: list[int] = field(default_factory=list)  # sampling steps (0 = first) where the guard intervened
    sigmas: list[float] = field(default_factory=list)  # sigma_t at every checked step
    max_sigma: float = float("-inf")
    nearest_index: int = -1  # nearest training image at the step of max sigma
    nearest_file: str | None = None
    nearest_caption: str | None = None

    def as_dict(self) -> dict:
        return {
            "guard": "amg",
            "intervened": bool(self.steps),
            "steps_intervened": list(self.steps),
            "num_steps_intervened": len(self.steps),
            "max_sigma": self.max_sigma,
            "nearest_index": self.nearest_index,
            "nearest_file": self.nearest_file,
            "nearest_caption": self.nearest_caption,
            "sigmas": list(self.sigmas),
        }


class AMGGuard:
    """Anti-Memorization Guidance for one batch of B images (formulas: docs/methods.md).

    `encode(captions) -> [K, L, D]` encodes training captions y_N for the caption-deduplication term
    (the pipeline's `encode_prompt`, so text-encoder LoRA and the like apply).
    """

    def __init__(
        self,
        core: UNetCore,
        index,
        embedder: Callable[[torch.Tensor], torch.Tensor],
        encode: Callable[[list[str]], torch.Tensor],
        config: AMGConfig,
        batch: int,
    ):
        self.core, self.index, self.embedder, self.encode, self.config = core, index, embedder, encode, config
        self.records = [GuardRecord() for _ in range(batch)]

    def nearest(self, latents: torch.Tensor, eps_hat: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B] cosine to the nearest training image, n0 [B]) of the decoded x0 estimate."""
        a = self.core.alphas_cumprod[t]
        with torch.no_grad():
            x0 = (latents - (1 - a).sqrt() * eps_hat) / a.sqrt()
            query = self.embedder(decode_images(self.core, x0))
            sims, idx = self.index.search(query, k=1)
        return sims[:, 0].float().cpu(), idx[:, 0].long().cpu()

    def similarity_gradient(
        self, latents: torch.Tensor, t: int, table: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """grad_{x_t} sigma_t for `rows` (through the CFG x0 estimate, the VAE decoder and the embedder)."""
        b = len(table) // 2
        x = latents[rows.to(latents.device)].detach().requires_grad_(True)
        m = len(rows)
        x_index = torch.arange(m).repeat(2)
        e_index = torch.cat([rows, rows + b])
        with torch.enable_grad():
            eps = self.core.eps(x, t, table, x_index, e_index, grad=True)
            _, _, eps_hat = _guided(eps, guidance_scale)
            a = self.core.alphas_cumprod[t]
            x0 = (x - (1 - a).sqrt() * eps_hat) / a.sqrt()
            query = self.embedder(decode_images(self.core, x0))
            reference = self.index.embeddings[targets].to(query.device, query.dtype)
            sigma = (query * reference).sum(dim=1)
            (grad,) = torch.autograd.grad(sigma.sum(), x)
        return grad.float()

    def guide(
        self, step: int, t: int, latents: torch.Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
        eps_hat: torch.Tensor, table: torch.Tensor, guidance_scale: float,
    ) -> torch.Tensor:
        cfg = self.config
        if step % max(1, int(cfg.check_every)):
            return eps_hat
        sigma, n0 = self.nearest(latents, eps_hat, t)
        for r, rec in enumerate(self.records):
            s = float(sigma[r])
            rec.sigmas.append(s)
            if s > rec.max_sigma:
                i = int(n0[r])
                rec.max_sigma, rec.nearest_index = s, i
                rec.nearest_file, rec.nearest_caption = self.index.file_names[i], self.index.captions[i]
        fire = sigma > cfg.threshold(t)
        if not bool(fire.any()):
            return eps_hat
        rows = fire.nonzero()[:, 0]
        for r in rows.tolist():
            self.records[r].steps.append(step)
        dev = eps_hat.device
        rd = rows.to(dev)
        sig = sigma[rows].to(dev).view(-1, 1, 1, 1)
        s0 = float(guidance_scale)
        guidance = torch.zeros_like(eps_hat[rd])
        s1 = (cfg.c1 * sig).clamp(0.0, s0 - 1.0) if cfg.despecification else torch.zeros_like(sig)
        if cfg.despecification:
            guidance = guidance - s1 * (eps_cond[rd] - eps_uncond[rd])
        if cfg.deduplication:
            dup = [k for k, r in enumerate(rows.tolist()) if self.index.caption_is_duplicated(int(n0[r]))]
            if dup:
                captions = [self.index.captions[int(n0[int(rows[k])])] for k in dup]
                unique = sorted(set(captions))
                caption_table = self.encode(unique).to(self.core.device, self.core.dtype)
                e_index = torch.tensor([unique.index(c) for c in captions])
                eps_caption = self.core.eps(latents, t, caption_table, rows[dup], e_index)
                kd = torch.tensor(dup, device=dev)
                cap = (s0 - s1[kd] - 1.0).clamp(min=0.0)
                s2 = torch.minimum((cfg.c2 * sig[kd]).clamp(min=0.0), cap)
                guidance[kd] = guidance[kd] - s2 * (eps_caption - eps_uncond[rd[kd]])
        if cfg.dissimilarity and cfg.c3 != 0:
            grad = self.similarity_gradient(latents, t, table, rows, n0[rows], guidance_scale)
            a = self.core.alphas_cumprod[t]
            guidance = guidance + cfg.c3 * (1 - a).sqrt() * grad.to(dev)
        eps_hat = eps_hat.clone()
        eps_hat[rd] = eps_hat[rd] + guidance
        return eps_hat


# ---------------------------------------------------------------- Wen et al.


def first_step_magnitude(
    core: UNetCore, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor, t0: int, grad: bool = False,
    eps_uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """||eps(x_T^j, t0, c_j) - eps(x_T^j, t0, c0)|| per row j (cond [M, L, D], uncond [1 or M, L, D], x_T [M, ...]).

    `eps_uncond`: the unconditional predictions, when already known (they do not depend on `cond`, so an
    optimisation of `cond` evaluates them once)."""
    m = len(x_T)
    if eps_uncond is not None:
        eps_cond = core.eps(x_T, t0, cond, torch.arange(m), torch.arange(m), grad=grad)
        return (eps_cond - eps_uncond).flatten(1).norm(dim=1)
    uncond = uncond.expand(m, -1, -1) if len(uncond) == 1 else uncond
    table = torch.cat([uncond.to(cond.device, cond.dtype), cond])
    x_index, e_index = _cfg_requests(m)
    eps = core.eps(x_T, t0, table, x_index, e_index, grad=grad)
    eps_uncond, eps_cond = eps.chunk(2)
    return (eps_cond - eps_uncond).flatten(1).norm(dim=1)


@dataclass
class WenRecord:
    prompt: str
    magnitude_before: float
    magnitude_after: float
    iterations: int
    target: float

    def as_dict(self) -> dict:
        return {"guard": "wen", "intervened": self.iterations > 0, **self.__dict__}


def optimize_embedding(
    core: UNetCore, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor, t0: int,
    target: float = WEN_TARGET, lr: float = WEN_LR, max_iters: int = WEN_MAX_ITERS,
) -> tuple[torch.Tensor, list[float]]:
    """Wen et al.'s loop for ONE prompt: cond [1, L, D] over its generations' x_T [n, ...].

    Loss = mean over the n generations of the first-step magnitude; AdamW(lr); BOS row gradient
    zeroed; stops as soon as the loss is <= target (checked before every step, and once after the
    last). Returns (embedding [1, L, D], the loss before each check).
    """
    emb = cond.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([emb], lr=lr)
    losses: list[float] = []
    m = len(x_T)
    uncond_rows = (uncond.expand(m, -1, -1) if len(uncond) == 1 else uncond).to(core.device, core.dtype)
    eps_uncond = core.eps(x_T, t0, uncond_rows, torch.arange(m), torch.arange(m))  # constant: evaluated once
    with torch.enable_grad():
        for it in range(int(max_iters) + 1):
            loss = first_step_magnitude(
                core, emb.to(core.dtype).expand(m, -1, -1), uncond, x_T, t0, grad=True, eps_uncond=eps_uncond
            ).mean()
            losses.append(float(loss.detach()))
            if losses[-1] <= target or it == max_iters:
                break
            optimizer.zero_grad()
            loss.backward()
            emb.grad[:, 0] = 0.0  # BOS
            optimizer.step()
    return emb.detach().to(cond.dtype), losses


def _encode(pipe, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [P, L, D], uncond [P, L, D]) from the pipeline's own `encode_prompt` (empty negative prompt)."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True)
    return cond, uncond


def mitigate_prompt_embedding(
    pipe, prompts: str | Sequence[str], target: float = WEN_TARGET, lr: float = WEN_LR,
    max_iters: int = WEN_MAX_ITERS, seed: int = 0, latents: torch.Tensor | None = None,
    num_inference_steps: int = 50, batch_size: int = 16,
) -> tuple[torch.Tensor, list[dict]]:
    """Wen et al.'s inference-time mitigation: optimised prompt embeddings [P, L, D] and a record per prompt.

    The first-step magnitude is measured on x_T = `latents` (prompt-major [P * n, C, H, W]: prompt i
    is optimised over its own n generations), or by default on the x_T of seed `seed` shared by all
    prompts (the detectors' convention), at the first DDIM timestep of `num_inference_steps`.
    """
    prompts = prompt_list(prompts)
    core = UNetCore(pipe, batch_size)
    cond, uncond = _encode(pipe, prompts, core.device)
    if latents is None:
        x_T = core.initial_noise(1, seed).repeat(len(prompts), 1, 1, 1)
    else:
        x_T = latents.to(core.device, torch.float32)
    if len(x_T) % len(prompts):
        raise MemtrainError(f"latents: {len(x_T)} rows is not a multiple of {len(prompts)} prompts")
    n = len(x_T) // len(prompts)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    out, records = [], []
    for i, prompt in enumerate(prompts):
        emb, losses = optimize_embedding(
            core, cond[i : i + 1], uncond[i : i + 1], x_T[i * n : (i + 1) * n], t0, target, lr, max_iters
        )
        out.append(emb)
        records.append(WenRecord(prompt, losses[0], losses[-1], len(losses) - 1, float(target)).as_dict())
    return torch.cat(out), records


def calibrate_wen_target(
    pipe, general_prompts: Sequence[str], quantile: float = 0.95, seed: int = 0,
    num_inference_steps: int = 50, batch_size: int = 16,
) -> float:
    """The `quantile` of the first-step magnitude over general (non-memorized) prompts, on the x_T of `seed`."""
    prompts = list(general_prompts)
    if not prompts:
        raise MemtrainError("calibrate_wen_target needs at least one general prompt")
    if not 0.0 < quantile <= 1.0:
        raise MemtrainError(f"quantile must be in (0, 1], got {quantile}")
    core = UNetCore(pipe, batch_size)
    cond, uncond = _encode(pipe, prompts, core.device)
    x_T = core.initial_noise(1, seed).repeat(len(prompts), 1, 1, 1)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    with torch.no_grad():
        magnitudes = first_step_magnitude(core, cond, uncond, x_T, t0)
    return float(torch.quantile(magnitudes.double().cpu(), quantile))
