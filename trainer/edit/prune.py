"""Subspace deletion: Wanda-style pruning of the UNet feed-forward weights (`ff.net.2`) that memorized
prompts use and general prompts do not.

Implements Chavhan et al. 2024, "Memorized images in diffusion models share a subspace that can be
located and deleted" (code ConceptPrune), with Wanda scores (Sun et al., ICLR 2024, "A simple and
effective pruning approach for large language models") over the first `steps` DDIM steps. Deviation:
target and base prompt lists may differ in length, so each squared column norm is divided by its
number of prompts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.core.unet_core import DEFAULT_BATCH_SIZE, UNetCore, count_evals, prompt_list
from trainer.io import MemtrainError

FFN_SUFFIX = "ff.net.2"




def ffn_layers(unet) -> dict[str, torch.nn.Linear]:
    """The second feed-forward linear (`...ff.net.2`) of every transformer block, by module name."""
    layers = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("." + FFN_SUFFIX) and isinstance(module, torch.nn.Linear)
    }
    if not layers:
        raise MemtrainError(
            "the UNet has no transformer feed-forward linear layers (ff.net.2); if a LoRA is loaded, "
            "fuse it first (pipe.fuse_lora())"
        )
    return layers


class _ColumnNorms:
    """Sum over token rows of the squared, row-normalised inputs of each hooked linear layer."""

    def __init__(self, layers: dict[str, torch.nn.Linear]):
        self.sq = {
            name: torch.zeros(m.in_features, device=m.weight.device, dtype=torch.float32)
            for name, m in layers.items()
        }

    def reset(self) -> None:
        for v in self.sq.values():
            v.zero_()

    def hook(self, name: str):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sq[name] += F.normalize(x, p=2, dim=1).square().sum(dim=0)

        return record

    def norms(self, count: int) -> dict[str, torch.Tensor]:
        """Column norms ||X_j||, each squared norm divided by `count` (the number of prompts)."""
        return {name: (v / count).sqrt() for name, v in self.sq.items()}


@contextlib.contextmanager
def _record_inputs(layers: dict[str, torch.nn.Linear]) -> Iterator[_ColumnNorms]:
    store = _ColumnNorms(layers)
    handles = [m.register_forward_pre_hook(store.hook(name)) for name, m in layers.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Trajectory:
    """Classifier-free-guidance DDIM sampling of several prompts from one shared x_T, step by step."""

    def __init__(self, core: UNetCore, prompts: Sequence[str], x_T: torch.Tensor):
        self.core = core
        self.table, self.index, self.e0 = core.encode_prompts(list(prompts))
        self.latents = x_T.expand(len(prompts), *x_T.shape[1:]).clone()

    def step(self, scheduler, t: torch.Tensor, guidance_scale: float, advance: bool) -> None:
        n = len(self.index)
        x_index = torch.arange(n).repeat_interleave(2)
        e_index = torch.stack([self.index, torch.full_like(self.index, self.e0)], dim=1).flatten()
        eps = self.core.eps(self.latents, int(t), self.table, x_index, e_index)
        if advance:
            cond, uncond = eps[0::2], eps[1::2]
            guided = uncond + guidance_scale * (cond - uncond)
            self.latents = scheduler.step(guided, t, self.latents, return_dict=False)[0]


def _step_mask(weight: torch.Tensor, target: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """M_ij = j in the row's top-k of |W| * ||X_target|| AND that score exceeds |W| * ||X_base||."""
    w = weight.detach().abs().float()
    s_target, s_base = w * target[None, :], w * base[None, :]
    top = torch.zeros_like(s_target, dtype=torch.bool)
    top.scatter_(1, s_target.topk(k, dim=1).indices, True)
    return top & (s_target > s_base)


def subspace_prune(
    pipe,
    memorized: list[str],
    base: list[str] | None = None,
    fraction: float = 0.01,
    steps: int = 10,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> dict:
    """Zero, IN PLACE, the `ff.net.2` weights that carry the memorized prompts (module docstring).

    `pipe`: a StableDiffusionPipeline (or UNetCore components). `base`: general prompts the edit
    should spare (default: the empty caption, as the authors). `fraction`: share of each weight row
    that may be pruned per step (paper: 1%). `steps`: the first sampling steps recorded (paper: 10).
    Costs `2 * steps * (len(memorized) + len(base))` UNet evaluations.

    Returns {"changed": {parameter name: number of weights zeroed}, "total_changed", "unet_evals",
    "seconds", "fraction", "steps"}.
    """
    memorized = prompt_list(memorized, "memorized")
    base = [""] if base is None else prompt_list(base, "base")
    if not 0 < float(fraction) <= 1:
        raise MemtrainError(f"fraction must be in (0, 1], got {fraction}")
    if not 1 <= int(steps) <= int(num_inference_steps):
        raise MemtrainError(
            f"steps must be between 1 and num_inference_steps ({num_inference_steps}), got {steps}"
        )
    start = time.perf_counter()
    core = UNetCore(pipe, batch_size)
    layers = ffn_layers(core.parts.unet)
    masks = {name: torch.zeros_like(m.weight, dtype=torch.bool) for name, m in layers.items()}
    scheduler = core.ddim(num_inference_steps)
    timesteps = scheduler.timesteps[: int(steps)]
    x_T = core.initial_noise(1, seed)
    with count_evals() as counter, _record_inputs(layers) as store:
        runs = {"target": _Trajectory(core, memorized, x_T), "base": _Trajectory(core, base, x_T)}
        for s, t in enumerate(tqdm(timesteps, desc="prune: sampling steps", disable=not progress,
                                   dynamic_ncols=True, leave=False)):
            norms = {}
            for role, run in runs.items():
                store.reset()
                run.step(scheduler, t, guidance_scale, advance=s + 1 < len(timesteps))
                norms[role] = store.norms(len(run.index))
            for name, m in layers.items():
                k = max(1, int(float(fraction) * m.in_features))
                masks[name] |= _step_mask(m.weight, norms["target"][name], norms["base"][name], k)
    changed = {}
    with torch.no_grad():
        for name, m in layers.items():
            hit = masks[name] & (m.weight != 0)
            m.weight.masked_fill_(masks[name], 0)
            changed[f"{name}.weight"] = int(hit.sum())
    return {
        "changed": changed,
        "total_changed": sum(changed.values()),
        "unet_evals": counter.unet_evals,
        "seconds": time.perf_counter() - start,
        "fraction": float(fraction),
        "steps": int(steps),
    }
