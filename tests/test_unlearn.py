"""The LoRA unlearning edit on the committed toy base (a trained 32x32 toy SD) and the tiny random pipeline.

The toy base has a real text-conditional signal, so ablating a named prompt to the empty caption
must shrink that prompt's first-step noise magnitude (Wen et al.'s signal) and move its
generations, while a preserved prompt keeps both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore
from trainer.detect import noise_magnitude
from trainer.edit.save import LORA_FILE, save_edited, save_lora
from trainer.edit.unlearn import merged_unet, unlearn
from trainer.io import MemtrainError
from trainer.sample.generate import generate_images

TOY_BASE = Path(__file__).resolve().parents[1] / "trainer" / "toy" / "toy_base"
NAMED = "a large red circle and a small blue square"
KEPT = "a small green triangle"
GEN = dict(n=2, seed=0, steps=10, guidance_scale=7.5, progress=False)


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    pipe = load_pipeline(TOY_BASE)
    prompts = [NAMED, KEPT]
    before = noise_magnitude(pipe, prompts, n=2, num_inference_steps=10)
    g0 = generate_images(pipe, prompts, **GEN)
    result = unlearn(pipe, [NAMED], preserved=["", KEPT], steps=40, lr=2e-3, batch_size=2, sample_steps=10,
                     seed=0, progress=False)
    after = noise_magnitude(pipe, prompts, n=2, num_inference_steps=10)
    g1 = generate_images(pipe, prompts, **GEN)
    out = tmp_path_factory.mktemp("unlearn") / "lora"
    path = save_lora(result["lora_state_dict"], out)
    return dict(pipe=pipe, result=result, before=before, after=after, g0=g0, g1=g1, out=out, path=path)


def test_named_prompt_removed_preserved_prompt_kept(edited):
    before, after = edited["before"], edited["after"]
    assert after[0] < 0.8 * before[0], (before, after)  # the named prompt's text-conditional signal shrinks
    assert abs(after[1] - before[1]) < 0.05 * before[1], (before, after)
    change = (edited["g1"] - edited["g0"]).flatten(1).pow(2).mean(1).sqrt()  # pixel L2 per generation
    named, kept = change[:2], change[2:]
    assert named.min() > 0.08, change
    assert kept.max() < 0.05, change
    assert named.min() > 3 * kept.max(), change
    result = edited["result"]
    assert len(result["losses"]) == 40 and result["forget_set"] == 1
    assert result["preserve_losses"][0] == 0.0  # the gaussian-initialised LoRA starts as the frozen model
    assert sum(result["forget_losses"][-10:]) < sum(result["forget_losses"][:10])
    assert result["unet_evals"] > 0 and result["seconds"] > 0


def test_lora_loads_in_stock_pipeline(edited):
    assert edited["path"] == edited["out"] / LORA_FILE and edited["path"].exists()
    keys = list(load_file(edited["path"]))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    stock = StableDiffusionPipeline.from_pretrained(str(TOY_BASE), safety_checker=None, requires_safety_checker=False)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(edited["out"]))
    images = generate_images(stock, [NAMED, KEPT], **GEN)
    assert (images - edited["g1"]).abs().max() <= 1e-5


def test_merge_gives_a_plain_unet_and_pipeline(edited, tmp_path):
    pipe = edited["pipe"]
    merged = merged_unet(pipe.unet)
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert not getattr(merged, "_hf_peft_config_loaded", False)
    core = UNetCore(pipe)
    table, index, _ = core.encode_prompts([NAMED])
    x = core.initial_noise(2, 0)
    with torch.no_grad():
        lora = pipe.unet(x, 500, encoder_hidden_states=table[index].expand(2, -1, -1)).sample
        fused = merged(x, 500, encoder_hidden_states=table[index].expand(2, -1, -1)).sample
    assert (lora - fused).abs().max() <= 1e-4
    plain = type(pipe)(**{**pipe.components, "unet": merged})
    out = tmp_path / "merged"
    with save_edited(plain, out, TOY_BASE, {"method": "unlearn"}):
        pass
    reloaded = load_pipeline(out)
    assert not getattr(reloaded.unet, "_hf_peft_config_loaded", False)
    images = generate_images(reloaded, [NAMED, KEPT], **GEN)
    assert (images - edited["g1"]).abs().max() <= 1e-3
    with pytest.raises(MemtrainError, match="source"), save_edited(plain, TOY_BASE, TOY_BASE, {}):
        pass


def test_full_weights_remove_named_prompt_and_keep_preserved():
    """`weights="full"`: every UNet weight trained in place (no adapter); the same behaviour as the LoRA edit."""
    pipe = load_pipeline(TOY_BASE)
    prompts = [NAMED, KEPT]
    before = noise_magnitude(pipe, prompts, n=2, num_inference_steps=10)
    g0 = generate_images(pipe, prompts, **GEN)
    w0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = unlearn(pipe, [NAMED], preserved=["", KEPT], steps=30, lr=1e-4, batch_size=2, sample_steps=10, seed=0,
                     progress=False, weights="full", gradient_checkpointing=True)
    assert result["lora_state_dict"] is None and not getattr(pipe.unet, "_hf_peft_config_loaded", False)
    moved = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, w0[n])]
    assert len(moved) > 0.9 * len(w0)  # the whole UNet trains, not a subset
    after = noise_magnitude(pipe, prompts, n=2, num_inference_steps=10)
    g1 = generate_images(pipe, prompts, **GEN)
    assert after[0] < 0.8 * before[0], (before, after)
    assert abs(after[1] - before[1]) < 0.1 * before[1], (before, after)
    change = (g1 - g0).flatten(1).pow(2).mean(1).sqrt()
    assert change[:2].min() > 2 * change[2:].max(), change  # measured 0.142 vs 0.048


def test_adversarial_adds_dori_embeddings_full_weights(tiny_model):
    pipe = load_pipeline(tiny_model)
    result = unlearn(pipe, ["a small red circle"], steps=8, lr=1e-3, adversarial=True, adversarial_every=1,
                     attack_steps=1, sample_steps=2, batch_size=2, progress=False, weights="full")
    assert result["forget_set"] == 1 + 8 and result["weights"] == "full"
    # every other forget request stays on the memorized prompt, however many attack embeddings joined (drawn
    # uniformly from the growing set it would get about a quarter of them)
    assert result["memorized_share"] >= 0.5
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    with pytest.raises(MemtrainError, match="weights must be one of"):
        unlearn(pipe, ["a small red circle"], weights="half", progress=False)


def test_preserve_weight_scales_the_preservation_term(tiny_model):
    """`preserve_weight` multiplies the preserved prompts' term: 0 turns it off (no preserved draws), and a
    heavier weight weighs the same draws more (the draws depend on (seed, step) only)."""
    runs = {w: unlearn(load_pipeline(tiny_model), ["a small red circle"], preserved=["a large blue square"], steps=3,
                       lr=1e-3, sample_steps=2, batch_size=2, progress=False, weights="full", preserve_weight=w)
            for w in (0.0, 1.0, 5.0)}
    assert runs[0.0]["preserve_losses"] == [0.0] * 3 and runs[1.0]["preserve_losses"][1] > 0
    first = [runs[w]["forget_losses"][0] for w in (0.0, 1.0, 5.0)]  # the same draws (batched kernels' rounding)
    assert first[1] == first[2] and first[0] == pytest.approx(first[1], rel=1e-4)
    for w in (1.0, 5.0):  # the first step's total: forget + w * preserve on the same draws
        r = runs[w]
        assert r["losses"][1] == pytest.approx(r["forget_losses"][1] + w * r["preserve_losses"][1], rel=1e-5)
    assert runs[5.0]["losses"][1] != pytest.approx(runs[1.0]["losses"][1], rel=1e-3)


def test_adversarial_adds_perturbed_embeddings(tiny_model):
    pipe = load_pipeline(tiny_model)
    result = unlearn(pipe, ["a small red circle"], steps=4, lr=1e-3, adversarial=True, adversarial_every=2,
                     attack_eps=0.1, attack_steps=2, sample_steps=2, batch_size=2, progress=False,
                     inner_attack="bounded")
    assert result["forget_set"] == 1 + 2  # attacks at steps 0 and 2
    assert len(result["losses"]) == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    plain = unlearn(load_pipeline(tiny_model), ["a small red circle"], steps=4, lr=1e-3, sample_steps=2,
                    batch_size=2, progress=False)
    assert result["unet_evals"] > plain["unet_evals"]  # the attacks' evaluations are counted


def test_bad_input(tiny_model):
    pipe = load_pipeline(tiny_model)
    cases = [
        (dict(memorized=[]), "no memorized prompts"),
        (dict(memorized=["a", "b", "c"], anchors=["x", "y"]), "anchors"),
        (dict(memorized=["a"], steps=0), "steps"),
        (dict(memorized=["a"], rank=0), "rank"),
        (dict(memorized=["a"], adversarial=True, attack_eps=0.0), "attack_eps"),
        (dict(memorized=["a"], lr=-1.0), "lr"),
    ]
    for kwargs, match in cases:
        with pytest.raises(MemtrainError, match=match):
            unlearn(pipe, progress=False, **kwargs)
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False)  # nothing was added on bad input
    with pytest.raises(MemtrainError, match="no LoRA adapter"):
        merged_unet(pipe.unet)
    unlearn(pipe, ["a small red circle"], steps=1, sample_steps=2, batch_size=1, progress=False)
    with pytest.raises(MemtrainError, match="already carries a LoRA"):
        unlearn(pipe, ["a small red circle"], steps=1, progress=False)


SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from trainer.edit.unlearn import unlearn
from trainer.core.components import load_pipeline
from accelerate import PartialState

torch.set_num_threads(1)
pipe = load_pipeline(sys.argv[1])
result = unlearn(pipe, ["a small red circle"], preserved=["", "a large blue square"], steps=3,
                 lr=1e-2 if sys.argv[4] == "lora" else 1e-4, batch_size=int(sys.argv[3]), sample_steps=2,
                 progress=False, weights=sys.argv[4])
if PartialState().is_main_process:
    save_file(result["lora_state_dict"] or {k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_two_processes_match_one_process(tmp_path, tiny_model, weights):
    script = tmp_path / "run_unlearn.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(tiny_model), str(two), "1", weights]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), str(one), "2", weights], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w2, w1 = load_file(str(two)), load_file(str(one))
    assert w2.keys() == w1.keys()
    diff = torch.cat([(w2[k] - w1[k]).flatten() for k in w1]).norm()
    if weights == "lora":
        ups = [k for k in w1 if "up" in k]  # B starts at 0: its norm is how far training moved
        moved = torch.cat([w1[k].flatten() for k in ups]).norm()
    else:  # against the source's weights
        w0 = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
        moved = torch.cat([(w1[k] - w0[k]).flatten() for k in w1]).norm()
    assert moved > 0 and diff / moved < 1e-2, (float(diff), float(moved))


def test_cli(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "unlearn", "--help"])
    assert exit_info.value.code == 0 and "--adversarial" in capsys.readouterr().out
    prompts = tmp_path / "memorized.txt"
    prompts.write_text("a small red circle\n")
    out = tmp_path / "lora"
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(prompts), "--out", str(out),
                 "--steps", "2"]) == 0
    assert (out / LORA_FILE).exists() and (out / "edit.json").exists()
    merged = tmp_path / "merged"
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(prompts), "--out", str(merged), "--merge",
                 "--lora", str(out), "--steps", "1"]) == 0
    assert (merged / "model_index.json").exists()
    capsys.readouterr()
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(prompts), "--out", str(tiny_model)]) == 2
    assert "source" in capsys.readouterr().err
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(prompts), "--out", str(tmp_path / "x"),
                 "--lora", str(out)]) == 2
    assert "--merge" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(prompts), "--out", str(tmp_path / "x"),
                 "--preserve-weight", "-1"]) == 2
    assert "--preserve-weight" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_loading_an_unlearn_lora_prints_no_text_encoder_notice(tiny_model, tmp_path):
    """diffusers said "No LoRA keys associated to CLIPTextModel found" at every load of a UNet-only LoRA."""
    (tmp_path / "p.txt").write_text("a small red circle\n")
    assert main(["edit", "unlearn", str(tiny_model), "--memorized", str(tmp_path / "p.txt"), "--out",
                 str(tmp_path / "lora"), "--steps", "1"]) == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "generate", str(tiny_model), "--lora",
                          str(tmp_path / "lora"), "--prompts", "p.txt", "--out", "g", "--steps", "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "LoRA keys" not in run.stderr and "CLIPTextModel" not in run.stderr, run.stderr
    assert len(list((tmp_path / "g").glob("*.png"))) == 1
