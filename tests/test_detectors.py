"""Detectors against direct, independent computations of the METHODS.md formulas on a tiny random model.

The reference values here call the UNet / text encoder / VAE directly, one sample at a time, and
restate the conventions (x_T of generation j from seed + j; epsilon space; DDIM 50 steps).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import trainer.detect as D
from trainer.core import attention as A
from trainer.core import unet_core as U
from trainer.detect import clid as C
from trainer.detect import prompt as P
from trainer.io import MemtrainError
from trainer.toy.base import SD_SCHEDULE, TinySize, build_components, build_tokenizer

# SD 1.x's own scheduler config ("leading" spacing: 981, 961, ..., 1); the toy base samples "trailing"
SD1_SCHEDULE = {**SD_SCHEDULE, "timestep_spacing": "leading"}

WORDS = "a an the cat dog bird on mat red blue green photo of painting sitting tree house river".split()
PROMPTS = ["a cat on the mat", "a red dog", "photo of a blue bird sitting on the tree", "painting"]
SIZE = TinySize(
    image_size=16,
    vae_channels=(32, 64),
    latent_channels=4,
    unet_channels=(32, 64),
    text_dim=32,
    text_layers=1,
)
RTOL, ATOL = 1e-4, 1e-6
COS_ATOL = 5e-5  # the angular term divides by tiny guidance vectors of a random model: float32 noise

torch.set_num_threads(1)


def _build(prediction_type: str = "epsilon") -> dict:
    tokenizer = build_tokenizer(WORDS)
    parts = build_components(tokenizer, SIZE, seed=0)
    parts["scheduler"] = DDIMScheduler(**SD1_SCHEDULE, prediction_type=prediction_type)
    for name in ("unet", "text_encoder", "vae"):
        parts[name].eval()
    return parts


@contextlib.contextmanager
def counted(parts: dict):
    """The library's counter (`count_evals`) inside this test's own forward pre-hook on the UNet: on leaving,
    the samples the UNet itself received must be the counter's `unet_evals` (and its calls `unet_calls`)."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(int((args[0] if args else kwargs["sample"]).shape[0]))

    handle = parts["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with U.count_evals() as c:
            yield c
    finally:
        handle.remove()
    assert (sum(seen), len(seen)) == (c.unet_evals, c.unet_calls), (seen, c)


@pytest.fixture(scope="module")
def model() -> dict:
    return _build()


@pytest.fixture(scope="module")
def vmodel() -> dict:
    return _build("v_prediction")


# ---------------------------------------------------------------- independent reference pieces


def embed(parts, prompt: str) -> torch.Tensor:
    tok = parts["tokenizer"]
    ids = tok(
        [prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return parts["text_encoder"](ids.input_ids)[0]


def embed_ids(parts, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return parts["text_encoder"](ids[None])[0]


def x_T(parts, j: int, seed: int = 0) -> torch.Tensor:
    cfg = parts["unet"].config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + j))


def eps(parts, x: torch.Tensor, t: int, e: torch.Tensor, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        out = parts["unet"](x, torch.tensor([t]), encoder_hidden_states=e).sample
    if parts["scheduler"].config.prediction_type == "v_prediction":
        a = parts["scheduler"].alphas_cumprod[t]
        out = a.sqrt() * out + (1 - a).sqrt() * x
    return out


def first_t(num_inference_steps: int = 50) -> int:
    s = DDIMScheduler(**SD1_SCHEDULE)
    s.set_timesteps(num_inference_steps)
    return int(s.timesteps[0])


# ---------------------------------------------------------------- Wen et al.


def test_ddim_timesteps_are_sd_schedule(model):
    ts = U.UNetCore(model).sampling_timesteps(50)
    assert int(ts[0]) == 981 and int(ts[-3]) == 41 and int(ts[-1]) == 1


def test_noise_magnitude_first_step_matches_direct(model):
    n = 2
    c0 = embed(model, "")
    expected = []
    for p in PROMPTS:
        c = embed(model, p)
        norms = [
            (eps(model, x_T(model, j), 981, c) - eps(model, x_T(model, j), 981, c0)).norm() for j in range(n)
        ]
        expected.append(torch.stack(norms).mean())
    got = D.noise_magnitude(model, PROMPTS, n=n)
    torch.testing.assert_close(got, torch.stack(expected).double(), rtol=RTOL, atol=ATOL)


def test_noise_magnitude_k_steps_matches_manual_cfg_ddim(model):
    n, k, scale = 2, 3, 7.5
    scheduler = DDIMScheduler(**SD1_SCHEDULE)
    scheduler.set_timesteps(50)
    c0 = embed(model, "")
    expected = []
    for p in PROMPTS[:2]:
        c = embed(model, p)
        per_gen = []
        for j in range(n):
            x, norms = x_T(model, j), []
            for t in scheduler.timesteps[:k]:
                ec, eu = eps(model, x, int(t), c), eps(model, x, int(t), c0)
                norms.append((ec - eu).norm())
                x = scheduler.step(eu + scale * (ec - eu), t, x).prev_sample
            per_gen.append(torch.stack(norms))
        expected.append(torch.stack(per_gen))
    got = D.noise_magnitude(model, PROMPTS[:2], n=n, steps=k, reduce=False)
    assert got.shape == (2, n, k)
    torch.testing.assert_close(got, torch.stack(expected).double(), rtol=RTOL, atol=ATOL)
    scores = D.noise_magnitude(model, PROMPTS[:2], n=n, steps=k)
    torch.testing.assert_close(scores, got.mean(dim=(1, 2)))


def test_noise_magnitude_eval_counts_and_text_encoding(model):
    n = 3
    with counted(model) as c:
        D.noise_magnitude(model, PROMPTS, n=n)
    assert c.unet_evals == 2 * n * len(PROMPTS)
    assert c.text_rows == len(PROMPTS) + 1  # each prompt once, c0 once
    with counted(model) as c:
        D.noise_magnitude(model, PROMPTS[:2], n=1, steps=4)
    assert c.unet_evals == 2 * 4 * 2
    with counted(model) as c:  # duplicate prompts cost nothing extra and share the score
        scores = D.noise_magnitude(model, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], n=1)
    assert c.unet_evals == 4 and c.text_rows == 3
    assert scores[0] == scores[2]


def test_reuse_uncond_same_values_fewer_evals(model):
    n = 2
    base = D.noise_magnitude(model, PROMPTS, n=n)
    with counted(model) as c:
        shared = D.noise_magnitude(model, PROMPTS, n=n, reuse_uncond=True)
    assert c.unet_evals == n * len(PROMPTS) + n
    torch.testing.assert_close(shared, base, rtol=RTOL, atol=ATOL)
    with counted(model) as c:
        a = D.anisotropy(model, PROMPTS, n=n, reuse_uncond=True)
    assert c.unet_evals == 2 * (n * len(PROMPTS) + n)
    torch.testing.assert_close(a.M, D.anisotropy(model, PROMPTS, n=n).M, rtol=RTOL, atol=COS_ATOL)


def test_token_attribution_matches_direct_gradient(model):
    n, prompt = 2, PROMPTS[0]
    c = embed(model, prompt)
    c0 = embed(model, "")
    leaf = c.expand(n, -1, -1).clone().requires_grad_(True)
    total = 0
    for j in range(n):
        d = eps(model, x_T(model, j), 981, leaf[j : j + 1], grad=True) - eps(model, x_T(model, j), 981, c0)
        total = total + d.norm()
    (g,) = torch.autograd.grad(total, leaf)
    expected = g.norm(dim=-1).mean(dim=0).double()
    expected[0] = 0
    with counted(model) as count:
        got = D.token_attribution(model, prompt, n=n)
    assert count.unet_evals == 2 * n  # first step: each generation's conditional (with gradient) and unconditional
    torch.testing.assert_close(got.per_position, expected, rtol=1e-3, atol=1e-7)
    assert got.per_position[0] == 0
    assert got.tokens == ["a</w>", "cat</w>", "on</w>", "the</w>", "mat</w>"]
    torch.testing.assert_close(got.scores, expected[1:6], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(
        got.magnitude, float(D.noise_magnitude(model, [prompt], n=n)[0]), rtol=RTOL, atol=ATOL
    )


# ---------------------------------------------------------------- anisotropy


def test_anisotropy_matches_direct(model):
    n, g_norm, g_cos = 2, 1.0, 2.0
    c0 = embed(model, "")
    Ns, Cs = [], []
    for p in PROMPTS:
        c = embed(model, p)
        norms, coss = [], []
        for j in range(n):
            x = x_T(model, j)
            norms.append((eps(model, x, 981, c) - eps(model, x, 981, c0)).norm())
            u = eps(model, x, 41, c0)
            d = eps(model, x, 41, c) - u
            cos = (u * d).sum(1) / (u.norm(dim=1) * d.norm(dim=1))  # over channels, per position
            coss.append(cos.mean())
        Ns.append(torch.stack(norms).mean())
        Cs.append(torch.stack(coss).mean())
    N, C = torch.stack(Ns).double(), torch.stack(Cs).double()
    got = D.anisotropy(model, PROMPTS, n=n)  # toy cross_attention_dim != 1024 -> SD1 default g_cos = 2
    torch.testing.assert_close(got.N, N, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.C, C, rtol=RTOL, atol=COS_ATOL)
    torch.testing.assert_close(got.M, g_norm * N + g_cos * C, rtol=RTOL, atol=COS_ATOL)
    other = D.anisotropy(model, PROMPTS, n=n, g_norm=0.5, g_cos=0.1)
    torch.testing.assert_close(other.M, 0.5 * got.N + 0.1 * got.C)


def test_anisotropy_counts_and_same_noise_for_every_prompt(model):
    n = 2
    inputs = []
    hook = model["unet"].register_forward_pre_hook(
        lambda m, args: inputs.append((args[0].clone(), args[1].clone()))
    )
    try:
        with counted(model) as c:
            D.anisotropy(model, PROMPTS, n=n, batch_size=64)
    finally:
        hook.remove()
    assert c.unet_evals == 4 * n * len(PROMPTS)
    assert c.unet_calls == 2  # one batched call per timestep
    assert [sorted(set(t.tolist())) for _, t in inputs] == [[981], [41]]
    noises = torch.cat([x_T(model, j) for j in range(n)])
    for x, _ in inputs:  # rows: (prompt, generation) pairs x (cond, uncond)
        rows = x.view(len(PROMPTS), n, 2, *x.shape[1:])
        torch.testing.assert_close(rows, noises[None, :, None].expand_as(rows), rtol=0, atol=0)
    # a prompt's score does not depend on the other prompts
    alone = D.anisotropy(model, PROMPTS[2:3], n=n)
    together = D.anisotropy(model, PROMPTS, n=n)
    torch.testing.assert_close(alone.M, together.M[2:3], rtol=RTOL, atol=COS_ATOL)


def test_default_g_cos_by_family(model, vmodel):
    """The family follows the prediction type (a small v-prediction model is on the authors' SD 2 path), not
    the cross-attention width; `family=` overrides it."""
    assert (P.model_family(model), P.model_family(vmodel)) == ("sd1", "sd2")
    assert (D.default_g_cos(model), D.default_g_cos(vmodel)) == (2.0, 0.1)
    wide = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024))
    assert D.model_family(dict(model, unet=wide)) == "sd1"  # SD 2.x-base: an epsilon model
    sd2, sd1 = D.anisotropy(vmodel, PROMPTS, n=1), D.anisotropy(vmodel, PROMPTS, n=1, family="sd1")
    torch.testing.assert_close(sd2.M, sd2.N + 0.1 * sd2.C)
    torch.testing.assert_close(sd1.M, sd2.N + 2.0 * sd2.C)


def test_v_prediction_anisotropy_norm_is_the_authors_score(vmodel):
    """On v-models the authors take N on their score s = (sqrt(abar) v - x) / (1 - abar) at the first sampling
    timestep: N = ||s(x_T, c) - s(x_T, c0)||, computed here from the raw v-predictions."""
    t0 = first_t()
    a = vmodel["scheduler"].alphas_cumprod[t0]
    c0 = embed(vmodel, "")

    def score(x, e):
        with torch.no_grad():
            v = vmodel["unet"](x, torch.tensor([t0]), encoder_hidden_states=e).sample
        return (a.sqrt() * v - x) / (1 - a)

    expected = []
    for p in PROMPTS:
        x = x_T(vmodel, 0)
        expected.append((score(x, embed(vmodel, p)) - score(x, c0)).norm())
    got = D.anisotropy(vmodel, PROMPTS, n=1)
    torch.testing.assert_close(got.N, torch.stack(expected).double(), rtol=RTOL, atol=ATOL)
    # the epsilon-space norm differs by the constant factor 1 / (1 - abar_t0) > 1
    wen = D.noise_magnitude(vmodel, PROMPTS)
    torch.testing.assert_close(got.N, wen / (1 - float(a)), rtol=RTOL, atol=ATOL)
    assert (got.N > wen).all()


# ---------------------------------------------------------------- attention entropy


def test_attention_layer_fallback(model):
    unet = model["unet"]
    names = A.cross_attention_modules(unet)
    assert names[0].startswith("down_blocks.0") and names[1].startswith("mid_block")
    assert A.resolve_cross_attention(unet, P.SD1_ENTROPY_LAYER, default=P.SD1_ENTROPY_LAYER) == [names[3]]
    assert A.resolve_cross_attention(unet, 1) == [names[1]]
    assert A.resolve_cross_attention(unet, "up_blocks.1.attentions.0") == [names[2]]
    with pytest.raises(MemtrainError):
        A.resolve_cross_attention(unet, "down_blocks.7")


def attention_distribution(parts, module: str, x: torch.Tensor, t: int, e: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one attn2 module for one sample, averaged over heads and pixels: [77]."""
    attn = dict(parts["unet"].named_modules())[module]
    seen = []
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs)),
        with_kwargs=True,
    )
    try:
        eps(parts, x, t, e)
    finally:
        hook.remove()
    hidden, kwargs = seen[0]
    with torch.no_grad():
        q, k = attn.to_q(hidden), attn.to_k(kwargs["encoder_hidden_states"])
    h = attn.heads
    q = q.view(1, -1, h, q.shape[-1] // h).transpose(1, 2)
    k = k.view(1, -1, h, k.shape[-1] // h).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # [1, heads, pixels, 77]
    return probs.mean(dim=(1, 2))[0].double()


def test_attention_entropy_matches_direct(model):
    n, layer = 2, "down_blocks.0.attentions.0"
    unet = model["unet"]
    expected = []
    for p in PROMPTS:
        c = embed(model, p)
        ents = []
        for j in range(n):
            a = attention_distribution(model, layer + ".transformer_blocks.0.attn2", x_T(model, j), 981, c)
            ents.append(-(a * a.log()).sum())
        expected.append(torch.stack(ents).mean())
    before = {name: dict(unet.named_modules())[name].processor for name in A.cross_attention_modules(unet)}
    with counted(model) as c:
        got, dist = D.attention_entropy(model, PROMPTS, n=n, layer=layer, return_distributions=True)
    after = {name: dict(unet.named_modules())[name].processor for name in A.cross_attention_modules(unet)}
    assert all(before[k] is after[k] for k in before)  # original processors restored
    assert c.unet_evals == n * len(PROMPTS)  # conditional branch only, first step
    assert dist.shape == (len(PROMPTS), n, 77)
    torch.testing.assert_close(dist.sum(-1), torch.ones(len(PROMPTS), n, dtype=torch.float64))
    torch.testing.assert_close(got, torch.stack(expected), rtol=RTOL, atol=ATOL)
    D.attention_entropy(model, PROMPTS[:1])  # the default layer falls back on the tiny UNet


# ---------------------------------------------------------------- CLiD


def _latents(parts, count: int) -> torch.Tensor:
    cfg = parts["unet"].config
    shape = (count, cfg.in_channels, cfg.sample_size, cfg.sample_size)  # (count, 4, 8, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


def test_clid_features_match_direct(model):
    captions = ["a red dog sitting on the mat", "photo of a blue bird", "painting"]
    latents = _latents(model, len(captions))
    importance = [[0.1, 0.9, 0.5, 0.3, 0.2, 0.0, 0.4], [0.3, 0.1, 0.2, 0.8, 0.7], [1.0]]
    got = D.clid_features(model, latents, captions, word_importance=importance, seed=5)
    ts = (440, 450, 460)
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    a = model["scheduler"].alphas_cumprod
    tok = model["tokenizer"]
    eos = tok.eos_token_id
    for i, cap in enumerate(captions):
        ids = tok(cap, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        words = cap.split()  # token positions of each word ("photo" is 4 byte tokens in the toy vocabulary)
        lengths = [len(tok(w, add_special_tokens=False).input_ids) for w in words]
        starts = np.cumsum([1] + lengths[:-1])
        order = np.argsort(-np.asarray(importance[i]), kind="stable")
        conds = []
        for f in (0.3, 0.5, 0.7):
            count = max(1, int(np.floor(f * len(words) + 0.5)))
            r = ids.clone()
            for w in order[:count]:
                r[int(starts[w]) : int(starts[w]) + lengths[w]] = eos
            conds.append(embed_ids(model, r))
        conds.append(embed(model, ""))
        c = embed(model, cap)
        err_c, err_r = [], [[] for _ in conds]
        for j, t in enumerate(ts):
            x0, e = latents[i : i + 1], noise[j : j + 1]
            xt = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * e
            err_c.append(((eps(model, xt, t, c) - e) ** 2).sum())
            for m, cm in enumerate(conds):
                err_r[m].append(((eps(model, xt, t, cm) - e) ** 2).sum())
        err_c = torch.stack(err_c).double()
        expected = [torch.stack(er).double().sub(err_c).mean() for er in err_r] + [-err_c.mean()]
        torch.testing.assert_close(got[i], torch.stack(expected), rtol=RTOL, atol=1e-4)
    # a one-word caption with its word replaced is the empty caption: all D_i coincide
    torch.testing.assert_close(got[2, :4], got[2, 3].expand(4), rtol=RTOL, atol=1e-4)


def test_clid_default_importance_is_cross_attention_mass(model):
    captions = ["a red dog sitting on the mat", "photo of a blue bird"]
    latents = _latents(model, len(captions))
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    a = model["scheduler"].alphas_cumprod
    modules = A.cross_attention_modules(model["unet"])
    importance = []
    for i, cap in enumerate(captions):
        c = embed(model, cap)
        mass = torch.stack(
            [
                attention_distribution(
                    model, m, a[t].sqrt() * latents[i : i + 1] + (1 - a[t]).sqrt() * noise[j], t, c
                )
                for j, t in enumerate((440, 450, 460))
                for m in modules
            ]
        ).mean(dim=0)
        importance.append([float(mass[w].sum()) for w in C.caption_words(model["tokenizer"], cap)])
    explicit = D.clid_features(model, latents, captions, word_importance=importance)
    torch.testing.assert_close(D.clid_features(model, latents, captions), explicit, rtol=RTOL, atol=1e-4)


def test_clid_counts_batching_and_images(model):
    captions = ["a red dog sitting on the mat", "photo of a blue bird", "a cat", "the river house"]
    latents = _latents(model, len(captions))
    with counted(model) as c:
        f8 = D.clid_features(model, latents, captions, batch_size=8)
    assert c.unet_evals == 15 * len(captions)
    assert f8.shape == (len(captions), 5)
    f1 = D.clid_features(model, latents, captions, batch_size=1)
    torch.testing.assert_close(f1, f8, rtol=RTOL, atol=1e-4)
    # images go through the VAE posterior sample x scaling factor
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(9)) * 2 - 1
    vae = model["vae"]
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(0))
    expected = (dist.mean + dist.std * noise) * vae.config.scaling_factor
    torch.testing.assert_close(U.encode_latents(model, images, seed=0), expected, rtol=1e-5, atol=1e-6)
    from_images = D.clid_features(model, images, captions[:2], seed=0)
    from_latents = D.clid_features(model, expected, captions[:2], seed=0)
    torch.testing.assert_close(from_images, from_latents, rtol=RTOL, atol=1e-4)


def test_clid_word_positions_and_reduction(model):
    tok = model["tokenizer"]
    assert C.caption_words(tok, "a red dog") == [[1], [2], [3]]
    assert (
        C.caption_words(tok, "a zebra")[0] == [1] and len(C.caption_words(tok, "a zebra")[1]) == 5
    )  # byte tokens
    ids = tok("a red dog", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    r = C._reduced_ids(ids, [[1], [2], [3]], [0.2, 0.9, 0.5], (0.3, 0.5, 0.7), tok.eos_token_id)
    assert [int((x != ids).sum()) for x in r] == [1, 2, 2]
    assert r[0][2] == tok.eos_token_id and r[1][3] == tok.eos_token_id


def test_clid_th_alpha_and_vec():
    rng = np.random.default_rng(0)
    # D carries the membership signal, L none
    members = np.c_[rng.normal(0.3, 1.0, (1000, 4)), rng.normal(0.0, 1.0, 1000)]
    others = np.c_[rng.normal(0.0, 1.0, (1000, 4)), rng.normal(0.0, 1.0, 1000)]
    features, labels = np.r_[members, others], np.r_[np.ones(1000), np.zeros(1000)]
    reference = others
    d, loss = features[:, :4].mean(1), features[:, 4]
    ref_d, ref_l = reference[:, :4].mean(1), reference[:, 4]

    def s(v, ref):
        q1, med, q3 = np.percentile(ref, [25, 50, 75])
        return (v - med) / (q3 - q1)

    expected = 0.3 * s(d, ref_d) + 0.7 * s(loss, ref_l)
    np.testing.assert_allclose(D.clid_th_scores(features, reference, 0.3), expected, rtol=1e-10)
    alpha = D.fit_clid_alpha(features, labels, reference_features=reference)
    assert alpha >= 0.8
    assert D.fit_clid_alpha(features, labels, metric="tpr@1%fpr") >= 0.5
    from sklearn.metrics import roc_auc_score

    # CLiD_vec: a non-linear rule (members have large |L|) that a threshold on a sum cannot express
    x = rng.normal(0.0, 1.0, (400, 5))
    y = (np.abs(x[:, 4]) > 1.0).astype(int)
    clf = D.clid_vec_classifier(x[::2], y[::2])
    assert roc_auc_score(y[1::2], D.clid_vec_scores(clf, x[1::2])) > 0.9
    with pytest.raises(MemtrainError):
        D.fit_clid_alpha(features, np.ones(len(features)))


# ---------------------------------------------------------------- batching, v-prediction, errors


def test_batching_invariance(model):
    for fn in (
        lambda bs: D.noise_magnitude(model, PROMPTS, n=2, batch_size=bs),
        lambda bs: D.noise_magnitude(model, PROMPTS[:2], n=2, steps=2, batch_size=bs),
        lambda bs: D.anisotropy(model, PROMPTS, n=2, batch_size=bs).N,
        lambda bs: D.attention_entropy(model, PROMPTS, n=2, batch_size=bs),
        lambda bs: D.token_attribution(model, PROMPTS[0], n=2, batch_size=bs).per_position,
    ):
        torch.testing.assert_close(fn(1), fn(8), rtol=1e-4, atol=1e-6)
    m1, m8 = (D.anisotropy(model, PROMPTS, n=2, batch_size=bs).M for bs in (1, 8))
    torch.testing.assert_close(m1, m8, rtol=1e-4, atol=COS_ATOL)


def test_v_prediction_model(vmodel):
    c0 = embed(vmodel, "")
    expected = []
    for p in PROMPTS[:2]:
        x = x_T(vmodel, 0)
        expected.append((eps(vmodel, x, 981, embed(vmodel, p)) - eps(vmodel, x, 981, c0)).norm())
    got = D.noise_magnitude(vmodel, PROMPTS[:2])
    torch.testing.assert_close(got, torch.stack(expected).double(), rtol=RTOL, atol=ATOL)
    core = U.UNetCore(vmodel)
    x = x_T(vmodel, 0)
    raw = core.eps(x, 981, c0, space="model")
    with torch.no_grad():
        v = vmodel["unet"](x, torch.tensor([981]), encoder_hidden_states=c0).sample
    torch.testing.assert_close(raw, v)
    a = D.anisotropy(vmodel, PROMPTS, n=1, cos_space="epsilon")
    b = D.anisotropy(vmodel, PROMPTS, n=1, cos_space="model")
    torch.testing.assert_close(a.N, b.N)
    # the reference code's definition (cosine on the raw v-prediction) is the default for v-models
    torch.testing.assert_close(D.anisotropy(vmodel, PROMPTS, n=1).C, b.C)
    assert not torch.allclose(a.C, b.C)
    assert torch.isfinite(a.M).all() and torch.isfinite(b.C).all()
    assert torch.isfinite(D.noise_magnitude(vmodel, PROMPTS[:1], steps=2)).all()
    f = D.clid_features(vmodel, _latents(vmodel, 2), PROMPTS[:2])
    assert f.shape == (2, 5) and torch.isfinite(f).all()


def test_user_errors(model):
    with pytest.raises(MemtrainError):
        D.noise_magnitude(model, [])
    with pytest.raises(MemtrainError):
        D.noise_magnitude(model, PROMPTS, steps="some")
    with pytest.raises(MemtrainError):
        D.noise_magnitude(model, PROMPTS, n=0)
    with pytest.raises(MemtrainError):
        D.clid_features(model, _latents(model, 2), ["a cat"])
    with pytest.raises(MemtrainError):
        U.UNetCore(model, batch_size=0)
    with pytest.raises(MemtrainError):
        U.UNetCore({"unet": model["unet"]})


def test_a_registered_detector_runs_in_evaluate(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Adding a detector is one function plus one registry entry: evaluate then scores and reports it."""
    from trainer.detect import PROMPT_DETECTORS, PromptDetector
    from trainer.report.evaluate import evaluate

    def first_step_norm_squared(pipe, prompts, seed, batch_size):
        return {"scores": D.noise_magnitude(pipe, prompts, seed=seed, batch_size=batch_size) ** 2}

    monkeypatch.setitem(PROMPT_DETECTORS, "squared", PromptDetector("Wen squared", first_step_norm_squared, 2))
    report = evaluate(tiny_model, tiny_data / "labels.jsonl", out=tmp_path / "eval", detectors="noise,squared",
                      generate=False, progress=False)
    found = report["trigger"]["detectors"]
    assert found["squared"]["name"] == "Wen squared" and found["squared"]["unet_evals_per_prompt"] == 2
    # a monotone transform of Wen's score ranks the prompts the same way
    assert found["squared"]["auroc"] == pytest.approx(found["noise"]["auroc"])
    assert "Wen squared" in (tmp_path / "eval" / "report.md").read_text()
