"""When does an AMG trigger fire? Per DDIM step, the top-1 similarity to a training-image index of the x0
estimates of the prompts' own trajectories (trigger = duplicated rows, the rest general), against a
per-step null: the held-out images noised to that step and denoised once (thresholded at 1% per step),
and against the index's clean-image calibration (docs/results.md, "AMG over a gradients index").

    python scripts/amg_trigger_by_step.py PIPELINE DATA RUN

RUN is a `scripts/measure_amg.sh` output (RUN/index, RUN/prompts.jsonl); DATA holds heldout/ with captions.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.core.components import load_pipeline
from trainer.core.unet_core import UNetCore, encode_latents
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.sample.guidance import cfg_requests, decode_images
from trainer.toy.study import load_image_dir

GUIDANCE, STEPS = 3.0, 50
CHECKED = [*range(0, STEPS, 5), STEPS - 1]


def x0_estimate(core: UNetCore, x: torch.Tensor, t: int, table: torch.Tensor) -> torch.Tensor:
    """The guided x0 estimate of latents x at timestep t (table = [uncond rows, cond rows])."""
    x_index, e_index = cfg_requests(len(x))
    uncond, cond = core.eps(x, t, table, x_index, e_index).chunk(2)
    eps = uncond + GUIDANCE * (cond - uncond)
    a = core.alphas_cumprod[t]
    return (x - (1 - a).sqrt() * eps) / a.sqrt(), eps


def conditions(core: UNetCore, texts: list[str]) -> torch.Tensor:
    table, index, _ = core.encode_prompts(texts)
    return torch.cat([table[torch.zeros(len(texts), dtype=torch.long)], table[index]])


@torch.no_grad()
def main(pipeline: str, data: Path, run: Path) -> None:
    torch.manual_seed(0)
    pipe = load_pipeline(pipeline)
    core = UNetCore(pipe)
    index = TrainingIndex.load(run / "index")
    embed = make_embedder(index.embedding)

    def similarity(x0: torch.Tensor) -> np.ndarray:
        return index.search(embed(decode_images(core, x0)), k=1)[0][:, 0].float().numpy()

    rows = [json.loads(line) for line in open(run / "prompts.jsonl") if line.strip()]
    table = conditions(core, [r["text"] for r in rows])
    scheduler = core.ddim(STEPS)
    trajectory = np.zeros((len(rows), len(CHECKED)))
    x = core.initial_noise(len(rows), seed=0)
    for step, t in enumerate(scheduler.timesteps):
        x0, eps = x0_estimate(core, x, int(t), table)
        if step in CHECKED:
            trajectory[:, CHECKED.index(step)] = similarity(x0)
        x = scheduler.step(eps, t, x, return_dict=False)[0]

    held, names = load_image_dir(data / "heldout")
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                for line in open(data / "heldout" / "metadata.jsonl") if line.strip()}
    z0 = encode_latents(pipe, held * 2 - 1)
    held_table = conditions(core, [captions[n] for n in names])
    null = np.zeros((len(held), len(CHECKED)))
    noise = torch.Generator().manual_seed(1)
    for k, step in enumerate(CHECKED):
        t = int(scheduler.timesteps[step])
        xt = core.add_noise(z0, torch.randn(z0.shape, generator=noise), torch.full((len(z0),), t))
        null[:, k] = similarity(x0_estimate(core, xt, t, held_table)[0])

    per_step = np.sort(null, axis=0)[::-1][int(0.01 * len(null))]
    clean = index.copy_calibration().threshold
    trigger = np.array([r["group"] == "duplicated" for r in rows])
    print("| step | t | per-step threshold | trigger above it | general above it | trigger above clean | general above clean |")
    print("|---|---|---|---|---|---|---|")
    for k, step in enumerate(CHECKED):
        print(f"| {step} | {int(scheduler.timesteps[step])} | {per_step[k]:.3f} | {np.mean(trajectory[trigger, k] > per_step[k]):.0%} "
              f"| {np.mean(trajectory[~trigger, k] > per_step[k]):.0%} | {np.mean(trajectory[trigger, k] > clean):.0%} "
              f"| {np.mean(trajectory[~trigger, k] > clean):.0%} |")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))


