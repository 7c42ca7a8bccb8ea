"""Prompt memorization detectors, small functions over `trainer.core.unet_core`; higher = more
likely memorized, float64 scores in input-prompt order.

Implements the noise-prediction magnitude and token significance (Wen et al., ICLR 2024, "Detecting,
explaining, and mitigating memorization in diffusion models"), the anisotropy metric (Asthana &
Belagiannis, ICLR 2026, "Detecting and mitigating memorization in diffusion models through anisotropy
of the log-probability") and cross-attention entropy (Ren et al., ECCV 2024, "Unveiling and
mitigating memorization in text-to-image diffusion models through cross attention").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.core.attention import record_cross_attention, resolve_cross_attention, stack_records
from trainer.core.unet_core import (
    DEFAULT_BATCH_SIZE,
    UNetCore,
    check_n,
    cond_uncond_pairs,
    get_parts,
    group_size,
    groups,
    prompt_list,
    unique_prompts,
)
from trainer.io import MemtrainError

SD1_ENTROPY_LAYER = "down_blocks.1.attentions.1"  # Ren et al.: the 4th cross-attention layer of SD 1.x
# The anisotropy authors' published weights (g_norm, g_cos) per model family.
ANISOTROPY_WEIGHTS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1), "realistic-vision": (2.0, 1.0)}


# ---------------------------------------------------------------- Wen et al.


def _num_steps(steps: str | int, num_inference_steps: int) -> int:
    if steps == "first":
        return 1
    if steps == "all":
        return int(num_inference_steps)
    if isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= num_inference_steps:
        return steps
    raise MemtrainError(f'steps must be "first", "all" or an int in 1..{num_inference_steps}, got {steps!r}')


def noise_magnitude(
    components,
    prompts: str | Sequence[str],
    n: int = 1,
    steps: str | int = "first",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    reduce: bool = True,
    reuse_uncond: bool = False,
) -> torch.Tensor:
    """Text-conditional noise-prediction magnitude (Wen et al., ICLR 2024, "Detecting, explaining,
    and mitigating memorization in diffusion models").

    Score = mean over the first `steps` DDIM steps (eta 0, 50 steps, guidance 7.5 driving the
    trajectory only) and `n` generations of `||d(c)||`. `steps`: "first" (default, the authors'),
    an int k (the paper's other variant is 10) or "all"; 2 * k UNet evals per generation.
    Returns [P] (or [P, n, k] with `reduce=False`). `reuse_uncond=True` evaluates the first step's
    `eps(x_T, t, c0)` once per generation instead of once per prompt (identical values).
    """
    prompts = prompt_list(prompts)
    n = check_n(n)
    k = _num_steps(steps, num_inference_steps)
    core = UNetCore(components, batch_size)
    unique, inverse = unique_prompts(prompts)
    x_T = core.initial_noise(n, seed)
    scheduler = core.ddim(num_inference_steps)
    timesteps = scheduler.timesteps[:k]
    out = torch.empty(len(unique), n, k, dtype=torch.float64)
    for rows in groups(len(unique), group_size(core.batch_size, 2 * n)):
        table, index, e0 = core.encode_prompts(unique[rows])
        jobs = len(index) * n
        job_prompt, job_gen = index.repeat_interleave(n), torch.arange(n).repeat(len(index))
        latents, x_index = x_T, job_gen  # step 0: every prompt on the shared x_T
        for s, t in enumerate(timesteps):
            req_x, req_e = cond_uncond_pairs(x_index, job_prompt, e0)
            eps = core.eps(latents, int(t), table, req_x, req_e, dedupe=reuse_uncond and s == 0)
            cond, uncond = eps[0::2], eps[1::2]
            out[rows, :, s] = (cond - uncond).flatten(1).double().norm(dim=1).view(-1, n).cpu()
            if s + 1 < k:
                guided = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(guided, t, latents[x_index].float(), return_dict=False)[0]
                x_index = torch.arange(jobs)
    out = out[inverse]
    return out.mean(dim=(1, 2)) if reduce else out


@dataclass
class TokenAttribution:
    """Per-token significance of one prompt (Wen et al.)."""

    tokens: list[str]  # the prompt's tokens (BOS, EOS and padding excluded)
    scores: torch.Tensor  # [len(tokens)] significance of each token
    per_position: torch.Tensor  # [L] significance at every sequence position, BOS set to 0
    magnitude: float  # the first-step score mean_j ||d(c)|| it explains


def token_attribution(
    components,
    prompt: str,
    n: int = 1,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TokenAttribution:
    """Token-wise significance (Wen et al., ICLR 2024): the gradient of the first-step
    `||d(c)||` w.r.t. each token's embedding (the text-encoder output row of that token, as in the
    authors' code), significance = L2 norm of that gradient over the embedding dimension, averaged
    over the `n` generations (each generation's gradient is taken of its own norm). BOS is
    excluded (its significance is reported as 0). 2 UNet evals (+ backward) per generation.
    """
    if not isinstance(prompt, str):
        raise MemtrainError("token_attribution scores one prompt: pass a string")
    n = check_n(n)
    core = UNetCore(components, batch_size)
    ids = core.tokenize([prompt])
    table, index, e0 = core.encode_prompts(ids)
    cond = table[int(index[0])].detach().expand(n, -1, -1).clone().requires_grad_(True)
    embeddings = torch.cat([cond, table[e0 : e0 + 1].detach()])  # rows 0..n-1: cond per generation; n: c0
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    req_x, req_e = cond_uncond_pairs(torch.arange(n), torch.arange(n), n)
    eps = core.eps(core.initial_noise(n, seed), t0, embeddings, req_x, req_e, grad=True)
    norms = (eps[0::2] - eps[1::2]).flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norms.sum(), cond)
    per_position = grad.double().norm(dim=-1).mean(dim=0).cpu()
    per_position[0] = 0.0
    tokenizer = core.parts.tokenizer
    row = ids[0].tolist()
    end = row.index(tokenizer.eos_token_id, 1) if tokenizer.eos_token_id in row[1:] else len(row)
    tokens = tokenizer.convert_ids_to_tokens(row[1:end])
    return TokenAttribution(tokens, per_position[1:end].clone(), per_position, float(norms.detach().mean()))


# ---------------------------------------------------------------- Asthana & Belagiannis


@dataclass
class AnisotropyScores:
    M: torch.Tensor  # [P] the score g_norm * N + g_cos * C
    N: torch.Tensor  # [P] norm term ||d(c)|| at the first sampling timestep
    C: torch.Tensor  # [P] angular term cos(eps(c0), d(c)) at timesteps[-3]


def model_family(components) -> str:
    """"sd2" for a v-prediction model (the authors' SD 2 code path: SD 2.0 / 2.1 at 768 px), else "sd1"
    (epsilon models: SD 1.x, SD 2.x-base, tiny models). Realistic Vision is SD 1.x-shaped: name it
    explicitly (`family=`), as any other model whose published weights differ."""
    scheduler = get_parts(components).scheduler
    return "sd2" if scheduler.config.get("prediction_type") == "v_prediction" else "sd1"


def default_g_cos(components) -> float:
    """The published g_cos of the model's family (`model_family`): 2 for SD 1.x, 0.1 for SD 2.x (v-prediction)."""
    return ANISOTROPY_WEIGHTS[model_family(components)][1]


def anisotropy(
    components,
    prompts: str | Sequence[str],
    n: int = 1,
    g_norm: float | None = None,
    g_cos: float | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    cos_space: str | None = None,
    family: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    reuse_uncond: bool = False,
) -> AnisotropyScores:
    """Anisotropy metric (Asthana & Belagiannis, "Detecting and mitigating memorization in
    diffusion models through anisotropy of the log-probability", ICLR 2026; code
    rohanasthana/memorization-anisotropy). Denoising-free, on pure noise x_T only:
    N = ||d(c)|| at the first DDIM timestep t0, C = cos(eps(x_T, t', c0), d(c)) at t' = timesteps[-3]
    (over channels, averaged over positions), M = g_norm * N + g_cos * C, averaged over n generations;
    4 UNet evals per generation. (g_norm, g_cos) default to the authors' `ANISOTROPY_WEIGHTS[family]`,
    `family` to `model_family` (by prediction type). On v-prediction models N is taken, as in the
    authors' code, on their score (sqrt(abar) v - x) / (1 - abar): ||d(c)|| in epsilon space / (1 - abar_t0).
    `cos_space`: the reference code's choice by default (raw output for v-prediction models, else
    epsilon). `reuse_uncond`: see `noise_magnitude`.
    """
    prompts = prompt_list(prompts)
    n = check_n(n)
    core = UNetCore(components, batch_size)
    family = family or model_family(components)
    if family not in ANISOTROPY_WEIGHTS:
        raise MemtrainError(f"anisotropy: unknown model family {family!r}; choose from {', '.join(ANISOTROPY_WEIGHTS)}")
    g_norm = ANISOTROPY_WEIGHTS[family][0] if g_norm is None else float(g_norm)
    g_cos = ANISOTROPY_WEIGHTS[family][1] if g_cos is None else float(g_cos)
    if cos_space is None:
        cos_space = "model" if core.prediction_type == "v_prediction" else "epsilon"
    timesteps = core.sampling_timesteps(num_inference_steps)
    if len(timesteps) < 3:
        raise MemtrainError(f"anisotropy needs num_inference_steps >= 3, got {num_inference_steps}")
    t_norm, t_cos = int(timesteps[0]), int(timesteps[-3])
    # v-models: the authors' score difference is the epsilon-space one divided by 1 - abar_t0
    score_scale = 1.0 - float(core.alphas_cumprod[t_norm]) if core.prediction_type == "v_prediction" else 1.0
    unique, inverse = unique_prompts(prompts)
    x_T = core.initial_noise(n, seed)
    norm_term = torch.empty(len(unique), n, dtype=torch.float64)
    cos_term = torch.empty(len(unique), n, dtype=torch.float64)
    for rows in groups(len(unique), group_size(core.batch_size, 4 * n)):
        table, index, e0 = core.encode_prompts(unique[rows])
        req_x, req_e = cond_uncond_pairs(torch.arange(n).repeat(len(index)), index.repeat_interleave(n), e0)
        eps = core.eps(x_T, t_norm, table, req_x, req_e, dedupe=reuse_uncond).double()
        norm_term[rows] = (eps[0::2] - eps[1::2]).flatten(1).norm(dim=1).view(-1, n).cpu() / score_scale
        eps = core.eps(x_T, t_cos, table, req_x, req_e, space=cos_space, dedupe=reuse_uncond).double()
        uncond = eps[1::2]
        cos = F.cosine_similarity(uncond, eps[0::2] - uncond, dim=1)  # [jobs, H, W]
        cos_term[rows] = cos.flatten(1).mean(dim=1).view(-1, n).cpu()
    N, C = norm_term[inverse].mean(dim=1), cos_term[inverse].mean(dim=1)
    return AnisotropyScores(M=g_norm * N + g_cos * C, N=N, C=C)


# ---------------------------------------------------------------- Ren et al.


def attention_entropy(
    components,
    prompts: str | Sequence[str],
    n: int = 1,
    layer: str | int = SD1_ENTROPY_LAYER,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    return_distributions: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention entropy at the first step (Ren et al., ECCV 2024, "Unveiling and mitigating
    memorization in text-to-image diffusion models through cross attention").

    E = -sum_i a_i log a_i of the conditional branch's attention in `layer`, averaged over heads and
    pixels into a distribution a over the 77 tokens, then over the n generations; memorized prompts
    have higher entropy. 1 UNet eval per generation at the first DDIM timestep.
    `layer`: a module-name prefix (several attn2 modules are averaged) or an index into
    `cross_attention_modules(unet)`; default the authors' "down_blocks.1.attentions.1", or on small
    UNets that lack it the 4th cross-attention layer in forward order (the last if fewer).
    Returns [P]; with `return_distributions=True` also the distributions [P, n, L].
    """
    prompts = prompt_list(prompts)
    n = check_n(n)
    core = UNetCore(components, batch_size)
    names = resolve_cross_attention(core.parts.unet, layer, default=SD1_ENTROPY_LAYER)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    unique, inverse = unique_prompts(prompts)
    x_T = core.initial_noise(n, seed)
    dists = []
    with record_cross_attention(core.parts.unet, names) as records:
        for rows in groups(len(unique), group_size(core.batch_size, n)):
            table, index, _ = core.encode_prompts(unique[rows])
            core.eps(x_T, t0, table, torch.arange(n).repeat(len(index)), index.repeat_interleave(n))
            dists.append(stack_records(records).mean(dim=0).double().cpu())
            for chunks in records.values():
                chunks.clear()
    dist = torch.cat(dists).view(len(unique), n, -1)[inverse]
    entropy = -torch.special.xlogy(dist, dist).sum(dim=-1).mean(dim=1)
    return (entropy, dist) if return_distributions else entropy
