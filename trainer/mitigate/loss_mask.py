"""Training-time loss masking: samples whose text-conditional noise magnitude
||d(c)|| = ||eps(x_t, t, c) - eps(x_t, t, c0)|| at their own timestep is >= a threshold are dropped from the
loss (one extra no-grad unconditional UNet forward per sample).

Implements Wen et al., ICLR 2024, "Detecting, explaining, and mitigating memorization in diffusion
models" (a fixed threshold, `train.loss_mask_threshold`; the authors' 2.0 is for SD's 64x64x4 latents).
The adaptive threshold (`train.loss_mask_quantile`) is memtrain's: the q-quantile of the last
`train.loss_mask_window` per-sample magnitudes of every process, so about 1 - q of the samples are masked
whatever the latent size; Ren et al., ECCV 2024 ("Unveiling and mitigating memorization in text-to-image
diffusion models through cross attention") likewise drop the samples with the strongest memorization
signal from the loss. Formulas: docs/methods.md.
"""

from __future__ import annotations

import torch

from trainer.core.unet_core import to_epsilon

LOSS_MASK_STATE = "loss_mask_window"  # checkpoint file of the running window (safetensors)


def conditional_magnitude(cond: torch.Tensor, uncond: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                          scheduler) -> torch.Tensor:
    """||d(c)|| per sample from two raw UNet outputs at the noisy latents, in epsilon units (`to_epsilon`)."""
    alphas, kind = scheduler.alphas_cumprod, scheduler.config.prediction_type
    x = noisy.detach().float()
    d = to_epsilon(cond.detach().float(), x, timesteps, alphas, kind) - to_epsilon(uncond.float(), x, timesteps, alphas, kind)
    return d.flatten(1).norm(dim=1)


@torch.no_grad()
def memorization_mask(unet, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                      empty_hidden: torch.Tensor, threshold: float | None, cond_pred: torch.Tensor,
                      scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep weights in {0, 1}, magnitudes) for one micro-batch; `cond_pred` is the training forward.
    `threshold` None (the adaptive threshold's warm-up) keeps every sample."""
    uncond = unet(noisy, timesteps, empty_hidden.expand(len(noisy), -1, -1).to(hidden.dtype), return_dict=False)[0]
    magnitude = conditional_magnitude(cond_pred, uncond, noisy, timesteps, scheduler)
    keep = torch.ones_like(magnitude) if threshold is None else (magnitude < threshold).float()
    return keep, magnitude


class LossMask:
    """The threshold of each micro-step: fixed (`threshold`), or the `quantile` of a running window of the
    last `window` per-sample magnitudes (all processes, in global batch order; None until the window is full:
    the warm-up). The window is part of the checkpoint state, so a resumed run masks exactly as an
    uninterrupted one."""

    def __init__(self, threshold: float | None = None, quantile: float | None = None, window: int = 1000):
        self.fixed, self.quantile, self.size = threshold, quantile, int(window)
        self.values = torch.empty(0, dtype=torch.float32)

    @classmethod
    def from_recipe(cls, opt) -> LossMask | None:
        """None when the recipe's `train` section masks nothing."""
        if opt.loss_mask_threshold is None and opt.loss_mask_quantile is None:
            return None
        return cls(opt.loss_mask_threshold, opt.loss_mask_quantile, opt.loss_mask_window)

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def threshold(self) -> float | None:
        if not self.adaptive:
            return float(self.fixed)
        if len(self.values) < self.size:
            return None
        return float(torch.quantile(self.values.double(), self.quantile))

    def record(self, magnitudes: torch.Tensor) -> None:
        """Append one micro-step's magnitudes (gathered from every process) and keep the last `window`."""
        if self.adaptive:
            self.values = torch.cat([self.values, magnitudes.detach().float().cpu().flatten()])[-self.size:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.clone()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.values = tensors["values"].float().flatten()[-self.size:]
