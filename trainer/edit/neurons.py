"""NeMo: find the cross-attention value neurons (`attn2.to_v` output channels) that carry a memorized
prompt, then block them.

Implements Hintersdorf et al., NeurIPS 2024, "Finding NeMo: Localizing neurons responsible for
memorization in diffusion models": z-scored activations, a coarse then layer-wise and neuron-wise
search until the first-step noise difference no longer matches the unblocked one (MS-SSIM <= 0.428).
Deviations: the noise difference is d(c) rather than eps(x_T, T, c) - x_T; a "magnitude" check is an
addition; MS-SSIM shrinks on small latents (docs/methods.md).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.core.attention import cross_attention_modules
from trainer.core.unet_core import DEFAULT_BATCH_SIZE, UNetCore, count_evals, prompt_list
from trainer.io import MemtrainError

SSIM_THRESHOLD = 0.428  # the authors' threshold for both the memorization check and the blocking criterion
THETA_START, THETA_MIN, THETA_STEP = 5.0, 1.0, 0.25
CHECKS = ("ssim", "magnitude")
BLOCKS = ("down_blocks", "mid_block")  # the paper searches the down and mid blocks of SD

Neurons = dict[str, list[int]]  # value-layer module name -> blocked output channels


# ---------------------------------------------------------------- SSIM


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ms_ssim(
    a: torch.Tensor, b: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5, scales: int = 3
) -> torch.Tensor:
    """Multi-scale SSIM [N] of images a, b [N, C, H, W] with values in [0, 1] (data range 1).

    Gaussian window, "valid" filtering, ReLU on every term, equal weights over the scales. On small
    images scales are dropped (the coarsest keeps at least 4 pixels a side) and the window is cut to
    the coarsest scale's side (odd size, same sigma).
    """
    a, b = a.float(), b.float()
    side = min(a.shape[-2:])
    scales = max(1, min(int(scales), int(math.log2(max(side, 1) / 4)) + 1))
    size = min(int(kernel_size), side // 2 ** (scales - 1))
    size -= 1 - size % 2  # odd
    window = _gaussian_window(size, sigma, a.shape[1], a.device, a.dtype)

    def blur(x):
        return F.conv2d(x, window, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    out = torch.ones(len(a), device=a.device)
    for s in range(scales):
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a**2
        var_b = blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        term = cs if s + 1 < scales else cs * (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
        out = out * term.flatten(1).mean(dim=1).clamp_min(0) ** (1.0 / scales)
        if s + 1 < scales:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return out


# ---------------------------------------------------------------- hooks


def value_layers(unet, blocks: Sequence[str] = BLOCKS) -> dict[str, torch.nn.Linear]:
    """The cross-attention value projections (`attn2.to_v`) of the given UNet blocks, in forward order."""
    modules = dict(unet.named_modules())
    prefixes = tuple(f"{b}." for b in blocks)
    names = [n for n in cross_attention_modules(unet) if n.startswith(prefixes)]
    layers = {
        f"{n}.to_v": modules[f"{n}.to_v"]
        for n in names
        if isinstance(modules.get(f"{n}.to_v"), torch.nn.Linear)
    }
    if not layers:
        raise MemtrainError(
            f"the UNet has no cross-attention value projections (attn2.to_v) in {', '.join(blocks)}; "
            "if a LoRA is loaded, fuse it first (pipe.fuse_lora())"
        )
    return layers


@contextlib.contextmanager
def _record(layers: dict[str, torch.nn.Linear]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record mean over tokens of |to_v output| per sample: {name: [per-call [B, channels] tensors]}."""
    records: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name):
        def store(module, args, output):
            records[name].append(output.detach().abs().float().mean(dim=1))

        return store

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def blocked(layers: dict[str, torch.nn.Linear], neurons: Neurons) -> Iterator[None]:
    """Zero the given output channels of the value projections during the `with` block (weights untouched)."""
    def hook(channels):
        def zero(module, args, output):
            output = output.clone()
            output[..., channels] = 0
            return output

        return zero

    handles = [
        layers[name].register_forward_hook(hook(torch.tensor(sorted(ch), dtype=torch.long)))
        for name, ch in neurons.items()
        if ch
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- localization


def _scaled(d: torch.Tensor) -> torch.Tensor:
    """Min-max scaling of every latent channel to [0, 1] (the authors' preprocessing for SSIM)."""
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-12)


class _Prompt:
    """First-step noise differences d(c) = eps(x_T, T, c) - eps(x_T, T, c0) of one prompt, optionally blocked."""

    def __init__(self, core: UNetCore, layers, x_T: torch.Tensor, t: int, table, row: int, e0: int):
        self.core, self.layers, self.x_T, self.t = core, layers, x_T, t
        self.table, self.row, self.e0 = table, row, e0

    def diff(self, neurons: Neurons | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(self.x_T)) if rows is None else rows
        m = len(rows)
        e_index = torch.cat([torch.full((m,), self.row), torch.full((m,), self.e0)])
        with blocked(self.layers, neurons or {}):  # blocking acts on the conditional and the c0 pass
            eps = self.core.eps(self.x_T, self.t, self.table, rows.repeat(2), e_index)
        return eps[:m] - eps[m:]


