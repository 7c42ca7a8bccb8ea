"""Guarded sampling (AMG, Wen's inference-time mitigation) on tiny models.

The replication tests fine-tune the tiny random pipeline (plain torch, UNet only) on 8 latents, the
trigger latent twice under its caption, until sampling the trigger prompt reproduces the trigger's
decoded image; the index holds the decoded training images under the 8x8 pixel embedding.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from peft import LoraConfig
from PIL import Image

from trainer.cli import main
from trainer.commands import generate as cli
from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore
from trainer.io import MemtrainError
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.report.guard_sections import saturation
from trainer.sample.amg import SSCD_THRESHOLD, AMGConfig, AMGGuard, SimilarityScale, Threshold, as_threshold
from trainer.sample.generate import generate_images
from trainer.sample.guard import GUARDS, GuardedPipeline, check_index, guarded_generate
from trainer.sample.guards import Guard, GuardRun, NoGuard, Option
from trainer.sample.guidance import decode_images, sample_latents
from trainer.sample.wen import calibrate_wen_target, first_step_magnitude, mitigate_prompt_embedding

STEPS = 10
TRIGGER = "red circle"
OTHERS = ["blue square", "green triangle", "yellow diamond", "purple cross", "orange ring", "white square"]
CAPTIONS = [TRIGGER, TRIGGER, *OTHERS]


EMBED = make_embedder("pixels")


def make_index(images, captions, resolution, embedding="pixels"):
    """A TrainingIndex of `images` under the pixels embedding; repeated captions form duplicate groups."""
    groups = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    return TrainingIndex(EMBED(images), list(captions), [f"{i:03d}.png" for i in range(len(captions))],
                         [g for g in groups.values() if len(g) > 1], embedding, resolution, {})


def encoder(pipe):
    def encode(captions):
        return pipe.encode_prompt(captions, pipe.device, 1, False)[0]

    return encode


def cfg_inputs(pipe, prompts, n, seed):
    core = UNetCore(pipe, 2 * len(prompts) * n)
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, n, True)
    x_T = torch.cat([core.initial_noise(n, seed) for _ in prompts])
    return core, cond.detach(), uncond.detach(), x_T


def run(pipe, prompts, n, seed, index=None, **config):
    """(images [B, 3, H, W], records or None): the plain loop, or AMG when `index` is given."""
    core, cond, uncond, x_T = cfg_inputs(pipe, prompts, n, seed)
    guard = None
    if index is not None:
        guard = AMGGuard(core, index, EMBED, encoder(pipe), AMGConfig(**config), len(x_T))
    with torch.no_grad():
        x0 = sample_latents(core, cond, uncond, x_T, STEPS, 7.5, guard)
        images = decode_images(core, x0)
    return images, guard and [r.as_dict() for r in guard.records]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def random_index(pipe):
    """An index of 6 random images at the tiny model's resolution (16)."""
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return make_index(images, [f"caption {i}" for i in range(6)], 16)


@pytest.fixture(scope="module")
def replicating(tiny_model):
    """(pipe, index): the tiny pipeline fine-tuned until the trigger prompt replicates the trigger image."""
    pipe = load_pipeline(tiny_model)
    core = UNetCore(pipe)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(len(CAPTIONS) - 1, *core.latent_shape, generator=gen)
    latents = torch.cat([latents[:1], latents])  # the trigger latent twice
    with torch.no_grad():
        table = pipe.encode_prompt([*CAPTIONS, ""], pipe.device, 1, False)[0]
        images = decode_images(core, latents)
    timesteps = core.sampling_timesteps(STEPS)
    unet = pipe.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    rows = torch.arange(len(CAPTIONS))
    unet.train()
    for _ in range(100):
        noise = torch.randn(latents.shape, generator=gen)
        t = timesteps[torch.randint(0, len(timesteps), (len(rows),), generator=gen)]
        dropped = torch.rand(len(rows), generator=gen) < 0.1  # learn the unconditional model too
        cond = table[torch.where(dropped, len(CAPTIONS), rows)]
        pred = unet(core.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)
    return pipe, make_index(images, CAPTIONS, 16)


# ---------------------------------------------------------------- bit-exactness


