"""Usage: scripts/seed_spread.py PIPELINE PROMPTS HELDOUT_DIR [--seeds 0,100,200] [-n 2] [--quality-feature toy]

The seed-to-seed spread of a model's quality on the label-0 (general) prompts of PROMPTS: the prompts are
generated at each seed (DDIM 50, guidance 3, as `memtrain evaluate` in docs/results.md) and scored as the
report's quality section scores them (`report.sections.general_scenario`: KID against HELDOUT_DIR's images,
the feature's alignment). Prints one line per seed, then mean, sd and range: the yardstick a guard's or an
edit's quality change is compared with (docs/results.md)."""

import argparse

import numpy as np
import torch

from trainer.core.components import load_pipeline
from trainer.data import load_images, load_rows
from trainer.measure.features import QUALITY_FEATURES, choose_quality_feature
from trainer.prompts import read_labelled_prompts
from trainer.report.sections import general_scenario
from trainer.sample.generate import generate_images
from trainer.toy.checker import TOY_QUALITY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline")
    p.add_argument("prompts")
    p.add_argument("heldout")
    p.add_argument("--seeds", default="0,100,200,300,400,500")
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--quality-feature", default="pix8")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    QUALITY_FEATURES.setdefault("toy", TOY_QUALITY)  # as the command line names it
    feature = choose_quality_feature(args.quality_feature)
    general = [r.text for r in read_labelled_prompts(args.prompts) if r.label == 0]
    rows = load_rows(args.heldout)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    heldout = load_images(rows.images, rows.names, resolution, progress=False)
    alignment, kids = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        images = generate_images(pipe, general, n=args.n, seed=seed, steps=50, guidance_scale=3, progress=False)
        q = general_scenario(images, [t for t in general for _ in range(args.n)], heldout, quality=feature)
        alignment.append(q.get(feature.alignment_key, np.nan) if feature.alignment is not None else np.nan)
        kids.append(q["kid"])
        print(f"seed {seed}: alignment {alignment[-1]:.4f} KID {kids[-1]:.4f}", flush=True)
    for name, values in (("alignment", np.array(alignment)), ("KID", np.array(kids))):
        print(f"{name}: mean {values.mean():.4f} sd {values.std(ddof=1):.4f} range {values.min():.4f}-{values.max():.4f}")


if __name__ == "__main__":
    main()
