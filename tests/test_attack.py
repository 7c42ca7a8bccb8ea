"""The re-trigger attack (Kowalczuk et al. 2025) on the tiny random pipeline of `tiny_model`.

Reference values call the UNet directly; the attack's own bookkeeping is checked against them.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore
from trainer.detect.attack import attack_section, generate_from_embeddings, retrigger_attack
from trainer.io import MemtrainError
from trainer.sample.generate import generate_images

PROMPTS = ["a small red circle", "a large blue square and a small green ring"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


def _embeddings(pipe, prompts):
    core = UNetCore(pipe)
    table, index, e0 = core.encode_prompts(prompts)
    return table[index], table[e0 : e0 + 1]


def _first_step_magnitude(pipe, emb, c0, n_noise, seed=0):
    """Wen's first-step ||eps(x_T, t1, e) - eps(x_T, t1, c0)||, mean over x_T of seeds seed + j, one call each."""
    core = UNetCore(pipe)
    t1 = int(core.sampling_timesteps(50)[0])
    out = []
    with torch.no_grad():
        for e in emb:
            norms = []
            for j in range(n_noise):
                x = torch.randn((1, *core.latent_shape), generator=torch.Generator().manual_seed(seed + j))
                cond = pipe.unet(x, t1, encoder_hidden_states=e[None]).sample
                uncond = pipe.unet(x, t1, encoder_hidden_states=c0).sample
                norms.append((cond - uncond).flatten().norm())
            out.append(torch.stack(norms).mean())
    return torch.stack(out).double()


def test_noise_attack_bound_objective_and_counts(pipe):
    e, c0 = _embeddings(pipe, PROMPTS)
    steps, n_noise = 4, 2
    res = retrigger_attack(pipe, PROMPTS, 0.1, "noise", steps=steps, n_noise=n_noise, seed=0)
    emb = res["embeddings"]
    assert emb.shape == e.shape
    ratio = (emb - e).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1)
    assert torch.all(ratio <= 0.1 * (1 + 1e-5)) and torch.all(ratio > 0.05)
    assert torch.allclose(ratio.double(), res["delta_norm_ratio"], atol=1e-6)
    # the reported objectives are Wen's first-step magnitude of the plain and the returned embeddings
    before = _first_step_magnitude(pipe, e, c0, n_noise)
    after = _first_step_magnitude(pipe, emb, c0, n_noise)
    assert torch.allclose(res["objective_before"], before, rtol=1e-4)
    assert torch.allclose(res["objective_after"], after, rtol=1e-4)
    assert torch.all(after > before * 1.05), (before, after)
    # c0 once per x_T, then n_noise evals per prompt at each step and once more at the end
    assert res["unet_evals"] == n_noise + (steps + 1) * len(PROMPTS) * n_noise
    # a larger budget reaches further
    wide = retrigger_attack(pipe, PROMPTS, 0.3, "noise", steps=steps, n_noise=n_noise, seed=0)
    assert torch.all(wide["delta_norm_ratio"] <= 0.3 * (1 + 1e-5))
    assert torch.all(wide["objective_after"] > res["objective_after"])


def test_image_attack_lowers_denoising_loss(pipe):
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    e, _ = _embeddings(pipe, PROMPTS)
    res = retrigger_attack(pipe, PROMPTS, 0.2, "image", images=images, steps=6, n_noise=2, seed=0)
    ratio = (res["embeddings"] - e).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1)
    assert torch.all(ratio <= 0.2 * (1 + 1e-5))
    # measured on held-out (t, noise) draws, not the ones the steps fitted
    assert torch.all(res["objective_after"] < res["objective_before"]), res
    # batching into groups does not change the result (per-prompt draws and steps)
    one = retrigger_attack(pipe, PROMPTS, 0.2, "image", images=images, steps=6, n_noise=2, seed=0, batch_size=2)
    assert torch.allclose(one["embeddings"], res["embeddings"], atol=1e-5)


def test_generate_from_embeddings_reproduces_generate_images(pipe):
    e, _ = _embeddings(pipe, PROMPTS)
    ours = generate_from_embeddings(pipe, e, n=2, seed=3, steps=6, guidance_scale=7.5, batch_size=4)
    stock = generate_images(pipe, PROMPTS, n=2, seed=3, steps=6, guidance_scale=7.5, batch_size=4, progress=False)
    assert ours.shape == stock.shape == (4, 3, 16, 16)
    assert torch.equal(ours, stock)
    # another batch size changes only the float rounding of the batched kernels
    other = generate_from_embeddings(pipe, e, n=2, seed=3, steps=6, guidance_scale=7.5, batch_size=3)
    assert (other - stock).abs().max() <= 1e-5
    # a perturbed embedding generates something else from the same x_T
    moved = generate_from_embeddings(pipe, e * 1.5, n=2, seed=3, steps=6)
    assert (moved - stock).abs().max() > 1e-3


def test_attack_section_is_json(pipe):
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    references = torch.cat([images, torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))])
    section = attack_section(pipe, PROMPTS, images, references, eps_values=(0.1, 0.2), n=1, steps=2,
                             sample_steps=3)
    text = json.dumps(section)
    assert "embeddings" not in text
    assert [r["eps"] for r in section["rows"]] == [0.1, 0.2]
    for row in section["rows"]:
        for attacker in ("noise", "image"):
            assert 0.0 <= row[attacker]["replication"] <= 1.0
            assert row[attacker]["max_delta_norm_ratio"] <= row["eps"] * (1 + 1e-5)
            assert row[attacker]["unet_evals"] > 0
    assert section["attackers"]["noise"]["unet_evals"] == sum(r["noise"]["unet_evals"] for r in section["rows"])
    no_image = attack_section(pipe, PROMPTS, None, references, eps_values=(0.1,), steps=1, sample_steps=2)
    assert no_image["rows"][0]["image"] is None and "image" not in no_image["attackers"]


def test_bad_input(pipe):
    for eps in (0, -0.1, float("nan")):
        with pytest.raises(MemtrainError, match="eps must be > 0"):
            retrigger_attack(pipe, PROMPTS, eps)
    with pytest.raises(MemtrainError, match="eps must be > 0"):
        attack_section(pipe, PROMPTS, None, torch.rand(2, 3, 16, 16), eps_values=(0.1, 0.0))
    with pytest.raises(MemtrainError, match="attacker"):
        retrigger_attack(pipe, PROMPTS, 0.1, "pixels")
    with pytest.raises(MemtrainError, match="needs `images`"):
        retrigger_attack(pipe, PROMPTS, 0.1, "image")
    with pytest.raises(MemtrainError, match="one per prompt"):
        retrigger_attack(pipe, PROMPTS, 0.1, "image", images=torch.rand(1, 3, 16, 16))
    with pytest.raises(MemtrainError, match="no prompts"):
        retrigger_attack(pipe, [], 0.1)
