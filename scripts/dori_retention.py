"""Usage: scripts/dori_retention.py DATA PROMPTS PIPELINE [PIPELINE ...] [--steps 50] [--draws 64] [--per-group 16]
                                  [--anchors FILE]

Is an image still held by the UNet after an edit? For each group of PROMPTS' rows (a JSON line per row:
text, group, file_name relative to DATA; e.g. the memorized prompts, non-memorized members and held-out
images), the mean denoising loss ||eps - eps_theta(x_t, t, y)||^2 of the row's image at one fixed set of
(t, noise) draws, shared by every image and model, under three embeddings y: the row's caption, the empty
prompt, and DoRI's embedding after --steps (Kowalczuk et al., ICML 2026; `trainer.detect.dori`, started
from the caption); with --anchors (a prompt a line, taken in turn for each group's rows), also under those
prompts, as `edit unlearn --anchors` would target them. An edit that removed an image brings its loss after
DoRI up to the held-out images'; one that only moved which embeddings reach it leaves it far below
(docs/results.md, issue 25)."""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore, encode_latents
from trainer.data import load_images
from trainer.detect.dori import DORI_STEPS, dori_attack, initial_embeddings


def fixed_draws(draws: int, shape: tuple, timesteps: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, timesteps, (draws,), generator=gen), torch.randn((draws, *shape), generator=gen)


def mean_losses(core: UNetCore, latents: torch.Tensor, embeddings: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """[P] the mean over the draws of image p's denoising loss under embeddings[p]."""
    d = len(t)
    rows = torch.arange(len(latents)).repeat_interleave(d)
    x_t = core.add_noise(latents[rows], noise.repeat(len(latents), 1, 1, 1), t.repeat(len(latents)))
    with torch.no_grad():
        pred = core.eps(x_t, t.repeat(len(latents)), embeddings, e_index=rows)
    return (pred - noise.repeat(len(latents), 1, 1, 1)).pow(2).flatten(1).mean(1).view(-1, d).mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("prompts", type=Path)
    p.add_argument("pipelines", nargs="+")
    p.add_argument("--steps", type=int, default=DORI_STEPS)
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--per-group", type=int, default=16, help="the first rows of each group")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--anchors", type=Path, help="prompts (a line each) to measure the images under, as anchors")
    args = p.parse_args()
    torch.set_num_threads(1)
    by_group = defaultdict(list)
    for line in args.prompts.read_text().splitlines():
        row = json.loads(line)
        if row.get("file_name") and len(by_group[row["group"]]) < args.per_group:
            by_group[row["group"]].append(row)
    rows = [r for g in by_group for r in by_group[g]]
    anchors = [line for line in args.anchors.read_text().splitlines() if line.strip()] if args.anchors else []
    anchor_texts = [anchors[i % len(anchors)] for members in by_group.values() for i in range(len(members))]
    columns = ["loss, caption", "loss, empty prompt", "loss after DoRI"] + (["loss, --anchors"] if anchors else [])
    print(f"| model | group | images | {' | '.join(columns)} |")
    print("|---" * (3 + len(columns)) + "|")
    for path in args.pipelines:
        pipe = load_pipeline(path)
        core = UNetCore(pipe, args.batch_size)
        resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        images = load_images([args.data / r["file_name"] for r in rows], [r["file_name"] for r in rows], resolution,
                             progress=False)
        latents = encode_latents(pipe, images * 2 - 1, batch_size=args.batch_size)
        t, noise = fixed_draws(args.draws, tuple(latents.shape[1:]), core.num_train_timesteps)
        caption = initial_embeddings(pipe, len(rows), [r["text"] for r in rows], batch_size=args.batch_size)
        empty = initial_embeddings(pipe, len(rows), [""] * len(rows), batch_size=args.batch_size)
        found = dori_attack(pipe, None, caption, args.steps, batch_size=args.batch_size, latents=latents)["embeddings"]
        embeddings = [caption, empty, found]
        if anchors:
            embeddings.append(initial_embeddings(pipe, len(rows), anchor_texts, batch_size=args.batch_size))
        losses = [mean_losses(core, latents, e.float(), t, noise) for e in embeddings]
        start = 0
        for group, members in by_group.items():
            sl = slice(start, start + len(members))
            start += len(members)
            cells = " | ".join(f"{float(x[sl].mean()):.4f}" for x in losses)
            print(f"| {Path(path).name} | {group} | {len(members)} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
