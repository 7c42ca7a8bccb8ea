"""The fine-tuning loop on a tiny SD-shaped model: resume equivalence, LoRA export, logging."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from trainer.cli import main
from trainer.mitigate.loss_mask import LossMask
from trainer.tracking import read_jsonl


def unet_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "logs" / "metrics.jsonl")}


def test_resume_continues_exactly(tmp_path, tiny_model, tiny_data):
    """Interrupted at step 3 and resumed == uninterrupted: same per-step losses, same final weights."""
    train = {"max_steps": 6, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2, "batch_size": 3,
             "snr_gamma": 5.0, "noise_offset": 0.05}
    full = tmp_path / "full"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", full, train=train,
                          checkpoint={"every_steps": 3}, data={"random_flip": True})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=3"]) == 0
    assert (part / "checkpoints" / "checkpoint-3").is_dir()
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0

    a, b = unet_weights(full), unet_weights(part)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    la, lb = losses(full), losses(part)
    assert sorted(la) == list(range(1, 7)) and sorted(lb) == list(range(1, 7))
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-7, step
    # the run really trained: weights moved away from the base
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4


@pytest.mark.parametrize("stop", [4, 6], ids=["at-epoch-boundary", "inside-epoch-1"])
def test_resume_past_the_first_epoch_continues_exactly(tmp_path, tiny_model, tiny_data, stop):
    """16 rows at batch 4 = 4 steps an epoch: resumed at the end of epoch 0 or inside epoch 1 == uninterrupted."""
    train = {"max_steps": 9, "batch_size": 4}
    full = tmp_path / "full"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", full, train=train,
                          checkpoint={"every_steps": stop}, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", f"train.max_steps={stop}"]) == 0
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    la, lb = losses(full), losses(part)
    assert sorted(lb) == list(range(1, 10))
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-7, (step, la[step], lb[step])


def test_ema_resume_is_exact_and_checkpoints_hold_no_pickle(tmp_path, tiny_model, tiny_data):
    """The EMA weights ride in the checkpoint as safetensors + JSON (a resume unpickles nothing of ours) and a
    resumed EMA run exports exactly the weights of an uninterrupted one."""
    train = {"max_steps": 6, "batch_size": 4, "ema": True, "ema_decay": 0.9}
    full = tmp_path / "full"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", full, train=train,
                          checkpoint={"every_steps": 3})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=3"]) == 0
    checkpoint = part / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "ema_state.safetensors").exists() and (checkpoint / "ema_state.json").exists()
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))  # accelerate loads these with weights_only=False
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    a, b = unet_weights(full), unet_weights(part)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_checkpoint_total_limit_and_atomic_names(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          checkpoint={"every_steps": 1, "total_limit": 2}, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-3", "checkpoint-4"]
    info = json.loads((out / "checkpoints" / "checkpoint-4" / "memtrain_checkpoint.json").read_text())
    assert info["step"] == 4
    assert not (out / "pipeline").exists()


def test_lora_export_loads_in_stock_diffusers(tmp_path, tiny_model, tiny_data):
    """LoRA weights written by `memtrain train` load with `pipe.load_lora_weights` and give the
    trained adapter's outputs (compared with the adapter rebuilt from the accelerate checkpoint)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    out = tmp_path / "lora"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          model={"pretrained": str(tiny_model), "lora": {"rank": 4}},
                          train={"learning_rate": 1e-2})
    assert main(["train", str(recipe)]) == 0
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    assert weights.exists()

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    base_unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    pipe.load_lora_weights(str(out / "lora"))

    reference = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    state = load_file(str(out / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        loaded = pipe.unet(x, t, hidden).sample
        expected = reference(x, t, hidden).sample
        base = base_unet(x, t, hidden).sample
    assert torch.allclose(loaded, expected, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-3  # the adapter changed the model


def test_jsonl_metrics_and_recipe_are_written(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          train={"mixed_precision": "bf16", "ema": True, "ema_decay": 0.9,
                                 "gradient_checkpointing": True, "gradient_accumulation_steps": 2})
    assert main(["train", str(recipe)]) == 0
    rows = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["lr"] == 1e-3 for r in rows)
    assert "ema: true" in (out / "recipe.yaml").read_text()
    # the exported pipeline holds the EMA weights, which differ from both the base and the raw weights
    ema = unet_weights(out)
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((ema[k] - base[k]).abs().max().item() for k in ema) > 0


def test_loss_mask_drops_samples_over_threshold(tmp_path, tiny_model, tiny_data):
    """Wen et al. loss masking: with a threshold below every magnitude all samples are masked (and
    the weights do not move); with a huge one none are; the count is logged per step."""
    from trainer.mitigate.loss_mask import conditional_magnitude

    runs = {}
    for name, threshold in (("all", 1e-6), ("none", 1e6)):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model, tiny_data / "train", out,
                              train={"loss_mask_threshold": threshold, "max_steps": 2})
        assert main(["train", str(recipe)]) == 0
        runs[name] = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["masked"] for r in runs["all"]] == [4, 4]
    assert [r["masked"] for r in runs["none"]] == [0, 0]
    assert all(r["noise_magnitude"] > 0 for r in runs["none"])
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    masked = unet_weights(tmp_path / "all")
    # AdamW weight decay still applies, but no gradient reached the weights
    assert max((masked[k] - base[k] * (1 - 1e-3 * 1e-2) ** 2).abs().max().item() for k in base) < 1e-6

    # v-prediction: the epsilon-space difference is sqrt(abar_t) times the v difference
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction")
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 990])
    noisy = torch.randn(3, 4, 2, 2)
    expected = (cond - uncond).flatten(1).norm(dim=1) * sched.alphas_cumprod[t].sqrt()
    assert torch.allclose(conditional_magnitude(cond, uncond, noisy, t, sched), expected, atol=1e-6)


