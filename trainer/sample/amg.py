"""Anti-Memorization Guidance (Chen, Liu & Xu, CVPR 2024, "Towards memorization-free diffusion models") as
a guard: at each DDIM step the decoded clean estimate is searched in the training-image index and, when it
is too similar, despecification, caption deduplication and a dissimilarity gradient are added to the guided
prediction (`AMGGuard.guide`).

AMG's constants are the authors' code's (cited line by line below and in docs/methods.md); deviations:
despecification is gated by the threshold as in the paper (the code applies it at every step,
`despecification_floor=0` reproduces that), the dissimilarity term's norm can be bounded (`max_ratio`,
off by default), other embedders than SSCD are mapped onto the SSCD scale (`SimilarityScale`), and
`check_every` > 1 skips checks to save VAE decodes. The trigger: the authors' schedule for SSCD, the
index's held-out calibration otherwise (`amg_trigger`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainer.core.unet_core import UNetCore
from trainer.io import MemtrainError
from trainer.measure.embedders import make_embedder
from trainer.sample.guards import Guard, GuardRun, Option, check_index
from trainer.sample.guidance import decode_images

# AMG's constants, each from the authors' code (chenchen-usyd/AMG-sd, commit d76d4c8; docs/methods.md
# cites the lines). They are written on the SSCD cosine scale; other embedders are mapped onto it
# (`SimilarityScale`).
C1_DEFAULT = 13.0  # ddim.py l.293: s1 = clip(6.5 / 0.5 * sigma, 0, 6.5)
DEDUP_FULL_AT = 0.3  # ddim.py l.304: s2 = clip((6.5 - s1) / 0.3 * sigma, 0, 6.5 - s1) (the adaptive c2)
DEDUP_WINDOW = 10  # ddim.py l.294-302 (g3_count): once fired, deduplication runs for 10 steps
DEDUP_NEIGHBOURS, DEDUP_MIN_COUNT = 1000, 20  # txt2img.py l.255-265: a caption > 20 times among the 1000 nearest
C3_DEFAULT = 100.0  # txt2img.py l.477 (--guidance_scale 100), returned as -grad * 100 (l.324)
DISSIMILARITY_BASE = 0.3  # ddim.py l.319: the dissimilarity is scaled by (sigma - 0.3)
DISSIMILARITY_TIME = 170.0  # ddim.py l.319: ... and by exp((1000 - t) / 170)
# An optional bound (memtrain's, not the authors'): the dissimilarity term's norm at most this multiple of the
# guided prediction's; 0, the default, leaves the term unbounded as the authors' code does (docs/methods.md).
DISSIMILARITY_MAX_RATIO = 0.0


@dataclass(frozen=True)
class Threshold:
    """lambda_t = base + amplitude * exp(-rate * t) (t the training timestep, 0..999)."""

    base: float
    amplitude: float = 0.0
    rate: float = 0.005

    def __call__(self, t: int) -> float:
        return self.base + self.amplitude * math.exp(-self.rate * float(t))


# ddim.py l.16-17 and l.272-278: asy(t, 0.3, 0.4, 0.005, 0) = 0.3 - (0.3 - 0.4) exp(-0.005 t)
SSCD_THRESHOLD = Threshold(0.3, 0.1, 0.005)


@dataclass(frozen=True)
class SimilarityScale:
    """An embedder's cosine similarity s on the SSCD scale AMG's constants are written in:
    u = lambda_0 (s - null) / (trigger - null), lambda_0 = 0.4 the authors' threshold at t = 0.

    `null`: the similarity of unrelated images (0 for SSCD); `trigger`: the similarity at which a clean
    estimate should trigger the guard (for an index calibrated on held-out images, its threshold at the
    stated false-positive rate). SSCD's own scale is the identity. `source` says where `trigger` came from.
    """

    null: float = 0.0
    trigger: float = 0.4
    source: str = "the authors' SSCD schedule"

    def __post_init__(self):
        if not self.trigger > self.null:
            raise MemtrainError(
                f"AMG trigger similarity {self.trigger:.4g} must exceed the similarity of unrelated images "
                f"({self.null:.4g}, the index's mean similarity): choose a higher --guard-threshold"
            )

    @property
    def slope(self) -> float:
        return SSCD_THRESHOLD(0) / (self.trigger - self.null)

    def __call__(self, s):
        return (s - self.null) * self.slope


def as_threshold(value, embedding: str | None = None) -> Threshold:
    """A `Threshold` (on the SSCD scale) from a number (constant lambda), a (base, amplitude, rate) tuple,
    or, for None, the authors' schedule."""
    if isinstance(value, Threshold):
        return value
    if value is None:
        return SSCD_THRESHOLD
    if isinstance(value, (int, float)):
        return Threshold(float(value))
    try:
        return Threshold(*(float(v) for v in value))
    except (TypeError, ValueError):
        raise MemtrainError(
            f"AMG threshold must be a number or (base, amplitude, rate), got {value!r}"
        ) from None



