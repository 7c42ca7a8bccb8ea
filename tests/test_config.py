"""Recipes: YAML + overrides -> typed dataclasses, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_recipe
from trainer.io import MemtrainError
from trainer.recipe import TrainRecipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(TrainRecipe, path, ["model.pretrained=x", "data.path=y"])
    recipe.validate()


def test_overrides_types_and_nested_suggestions(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {pretrained: m}\ndata: {path: d}\ntrain: {learning_rate: 1e-4}\n")
    recipe = load_recipe(TrainRecipe, path, ["model.lora.rank=8", "log.trackers=[wandb, tensorboard]",
                                              "train.snr_gamma=5", "checkpoint.total_limit=null"])
    assert recipe.train.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string; accepted as a float
    assert recipe.model.lora.rank == 8 and recipe.train.snr_gamma == 5.0
    assert recipe.log.trackers == ["wandb", "tensorboard"] and recipe.checkpoint.total_limit is None
    assert recipe.export == "lora"
    with pytest.raises(MemtrainError, match=r"unknown key `model.lora.rnak`; did you mean `model.lora.rank`"):
        load_recipe(TrainRecipe, path, ["model.lora.rnak=4"])
    with pytest.raises(MemtrainError, match=r"`model.lora.rank` must be int, got 'four'"):
        load_recipe(TrainRecipe, path, ["model.lora.rank=four"])
    with pytest.raises(MemtrainError, match=r"override `train` must look like key.sub=value"):
        load_recipe(TrainRecipe, path, ["train"])
    with pytest.raises(MemtrainError, match=r"not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: [unclosed\n")
        load_recipe(TrainRecipe, bad)
    recipe = load_recipe(TrainRecipe, path, ["train.ema=true", "model.lora.rank=4"])
    with pytest.raises(MemtrainError, match="train.ema"):
        recipe.validate()
