"""UCE (closed-form cross-attention edit) on tiny random pipelines: the edit solves its least-squares
problem, maps a memorized prompt's keys / values to its anchor's while a preserved prompt keeps its own,
and its LoRA form reproduces the edited weights to the reported residual and loads with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

import trainer
from trainer.core.components import load_pipeline
from trainer.edit.save import LORA_FILE, check_lora_base, load_for_edit, save_lora
from trainer.edit.uce import edited_linears, token_embeddings, uce_edit, uce_lora
from trainer.io import MemtrainError
from trainer.toy import world as toy_world
from trainer.toy.base import TinySize, build_components, build_tokenizer, save_pipeline

MEMORIZED = ["a large green ring and a small orange ring"]
TOY_BASE = Path(trainer.__file__).parent / "toy" / "toy_base"  # committed; layers of widths 32 and 64
PRESERVED = ["small purple diamond"]  # no common prefix with the memorized prompt (a shared prefix is the same tokens)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny pipeline whose text width (192) exceeds the tokens of two prompts (154), as SD's 768 does."""
    size = TinySize(image_size=16, vae_channels=(16, 32), latent_channels=4, unet_channels=(32, 32), text_dim=192,
                    text_layers=1, text_heads=2, attention_head_dim=2)
    out = tmp_path_factory.mktemp("models") / "wide"
    save_pipeline(build_components(build_tokenizer(toy_world.vocabulary()), size, seed=1), out)
    return out


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().double().clone() for n, m in edited_linears(pipe.unet).items()}


def _relative_errors(pipe, w0, w1):
    """Per layer: ||W c_e - W0 c*_e|| / ||W0 c_e - W0 c*_e|| and ||W c_p - W0 c_p|| / ||W0 c_p - W0 c*_e||."""
    emb = token_embeddings(pipe, MEMORIZED + [""] + PRESERVED)
    e, star, p = emb[0].T, emb[1].T, emb[2].T
    out = []
    for n in w0:
        out.append((float((w1[n] @ e - w0[n] @ star).norm() / (w0[n] @ e - w0[n] @ star).norm()),
                    float((w1[n] @ p - w0[n] @ p).norm() / (w0[n] @ p - w0[n] @ star).norm())))
    return torch.tensor(out)


def test_uce_maps_memorized_to_anchor_and_keeps_preserved(wide_model):
    pipe = load_pipeline(wide_model)
    w0 = _weights(pipe)
    result = uce_edit(pipe, MEMORIZED, preserved=PRESERVED, lam=0.1)
    w1 = _weights(pipe)
    errors = _relative_errors(pipe, w0, w1)
    assert errors[:, 0].max() < 0.05, errors  # memorized keys / values now those of the empty prompt
    assert errors[:, 1].max() < 0.1, errors  # preserved prompt's barely moved
    assert result["total_changed"] == sum(result["changed"].values()) == sum(w.numel() for w in w0.values())
    assert set(result["changed"]) == {f"{n}.weight" for n in w0}
    for name, info in result["delta"].items():
        assert info["fro_norm"] == pytest.approx(float((w1[name[:-7]] - w0[name[:-7]]).norm()), rel=1e-4)
        assert 1 <= info["rank_for_tol"] <= info["numerical_rank"] <= 192

    # without the preservation term the preserved prompt moves with the memorized one: the term does the work
    pipe = load_pipeline(wide_model)
    uce_edit(pipe, MEMORIZED, lam=0.1)
    assert _relative_errors(pipe, w0, _weights(pipe))[:, 1].min() > 0.5


def test_uce_solves_its_least_squares_problem(tiny_model):
    """W minimises lam||W - W0||^2 + sum_e ||W c_e - W0 c*_e||^2 + s sum_p ||W c_p - W0 c_p||^2: zero gradient."""
    pipe = load_pipeline(tiny_model)
    w0 = _weights(pipe)
    anchors = ["a small red square"]
    lam, scale = 0.5, 2.0
    uce_edit(pipe, MEMORIZED, anchors=anchors, preserved=PRESERVED, lam=lam, preserve_scale=scale)
    emb = token_embeddings(pipe, MEMORIZED + anchors + PRESERVED)
    e, star, p = emb[0].T, emb[1].T, emb[2].T
    for name, w in _weights(pipe).items():
        a = w0[name]
        grad = lam * (w - a) + (w @ e - a @ star) @ e.T + scale * (w @ p - a @ p) @ p.T
        scale_of_terms = (lam * a).norm() + (a @ star @ e.T).norm() + scale * (a @ p @ p.T).norm()
        assert grad.norm() / scale_of_terms < 1e-5, name
        assert (w - a).norm() / a.norm() > 1e-3, name  # and it did move