def _pairwise_max_ssim(diffs: torch.Tensor) -> torch.Tensor:
    """For each of n noise differences, its largest SSIM with any other one ([n]; -inf when n < 2)."""
    n = len(diffs)
    best = torch.full((n,), -math.inf)
    if n < 2:
        return best
    pairs = torch.combinations(torch.arange(n), r=2)
    values = ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]]).cpu()
    for col in (0, 1):
        best = best.scatter_reduce(0, pairs[:, col], values, reduce="amax")
    return best


def _select(z: dict[str, torch.Tensor], act: dict[str, torch.Tensor], theta: float, k: int) -> Neurons:
    out = {}
    for name, zs in z.items():
        chosen = set((zs > theta).nonzero().flatten().tolist())
        if k > 0:
            chosen |= set(act[name].topk(min(k, len(zs))).indices.tolist())
        out[name] = sorted(chosen)
    return out


def _localize(
    pipe,
    memorized,
    reference,
    seed: int,
    n: int,
    num_inference_steps: int,
    ssim_threshold: float,
    check: str,
    blocks: Sequence[str],
    batch_size: int,
    progress: bool = False,
) -> tuple[dict[str, Neurons], dict[str, str], dict[str, float]]:
    memorized = prompt_list(memorized, "memorized")
    reference = prompt_list(reference, "reference")
    if len(reference) < 2:
        raise MemtrainError(
            "NeMo needs at least 2 reference (non-memorized) prompts for the activation statistics"
        )
    if int(n) < 2:
        raise MemtrainError(f"n must be >= 2 (the memorization check compares generations), got {n}")
    if check not in CHECKS:
        raise MemtrainError(f"check must be one of {CHECKS}, got {check!r}")
    n = int(n)
    core = UNetCore(pipe, batch_size)
    layers = value_layers(core.parts.unet, blocks)
    t = int(core.sampling_timesteps(num_inference_steps)[0])
    x_T = core.initial_noise(n, seed)

    # reference prompts: activation statistics (to_v sees only the text, so one generation suffices)
    # and, for check="magnitude", the largest first-step ||d(c)|| of any reference prompt per generation
    table, index, e0 = core.encode_prompts(reference)
    gens = n if check == "magnitude" else 1
    with _record(layers) as rec:
        eps = core.eps(x_T, t, table, torch.arange(gens).repeat(len(index)), index.repeat_interleave(gens))
    ref = {name: torch.cat(chunks)[::gens] for name, chunks in rec.items()}
    mean = {name: a.mean(dim=0) for name, a in ref.items()}
    std = {name: a.std(dim=0).clamp_min(1e-8) for name, a in ref.items()}
    if check == "magnitude":
        uncond = core.eps(x_T, t, table, torch.arange(n), torch.full((n,), e0))
        ref_norms = (eps.view(len(index), n, -1) - uncond.flatten(1)[None]).norm(dim=2)
        ref_max = ref_norms.amax(dim=0).cpu()

    found: dict[str, Neurons] = {}
    skipped: dict[str, str] = {}
    final_ssim: dict[str, float] = {}
    table, index, e0 = core.encode_prompts(memorized)
    bar = tqdm(list(zip(memorized, index.tolist(), strict=True)), desc="NeMo: prompts", disable=not progress,
               dynamic_ncols=True)
    for prompt, row in bar:
        if prompt in found or prompt in skipped:
            continue
        target = _Prompt(core, layers, x_T, t, table, row, e0)
        with _record(layers) as rec:
            raw = target.diff()
        act = {name: chunks[0][0] for name, chunks in rec.items()}
        unblocked = _scaled(raw)
        if check == "ssim":
            keep = (_pairwise_max_ssim(unblocked) > ssim_threshold).nonzero().flatten()
            why = f"no two of the {n} generations' noise differences have SSIM > {ssim_threshold}"
        else:
            keep = (raw.flatten(1).norm(dim=1).cpu() > ref_max).nonzero().flatten()
            why = f"its first-step ||d(c)|| exceeds no reference prompt's on any of {n} generations"
        if len(keep) == 0:
            skipped[prompt] = f"not memorized: {why}"
            continue
        unblocked = unblocked[keep]

        def max_ssim(neurons: Neurons) -> float:
            return float(ms_ssim(unblocked, _scaled(target.diff(neurons, keep))).max())  # noqa: B023

        z = {name: (act[name] - mean[name]).abs() / std[name] for name in layers}
        theta, k = THETA_START, 0
        while True:
            neurons = _select(z, act, theta, k)
            ssim = max_ssim(neurons)
            if ssim <= ssim_threshold:
                threshold = ssim_threshold
                break
            if theta <= THETA_MIN:
                threshold = ssim  # the authors' fallback: refine against what the widest selection reached
                break
            theta, k = max(THETA_MIN, theta - THETA_STEP), k + 1
        for name in reversed(list(layers)):  # refinement 1: drop whole layers
            if neurons[name]:
                trial = {**neurons, name: []}
                if max_ssim(trial) < threshold:
                    neurons = trial
        for name in reversed(list(layers)):  # refinement 2: drop single neurons
            for channel in list(neurons[name]):
                trial = {**neurons, name: [c for c in neurons[name] if c != channel]}
                if max_ssim(trial) < threshold:
                    neurons = trial
        found[prompt] = {name: ch for name, ch in neurons.items() if ch}
        final_ssim[prompt] = max_ssim(neurons)
    bar.close()
    return found, skipped, final_ssim


