import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MEMTRAIN_CACHE", tempfile.mkdtemp(prefix="memtrain-cache-"))  # `edit --evaluate` caches here

import torch  # noqa: E402

torch.set_num_threads(1)

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer.core.unet_core import UNetCore, encode_latents  # noqa: E402
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


def train_memorizing_model(out: Path, steps: int = 150, general: int = 200, heldout: int = 0,
                           ) -> tuple[torch.Tensor, list[str]]:
    """Fine-tune the tiny SD-shaped model for a few seconds so that it memorizes ONE toy image, and save it to
    `out`: half of every batch is that image with its full caption (a scene of at least two objects), the other
    half `general` other toy images captioned only by their first shape ("a circle", ...), so each general
    caption stands for ~30 images; `heldout` more images are drawn and never trained on. The latents are
    scaled to unit variance (as SD's scaling factor gives); 10% caption dropout. Returns (images in [0, 1]:
    the memorized one, the general ones, the held-out ones; their captions)."""
    torch.manual_seed(0)
    parts = build_components(build_tokenizer(toy_world.vocabulary()), TINY, seed=0)
    rng = random.Random(0)
    memorized = toy_world.random_scene(rng)
    while len(memorized.objects) < 2:
        memorized = toy_world.random_scene(rng)
    scenes = [memorized] + [toy_world.random_scene(rng) for _ in range(general + heldout)]
    images = torch.stack([torch.tensor(np.asarray(toy_world.render(s, rng, size=TINY.image_size), dtype=np.float32)
                                       / 255).permute(2, 0, 1) for s in scenes])
    captions = [memorized.caption()] + [f"a {s.objects[0].shape}" for s in scenes[1:]]
    latents = encode_latents(parts, images[: 1 + general] * 2 - 1, seed=0)
    scale = 1.0 / float(latents.std())
    parts["vae"].register_to_config(scaling_factor=parts["vae"].config.scaling_factor * scale)
    latents = latents * scale
    core = UNetCore(parts)
    table, index, e0 = core.encode_prompts(captions[: 1 + general])
    unet = parts["unet"]
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(steps):
        rows = torch.randint(1, len(index), (4,), generator=g)
        rows[:2] = 0
        emb = table[index[rows]].clone()
        emb[torch.rand(4, generator=g) < 0.1] = table[e0]  # caption dropout
        noise = torch.randn(latents[rows].shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        pred = unet(core.add_noise(latents[rows], noise, t), t, encoder_hidden_states=emb).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    save_pipeline(parts, out)
    return images, captions


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


def optional_extra(module: str):
    """The mark of a test of an optional extra: skipped where `module` is not installed, except under
    MEMTRAIN_REQUIRE_EXTRAS=1 (.ci/run, which installs the extras), where it runs and so fails without it."""
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing and os.environ.get("MEMTRAIN_REQUIRE_EXTRAS") != "1",
                              reason=f"{module} is not installed (an optional extra: `make extras`)")


# ---------------------------------------------------------------- N processes = 1 process, gradient for gradient

# Recipe keys that make the optimizer plain SGD, so that the weights show the gradient's scale: AdamW with
# beta1 = 0, no weight decay and an epsilon far above every |gradient| steps by lr * g / (|g| + eps), i.e.
# (lr / eps) * g to a relative |g| / eps (<= 1e-5 on the tiny model), and no clipping. Adam's own update is
# invariant to the gradient's scale and clipping bounds it: a sum over processes instead of the mean passes
# under either.
SGD = {"adam_beta1": 0.0, "adam_weight_decay": 0.0, "adam_epsilon": 1e4, "max_grad_norm": 0.0, "learning_rate": 1e3}


def assert_same_sgd_steps(base_dir, a_dir, b_dir) -> None:
    """Two SGD runs moved every UNet weight by the same amount (the sum of their steps' gradients, times the
    learning rate) up to float rounding (measured 2e-6): a gradient twice or half as large is a relative error
    of 1 or 0.5."""
    name = "unet/diffusion_pytorch_model.safetensors"
    base, a, b = (load_file(str(d / name)) for d in (base_dir, a_dir, b_dir))
    moved_a = torch.cat([(a[k] - base[k]).flatten() for k in base])
    moved_b = torch.cat([(b[k] - base[k]).flatten() for k in base])
    assert moved_b.norm() > 1e-3 * torch.cat([v.flatten() for v in base.values()]).norm()  # training moved it
    assert (moved_a - moved_b).norm() < 1e-4 * moved_b.norm(), float((moved_a - moved_b).norm() / moved_b.norm())


# ---------------------------------------------------------------- the demo's model, trained once per run

ROOT = Path(__file__).resolve().parents[1]
# The demo trains 2,400 steps: 9-10 minutes on an idle 2-core AMD EPYC, 32-46 minutes on a loaded one
# (docs/results.md). Past CI's whole time limit the fixture fails (its process group is killed) instead
# of waiting on a hung process.
DEMO_TRAIN_TIMEOUT = 5400


def source_digest() -> str:
    """sha256 over the package's sources, recipes and toy base: a cached demo is reused only by the same code."""
    digest = hashlib.sha256()
    for top in ("trainer", "recipes"):
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                digest.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """(OUT, report.json) of `memtrain demo --out OUT`, trained once per test session for every slow test that
    needs the demo's model. MEMTRAIN_TEST_DEMO=DIR keeps it in DIR and reuses it in later sessions while
    the package's code is unchanged (the digest in DIR/.source-digest)."""
    cache = os.environ.get("MEMTRAIN_TEST_DEMO")
    root = Path(cache) if cache else tmp_path_factory.mktemp("demo")
    # the stamp lies beside OUT, not in it: `memtrain demo` replaces only a folder of its own output
    out, stamp, digest = root / "demo", root / ".source-digest", source_digest()
    if not (stamp.is_file() and stamp.read_text() == digest and (out / "report.json").is_file()):
        if root.exists() and any(root.iterdir()):  # an older demo of this cache (other code, or cut short)
            assert stamp.is_file(), f"MEMTRAIN_TEST_DEMO={root} is not a demo cache"
            shutil.rmtree(out, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text("training")  # marks ROOT as this fixture's, should the run be cut short
        cmd = [sys.executable, "-m", "trainer.cli", "demo", "--out", str(out), "log.progress=false"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a timeout kills the trainers too
        try:
            _, err = proc.communicate(timeout=DEMO_TRAIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"`memtrain demo` did not finish in {DEMO_TRAIN_TIMEOUT} s")
        assert proc.returncode == 0, err[-3000:]
        stamp.write_text(digest)
    return out, json.loads((out / "report.json").read_text())
