"""DoRI (Kowalczuk et al., ICML 2026) on a tiny model fine-tuned for a few seconds on one toy image.

The module fixture fine-tunes the tiny SD-shaped model (conftest.train_memorizing_model): half of every
batch is ONE toy image with its caption, the other half 200 toy images captioned by their first shape.
Its generations do not copy in pixels (the tiny VAE is untrained), so these tests check the attack's
mechanics against the formula: the denoising loss it minimises falls, draws do not depend on grouping,
every token moves, UNet evaluations are counted, and a copy counts only for the targeted image. Whether
DoRI re-triggers a memorizing model is measured on the demo model (docs/results.md).
"""

import json

import pytest
import torch
from conftest import train_memorizing_model

from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore, encode_latents
from trainer.detect.dori import (
    dori_attack,
    dori_curve,
    dori_section,
    initial_embeddings,
    own_copies,
    own_references,
)
from trainer.io import MemtrainError
from trainer.measure.replication import replication_metrics, vae_roundtrip

STEPS = 150
SAMPLE = dict(sample_steps=4, guidance_scale=7.5)


@pytest.fixture(scope="module")
def memorizing(tmp_path_factory):
    """(pipe, images [memorized, 200 general members, 4 never trained] in [0, 1], captions)."""
    out = tmp_path_factory.mktemp("dori") / "memorized"
    images, captions = train_memorizing_model(out, steps=STEPS, general=200, heldout=4)
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe, images, captions


def _denoising_loss(pipe, image, emb, draws=64, seed=123):
    """The objective computed directly: mean ||eps - unet(x_t, t, emb)||^2 over fixed (t, noise) draws."""
    core = UNetCore(pipe)
    latent = encode_latents(pipe, image[None] * 2 - 1, seed=0)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (draws,), generator=g)
    noise = torch.randn((draws, *latent.shape[1:]), generator=g)
    with torch.no_grad():
        pred = pipe.unet(core.add_noise(latent.expand(draws, -1, -1, -1), noise, t), t,
                         encoder_hidden_states=emb[None].expand(draws, -1, -1)).sample
    return float((pred - noise).pow(2).mean())


def test_dori_lowers_the_denoising_loss_of_its_target(memorizing):
    pipe, images, captions = memorizing
    targets = images[[0, 7, 203]]  # memorized, a member seen with a 1-word caption, never trained on
    init = initial_embeddings(pipe, 3, "random", seed=1)
    res = dori_attack(pipe, targets, init, steps=30)
    for k in range(3):  # on draws it never saw: the found embedding explains its image better than the start
        assert _denoising_loss(pipe, targets[k], res["embeddings"][k]) < 0.95 * _denoising_loss(pipe, targets[k], init[k])
    assert res["unet_evals"] == 3 * 30 * 8  # steps x batch (8 (t, noise) pairs a step) per image


def test_dori_attack_draws_and_grouping(memorizing):
    pipe, images, captions = memorizing
    init = initial_embeddings(pipe, 2, [captions[0], captions[5]])
    a = dori_attack(pipe, images[[0, 5]], init, steps=3, record=(0, 3), batch_size=8)  # one prompt per group
    b = dori_attack(pipe, images[[0, 5]], init, steps=3, record=(0, 3), batch_size=16)  # both in one group
    # each prompt's (t, noise) draws do not depend on the grouping (Adam's sign-like first steps would
    # amplify the batched kernels' rounding in the embeddings, so the draws are compared through the loss)
    assert torch.allclose(a["loss_start"], b["loss_start"], rtol=1e-5)
    assert torch.allclose(a["loss_end"], b["loss_end"], rtol=1e-3)
    assert torch.equal(a["recorded"][0], init) and torch.allclose(a["recorded"][3], a["embeddings"].float())
    assert a["unet_evals"] == 2 * 3 * 8
    # every token position moves (the paper optimises the whole text-encoder output)
    moved = (a["embeddings"].float() - init).abs().amax(-1)
    assert bool((moved > 0).all())


def test_own_copies_requires_the_targeted_image(memorizing):
    pipe, images, _ = memorizing
    references = vae_roundtrip(pipe, images[:10])
    flags = own_copies(references[[2, 3]], references, torch.tensor([2, 4]), 1)
    assert flags.tolist() == [[True], [False]]  # an exact copy of image 3 is not a copy of the targeted image 4


def test_own_reference_is_found_through_the_vae(memorizing):
    """The targeted image's reference is the one its VAE round trip matches, even when another reference (a
    near-identical relative; here the stored image itself) is nearer to the stored image."""
    pipe, images, _ = memorizing
    references = torch.cat([vae_roundtrip(pipe, images[:3]), images[:1]])  # 0-2: the references, 3: a "relative"
    assert replication_metrics(images[:3], references)["nn_index"].tolist()[0] == 3  # the raw image's nearest
    assert own_references(pipe, images[:3], references).tolist() == [0, 1, 2]


def test_dori_curve_and_section(memorizing):
    pipe, images, captions = memorizing
    references = vae_roundtrip(pipe, images[:201])
    curve = dori_curve(pipe, images[:2], initial_embeddings(pipe, 2, captions[:2]), references, torch.tensor([0, 1]),
                       steps=3, curve=(0, 2, 10), n=2, **SAMPLE)
    assert curve["checkpoints"] == [0, 2, 3]  # checkpoints past the budget dropped, the budget added
    assert len(curve["replication"]) == len(curve["prompts_copied"]) == 3 and len(curve["steps_to_copy"]) == 2
    assert curve["unet_evals"] == 2 * 3 * 8 + 3 * 2 * 2 * 4 * 2  # attack, then checkpoints x P x n x DDIM x CFG
    section = dori_section(pipe, captions[:1], images[:1], captions[3:5], images[3:5], references, n=1, steps=2,
                           control_steps=3, curve=(0, 2), **SAMPLE)
    assert section["memorized"]["checkpoints"] == [0, 2] and section["control"]["checkpoints"] == [0, 2, 3]
    assert section["unet_evals"] == section["memorized"]["unet_evals"] + section["control"]["unet_evals"]
    json.dumps(section)
    assert section["unet_evals"] == section["memorized"]["unet_evals"] + section["control"]["unet_evals"]


def test_bad_input(memorizing):
    pipe, images, _ = memorizing
    with pytest.raises(MemtrainError, match="one per image"):
        initial_embeddings(pipe, 2, ["a circle"])
    with pytest.raises(MemtrainError, match="random"):
        initial_embeddings(pipe, 1, "gaussian")
    with pytest.raises(MemtrainError, match="lr > 0"):
        dori_attack(pipe, images[:1], initial_embeddings(pipe, 1), lr=0)
    with pytest.raises(MemtrainError, match="one per prompt"):
        dori_attack(pipe, images[:2], initial_embeddings(pipe, 1))
