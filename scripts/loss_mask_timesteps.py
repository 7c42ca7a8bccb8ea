"""How the loss mask's signal ||d(c)|| depends on the timestep, and which samples one quantile over all
timesteps would mask compared with the per-timestep-range quantile of `train.loss_mask_quantile`.

Draws --samples training rows, a timestep and noise each (seeded), computes ||d(c)|| at the noisy latent as
the training loop does (`mitigate.loss_mask.conditional_magnitude`) and prints, per timestep range, the
median magnitude and the share each rule masks (q = --quantile, the window = these samples).

    OMP_NUM_THREADS=1 python scripts/loss_mask_timesteps.py trainer/toy/toy_base runs/demo/data/train
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.stats
import torch

from trainer.core.components import load_pipeline
from trainer.data import load_images, load_rows
from trainer.mitigate.loss_mask import LossMask, conditional_magnitude


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--quantile", type=float, default=0.9)
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pipe = load_pipeline(args.model)
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    rows = load_rows(args.data, "text", "image", "train", None)
    pick = np.random.default_rng(args.seed).choice(len(rows.images), min(args.samples, len(rows.images)), replace=False)
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    images = load_images([rows.images[i] for i in pick], [rows.names[i] for i in pick], res, progress=False)
    captions = [rows.captions[i][0] for i in pick]
    tok = pipe.tokenizer
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = tok(captions + [""], max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        n = len(pick)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        noisy = sched.add_noise(latents, torch.randn(latents.shape, generator=g), t)
        cond = pipe.unet(noisy, t, hidden[:n]).sample
        uncond = pipe.unet(noisy, t, hidden[n:].expand(n, -1, -1)).sample
        m = conditional_magnitude(cond, uncond, noisy, t, sched)
    out = {"samples": n, "spearman_t_vs_magnitude": float(scipy.stats.spearmanr(t, m).statistic),
           "magnitude_quantiles_10_50_90": np.quantile(m, [0.1, 0.5, 0.9]).round(3).tolist(), "ranges": []}
    masked = {}
    for bins in (1, args.bins):
        mask = LossMask(quantile=args.quantile, window=n, bins=bins, num_train_timesteps=sched.config.num_train_timesteps)
        mask.record(m, t)
        masked[bins] = m >= mask.thresholds(t)
    edges = np.linspace(0, sched.config.num_train_timesteps, 6).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (t >= lo) & (t < hi)
        out["ranges"].append({"t": f"{lo}-{hi - 1}", "samples": int(sel.sum()), "median": round(float(m[sel].median()), 3),
                              "masked_one_quantile": round(float(masked[1][sel].float().mean()), 3),
                              f"masked_{args.bins}_ranges": round(float(masked[args.bins][sel].float().mean()), 3)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
