"""CLiD membership inference (Zhai et al., NeurIPS 2024, "Membership inference on text-to-image diffusion
models via conditional likelihood discrepancy"), as functions over `trainer.core.unet_core`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.preprocessing import RobustScaler

from trainer.core.attention import cross_attention_modules, record_cross_attention, stack_records
from trainer.core.unet_core import (
    DEFAULT_BATCH_SIZE,
    UNetCore,
    encode_latents,
    group_size,
    groups,
    looks_like_images,
)
from trainer.io import MemtrainError
from trainer.measure.metrics import auroc, tpr_at_fpr

CLID_TIMESTEPS = (440, 450, 460)


CLID_REPLACE_FRACTIONS = (0.3, 0.5, 0.7)


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
    diffusion models via conditional likelihood discrepancy"): [N, k + 1] = (D_1..D_k, L), larger =
    more likely a member; 15 UNet evals per sample by default (formulas: docs/methods.md).

    Reduced conditions: the caption with its top `replace_fractions` of words (round-half-up, at least
    one) set to the end-of-text token, and the empty caption; one noise per timestep shared by all
    conditions and samples. `word_importance`: "attention" (deviation: cross-attention mass of the
    full caption's evals instead of attention attribution, at no extra UNet cost) or per-word scores,
    one list per caption aligned with `caption_words`. `images_or_latents`: pixels in [-1, 1] (VAE
    posterior sample, `unet_core.encode_latents`) or scaled latents; `is_latents` None decides by
    channel count.
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
    for rows in groups(len(captions), group_size(core.batch_size, 5 * T)):
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
    if not 0.0 <= float(alpha) <= 1.0:
        raise MemtrainError(f"alpha must lie in [0, 1], got {alpha}")
    scaler = RobustScaler().fit(_th_columns(_as_2d(reference_features, "reference_features")))
    scaled = scaler.transform(_th_columns(_as_2d(features, "features")))
    return float(alpha) * scaled[:, 0] + (1.0 - float(alpha)) * scaled[:, 1]


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
        value = auroc(scores, y) if metric == "auroc" else tpr_at_fpr(scores, y)
        if value > best + 1e-12:
            best_alpha, best = float(alpha), value
    return best_alpha


def clid_vec_classifier(features, labels, seed: int = 0, **params):
    """CLiD_vec (Zhai et al.): a small sklearn GradientBoostingClassifier (100 trees of depth 3 by
    default; `params` override) trained on the vectors (D_1..D_k, L) of a labelled shadow split.
    Score new samples with `clid_vec_scores`."""
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