@dataclass
class AMGConfig:
    """AMG's settings; `threshold` and the scales act on the SSCD scale that `scale` maps similarities to.

    `despecification_floor`: despecification fires when u > lambda_t (None, the paper's rule) or when
    u > this floor (0.0 reproduces the authors' code, ddim.py l.292, which applies it at every step).
    """

    threshold: Threshold = SSCD_THRESHOLD
    c1: float = C1_DEFAULT
    c3: float = C3_DEFAULT
    despecification: bool = True
    deduplication: bool = True
    dissimilarity: bool = True
    check_every: int = 1  # 1 = the paper (every step); k > 1 checks only every k-th step (cheaper)
    scale: SimilarityScale = field(default_factory=SimilarityScale)
    max_ratio: float = DISSIMILARITY_MAX_RATIO
    despecification_floor: float | None = None


@dataclass
class GuardRecord:
    """What the guard saw for one image (similarities on the embedder's own cosine scale)."""

    steps: list[int] = field(default_factory=list)  # sampling steps (0 = first) where the guard intervened
    sigmas: list[float] = field(default_factory=list)  # similarity at every checked step
    max_sigma: float = float("-inf")
    nearest_index: int = -1  # nearest training image at the step of max sigma
    nearest_file: str | None = None
    nearest_caption: str | None = None
    dup_caption: str | None = None  # the frequent caption deduplication steers from (authors' dup_caption)
    dedup_left: int = 0  # steps left in the deduplication window
    terms: dict = field(default_factory=lambda: {"despecification": 0, "deduplication": 0, "dissimilarity": 0})
    bounded_steps: int = 0  # steps where the dissimilarity term was cut to `max_ratio`

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
            "dup_caption": self.dup_caption,
            "terms": dict(self.terms),
            "bounded_steps": self.bounded_steps,
            "sigmas": list(self.sigmas),
        }


