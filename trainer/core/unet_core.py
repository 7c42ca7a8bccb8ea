"""The batched UNet core every detector and edit uses: a method is a list of requests, request r
asking for `eps(latents[x_index[r]], timesteps[r], embeddings[e_index[r]])`, and `UNetCore.eps`
answers them `batch_size` samples per UNet forward.

Each distinct token sequence is encoded once per call; generation j starts from x_T drawn on the CPU
from seed `seed + j` (as `memtrain generate`); predictions are returned as float32 in epsilon space
(v and x0 outputs converted with `alphas_cumprod`) unless `space="model"`. Also: `encode_latents`,
`record_cross_attention` and the `count_evals` counter. Conventions: docs/methods.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from trainer.io import MemtrainError

DEFAULT_BATCH_SIZE = 16
SPACES = ("epsilon", "model")


# ---------------------------------------------------------------- evaluation counter


@dataclass
class EvalCounter:
    """Work done by the core: UNet samples (one per latent in a batch), UNet calls, text rows."""

    unet_evals: int = 0
    unet_calls: int = 0
    text_rows: int = 0

    def reset(self) -> None:
        self.unet_evals = self.unet_calls = self.text_rows = 0


_ACTIVE: list[EvalCounter] = []


@contextlib.contextmanager
def count_evals() -> Iterator[EvalCounter]:
    """Count the work done inside the `with` block: `with count_evals() as c: ...; c.unet_evals`."""
    counter = EvalCounter()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


@contextlib.contextmanager
def count_unet_samples(unet) -> Iterator[list[int]]:
    """Samples passed through `unet` while the block runs, by any caller (the core, a pipeline, a training
    step): a forward pre-hook, so stock pipelines are counted too. Yields a one-item list."""
    count = [0]

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count[0] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def _count(unet_evals: int = 0, unet_calls: int = 0, text_rows: int = 0) -> None:
    for c in _ACTIVE:
        c.unet_evals += unet_evals
        c.unet_calls += unet_calls
        c.text_rows += text_rows


# ---------------------------------------------------------------- components


@dataclass
class Parts:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None = None


def get_parts(components) -> Parts:
    """Accept a dict (`build_components`, or training parts with `noise_scheduler`), a pipeline or `Parts`."""
    if isinstance(components, Parts):
        return components
    if isinstance(components, dict):
        get = components.get
    else:
        def get(key):
            return getattr(components, key, None)

    scheduler = get("scheduler")
    if scheduler is None:
        scheduler = get("noise_scheduler")
    found = dict(
        unet=get("unet"), text_encoder=get("text_encoder"), tokenizer=get("tokenizer"), scheduler=scheduler
    )
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise MemtrainError(
            f"detector components are missing {', '.join(missing)}: pass a StableDiffusionPipeline or a dict "
            "with unet, text_encoder, tokenizer, scheduler (or noise_scheduler) and optionally vae"
        )
    return Parts(vae=get("vae"), **found)


# ---------------------------------------------------------------- the core


class UNetCore:
    """Batched noise predictions for one model. Cheap to build; detectors build one per call."""

    def __init__(self, components, batch_size: int = DEFAULT_BATCH_SIZE):
        if int(batch_size) < 1:
            raise MemtrainError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.parts = get_parts(components)
        unet = self.parts.unet
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = self.parts.scheduler.config
        self.prediction_type = config.get("prediction_type", "epsilon") or "epsilon"
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise MemtrainError(
                f"scheduler prediction_type {self.prediction_type!r} is not supported "
                "(expected epsilon, v_prediction or sample)"
            )
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.alphas_cumprod = self.parts.scheduler.alphas_cumprod.detach().to(self.device, torch.float32)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(unet.config.in_channels), int(h), int(w))
        self.cross_attention_dim = unet.config.cross_attention_dim
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- text

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [P, model_max_length] exactly as `StableDiffusionPipeline.encode_prompt` makes them."""
        tok = self.parts.tokenizer
        return tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each DISTINCT row of `ids` once; returns (table [U, L, D], index [P] into the table)."""
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
        te = self.parts.text_encoder
        te_device = next(te.parameters()).device
        use_mask = bool(getattr(te.config, "use_attention_mask", False))
        eos = self.parts.tokenizer.eos_token_id
        rows = []
        with torch.no_grad():
            for start in range(0, len(unique), self.batch_size):
                chunk = unique[start : start + self.batch_size].to(te_device)
                mask = None
                if use_mask:  # attend up to and including the first end-of-text token
                    first_eos = (chunk == eos).int().argmax(dim=1, keepdim=True)
                    mask = (torch.arange(chunk.shape[1], device=te_device)[None] <= first_eos).long()
                hidden = te(chunk, attention_mask=mask, return_dict=False)[0]
                rows.append(hidden.to(self.device, self.dtype))
                _count(text_rows=len(chunk))
        return torch.cat(rows), inverse

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, L], embedding [1, L, D]) of the empty caption c0, encoded once per core."""
        if self._empty is None:
            ids = self.tokenize([""])
            self._empty = (ids, self.encode_ids(ids)[0])
        return self._empty

    def encode_prompts(self, prompts: Sequence[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(table, index [P], empty_index) for prompts (strings or token ids [P, L]).

        Row `empty_index` (= 0) of the table is c0, encoded once per core; every other distinct
        token sequence is encoded once per call (a prompt that tokenizes like c0 reuses row 0).
        """
        ids = prompts if torch.is_tensor(prompts) else self.tokenize(prompts)
        ids0, emb0 = self.empty()
        is_empty = (ids == ids0).all(dim=1)
        index = torch.zeros(len(ids), dtype=torch.long)
        if bool((~is_empty).any()):
            table, rows = self.encode_ids(ids[~is_empty])
            index[~is_empty] = rows + 1
            return torch.cat([emb0, table]), index, 0
        return emb0, index, 0

    # ---- noise and schedules

    def initial_noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """x_T [n, C, H, W] (float32, on the UNet's device); generation j from seed `seed + j`.

        DDIM's `init_noise_sigma` is 1, so this is the pipeline's initial latent as-is.
        """
        return initial_latents(self.parts.unet, [int(seed) + j for j in range(n)]).to(self.device)

    def ddim(self, num_inference_steps: int = 50):
        """A DDIM scheduler (eta=0) over the model's noise schedule; it is stepped with epsilon predictions."""
        config = dict(self.parts.scheduler.config)
        config["prediction_type"] = "epsilon"
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(int(num_inference_steps))
        return scheduler

    def sampling_timesteps(self, num_inference_steps: int = 50) -> torch.Tensor:
        """DDIM sampling timesteps, highest noise first (the checkpoint's own spacing: 981, 961, ..., 1 for 50 steps on SD 1.x)."""
        return self.ddim(num_inference_steps).timesteps.clone()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (per-sample timesteps)."""
        a = self.alphas_cumprod[timesteps.to(self.device)].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    # ---- the UNet

    def eps(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        embeddings: torch.Tensor,
        x_index: torch.Tensor | None = None,
        e_index: torch.Tensor | None = None,
        *,
        space: str = "epsilon",
        grad: bool = False,
        dedupe: bool = False,
    ) -> torch.Tensor:
        """Predictions [R, C, H, W] (float32) for R requests, `batch_size` samples per UNet forward.

        Request r is (latents[x_index[r]], timesteps[r], embeddings[e_index[r]]); a missing index
        means "row r". `space="epsilon"` converts v / x0 predictions to epsilon (module docstring).
        `dedupe=True` evaluates identical requests once (they are bit-identical in exact
        arithmetic). `grad=True` keeps the autograd graph (for gradients w.r.t. embeddings).
        """
        if space not in SPACES:
            raise MemtrainError(f"space must be one of {SPACES}, got {space!r}")
        n = len(x_index) if x_index is not None else len(e_index) if e_index is not None else len(latents)
        x_index = torch.arange(n) if x_index is None else x_index.long().cpu()
        e_index = torch.arange(n) if e_index is None else e_index.long().cpu()
        if isinstance(timesteps, int) or (torch.is_tensor(timesteps) and timesteps.dim() == 0):
            timesteps = torch.full((n,), int(timesteps), dtype=torch.long)
        timesteps = timesteps.long().cpu()
        if not (len(x_index) == len(e_index) == len(timesteps) == n):
            raise MemtrainError("eps: x_index, timesteps and e_index must have one entry per request")
        if dedupe and n > 1:
            keys = torch.stack([x_index, timesteps, e_index], dim=1)
            unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
            if len(unique) < n:
                out = self.eps(
                    latents, unique[:, 1], embeddings, unique[:, 0], unique[:, 2], space=space, grad=grad
                )
                return out[inverse.to(out.device)]
        outs = []
        context = torch.enable_grad() if grad else torch.no_grad()
        with context:
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                x = latents[x_index[rows].to(latents.device)].to(self.device, self.dtype)
                t = timesteps[rows].to(self.device)
                e = embeddings[e_index[rows].to(embeddings.device)].to(self.device, self.dtype)
                out = self.parts.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
                _count(unet_evals=len(x), unet_calls=1)
                outs.append(self.to_space(out.float(), x.float(), t, space))
        return torch.cat(outs) if outs else torch.empty((0, *self.latent_shape), device=self.device)

    def to_space(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, space: str = "epsilon"
    ) -> torch.Tensor:
        """Convert a raw UNet output to epsilon (identity for epsilon models or `space="model"`)."""
        if space == "model":
            return out
        return to_epsilon(out, x, t, self.alphas_cumprod, self.prediction_type)


def to_epsilon(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """A raw UNet output in epsilon space: v -> sqrt(abar_t) v + sqrt(1 - abar_t) x_t, x0 -> (x_t - sqrt(abar_t)
    x0) / sqrt(1 - abar_t), epsilon as-is (per-sample timesteps `t`)."""
    if prediction_type == "epsilon":
        return out
    a = alphas_cumprod.to(out.device)[t.to(out.device)].view(-1, *([1] * (out.dim() - 1)))
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x
    return (x - a.sqrt() * out) / (1 - a).sqrt()  # "sample": out is x0


# ---------------------------------------------------------------- VAE


def posterior_latents(vae, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The UNet's latent of a VAE posterior sample: (mean + std * noise - shift_factor) * scaling_factor."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean + std * noise - shift) * vae.config.scaling_factor


def initial_latents(unet, seeds) -> torch.Tensor:
    """x_T [len(seeds), C, H, W] (float32, CPU): latent i from `torch.Generator("cpu").manual_seed(seeds[i])`.
    The convention of every sampler and detector here, so a detector scores the trajectory a generation takes."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(unet.config.in_channels), int(h), int(w))
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def encode_latents(
    components, images: torch.Tensor, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """Latents [N, C, h, w] (float32, UNet device): VAE posterior SAMPLE * vae.config.scaling_factor.

    `images` are pixel values in [-1, 1] (the training convention). The posterior noise of every
    image is drawn from `torch.Generator("cpu").manual_seed(seed)`, so an image's latent does not
    depend on the other images or the batch size. Without a VAE the input is returned as-is.
    """
    core = UNetCore(components, batch_size)
    vae = core.parts.vae
    if vae is None:
        return images.float().to(core.device)
    vae_param = next(vae.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(images), core.batch_size):
            x = images[start : start + core.batch_size].to(vae_param.device, vae_param.dtype)
            dist = vae.encode(x).latent_dist
            noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator("cpu").manual_seed(int(seed)))
            z = posterior_latents(vae, dist.mean.float(), dist.std.float(), noise.to(dist.mean.device))
            out.append(z.to(core.device))
    return torch.cat(out)


def looks_like_images(components, x: torch.Tensor) -> bool:
    """True when `x` should go through the VAE: there is one and x has its input channel count."""
    parts = get_parts(components)
    return (
        parts.vae is not None and x.shape[1] == parts.vae.config.in_channels != parts.unet.config.in_channels
    )


# ---------------------------------------------------------------- cross-attention recording


def groups(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` items covering range(n)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def prompt_list(prompts: str | Sequence[str] | None, what: str = "", allow_empty: bool = False) -> list[str]:
    """A list of prompt strings (one string is a list of one); one MemtrainError naming `what` (e.g.
    "memorized") for an empty list or a non-string entry."""
    kind = f"{what} prompts" if what else "prompts"
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts and not allow_empty:
        raise MemtrainError(f"no {kind} given: pass at least one")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise MemtrainError(f"{kind} must be strings; entries {bad[:5]} are not")
    return prompts


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    first: dict[str, int] = {}
    inverse = torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.long)
    return list(first), inverse


def check_n(n: int) -> int:
    if int(n) < 1:
        raise MemtrainError(f"n (generations per prompt) must be >= 1, got {n}")
    return int(n)


def group_size(batch_size: int, evals_per_item: int) -> int:
    """Items per group: about 32 full UNet batches, bounding memory for long prompt lists; a whole number of
    `batch_size` items, so a list cut between batches of items (`core.distributed`) keeps every UNet batch."""
    batch_size = max(1, int(batch_size))
    return max(batch_size, (32 * batch_size) // max(1, evals_per_item) // batch_size * batch_size)


def cond_uncond_pairs(x_index: torch.Tensor, e_index: torch.Tensor, e0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved (cond, uncond) requests for each job: x index twice, embedding (cond, c0)."""
    return x_index.repeat_interleave(2), torch.stack([e_index, torch.full_like(e_index, e0)], 1).flatten()