def _as_pairs(neurons: Neurons) -> list[tuple[str, int]]:
    return [(name, int(c)) for name, channels in neurons.items() for c in channels]


def localize_neurons(
    pipe,
    memorized: list[str],
    reference: list[str],
    seed: int = 0,
    n: int = 10,
    num_inference_steps: int = 50,
    ssim_threshold: float = SSIM_THRESHOLD,
    check: str = "ssim",
    blocks: Sequence[str] = BLOCKS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, list[tuple[str, int]]]:
    """Per memorized prompt, the (value-layer module name, output channel) neurons NeMo localizes.

    `reference`: non-memorized prompts for the activation statistics (>= 2). `n`: generations per
    prompt for the memorization check and the SSIM criterion (authors: 10). A prompt that fails the
    memorization check maps to [] (with a warning). Weights are not changed.
    """
    found, skipped, _ = _localize(
        pipe, memorized, reference, seed, n, num_inference_steps, ssim_threshold, check, blocks, batch_size
    )
    for prompt, reason in skipped.items():
        warnings.warn(f"NeMo: nothing to block for {prompt!r}: {reason}", stacklevel=2)
    return {p: _as_pairs(found.get(p, {})) for p in dict.fromkeys(prompt_list(memorized, "memorized"))}


def block_neurons(unet, neurons: dict[str, list[tuple[str, int]]]) -> dict[str, int]:
    """Zero, IN PLACE, the weight rows (and bias entries) of the given value-projection output channels.

    `neurons`: prompt -> [(to_v module name, channel)] as `localize_neurons` returns (the union over
    prompts is blocked). Returns {weight parameter name: number of weights zeroed}.
    """
    modules = dict(unet.named_modules())
    union: dict[str, set[int]] = {}
    for prompt, pairs in neurons.items():
        for name, channel in pairs:
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise MemtrainError(f"neuron of {prompt!r}: the UNet has no linear layer named {name!r}")
            if not 0 <= int(channel) < module.out_features:
                raise MemtrainError(
                    f"neuron of {prompt!r}: channel {channel} is out of range for {name} ({module.out_features} outputs)"
                )
            union.setdefault(name, set()).add(int(channel))
    changed = {}
    with torch.no_grad():
        for name, channels in union.items():
            module = modules[name]
            rows = torch.tensor(sorted(channels), dtype=torch.long, device=module.weight.device)
            changed[f"{name}.weight"] = int((module.weight[rows] != 0).sum())
            module.weight[rows] = 0
            if module.bias is not None:
                module.bias[rows] = 0
    return changed


def nemo_block(
    pipe,
    memorized: list[str],
    reference: list[str],
    seed: int = 0,
    n: int = 10,
    num_inference_steps: int = 50,
    ssim_threshold: float = SSIM_THRESHOLD,
    check: str = "ssim",
    blocks: Sequence[str] = BLOCKS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> dict:
    """Localize (`localize_neurons`) and block (`block_neurons`) in place (`progress`: a bar over the prompts).

    Returns {"neurons": {prompt: [(module, channel)]}, "changed": {weight name: weights zeroed},
    "skipped": {prompt: why nothing was blocked}, "ssim": {prompt: max SSIM with its neurons blocked},
    "unet_evals", "seconds"}.
    """
    memorized = prompt_list(memorized, "memorized")
    start = time.perf_counter()
    with count_evals() as counter:
        found, skipped, ssim = _localize(
            pipe,
            memorized,
            reference,
            seed,
            n,
            num_inference_steps,
            ssim_threshold,
            check,
            blocks,
            batch_size,
            progress,
        )
    neurons = {p: _as_pairs(found.get(p, {})) for p in dict.fromkeys(memorized)}
    changed = block_neurons(UNetCore(pipe).parts.unet, neurons)
    return {
        "neurons": neurons,
        "changed": changed,
        "skipped": skipped,
        "ssim": ssim,
        "unet_evals": counter.unet_evals,
        "seconds": time.perf_counter() - start,
    }