class AMGGuard:
    """Anti-Memorization Guidance for one batch of B images, as the authors' `p_sample_ddim` (formulas
    and line references: docs/methods.md).

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
        self.k = min(DEDUP_NEIGHBOURS, len(index.captions))

    def _x0(self, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a = self.core.alphas_cumprod[t]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def _search(self, query: torch.Tensor, rows: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-1 similarity [M], nearest [M]) of embedded estimates, updating each row's frequent caption:
        the most common caption among the 1000 nearest training images above lambda_t, when it occurs more
        than 20 times (txt2img.py l.255-265; kept once found, ddim.py l.283-284). Deviation: the authors'
        1000 nearest of LAION's billions are near-copies; of a small training set they can be all of it,
        so only neighbours above the threshold count."""
        sims, idx = self.index.search(query.detach(), k=self.k)
        above = self.config.scale(sims.double().cpu()) > self.config.threshold(t)
        for r, neighbours, keep in zip(rows, idx.tolist(), above.tolist(), strict=True):
            counts = Counter(self.index.captions[j] for j, ok in zip(neighbours, keep, strict=True) if ok)
            if counts and counts.most_common(1)[0][1] > DEDUP_MIN_COUNT:
                self.records[r].dup_caption = counts.most_common(1)[0][0]
        return sims[:, 0].float().cpu(), idx[:, 0].long().cpu()

    def nearest(self, latents: torch.Tensor, eps_hat: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B] cosine to the nearest training image, n0 [B]) of the decoded x0 estimate."""
        with torch.no_grad():
            query = self.embedder(decode_images(self.core, self._x0(latents, eps_hat, t)))
        return self._search(query, list(range(len(latents))), t)

    def similarity_gradient(
        self, latents: torch.Tensor, eps: torch.Tensor, t: int, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [M], grad_{x_t} sigma [M, ...]) of `rows` at prediction `eps`, through x0 = (x_t - sqrt(1 -
        abar) eps) / sqrt(abar), the VAE decoder and the embedder, `eps` held constant (txt2img.py l.243-313)."""
        x = latents[rows.to(latents.device)].detach().requires_grad_(True)
        with torch.enable_grad():
            query = self.embedder(decode_images(self.core, self._x0(x, eps[rows.to(eps.device)].detach(), t)))
            sigma, n0 = self._search(query, rows.tolist(), t)
            reference = self.index.embeddings[n0.to(self.index.embeddings.device)].to(query.device, query.dtype)
            (grad,) = torch.autograd.grad((query * reference).sum(), x)
        return sigma, grad.float()

    def _record(self, step: int, sigma: torch.Tensor, n0: torch.Tensor) -> None:
        for r, rec in enumerate(self.records):
            s = float(sigma[r])
            rec.sigmas.append(s)
            if s > rec.max_sigma:
                i = int(n0[r])
                rec.max_sigma, rec.nearest_index = s, i
                rec.nearest_file, rec.nearest_caption = self.index.file_names[i], self.index.captions[i]

    def guide(
        self, step: int, t: int, latents: torch.Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
        eps_hat: torch.Tensor, table: torch.Tensor, guidance_scale: float,
    ) -> torch.Tensor:
        cfg = self.config
        if step % max(1, int(cfg.check_every)):
            return eps_hat
        sigma, n0 = self.nearest(latents, eps_hat, t)
        self._record(step, sigma, n0)
        u, lam, s0 = cfg.scale(sigma.double()), cfg.threshold(t), float(guidance_scale)
        floor = lam if cfg.despecification_floor is None else cfg.despecification_floor
        b, dev = len(latents), eps_hat.device
        s1, s2 = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        dup: list[int] = []
        for r, rec in enumerate(self.records):
            fired = bool(u[r] > lam)
            if not u[r] > 0:  # ddim.py l.292: no guidance at all below similarity 0
                continue
            if cfg.deduplication and ((rec.dup_caption is not None and fired) or rec.dedup_left > 0):
                if rec.dup_caption is not None and fired:
                    rec.dedup_left = DEDUP_WINDOW  # ddim.py l.296-302: (re)start the 10-step window
                rec.dedup_left -= 1
                dup.append(r)
            if cfg.despecification and (bool(u[r] > floor) or r in dup):
                s1[r] = min(max(cfg.c1 * float(u[r]), 0.0), s0 - 1.0)  # ddim.py l.293
        for r in dup:  # ddim.py l.304: the adaptive c2 = (s0 - 1 - s1) / 0.3
            cap = max(s0 - 1.0 - float(s1[r]), 0.0)
            s2[r] = min(max(cap / DEDUP_FULL_AT * float(u[r]), 0.0), cap)
        guided = eps_hat - s1.to(dev, eps_hat.dtype).view(-1, 1, 1, 1) * (eps_cond - eps_uncond)
        if dup:
            captions = [self.records[r].dup_caption for r in dup]
            unique = sorted(set(captions))
            caption_table = self.encode(unique).to(self.core.device, self.core.dtype)
            rows = torch.tensor(dup)
            eps_caption = self.core.eps(latents, t, caption_table, rows, torch.tensor([unique.index(c) for c in captions]))
            scale = s2[rows].to(dev, eps_hat.dtype).view(-1, 1, 1, 1)
            guided[rows.to(dev)] = guided[rows.to(dev)] - scale * (eps_caption - eps_uncond[rows.to(dev)])
        changed = (s1 > 0) | (s2 > 0)
        candidates = (changed | (u > lam)).nonzero()[:, 0]
        if not cfg.dissimilarity or cfg.c3 == 0:
            candidates = candidates[:0]
        if not len(candidates) and not bool(changed.any()):
            return eps_hat  # nothing fired: the unguarded step, bit for bit
        bounded, sim_fired = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
        if len(candidates):
            sigma2, grad = self.similarity_gradient(latents, guided, t, candidates)
            u2 = cfg.scale(sigma2.double())
            fire2 = u2 > lam  # ddim.py l.318 / l.328: on the similarity after despecification and deduplication
            rows, u2, grad = candidates[fire2], u2[fire2], grad[fire2.to(grad.device)]
            if len(rows):
                a = self.core.alphas_cumprod[t]
                time_factor = math.exp((self.core.num_train_timesteps - t) / DISSIMILARITY_TIME)  # ddim.py l.319
                weight = cfg.c3 * (u2 - DISSIMILARITY_BASE) * time_factor * cfg.scale.slope
                term = weight.to(dev, torch.float32).view(-1, 1, 1, 1) * (1 - a).sqrt() * grad.to(dev)
                rd = rows.to(dev)
                if cfg.max_ratio > 0:  # the optional bound (off by default)
                    limit = cfg.max_ratio * guided[rd].float().flatten(1).norm(dim=1)
                    norm = term.flatten(1).norm(dim=1)
                    cut = norm > limit
                    term = term * torch.where(cut, limit / norm.clamp_min(1e-12), torch.ones_like(norm)).view(-1, 1, 1, 1)
                    bounded[rows] = cut.cpu()
                guided[rd] = guided[rd] + term.to(guided.dtype)
                sim_fired[rows] = True
        for r, rec in enumerate(self.records):
            terms = {"despecification": bool(s1[r] > 0), "deduplication": r in dup, "dissimilarity": bool(sim_fired[r])}
            if any(terms.values()):
                rec.steps.append(step)
                for name, on in terms.items():
                    rec.terms[name] += int(on)
                rec.bounded_steps += int(bounded[r])
        return guided


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