def test_adaptive_loss_mask_masks_the_stated_share(tmp_path, tiny_model, tiny_data):
    """`train.loss_mask_quantile`: nothing is masked while the window fills (the warm-up), then each step's
    samples at or over the running q-quantile of ||d(c)|| in their timestep range are: about 1 - q of them."""
    out = tmp_path / "q"
    recipe = write_recipe(tmp_path / "q.yaml", tiny_model, tiny_data / "train", out,
                          train={"loss_mask_quantile": 0.75, "loss_mask_window": 64, "loss_mask_timestep_bins": 4,
                                 "max_steps": 28, "batch_size": 8})
    assert main(["train", str(recipe)]) == 0
    rows = read_jsonl(out / "logs" / "metrics.jsonl")
    warmup = 64 // 8
    assert [r["masked"] for r in rows[:warmup]] == [0] * warmup and all("mask_threshold" not in r for r in rows[:warmup])
    after = rows[warmup:]
    assert all(r["mask_threshold"] > 0 for r in after)
    share = sum(r["masked"] for r in after) / (8 * len(after))
    assert 0.15 <= share <= 0.35, share  # stated share 0.25
    assert len({r["mask_threshold"] for r in after}) > 1  # the thresholds follow the running distribution


def test_loss_mask_window_quantiles_per_timestep_range():
    """The window's quantile on magnitudes that fall with the timestep (as ||d(c)|| does): one quantile over
    all timesteps masks only low-noise samples; per timestep range, about 1 - q of every range."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (3000,), generator=g)
    m = 3.0 * (1 - t / 1000) + 0.3 * torch.rand(3000, generator=g)
    shares = {}
    for bins in (1, 10):
        mask = LossMask(quantile=0.9, window=1000, bins=bins)
        assert mask.thresholds(t[:8]) is None  # warm-up
        mask.record(m[:1000], t[:1000])
        assert torch.equal(mask.values, m[:1000]) and torch.equal(mask.steps, t[:1000])
        if bins == 1:
            assert mask.thresholds(t[:1]).item() == pytest.approx(torch.quantile(m[:1000].double(), 0.9).item())
        masked = m[1000:] >= mask.thresholds(t[1000:])
        shares[bins] = [masked[(t[1000:] // 100) == b].float().mean().item() for b in range(10)]
        assert abs(masked.float().mean().item() - 0.1) < 0.03
        mask.record(m[1000:], t[1000:])
        assert torch.equal(mask.values, m[2000:])  # the last `window` values
    assert shares[1][0] > 0.7 and max(shares[1][3:]) == 0.0  # all at low t
    assert all(0.03 < s < 0.2 for s in shares[10])


def test_loss_mask_keys_are_checked(tmp_path, tiny_model, tiny_data, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out")
    for overrides, message in ((["train.loss_mask_quantile=0.9", "train.loss_mask_threshold=2.0"], "both set"),
                               (["train.loss_mask_quantile=1.0"], "loss_mask_quantile"),
                               (["train.loss_mask_quantile=0.9", "train.loss_mask_window=1"], "loss_mask_window")):
        assert main(["train", str(recipe), *overrides]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_datasets_dataset_with_caption_lists_and_validation_images(tmp_path, tiny_model, tiny_data):
    """A `datasets` save_to_disk dataset whose caption column holds lists (MC draws one per sample),
    and validation images written at intervals."""
    import datasets
    from PIL import Image

    rows = [json.loads(line) for line in (tiny_data / "train" / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({
        "img": [Image.open(tiny_data / "train" / r["file_name"]).convert("RGB") for r in rows],
        "captions": [[r["text"], "a picture"] for r in rows],
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "ds", out,
                          data={"path": str(tmp_path / "ds"), "image_column": "img", "caption_column": "captions",
                                "captions": {"multiple_captions": True}},
                          log={"validation_prompts": ["a small red circle"],
                               "validation_every": 2, "validation_images": 2})
    assert main(["train", str(recipe)]) == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert len(read_jsonl(out / "logs" / "metrics.jsonl")) == 4


@pytest.mark.parametrize("flip", [False, True], ids=["one-view-a-row", "random-flips"])
def test_data_cache_trains_as_without_it(tmp_path, tiny_model, tiny_data, flip):
    """data.cache=true (decoded images and VAE posteriors kept across epochs) trains as without it for three
    epochs: bit-equal when every row has one view; with random flips a view first met in a smaller batch is
    encoded there (another rounding), so the losses agree to float rounding."""
    runs = {}
    for cache in (False, True):
        out = tmp_path / f"cache-{cache}"
        recipe = write_recipe(tmp_path / f"r{cache}.yaml", tiny_model, tiny_data / "train", out,
                              train={"max_steps": 12, "noise_offset": 0.1}, data={"random_flip": flip, "cache": cache})
        assert main(["train", str(recipe)]) == 0
        runs[cache] = out
    la, lb = losses(runs[False]), losses(runs[True])
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    a, b = unet_weights(runs[False]), unet_weights(runs[True])
    if not flip:
        assert la == lb
        assert all(torch.equal(a[k], b[k]) for k in a)
        return
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5 * abs(la[step]), (step, la[step], lb[step])
    # Adam's update of a weight whose gradient is at rounding level is itself noise of size lr: the weights are
    # compared as a whole, their distance against how far training moved them
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = torch.cat([(a[k] - base[k]).flatten() for k in a])
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert apart.norm() < 1e-2 * moved.norm(), float(apart.norm() / moved.norm())


def test_vae_posterior_cache_encodes_each_view_once(tiny_model):
    """The cache returns the posterior of a view's first encoding (not the pixels it is given later), equal to an
    uncached encoding of the same pixels up to float rounding."""
    from diffusers import AutoencoderKL

    from trainer.training.loss import vae_posterior

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    views = [(i, 0, 0, False) for i in range(4)]
    cache = {}
    with torch.no_grad():
        mean, std = vae_posterior(vae, pixels, views, cache)
        plain_mean, plain_std = vae_posterior(vae, pixels)
        assert len(cache) == 4
        torch.testing.assert_close(mean, plain_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, plain_std, rtol=1e-5, atol=1e-6)
        # views 0 and 2 again (cached), view 4 new: only the new one is encoded from the pixels given now
        again_mean, _ = vae_posterior(vae, torch.zeros(3, 3, 16, 16), [views[0], (4, 0, 0, False), views[2]], cache)
        zero_mean, _ = vae_posterior(vae, torch.zeros(1, 3, 16, 16))
    assert len(cache) == 5
    torch.testing.assert_close(again_mean[[0, 2]], mean[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(again_mean[1], zero_mean[0], rtol=1e-5, atol=1e-6)
    assert (mean[0] - zero_mean[0]).abs().max() > 1e-3  # the pixels matter: the cache really reused view 0
