import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_CACHE", tempfile.mkdtemp(prefix="memtrain-cache-"))  # `edit --evaluate` caches here

import torch  # noqa: E402

torch.set_num_threads(1)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from trainer.toy import world as toy_world  # noqa: E402
from trainer.toy.base import TinySize, build_components, build_tokenizer, save_pipeline  # noqa: E402

TINY = TinySize(image_size=16, vae_channels=(16, 32), latent_channels=4, unet_channels=(32, 32), text_dim=32, text_layers=1,
                text_heads=2, attention_head_dim=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised SD-shaped pipeline directory (16x16 images, 8x8x4 latents)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    parts = build_components(build_tokenizer(toy_world.vocabulary()), TINY, seed=0)
    save_pipeline(parts, out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small toy dataset: 2 duplicated images x 4 copies, 8 singletons, 4 held-out, 4 novel."""
    out = tmp_path_factory.mktemp("data") / "toy"
    toy_world.make_toy_data(out, toy_world.ToyDataConfig(seed=3, n_duplicated=2, copies=4, n_singletons=8,
                                                         n_heldout=4, n_novel=4))
    return out


def write_recipe(path: Path, model: Path, data: Path, out: Path, /, **sections) -> Path:
    """A tiny-run recipe file; `sections` override whole keys, e.g. train={"max_steps": 3}."""
    recipe = {
        "model": {"pretrained": str(model)},
        "data": {"path": str(data), "resolution": 16},
        "train": {"batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, "seed": 0},
        "checkpoint": {"every_steps": 2},
        "log": {"every_steps": 1, "progress": False},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path