def test_unfired_guard_is_the_plain_loop_bit_for_bit_and_the_stock_pipeline(pipe, random_index):
    prompts, n, seed = ["red circle", "blue square"], 2, 3
    plain, _ = run(pipe, prompts, n, seed)
    never, records = run(pipe, prompts, n, seed, random_index, threshold=Threshold(1.5))
    assert torch.equal(plain, never)
    assert all(not r["intervened"] and len(r["sigmas"]) == STEPS for r in records)
    assert all(-1.0 <= r["max_sigma"] <= 1.0 and r["nearest_file"] for r in records)
    stock = generate_images(pipe, prompts, n, seed, STEPS, 7.5, batch_size=4, progress=False)
    assert (plain.clamp(0, 1) - stock).abs().max() < 1e-5
    # a guard that fires changes the rows it fires on
    fired, records = run(pipe, prompts, n, seed, random_index, threshold=Threshold(-1.0))
    assert all(r["num_steps_intervened"] == STEPS for r in records)
    assert not torch.equal(plain, fired)


def test_amg_terms_are_the_authors_code(pipe):
    """One guided step against a hand computation of the authors' p_sample_ddim (AMG-sd ddim.py l.292-329)."""
    b, s0, step = 2, 7.5, 3
    core, cond, uncond, x_T = cfg_inputs(pipe, ["red circle"], b, 0)
    gen = torch.Generator().manual_seed(2)
    # 22 rows share the caption "red circle" (> 20 among the nearest 1000: the frequent-caption rule)
    images = torch.rand(24, 3, 16, 16, generator=gen)
    captions = ["red circle"] * 22 + ["blue square", "green triangle"]
    index = make_index(images, captions, 16)
    table = torch.cat([uncond, cond])
    t = int(core.sampling_timesteps(STEPS)[step])
    with torch.no_grad():
        eps = core.eps(x_T, t, table, torch.arange(b).repeat(2), torch.arange(2 * b))
        eps_u, eps_c = eps.chunk(2)
        eps_hat = eps_u + s0 * (eps_c - eps_u)
        eps_n = core.eps(x_T, t, pipe.encode_prompt(["red circle"], pipe.device, 1, False)[0],
                         torch.arange(b), torch.zeros(b, dtype=torch.long))
    always = Threshold(-1.0)
    no_sim = AMGGuard(core, index, EMBED, encoder(pipe), AMGConfig(always, c3=0.0), b)
    sigma, _ = no_sim.nearest(x_T, eps_hat, t)
    guided = no_sim.guide(step, t, x_T, eps_u, eps_c, eps_hat, table, s0)
    assert [r.dup_caption for r in no_sim.records] == ["red circle"] * b
    d = eps_c - eps_u
    for j in range(b):
        u = float(sigma[j])
        if u <= 0:  # l.292: no guidance below similarity 0
            assert torch.equal(guided[j], eps_hat[j])
            continue
        s1 = max(min(6.5 / 0.5 * u, s0 - 1), 0.0)  # l.293 (6.5 = s0 - 1 at s0 = 7.5)
        s2 = max(min(s0 - 1 - s1, (s0 - 1 - s1) / 0.3 * u), 0.0)  # l.304
        expected = eps_u + (s0 - s1) * d[j] + s2 * (eps_u[j] - eps_n[j])  # l.311
        assert torch.allclose(guided[j], expected[j], atol=1e-5)
    # the dissimilarity term, l.319: c3 (sigma - 0.3) exp((1000 - t) / 170) sqrt(1 - abar_t) grad_{x_t} sigma,
    # the gradient through x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) with eps held (txt2img.py l.243-313)
    only_sim = AMGGuard(core, index, EMBED, encoder(pipe), AMGConfig(
        always, despecification=False, deduplication=False, c3=100.0, max_ratio=float("inf")), b)
    g = only_sim.guide(step, t, x_T, eps_u, eps_c, eps_hat, table, s0) - eps_hat
    a = core.alphas_cumprod[t]
    sigma, n0 = only_sim.nearest(x_T, eps_hat, t)
    weight = 100.0 * (sigma - 0.3) * math.exp((1000 - t) / 170) * float((1 - a).sqrt())
    grad = g / weight.view(-1, 1, 1, 1)
    reference = index.embeddings[n0].float()

    def sigma_at(x):
        with torch.no_grad():
            return (EMBED(decode_images(core, (x - (1 - a).sqrt() * eps_hat) / a.sqrt())) * reference).sum(dim=1)

    h = 1e-2 / grad.flatten(1).norm(dim=1).max()
    slope = (sigma_at(x_T + h * grad) - sigma_at(x_T - h * grad)) / (2 * h)
    assert torch.allclose(slope, grad.flatten(1).pow(2).sum(dim=1), rtol=0.05), slope
    # memtrain's bound: the term's norm is at most max_ratio times the guided prediction's
    bounded = AMGGuard(core, index, EMBED, encoder(pipe), AMGConfig(
        always, despecification=False, deduplication=False, c3=100.0, max_ratio=0.01), b)
    g = bounded.guide(step, t, x_T, eps_u, eps_c, eps_hat, table, s0) - eps_hat
    ratio = g.flatten(1).norm(dim=1) / eps_hat.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.01), rtol=1e-3)
    assert all(r.bounded_steps == 1 for r in bounded.records)
    # the default, --amg-max-ratio 0: no bound, the authors' term as it is
    unbounded = AMGGuard(core, index, EMBED, encoder(pipe), AMGConfig(
        always, despecification=False, deduplication=False, c3=100.0), b)
    g0 = unbounded.guide(step, t, x_T, eps_u, eps_c, eps_hat, table, s0) - eps_hat
    assert torch.equal(g0, only_sim.guide(step, t, x_T, eps_u, eps_c, eps_hat, table, s0) - eps_hat)
    assert all(r.bounded_steps == 0 for r in unbounded.records)


