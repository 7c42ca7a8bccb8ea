"""Training-time loss masking: samples whose text-conditional noise magnitude
||d(c)|| = ||eps(x_t, t, c) - eps(x_t, t, c0)|| at their own timestep is >= a threshold are dropped from the
loss (one extra no-grad unconditional UNet forward per sample).

Implements Wen et al., ICLR 2024, "Detecting, explaining, and mitigating memorization in diffusion
models" (a fixed threshold, `train.loss_mask_threshold`; the authors' 2.0 is for SD's 64x64x4 latents).
The adaptive threshold (`train.loss_mask_quantile`) is memtrain's: the q-quantile of the magnitudes at
similar timesteps among the last `train.loss_mask_window` samples of every process, so about 1 - q of the
samples are masked whatever the latent size; Ren et al., ECCV 2024 ("Unveiling and mitigating memorization in text-to-image
diffusion models through cross attention") likewise drop the samples with the strongest memorization
signal from the loss. Formulas: docs/methods.md.
"""

from __future__ import annotations

import warnings

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
                      empty_hidden: torch.Tensor, thresholds: torch.Tensor | float | None, cond_pred: torch.Tensor,
                      scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep weights in {0, 1}, magnitudes) for one micro-batch; `cond_pred` is the training forward.
    `thresholds`: one value or one per sample; None (the adaptive threshold's warm-up) keeps every sample."""
    uncond = unet(noisy, timesteps, empty_hidden.expand(len(noisy), -1, -1).to(hidden.dtype), return_dict=False)[0]
    magnitude = conditional_magnitude(cond_pred, uncond, noisy, timesteps, scheduler)
    if thresholds is None:
        return torch.ones_like(magnitude), magnitude
    thresholds = torch.as_tensor(thresholds, dtype=magnitude.dtype, device=magnitude.device)
    return (magnitude < thresholds).float(), magnitude


class LossMask:
    """The thresholds of each micro-step: fixed (`threshold`), or per timestep bin the `quantile` of the
    magnitudes in that bin of a running window of the last `window` samples (all processes, in global batch
    order; none until the window is full: the warm-up). ||d(c)|| depends strongly on the timestep, so one
    quantile over all timesteps would mask mostly low-noise samples: `bins` equal timestep ranges (1 = one
    quantile) compare each sample with samples at similar noise levels. The window is part of the checkpoint
    state, so a resumed run masks exactly as an uninterrupted one."""

    def __init__(self, threshold: float | None = None, quantile: float | None = None, window: int = 1000,
                 bins: int = 10, num_train_timesteps: int = 1000):
        self.fixed, self.quantile, self.size = threshold, quantile, int(window)
        self.bins, self.timesteps = int(bins), int(num_train_timesteps)
        self.values = torch.empty(0, dtype=torch.float32)
        self.steps = torch.empty(0, dtype=torch.long)  # the timestep of each value

    @classmethod
    def from_recipe(cls, opt, num_train_timesteps: int) -> LossMask | None:
        """None when the recipe's `train` section masks nothing."""
        if opt.loss_mask_threshold is None and opt.loss_mask_quantile is None:
            return None
        return cls(opt.loss_mask_threshold, opt.loss_mask_quantile, opt.loss_mask_window, opt.loss_mask_timestep_bins,
                   num_train_timesteps)

    @property
    def adaptive(self) -> bool:
        return self.fixed is None

    def _bin(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps.detach().cpu().long() * self.bins // self.timesteps).clamp(0, self.bins - 1)

    def bin_thresholds(self) -> torch.Tensor | None:
        """[bins] the q-quantile of the window's magnitudes in each timestep bin (inf for a bin with fewer than
        2 values: nothing there is masked); None while the window fills."""
        if len(self.values) < self.size:
            return None
        out = torch.full((self.bins,), float("inf"), dtype=torch.float64)
        bin_of = self._bin(self.steps)
        for b in range(self.bins):
            values = self.values[bin_of == b].double()
            if len(values) >= 2:
                out[b] = torch.quantile(values, self.quantile)
        return out

    def thresholds(self, timesteps: torch.Tensor) -> torch.Tensor | float | None:
        """The threshold of each sample at `timesteps` (a float when fixed; None during the warm-up)."""
        if not self.adaptive:
            return float(self.fixed)
        per_bin = self.bin_thresholds()
        return None if per_bin is None else per_bin[self._bin(timesteps)].to(timesteps.device)

    def logged_threshold(self) -> float | None:
        """One number for the logs: the fixed threshold, or the mean of the finite per-bin thresholds."""
        if not self.adaptive:
            return float(self.fixed)
        per_bin = self.bin_thresholds()
        finite = per_bin[torch.isfinite(per_bin)] if per_bin is not None else torch.empty(0)
        return float(finite.mean()) if len(finite) else None

    def record(self, magnitudes: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Append one micro-step's magnitudes and timesteps (gathered from every process); keep the last `window`."""
        if self.adaptive:
            self.values = torch.cat([self.values, magnitudes.detach().float().cpu().flatten()])[-self.size:]
            self.steps = torch.cat([self.steps, timesteps.detach().cpu().long().flatten()])[-self.size:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.clone(), "timesteps": self.steps.clone()}

    def resume(self, tensors: dict[str, torch.Tensor] | None, checkpoint, warn: bool) -> None:
        """Load the window saved in `checkpoint`; one saved by a run that did not mask adaptively (None)
        leaves it empty: the warm-up starts again (`warn`: say so)."""
        if not self.adaptive:
            return
        if tensors is None:
            if warn:
                warnings.warn(f"{checkpoint} holds no loss-mask window ({LOSS_MASK_STATE}.safetensors): the adaptive "
                              "loss mask warms up again from this step", stacklevel=2)
            return
        self.load_state_dict(tensors)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.values = tensors["values"].float().flatten()[-self.size:]
        self.steps = tensors["timesteps"].long().flatten()[-self.size:]
