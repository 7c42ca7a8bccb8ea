"""Where a step of `memtrain demo`'s training goes: cProfile (CPU time) of N steps of the demo's recipe in one
process, grouped into the parts of a step (docs/results.md, "The demo on both cores").

    OMP_NUM_THREADS=1 python scripts/profile_demo.py --steps 40
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_recipe  # noqa: E402
from trainer.recipe import TrainRecipe  # noqa: E402
from trainer.toy import world as toy_world  # noqa: E402
from trainer.toy.base import TOY_BASE  # noqa: E402
from trainer.training.loop import train  # noqa: E402

# part of a step: (file suffix, function name) whose cumulative time it is
PARTS = {
    "backward (UNet + text encoder)": ("accelerate/accelerator.py", "backward"),
    "UNet forward": ("unets/unet_2d_condition.py", "forward"),
    "VAE encode": ("autoencoders/autoencoder_kl.py", "encode"),
    "text encoder forward": ("models/clip/modeling_clip.py", "forward"),
    "data loading (decode, resize, tokenize)": ("torch/utils/data/dataloader.py", "__next__"),
    "optimizer step": ("accelerate/optimizer.py", "step"),
    "EMA update": ("diffusers/training_utils.py", "step"),
    "gather of the loss (logging)": ("accelerate/accelerator.py", "gather"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="memtrain_profile_") as tmp:
        toy_world.make_toy_data(Path(tmp) / "data", toy_world.ToyDataConfig())
        recipe = load_recipe(TrainRecipe, "toy", [
            f"model.pretrained={TOY_BASE}", f"data.path={Path(tmp) / 'data' / 'train'}", f"output.dir={tmp}/run",
            "log.progress=false", f"train.max_steps={args.steps}", "output.export=none", "checkpoint.every_steps=100000"])
        profile = cProfile.Profile(time.process_time)
        profile.runcall(train, recipe)
    stats = pstats.Stats(profile).stats
    total = sum(tt for _, _, tt, _, _ in stats.values())
    loop = next(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                if file.endswith("training/loop.py") and name == "_train_loop")
    print(f"CPU s: {total:.1f} in all, {loop:.1f} in the loop ({loop / args.steps:.3f} per step)")
    for part, (suffix, function) in PARTS.items():
        seconds = max((ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                       if file.endswith(suffix) and name == function), default=0.0)  # the outermost
        print(f"{part:42s} {seconds / args.steps:.3f} s/step  {100 * seconds / loop:5.1f}% of the loop")


if __name__ == "__main__":
    main()