def test_uce_lora_reproduces_the_edit_and_loads_with_stock_diffusers(tiny_model, tmp_path):
    edited = load_pipeline(tiny_model)
    uce_edit(edited, MEMORIZED, preserved=PRESERVED)
    target = _weights(edited)

    pipe = load_pipeline(tiny_model)
    w0 = _weights(pipe)
    result = uce_lora(pipe, MEMORIZED, preserved=PRESERVED)
    assert all(torch.equal(w, w0[n]) for n, w in _weights(pipe).items())  # the pipeline is left unedited
    lora = result["lora"]
    assert lora["rank"] == max(v["rank_for_tol"] for v in lora["layers"].values())
    assert lora["max_residual"] <= 1e-3
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in result["lora_state_dict"])

    file = save_lora(result["lora_state_dict"], tmp_path / "lora")
    assert file.name == LORA_FILE
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    stock.load_lora_weights(str(tmp_path / "lora"))
    stock.fuse_lora()
    stock.unload_lora_weights()
    fused = _weights(stock)
    for name in w0:
        delta = (target[name] - w0[name]).norm()
        residual = float((fused[name] - target[name]).norm() / delta)
        assert residual <= lora["layers"][f"{name}.weight"]["residual"] * 1.01 + 1e-5, name

    # a given rank: the reported residual is the true one
    low = uce_lora(load_pipeline(tiny_model), MEMORIZED, preserved=PRESERVED, rank=1)
    assert low["lora"]["rank"] == 1
    sd = low["lora_state_dict"]
    for name in w0:
        up, down = sd[f"unet.{name}.lora.up.weight"].double(), sd[f"unet.{name}.lora.down.weight"].double()
        true = float((w0[name] + up @ down - target[name]).norm() / (target[name] - w0[name]).norm())
        assert low["lora"]["layers"][f"{name}.weight"]["residual"] == pytest.approx(true, rel=1e-3, abs=1e-6)
        assert true > 1e-3  # rank 1 is not enough here, so the automatic rank was needed


def test_uce_lora_with_layers_of_different_widths(tmp_path):
    """One rank r for every layer; a layer whose update has full rank below r is exact, padded with zeros."""
    edited = load_pipeline(TOY_BASE)
    uce_edit(edited, MEMORIZED, preserved=PRESERVED)
    target = _weights(edited)
    result = uce_lora(load_pipeline(TOY_BASE), MEMORIZED, preserved=PRESERVED)
    lora = result["lora"]
    small = [n for n, w in target.items() if min(w.shape) < lora["rank"]]
    assert small and len(small) < len(target)  # the case this test is about
    assert all(lora["layers"][f"{n}.weight"]["residual"] < 1e-9 for n in small)
    assert lora["max_residual"] <= 1e-3 and {v.shape[0] for k, v in result["lora_state_dict"].items()
                                             if ".lora.down." in k} == {lora["rank"]}
    save_lora(result["lora_state_dict"], tmp_path)
    stock = StableDiffusionPipeline.from_pretrained(str(TOY_BASE), safety_checker=None)
    w0 = _weights(stock)
    stock.load_lora_weights(str(tmp_path))
    stock.fuse_lora()
    stock.unload_lora_weights()
    fused = _weights(stock)
    for name in target:
        residual = float((fused[name] - target[name]).norm() / (target[name] - w0[name]).norm())
        assert residual <= lora["layers"][f"{name}.weight"]["residual"] * 1.01 + 1e-5, name


def test_lora_of_another_base_is_refused(tiny_model, wide_model, tmp_path):
    wide = uce_lora(load_pipeline(wide_model), MEMORIZED)  # to_k / to_v take 192-dim inputs there, 32 here
    save_lora(wide["lora_state_dict"], tmp_path / "wide")
    with pytest.raises(MemtrainError, match=r"wide.*input size 192 != 32"):
        load_for_edit(tiny_model, tmp_path / "wide")

    own = uce_lora(load_pipeline(tiny_model), MEMORIZED)["lora_state_dict"]
    renamed = {k.replace("mid_block", "mid_block_x"): v for k, v in own.items()}
    save_lora(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(MemtrainError, match=r"renamed\.safetensors.*no module 'mid_block_x"):
        check_lora_base(load_pipeline(tiny_model), tmp_path / "renamed.safetensors")

    # the matching LoRA is fused: the loaded weights are the edited ones
    save_lora(own, tmp_path / "own")
    pipe = load_for_edit(tiny_model, tmp_path / "own", device="cpu")
    base = _weights(load_pipeline(tiny_model))
    edited = load_pipeline(tiny_model)
    uce_edit(edited, MEMORIZED)
    target = _weights(edited)
    for name, w in _weights(pipe).items():
        assert (w - target[name]).norm() <= 2e-3 * (target[name] - base[name]).norm(), name
    assert not getattr(pipe.unet, "peft_config", None)


def test_bad_uce_arguments(tiny_model):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(MemtrainError, match="no memorized prompt"):
        uce_edit(pipe, [])
    with pytest.raises(MemtrainError, match="lam must be > 0"):
        uce_edit(pipe, MEMORIZED, lam=0)
    with pytest.raises(MemtrainError, match="2 anchors for 1 memorized"):
        uce_edit(pipe, MEMORIZED, anchors=["a", "b"])
    with pytest.raises(MemtrainError, match="no Linear"):
        uce_edit(pipe, MEMORIZED, layers=("to_q_missing",))
