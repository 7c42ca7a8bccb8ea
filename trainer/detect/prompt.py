"""Memorization detectors and CLiD membership inference, as small functions over `trainer.unet_core`.

Every score follows one convention: HIGHER = more likely memorized (prompt detectors) or more
likely a training member (CLiD). No detector needed a sign flip: memorized prompts have a larger
text-conditional noise norm (Wen), a larger norm and a larger uncond/guidance alignment
(anisotropy), a HIGHER cross-attention entropy (Ren: non-memorized prompts concentrate on BOS),
and members have a larger condition discrepancy and a smaller loss (CLiD uses L = -loss).

Notation as in METHODS.md: `d(c) = eps(x_t, t, c) - eps(x_t, t, c0)`, c0 the empty caption, norms
are L2 over the whole flattened latent. Noise predictions are in epsilon space (v-prediction
models are converted with the scheduler's alphas, see `unet_core`). Generation j of every prompt
starts from the same x_T (seed `seed + j`, the `memtrain generate` convention). Each detector
makes exactly the UNet evaluations its method needs; `unet_core.count_evals()` counts them.
Scores are float64 CPU tensors in the order of the input prompts (duplicate prompts are scored
once and share the score). `batch_size` is the number of samples per UNet forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.core.unet_core import (
    DEFAULT_BATCH_SIZE,
    UNetCore,
    cross_attention_modules,
    encode_latents,
    get_parts,
    groups,
    looks_like_images,
    record_cross_attention,
    resolve_cross_attention,
    stack_records,
)
from trainer.io import MemtrainError

SD1_ENTROPY_LAYER = "down_blocks.1.attentions.1"  # Ren et al.: the 4th cross-attention layer of SD 1.x
CLID_TIMESTEPS = (440, 450, 460)
CLID_REPLACE_FRACTIONS = (0.3, 0.5, 0.7)
G_COS_SD1, G_COS_SD2 = 2.0, 0.1


# ---------------------------------------------------------------- helpers


def _prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise MemtrainError("no prompts given: pass at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise MemtrainError(f"prompts must be strings; entries {bad[:5]} are not")
    return prompts


def _unique(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    first: dict[str, int] = {}
    inverse = torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.long)
    return list(first), inverse


def _check_n(n: int) -> int:
    if int(n) < 1:
        raise MemtrainError(f"n (generations per prompt) must be >= 1, got {n}")
    return int(n)


def _group_size(batch_size: int, evals_per_item: int) -> int:
    """Items per group: about 32 full UNet batches, bounding memory for long prompt lists."""
    return max(1, (32 * batch_size) // max(1, evals_per_item))


def _pairs(x_index: torch.Tensor, e_index: torch.Tensor, e0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved (cond, uncond) requests for each job: x index twice, embedding (cond, c0)."""
    return x_index.repeat_interleave(2), torch.stack([e_index, torch.full_like(e_index, e0)], 1).flatten()