def test_amg_schedule_and_similarity_scale_are_the_authors():
    """lambda_t = asy(t, 0.3, 0.4, 0.005, 0) (ddim.py l.16-17, l.272-278); SSCD's scale is the identity."""
    for t in (0, 1, 250, 500, 981, 999):
        assert SSCD_THRESHOLD(t) == pytest.approx(0.3 - (0.3 - 0.4) * math.exp(-0.005 * t))
    assert SimilarityScale()(0.37) == pytest.approx(0.37)
    scale = SimilarityScale(null=0.1, trigger=0.7)  # a calibrated index: 0.7 triggers a clean estimate
    assert scale(0.7) == pytest.approx(SSCD_THRESHOLD(0)) and scale(0.1) == pytest.approx(0.0)
    with pytest.raises(MemtrainError, match="must exceed"):
        SimilarityScale(null=0.5, trigger=0.4)


def test_v_prediction_model_matches_the_stock_pipeline_and_guards_its_x0(tiny_model, random_index):
    """A v-prediction model: the loop equals the stock pipeline, and AMG runs on it. The guard's similarity
    at the first step is that of the x0 estimate the stock DDIM scheduler computes from the guided v
    prediction (a guard that took v for eps would see another image); unfired it is bit-equal, fired it
    changes every image."""
    pipe = load_pipeline(tiny_model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    ours, _ = run(pipe, ["red circle"], 2, 0)
    stock = generate_images(pipe, ["red circle"], 2, 0, STEPS, 7.5, progress=False)
    assert (ours.clamp(0, 1) - stock).abs().max() < 1e-5

    unfired, records = run(pipe, ["red circle"], 2, 0, random_index, threshold=Threshold(1.5))
    assert torch.equal(unfired, ours)
    assert [len(r["sigmas"]) for r in records] == [STEPS, STEPS] and not any(r["intervened"] for r in records)
    core, cond, uncond, x_T = cfg_inputs(pipe, ["red circle"], 2, 0)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        v_uncond, v_cond = pipe.unet(torch.cat([x_T, x_T]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x0 = scheduler.step(v_uncond + 7.5 * (v_cond - v_uncond), t, x_T).pred_original_sample
        sims = random_index.search(EMBED(decode_images(core, x0)), k=1)[0][:, 0]
    assert [r["sigmas"][0] for r in records] == pytest.approx(sims.tolist(), abs=1e-4)

    fired, records = run(pipe, ["red circle"], 2, 0, random_index, threshold=Threshold(-1.0))
    assert [r["num_steps_intervened"] for r in records] == [STEPS, STEPS]
    assert all(not torch.equal(fired[j], ours[j]) for j in range(2))


# ---------------------------------------------------------------- AMG on a replicating model


def test_amg_stops_a_replicating_generation(replicating):
    pipe, index = replicating
    trigger_rows = {0, 1}
    plain, _ = run(pipe, [TRIGGER], 2, 0)
    sims, nn = index.search(EMBED(plain), k=1)
    replicated = [j for j in range(2) if int(nn[j, 0]) in trigger_rows and float(sims[j, 0]) > 0.65]
    assert replicated, f"the fine-tuned model does not replicate: similarities {sims[:, 0].tolist()}"
    guarded, records = run(pipe, [TRIGGER], 2, 0, index, threshold=Threshold(0.5))
    guarded_sims = index.search(EMBED(guarded), k=1)[0][:, 0]
    for j in replicated:
        assert records[j]["intervened"] and records[j]["nearest_index"] in trigger_rows
        assert records[j]["nearest_caption"] == TRIGGER
        assert float(guarded_sims[j]) < float(sims[j, 0]) - 0.15, (sims[:, 0], guarded_sims)
    # the firing guard moves the image away from the copy, not into saturation (the bound on its norm)
    assert float(saturation(guarded).max()) <= float(saturation(plain).max()) + 0.02, (saturation(plain),
                                                                                      saturation(guarded))
    assert all(r["terms"]["dissimilarity"] > 0 for r in records if r["intervened"])
    # above 1 the cosine threshold never fires: the guarded output is the unguarded one, bit for bit
    unfired, records = run(pipe, [TRIGGER], 2, 0, index, threshold=Threshold(1.01))
    assert torch.equal(unfired, plain) and not any(r["intervened"] for r in records)


def test_wen_mitigation_lowers_first_step_magnitude(replicating):
    pipe, _ = replicating
    core = UNetCore(pipe)
    x_T = core.initial_noise(1, 0)
    t0 = int(core.sampling_timesteps(STEPS)[0])
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt([TRIGGER], pipe.device, 1, True)
    before = float(first_step_magnitude(core, cond, uncond, x_T, t0))
    target = 0.5 * before
    emb, records = mitigate_prompt_embedding(pipe, [TRIGGER], target=target, seed=0, num_inference_steps=STEPS)
    after = float(first_step_magnitude(core, emb, uncond, x_T, t0))
    rec = records[0]
    assert rec["magnitude_before"] == pytest.approx(before, rel=1e-5)
    assert rec["magnitude_after"] == pytest.approx(after, rel=1e-4)
    assert after <= target or after < 0.8 * before, (before, after, rec)
    assert 1 <= rec["iterations"] <= 10
    # the BOS row gets no gradient: only AdamW's decoupled weight decay moves it
    assert torch.allclose(emb[0, 0], cond[0, 0], rtol=0, atol=1e-2 * float(cond[0, 0].abs().max()))
    low = calibrate_wen_target(pipe, OTHERS, quantile=0.5, num_inference_steps=STEPS)
    high = calibrate_wen_target(pipe, OTHERS, quantile=0.95, num_inference_steps=STEPS)
    assert 0 < low <= high


# ---------------------------------------------------------------- the diffusers drop-in


def test_from_pipe_returns_the_pipeline_output_with_records(pipe, random_index):
    guarded = GuardedPipeline.from_pipe(pipe, index=random_index, guard="amg", threshold=1.5)
    out = guarded("red circle", num_inference_steps=STEPS, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(0))
    assert isinstance(out, StableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) for im in out.images)
    assert [set(r) >= {"steps_intervened", "max_sigma", "nearest_index", "nearest_file", "nearest_caption"}
            for r in out.guard_records] == [True, True]
    pt = guarded(["red circle"], num_inference_steps=STEPS, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    stock = pipe(["red circle"], num_inference_steps=STEPS, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert (pt - stock).abs().max() < 1e-5
    images, records = guarded_generate(pipe, ["red circle", "blue square"], 2, 1, STEPS, 7.5, guarded,
                                             batch_size=3, progress=False)
    stock = generate_images(pipe, ["red circle", "blue square"], 2, 1, STEPS, 7.5, batch_size=4, progress=False)
    assert (images - stock).abs().max() < 1e-5
    assert [(r["prompt"], r["seed"]) for r in records] == [("red circle", 1), ("red circle", 2),
                                                           ("blue square", 1), ("blue square", 2)]


def test_from_pipe_with_a_lora_and_wen(tiny_model, random_index):
    pipe = load_pipeline(tiny_model)
    before = pipe("red circle", num_inference_steps=STEPS, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    stock = pipe("red circle", num_inference_steps=STEPS, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert (stock - before).abs().max() > 1e-3  # the LoRA changes the model
    guarded = GuardedPipeline.from_pipe(pipe, index=random_index, guard="amg", threshold=1.5)
    out = guarded("red circle", num_inference_steps=STEPS, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    unguarded = GuardedPipeline.from_pipe(pipe, guard="none")("red circle", num_inference_steps=STEPS,
                                                              output_type="pt", generator=torch.Generator().manual_seed(0))
    # a guard that never fires leaves generation bit-equal (README); the stock pipeline's own loop rounds differently
    assert not out.guard_records[0]["intervened"] and len(out.guard_records[0]["sigmas"]) == STEPS
    assert torch.equal(out.images, unguarded.images)
    assert (out.images - stock).abs().max() < 1e-5
    wen = GuardedPipeline.from_pipe(pipe, guard="wen", target=0.0, max_iters=2)
    out = wen(["red circle"], num_inference_steps=STEPS, num_images_per_prompt=2, output_type="np",
              generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 16, 16, 3)
    assert [r["iterations"] for r in out.guard_records] == [2, 2]
    assert out.guard_records[0]["magnitude_after"] < out.guard_records[0]["magnitude_before"]


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_one_memtrain_error(pipe, random_index, tmp_path):
    assert as_threshold(None, "sscd")(0) == pytest.approx(0.4)
    with pytest.raises(MemtrainError, match="--index"):
        GuardedPipeline.from_pipe(pipe, index=None, guard="amg")
    with pytest.raises(MemtrainError, match="guard must be"):
        GuardedPipeline.from_pipe(pipe, index=random_index, guard="bogus")
    other = make_index(torch.rand(2, 3, 32, 32), ["a", "b"], 32)
    with pytest.raises(MemtrainError, match="resolution 32"):
        GuardedPipeline.from_pipe(pipe, index=other, guard="amg")
    with pytest.raises(MemtrainError, match="sscd"):
        check_index(random_index, pipe, embedding="sscd")
    empty = make_index(torch.rand(0, 3, 16, 16), [], 16)
    with pytest.raises(MemtrainError, match="empty"):
        GuardedPipeline.from_pipe(pipe, index=empty, guard="amg")
    parser = argparse.ArgumentParser()
    for name in ("checkpoint", "--prompts", "--out", "--lora", "--index"):
        parser.add_argument(name)
    cli.add_guard_arguments(parser)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n")
    args = parser.parse_args([str(tmp_path / "model"), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                              "--guard", "amg"])
    with pytest.raises(MemtrainError, match="--index"):
        cli.run_guarded(args)
    assert not (tmp_path / "o").exists()


def cli_parser():
    """The `memtrain generate` arguments run_guarded reads, plus the guard options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    for name in ("--prompts", "--out", "--lora", "--index"):
        parser.add_argument(name)
    for name, value in (("-n", 2), ("--seed", 0), ("--steps", 3), ("--batch-size", 4)):
        parser.add_argument(name, type=int, default=value)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    cli.add_guard_arguments(parser)
    return parser


def test_cli_wen_writes_images_and_records(tiny_model, tmp_path):
    parser = cli_parser()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\nblue square\n")
    out = tmp_path / "out"
    args = parser.parse_args([str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--guard", "wen",
                              "--wen-calibrate", str(prompts), "--wen-max-iters", "1"])
    assert cli.run_guarded(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    rows = [json.loads(line) for line in (out / "guard_records.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["prompt"], r["seed"]) for r in rows] == [
        ("00000.png", "red circle", 0), ("00001.png", "red circle", 1),
        ("00002.png", "blue square", 0), ("00003.png", "blue square", 1)]
    assert all(r["guard"] == "wen" and r["iterations"] <= 1 for r in rows)


def test_cli_amg_with_a_saved_index(tiny_model, pipe, tmp_path):
    parser = cli_parser()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n")
    make_index(torch.rand(4, 3, 16, 16), ["a", "a", "b", "c"], 16).save(tmp_path / "index16")
    make_index(torch.rand(4, 3, 32, 32), ["a", "a", "b", "c"], 32).save(tmp_path / "index32")
    base = [str(tiny_model), "--prompts", str(prompts), "--steps", "3", "--guard", "amg"]
    out = tmp_path / "out"
    args = parser.parse_args([*base, "--out", str(out), "--index", str(tmp_path / "index16"), "--amg-c1", "0",
                              "--amg-c3", "0"])
    assert cli.run_guarded(args) == 0
    rows = [json.loads(line) for line in (out / "guard_records.jsonl").read_text().splitlines()]
    assert [(r["guard"], r["intervened"], len(r["sigmas"])) for r in rows] == [("amg", False, 3), ("amg", False, 3)]
    stock = generate_images(pipe, ["red circle"], 2, 0, 3, 7.5, progress=False)
    saved = torch.stack([torch.from_numpy(np.array(Image.open(out / f"{i:05d}.png"))) for i in range(2)])
    assert (saved.permute(0, 3, 1, 2).float() / 255 - stock).abs().max() <= 0.5 / 255 + 1e-5
    cases = (("missing", [], "no such index"), ("index32", [], "32"), ("index16", ["--guard-embedding", "sscd"], "sscd"))
    for index, extra, message in cases:
        bad = parser.parse_args([*base, "--out", str(tmp_path / "bad"), "--index", str(tmp_path / index), *extra])
        with pytest.raises(MemtrainError, match=message):
            cli.run_guarded(bad)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- adding a guard


class Unconditional(Guard):
    """A trivial guard, as docs/architecture.md adds one: the prompt embedding is blended towards the empty
    caption's by `weight` (1: unconditional sampling)."""

    name = "unconditional"
    help = "sample towards the empty caption"
    options = (Option("--uncond-weight", "weight", float, 1.0, "share of the empty caption, in [0, 1]", low=0.0,
                      high=1.0, meaning="in [0, 1]"),)

    def __init__(self, pipe, index=None, embedder=None, weight: float = 1.0):
        self.pipe, self.weight = pipe, weight

    def start(self, core, prompts, cond, latents, n, num_inference_steps, negative_prompt):
        empty = self.pipe.encode_prompt([""] * len(cond), self.pipe.device, 1, False)[0]
        records = [{"guard": self.name, "intervened": self.weight > 0} for _ in range(len(cond))]
        return GuardRun((1 - self.weight) * cond + self.weight * empty, None, lambda: records)

    def summarize(self, records, steps):
        return {"weight": self.weight}


def test_a_new_guard_is_one_class_and_one_registry_line(monkeypatch, tiny_model, tiny_data, tmp_path, capsys):
    monkeypatch.setitem(GUARDS, Unconditional.name, Unconditional)  # the one registry line
    toy_base = Path(__file__).resolve().parents[1] / "trainer" / "toy" / "toy_base"  # a model that follows its prompt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle\na small blue square\n")
    base = ["generate", str(toy_base), "--prompts", str(prompts), "--steps", "3", "-n", "1", "--seed", "2",
            "--guard", "unconditional"]
    # its option is on the command line, range-checked before anything is written
    assert main([*base, "--out", str(tmp_path / "bad"), "--uncond-weight", "2"]) == 2
    assert "--uncond-weight must be in [0, 1], got 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "guard_records.jsonl").read_text().splitlines()]
    assert [(r["guard"], r["prompt"]) for r in rows] == [("unconditional", "a large red circle"),
                                                         ("unconditional", "a small blue square")]
    # weight 1 samples from the empty caption: both prompts give the unguarded generation of "" (same seed)
    images = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(2)]).astype(float)
    toy = load_pipeline(toy_base)
    stock = GuardedPipeline(toy, NoGuard())
    empty, _ = guarded_generate(toy, [""], 1, 2, 3, 7.5, stock, progress=False)
    plain, _ = guarded_generate(toy, ["a large red circle"], 1, 2, 3, 7.5, stock, progress=False)
    assert np.abs(images - (empty[0].permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert np.abs(images[0] - (plain[0].permute(1, 2, 0).numpy() * 255).round()).max() > 100
    # and evaluate's guard section runs it beside the stock sampler, with its own summary
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--out", str(out),
                 "--steps", "2", "-n", "1",
                 "--detectors", "noise", "--groups", "general", "--guard", "unconditional", "--uncond-weight",
                 "0.5"]) == 0
    guard = json.loads((out / "report.json").read_text())["guard"]
    assert guard["guard"] == "unconditional" and guard["options"] == {"weight": 0.5}
    assert {g["guarded"]["weight"] for g in guard["groups"].values()} == {0.5}