class AMG(Guard):
    """Anti-Memorization Guidance over a training-image `index` (module docstring); `embedder` embeds the
    clean estimates as the index was built (default: the index's own embedder, from `embedder_path` or the
    path stored in the index), `threshold` sets the trigger (`amg_trigger`)."""

    name = "amg"
    help = "Anti-Memorization Guidance (Chen et al. 2024, needs --index)"
    needs_index = True
    options = (
        Option("--guard-threshold", "threshold", help="AMG: the similarity at which a clean estimate triggers the "
               "guard, in (-1, 1); default: the authors' schedule for sscd, the index's calibration (`memtrain "
               "index --heldout`) for pixels / clip", low=-1.0, high=1.0, low_ok=False, high_ok=False,
               meaning="a cosine similarity in (-1, 1)"),
        Option("--embedder-path", "embedder_path", str, reads_file=True,
               help="CLIP model directory / SSCD TorchScript file for a clip/sscd index"),
        Option("--amg-c1", "c1", float, C1_DEFAULT, f"despecification scale, >= 0 (default {C1_DEFAULT:g}, the "
               "authors')", low=0.0, meaning=">= 0 (0 turns despecification off)"),
        Option("--amg-c3", "c3", float, C3_DEFAULT, f"dissimilarity scale, >= 0 (default {C3_DEFAULT:g}, the "
               "authors')", low=0.0, meaning=">= 0 (0 turns the dissimilarity term off)"),
        Option("--amg-max-ratio", "max_ratio", float, DISSIMILARITY_MAX_RATIO, "a bound on the dissimilarity "
               "term: its norm at most this multiple of the guided prediction's, e.g. 1 if guarded images saturate "
               "(default 0: unbounded, the authors' code)", low=0.0, meaning=">= 0 (0: no bound)"),
        Option("--amg-check-every", "check_every", int, 1, "check the similarity every k-th step only (default 1: "
               "every step, as the paper)", low=1, meaning="an integer >= 1 (1: every step)"),
    )

    def __init__(self, pipe, index=None, embedder=None, embedder_path=None, threshold=None, c1: float = C1_DEFAULT,
                 c3: float = C3_DEFAULT, despecification: bool = True, deduplication: bool = True,
                 dissimilarity: bool = True, check_every: int = 1, max_ratio: float = DISSIMILARITY_MAX_RATIO):
        check_index(index, pipe, guard=self.name)
        lam, scale = amg_trigger(index, threshold)
        self.pipe, self.index, self.trigger = pipe, index, scale.source
        self.config = AMGConfig(lam, c1, c3, despecification, deduplication, dissimilarity, check_every, scale,
                                max_ratio)
        if embedder is None:
            path = embedder_path or (index.meta or {}).get("embedder_path")
            embedder = make_embedder(index.embedding, path, pipe.device)
        self.embedder = embedder

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Training captions y_N through the pipeline's own `encode_prompt` (text-encoder LoRA applies)."""
        with torch.no_grad():
            return self.pipe.encode_prompt(captions, self.pipe.device, 1, False)[0]

    def start(self, core, prompts, cond, latents, n, num_inference_steps, negative_prompt) -> GuardRun:
        guard = AMGGuard(core, self.index, self.embedder, self.encode, self.config, len(cond))
        return GuardRun(cond, guard, lambda: [r.as_dict() for r in guard.records])

    def summarize(self, records: list[dict], steps: int) -> dict:
        return {"fraction_steps_intervened": sum(r["num_steps_intervened"] for r in records) / (len(records) * steps)}