# ---------------------------------------------------------------- 1.1 Wen et al.


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

    Score = mean over the first `steps` DDIM steps and `n` generations of `||d(c)||`, recorded
    during ordinary classifier-free-guidance DDIM sampling (eta 0, `num_inference_steps` = 50,
    `guidance_scale` = 7.5; the guided prediction `eps(c0) + s * d(c)` only drives the trajectory,
    the scale is NOT applied to the norm). `steps`: "first" (default, the cheapest: 2 UNet evals
    per generation), an int k (first k steps; the paper's other variant is 10), or "all".
    Authors' defaults: n = 1 (also 4, 16), first step. Costs 2 * k UNet evals per generation.

    Returns [P] (or [P, n, k] per generation and step with `reduce=False`). `reuse_uncond=True`
    evaluates the first step's `eps(x_T, t, c0)` once per generation instead of once per prompt
    (identical values, since x_T is shared by all prompts) - fewer evals than the method's count.
    """
    prompts = _prompts(prompts)
    n = _check_n(n)
    k = _num_steps(steps, num_inference_steps)
    core = UNetCore(components, batch_size)
    unique, inverse = _unique(prompts)
    x_T = core.initial_noise(n, seed)
    scheduler = core.ddim(num_inference_steps)
    timesteps = scheduler.timesteps[:k]
    out = torch.empty(len(unique), n, k, dtype=torch.float64)
    for rows in groups(len(unique), _group_size(core.batch_size, 2 * n)):
        table, index, e0 = core.encode_prompts(unique[rows])
        jobs = len(index) * n
        job_prompt, job_gen = index.repeat_interleave(n), torch.arange(n).repeat(len(index))
        latents, x_index = x_T, job_gen  # step 0: every prompt on the shared x_T
        for s, t in enumerate(timesteps):
            req_x, req_e = _pairs(x_index, job_prompt, e0)
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
    n = _check_n(n)
    core = UNetCore(components, batch_size)
    ids = core.tokenize([prompt])
    table, index, e0 = core.encode_prompts(ids)
    cond = table[int(index[0])].detach().expand(n, -1, -1).clone().requires_grad_(True)
    embeddings = torch.cat([cond, table[e0 : e0 + 1].detach()])  # rows 0..n-1: cond per generation; n: c0
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    req_x, req_e = _pairs(torch.arange(n), torch.arange(n), n)
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


# ---------------------------------------------------------------- 1.2 Asthana & Belagiannis


@dataclass
class AnisotropyScores:
    M: torch.Tensor  # [P] the score g_norm * N + g_cos * C
    N: torch.Tensor  # [P] norm term ||d(c)|| at the first sampling timestep
    C: torch.Tensor  # [P] angular term cos(eps(c0), d(c)) at timesteps[-3]


def default_g_cos(components) -> float:
    """2.0 for SD1-like models, 0.1 for SD2-like: decided by the UNet's cross_attention_dim
    (1024 = OpenCLIP ViT-H text encoder of SD 2.x -> 0.1; anything else, incl. 768 and tiny toys -> 2.0).
    """
    dim = get_parts(components).unet.config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    return G_COS_SD2 if dim == 1024 else G_COS_SD1


def anisotropy(
    components,
    prompts: str | Sequence[str],
    n: int = 1,
    g_norm: float = 1.0,
    g_cos: float | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    cos_space: str = "epsilon",
    batch_size: int = DEFAULT_BATCH_SIZE,
    reuse_uncond: bool = False,
) -> AnisotropyScores:
    """Anisotropy metric (Asthana & Belagiannis, "Detecting and mitigating memorization in
    diffusion models through anisotropy of the log-probability", ICLR 2026; code
    rohanasthana/memorization-anisotropy). Denoising-free, on pure noise x_T only:

    - N = ||d(c)|| at the first DDIM timestep (981 for 50 steps on SD 1.x);
    - C = cos(eps(x_T, t', c0), d(c)) on the SAME x_T at t' = timesteps[-3] (41), the cosine taken
      over the latent channel axis at each spatial position, averaged over positions;
    - M = g_norm * N + g_cos * C; each term averaged over the n generations.

    Defaults: g_norm = 1, g_cos = `default_g_cos` (2 for SD v1.4, 0.1 for SD v2), n = 1, the same
    x_T seed for every prompt. Exactly 4 UNet evals per generation, in 2 batched calls (one per
    timestep). `cos_space="model"` takes the cosine on raw v-predictions, as the reference code
    does for SD 2 (for epsilon models both spaces are identical); the norm is in epsilon space,
    which for v-models equals the reference's score difference up to 1/(1-abar_981) ~ 1.005.
    `reuse_uncond`: see `noise_magnitude`.
    """
    prompts = _prompts(prompts)
    n = _check_n(n)
    core = UNetCore(components, batch_size)
    g_cos = default_g_cos(components) if g_cos is None else float(g_cos)
    timesteps = core.sampling_timesteps(num_inference_steps)
    if len(timesteps) < 3:
        raise MemtrainError(f"anisotropy needs num_inference_steps >= 3, got {num_inference_steps}")
    t_norm, t_cos = int(timesteps[0]), int(timesteps[-3])
    unique, inverse = _unique(prompts)
    x_T = core.initial_noise(n, seed)
    norm_term = torch.empty(len(unique), n, dtype=torch.float64)
    cos_term = torch.empty(len(unique), n, dtype=torch.float64)
    for rows in groups(len(unique), _group_size(core.batch_size, 4 * n)):
        table, index, e0 = core.encode_prompts(unique[rows])
        req_x, req_e = _pairs(torch.arange(n).repeat(len(index)), index.repeat_interleave(n), e0)
        eps = core.eps(x_T, t_norm, table, req_x, req_e, dedupe=reuse_uncond).double()
        norm_term[rows] = (eps[0::2] - eps[1::2]).flatten(1).norm(dim=1).view(-1, n).cpu()
        eps = core.eps(x_T, t_cos, table, req_x, req_e, space=cos_space, dedupe=reuse_uncond).double()
        uncond = eps[1::2]
        cos = F.cosine_similarity(uncond, eps[0::2] - uncond, dim=1)  # [jobs, H, W]
        cos_term[rows] = cos.flatten(1).mean(dim=1).view(-1, n).cpu()
    N, C = norm_term[inverse].mean(dim=1), cos_term[inverse].mean(dim=1)
    return AnisotropyScores(M=g_norm * N + g_cos * C, N=N, C=C)


# ---------------------------------------------------------------- 1.3 Ren et al.


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

    The conditional branch's softmax attention in `layer` is averaged over heads and pixels into a
    distribution a over the L = 77 tokens; E = -sum_i a_i log a_i (natural log), averaged over the
    n generations (x_T as everywhere). Memorized prompts have HIGHER entropy, so E is the score.
    Only the conditional branch is needed: 1 UNet eval per generation at the first DDIM timestep.

    `layer` (default "down_blocks.1.attentions.1", the 4th cross-attention layer of SD 1.x, the
    authors' choice) is a module-name prefix or an index into `cross_attention_modules(unet)`
    (forward order: down, mid, up). Small UNets (e.g. layers_per_block=1) lack the default; then
    the 4th cross-attention layer in forward order is used, or the last one if there are fewer.
    If a prefix holds several attn2 modules their distributions are averaged. The recording
    processor is set only on those modules and the original processors are restored afterwards.

    Returns [P]; with `return_distributions=True` also the distributions [P, n, L].
    """
    prompts = _prompts(prompts)
    n = _check_n(n)
    core = UNetCore(components, batch_size)
    names = resolve_cross_attention(core.parts.unet, layer, default=SD1_ENTROPY_LAYER)
    t0 = int(core.sampling_timesteps(num_inference_steps)[0])
    unique, inverse = _unique(prompts)
    x_T = core.initial_noise(n, seed)
    dists = []
    with record_cross_attention(core.parts.unet, names) as records:
        for rows in groups(len(unique), _group_size(core.batch_size, n)):
            table, index, _ = core.encode_prompts(unique[rows])
            core.eps(x_T, t0, table, torch.arange(n).repeat(len(index)), index.repeat_interleave(n))
            dists.append(stack_records(records).mean(dim=0).double().cpu())
            for chunks in records.values():
                chunks.clear()
    dist = torch.cat(dists).view(len(unique), n, -1)[inverse]
    entropy = -torch.special.xlogy(dist, dist).sum(dim=-1).mean(dim=1)
    return (entropy, dist) if return_distributions else entropy


# ---------------------------------------------------------------- 1.4 CLiD (Zhai et al.)


def caption_words(tokenizer, caption: str) -> list[list[int]]:
    """Token positions (in the padded ids, BOS = 0) of each whitespace-separated word of `caption`.

    Falls back to one "word" per token when word-by-word tokenization differs from the caption's.
    Words cut off by the 77-token truncation are dropped (they are not in the condition).
    """
    full = tokenizer(caption, add_special_tokens=False).input_ids
    per_word = [tokenizer(w, add_special_tokens=False).input_ids for w in caption.split()]
    if [t for w in per_word for t in w] != full:
        per_word = [[t] for t in full]
    last = tokenizer.model_max_length - 2  # the last content position before EOS
    words, pos = [], 1
    for w in per_word:
        positions = [p for p in range(pos, pos + len(w)) if p <= last]
        if positions:
            words.append(positions)
        pos += len(w)
    return words


def _reduced_ids(
    ids: torch.Tensor,
    words: list[list[int]],
    importance: Sequence[float],
    fractions: Sequence[float],
    eos: int,
) -> list[torch.Tensor]:
    """The caption with its top round(f * words) (at least 1) most important words set to EOS, per f."""
    order = sorted(range(len(words)), key=lambda w: -float(importance[w]))  # stable: ties by position
    out = []
    for f in fractions:
        count = min(len(words), max(1, int(math.floor(f * len(words) + 0.5)))) if words else 0
        reduced = ids.clone()
        for w in order[:count]:
            reduced[words[w]] = eos
        out.append(reduced)
    return out


def clid_features(
    components,
    images_or_latents: torch.Tensor,
    captions: Sequence[str],
    timesteps: Sequence[int] = CLID_TIMESTEPS,
    replace_fractions: Sequence[float] = CLID_REPLACE_FRACTIONS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    word_importance: str | Sequence[Sequence[float]] = "attention",
    is_latents: bool | None = None,
) -> torch.Tensor:
    """CLiD feature vectors (Zhai et al., NeurIPS 2024, "Membership inference on text-to-image
    diffusion models via conditional likelihood discrepancy"): [N, k + 1] = (D_1..D_k, L).

    Reduced conditions c*_1..c*_k (k = len(replace_fractions) + 1 = 4 by default): the caption with
    its top 30 / 50 / 70 % most important words replaced by the end-of-text token (round-half-up
    of the fraction times the number of words, at least one word), and the empty caption c0. With
    one noise eps_t per timestep t in {440, 450, 460}, shared by all conditions (and all samples),
    x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps_t and
    `D_i = mean_t ||eps(x_t,t,c*_i) - eps_t||^2 - ||eps(x_t,t,c) - eps_t||^2`,
    `L = -mean_t ||eps(x_t,t,c) - eps_t||^2` (squared L2 over the whole latent). Exactly
    3 + 4 * 3 = 15 UNet evals per sample. Larger D and L = more likely a member.

    Word importance (the authors used attention attribution) uses a cheaper proxy by default,
    CROSS-ATTENTION MASS: the conditional branch's attention to each token, averaged over every
    cross-attention layer, head, pixel and the 3 timesteps of the 3 evals of the full caption
    (recorded during those evals, so it costs no extra UNet evaluation); a word's importance is
    the sum over its tokens (`caption_words`). Alternatively pass per-word scores, one list per
    caption aligned with `caption_words`.

    `images_or_latents`: pixel values in [-1, 1] (encoded with the VAE posterior SAMPLE, see
    `unet_core.encode_latents`) or latents already scaled by the VAE scaling factor; `is_latents`
    None decides by channel count.
    """
    captions = list(captions)
    x = images_or_latents
    if not torch.is_tensor(x) or x.dim() != 4:
        raise MemtrainError("clid_features: images_or_latents must be a tensor [N, C, H, W]")
    if len(captions) != len(x):
        raise MemtrainError(
            f"clid_features: {len(x)} images but {len(captions)} captions; give one caption each"
        )
    timesteps = [int(t) for t in timesteps]
    core = UNetCore(components, batch_size)
    if not all(0 <= t < core.num_train_timesteps for t in timesteps):
        raise MemtrainError(f"CLiD timesteps must lie in [0, {core.num_train_timesteps}), got {timesteps}")
    if not all(0 < f <= 1 for f in replace_fractions):
        raise MemtrainError(f"replace_fractions must lie in (0, 1], got {list(replace_fractions)}")
    attention = isinstance(word_importance, str)
    if attention and word_importance != "attention":
        raise MemtrainError(
            f'word_importance must be "attention" or per-word scores, got {word_importance!r}'
        )
    if not attention and len(word_importance) != len(captions):
        raise MemtrainError("word_importance: give one list of per-word scores per caption")
    if is_latents is None:
        is_latents = not looks_like_images(components, x)
    latents = (
        x.float().to(core.device) if is_latents else encode_latents(components, x, seed, core.batch_size)
    )
    T, k = len(timesteps), len(replace_fractions) + 1
    noise = torch.randn((T, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(int(seed)))
    noise = noise.to(core.device)
    t_all = torch.tensor(timesteps)
    tokenizer, unet = core.parts.tokenizer, core.parts.unet
    all_layers = cross_attention_modules(unet) if attention else []
    features = torch.empty(len(captions), k + 1, dtype=torch.float64)
    for rows in groups(len(captions), _group_size(core.batch_size, 5 * T)):
        G = rows.stop - rows.start
        ids = core.tokenize(captions[rows])
        table, index, e0 = core.encode_prompts(ids)
        # x_t for (sample i, timestep j) at row i * T + j
        x_t = core.add_noise(latents[rows].repeat_interleave(T, 0), noise.repeat(G, 1, 1, 1), t_all.repeat(G))
        target = noise.repeat(G, 1, 1, 1)
        req_x, req_t = torch.arange(G * T), t_all.repeat(G)
        with record_cross_attention(unet, all_layers) as records:
            eps_c = core.eps(x_t, req_t, table, req_x, index.repeat_interleave(T))
        err_c = (eps_c - target).double().flatten(1).pow(2).sum(dim=1).view(G, T).cpu()
        mass = stack_records(records).mean(dim=0).view(G, T, -1).mean(dim=1).cpu() if attention else None
        reduced = []
        for i in range(G):
            words = caption_words(tokenizer, captions[rows.start + i])
            if attention:
                scores = [float(mass[i, w].sum()) for w in words]
            else:
                scores = list(word_importance[rows.start + i])
                if len(scores) != len(words):
                    raise MemtrainError(
                        f"word_importance[{rows.start + i}] has {len(scores)} scores but the caption has "
                        f"{len(words)} words (see caption_words)"
                    )
            reduced += _reduced_ids(ids[i], words, scores, replace_fractions, tokenizer.eos_token_id)
        red_table, red_index, red_e0 = core.encode_prompts(torch.stack(reduced))
        cond = torch.cat([red_index.view(G, k - 1), torch.full((G, 1), red_e0)], dim=1)  # [G, k]
        # requests for (sample i, condition m, timestep j)
        rx = (torch.arange(G)[:, None, None] * T + torch.arange(T)[None, None, :]).expand(G, k, T).flatten()
        re = cond[:, :, None].expand(G, k, T).flatten()
        eps_r = core.eps(x_t, t_all.repeat(G * k), red_table, rx, re)
        err_r = (
            (eps_r - target[rx.to(target.device)]).double().flatten(1).pow(2).sum(dim=1).view(G, k, T).cpu()
        )
        features[rows, :k] = (err_r - err_c[:, None, :]).mean(dim=2)
        features[rows, k] = -err_c.mean(dim=1)
    return features


def _as_2d(features, what: str) -> np.ndarray:
    f = (
        features.detach().cpu().double().numpy()
        if torch.is_tensor(features)
        else np.asarray(features, np.float64)
    )
    if f.ndim != 2 or f.shape[1] < 2:
        raise MemtrainError(
            f"{what} must be CLiD feature vectors [N, k + 1] (D_1..D_k, L), got shape {f.shape}"
        )
    return f


def _th_columns(features: np.ndarray) -> np.ndarray:
    return np.stack([features[:, :-1].mean(axis=1), features[:, -1]], axis=1)


def clid_th_scores(features, reference_features, alpha: float) -> np.ndarray:
    """CLiD_th (Zhai et al.): `alpha * S(mean_i D_i) + (1 - alpha) * S(L)`, S a robust scaler
    (sklearn RobustScaler: median / IQR) fitted on `reference_features`. Higher = member."""
    from sklearn.preprocessing import RobustScaler

    if not 0.0 <= float(alpha) <= 1.0:
        raise MemtrainError(f"alpha must lie in [0, 1], got {alpha}")
    scaler = RobustScaler().fit(_th_columns(_as_2d(reference_features, "reference_features")))
    scaled = scaler.transform(_th_columns(_as_2d(features, "features")))
    return float(alpha) * scaled[:, 0] + (1.0 - float(alpha)) * scaled[:, 1]


def _tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01) -> float:
    from sklearn.metrics import roc_curve

    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr].max())


def fit_clid_alpha(
    features,
    labels,
    reference_features=None,
    alphas: Sequence[float] | None = None,
    metric: str = "auroc",
) -> float:
    """Choose CLiD_th's alpha on a labelled shadow / reference split (Zhai et al.).

    Scores `features` (labels 1 = member) with `clid_th_scores` for every alpha of the grid
    (default 0, 0.05, ..., 1), the scaler fitted on `reference_features` (default: the split
    itself), and returns the alpha with the best `metric`: "auroc" or "tpr@1%fpr" (largest TPR
    at FPR <= 1%); ties go to the smallest alpha.
    """
    from sklearn.metrics import roc_auc_score

    f = _as_2d(features, "features")
    y = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64).ravel()
    if y.shape[0] != f.shape[0] or not set(np.unique(y)) == {0, 1}:
        raise MemtrainError(
            "fit_clid_alpha needs one 0/1 label per feature vector, with both classes present"
        )
    if metric not in ("auroc", "tpr@1%fpr"):
        raise MemtrainError(f'metric must be "auroc" or "tpr@1%fpr", got {metric!r}')
    reference = f if reference_features is None else reference_features
    grid = np.linspace(0.0, 1.0, 21) if alphas is None else np.asarray(alphas, np.float64)
    best_alpha, best = float(grid[0]), -np.inf
    for alpha in grid:
        scores = clid_th_scores(f, reference, float(alpha))
        value = roc_auc_score(y, scores) if metric == "auroc" else _tpr_at_fpr(scores, y)
        if value > best + 1e-12:
            best_alpha, best = float(alpha), value
    return best_alpha


def clid_vec_classifier(features, labels, seed: int = 0, **params):
    """CLiD_vec (Zhai et al.): a small sklearn GradientBoostingClassifier (100 trees of depth 3 by
    default; `params` override) trained on the vectors (D_1..D_k, L) of a labelled shadow split.
    Score new samples with `clid_vec_scores`."""
    from sklearn.ensemble import GradientBoostingClassifier

    f = _as_2d(features, "features")
    y = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64).ravel()
    if y.shape[0] != f.shape[0] or not set(np.unique(y)) == {0, 1}:
        raise MemtrainError(
            "clid_vec_classifier needs one 0/1 label per feature vector, with both classes present"
        )
    options = dict(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=seed)
    options.update(params)
    return GradientBoostingClassifier(**options).fit(f, y)


def clid_vec_scores(classifier, features) -> np.ndarray:
    """Member probability of each vector under a `clid_vec_classifier` (higher = member)."""
    return classifier.predict_proba(_as_2d(features, "features"))[:, 1]
