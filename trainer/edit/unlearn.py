"""Unlearning edit: pull memorized prompts' noise predictions to an anchor's, keep the rest.

Implements concept-ablation fine-tuning (Kumari et al., ICCV 2023, "Ablating concepts in text-to-image
diffusion models") with a preservation term, and with `adversarial=True` the adversarial fine-tuning of
Kowalczuk et al., ICML 2026, "Finding DoRI" (embeddings the inner attack finds on the current model join
the forget set, and every other forget request stays on a memorized prompt itself; inner attack DoRI,
`trainer.detect.dori`, or the bounded one). `weights="lora"`: a LoRA on
every attention block's to_q/to_k/to_v/to_out.0 (ships as a stock diffusers LoRA); `weights="full"`: every
UNet weight, as the paper (its LoRA variant failed), with gradient checkpointing, the Accelerator's mixed
precision and 8-bit AdamW when bitsandbytes is installed on CUDA. Deviations: x_t comes from latents the
frozen model samples, and DoRI's target is the frozen model's own sample of the memorized prompt (no
training image needed); the paper pulls adversarial embeddings to a surrogate image and keeps LAION pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from trainer.core.unet_core import UNetCore, count_evals, prompt_list
from trainer.detect.attack import generate_from_embeddings, retrigger_attack
from trainer.detect.dori import dori_attack
from trainer.io import MemtrainError

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHTS = ("lora", "full")
INNER_ATTACKS = ("dori", "bounded")


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes; Dettmers et al. 2022) on CUDA when installed, else torch's AdamW."""
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # an optional extra: imported only where it runs

        return bitsandbytes.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _inner_attack(kind: str, parts: dict, memorized: list[str], emb: torch.Tensor, latents: torch.Tensor,
                  eps: float, steps: int, seed: int, batch_size: int) -> torch.Tensor:
    """Embeddings [P, 77, D] that re-trigger each memorized prompt on the current model (`parts`)."""
    if kind == "dori":
        return dori_attack(parts, None, emb, steps=steps, seed=seed, batch_size=batch_size,
                           latents=latents)["embeddings"]
    return retrigger_attack(parts, memorized, eps, "noise", steps=steps, seed=seed, batch_size=batch_size)["embeddings"]




def _check_args(memorized, anchors, preserved, rank, steps, lr, preserve_weight, adversarial_every, attack_eps,
                batch_size, samples_per_prompt) -> tuple[list[str], list[str], list[str]]:
    memorized = prompt_list(memorized, "memorized")
    anchors = [""] if anchors is None else prompt_list(anchors, "anchor")
    if len(anchors) == 1:
        anchors = anchors * len(memorized)
    if len(anchors) != len(memorized):
        raise MemtrainError(
            f"anchors: got {len(anchors)} for {len(memorized)} memorized prompts; pass one, or one per prompt"
        )
    preserved = list(dict.fromkeys(anchors)) if preserved is None else prompt_list(preserved, "preserved", allow_empty=True)
    for name, value, ok in (
        ("rank", rank, int(rank) >= 1),
        ("steps", steps, int(steps) >= 1),
        ("lr", lr, lr > 0),
        ("preserve_weight", preserve_weight, preserve_weight >= 0),
        ("adversarial_every", adversarial_every, int(adversarial_every) >= 1),
        ("attack_eps", attack_eps, attack_eps > 0),
        ("batch_size", batch_size, int(batch_size) >= 1),
        ("samples_per_prompt", samples_per_prompt, int(samples_per_prompt) >= 1),
    ):
        if not ok:
            raise MemtrainError(f"unlearn: {name} must be {'> 0' if name in ('lr', 'attack_eps') else '>= 1'}"
                                f"{' (or 0)' if name == 'preserve_weight' else ''}, got {value!r}")
    return memorized, anchors, preserved


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 2_654_435_761 + step) % 2**63)


def _draw(gen: torch.Generator, total: int, n_entries: int, n_pool: int, shape: tuple, timesteps: int):
    """Global draws of one step: entry, pool latent, timestep and noise per request."""
    return (
        torch.randint(0, n_entries, (total,), generator=gen),
        torch.randint(0, n_pool, (total,), generator=gen),
        torch.randint(0, timesteps, (total,), generator=gen),
        torch.randn((total, *shape), generator=gen),
    )


def unlearn(
    pipe,
    memorized: list[str],
    anchors: list[str] | None = None,
    preserved: list[str] | None = None,
    rank: int = 4,
    steps: int = 200,
    lr: float = 1e-4,
    preserve_weight: float = 1.0,
    adversarial: bool = False,
    adversarial_every: int = 25,
    attack_eps: float = 0.1,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    samples_per_prompt: int = 2,
    sample_steps: int = 50,
    guidance_scale: float = 7.5,
    attack_steps: int = 10,
    mixed_precision: str = "no",
    weights: str = "lora",
    inner_attack: str = "dori",
    gradient_checkpointing: bool = False,
) -> dict:
    """Train the unlearning LoRA on `pipe.unet`, or with `weights="full"` every UNet weight in place (module
    docstring); the adapter stays active on it. `inner_attack` (with `adversarial`): "dori" or "bounded".

    `memorized`: prompts to remove; `anchors`: one, or one per memorized prompt (default "");
    `preserved`: prompts whose predictions must not change (default: the anchors). `batch_size`
    requests per process and step for the forget term and as many for the preservation term.
    Returns {"lora_state_dict": diffusers-format LoRA weights (`save_unlearn_lora` writes them; None for
    full weights),
    "losses" / "forget_losses" / "preserve_losses": per step, "forget_set": its final size,
    "memorized_share": the share of this process's forget requests on the memorized prompts themselves,
    "unet_evals": samples through the UNet (pool sampling, targets, training, attacks), "seconds"}.
    """
    memorized, anchors, preserved = _check_args(memorized, anchors, preserved, rank, steps, lr, preserve_weight,
                                                adversarial_every, attack_eps, batch_size, samples_per_prompt)
    if weights not in WEIGHTS or inner_attack not in INNER_ATTACKS:
        raise MemtrainError(f"unlearn: weights must be one of {WEIGHTS} and inner_attack one of {INNER_ATTACKS}, "
                            f"got {weights!r}, {inner_attack!r}")
    if getattr(pipe.unet, "_hf_peft_config_loaded", False):
        raise MemtrainError(
            "the UNet already carries a LoRA adapter: fuse it into the weights first "
            "(pipe.fuse_lora(); pipe.unload_lora_weights()) and edit the fused model"
        )
    start = time.perf_counter()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    steps, batch_size = int(steps), int(batch_size)
    with count_evals() as counter:
        pools = _pools(pipe, memorized, anchors, preserved, seed, int(samples_per_prompt), sample_steps,
                       guidance_scale)
        t = _trainable(pipe, accelerator, weights, rank, seed, lr, batch_size, gradient_checkpointing)
        for key in ("forget_emb", "anchor_emb", "forget_pool", "pres_emb", "preserve_pool"):
            pools[key] = pools[key].to(t.core.device) if pools[key] is not None else None
        dori_targets = pools["forget_pool"][torch.arange(len(memorized)) * int(samples_per_prompt)]  # first samples
        losses, forget_losses, preserve_losses = [], [], []
        on_memorized = 0
        bar = tqdm(total=steps, desc="unlearn", disable=not (progress and accelerator.is_main_process),
                   dynamic_ncols=True)
        for step in range(steps):
            if adversarial and step % int(adversarial_every) == 0:
                t.base.eval()
                found = _inner_attack(inner_attack, t.attack_parts, memorized, pools["forget_emb"][: len(memorized)],
                                      dori_targets, attack_eps, attack_steps, seed + step, t.core.batch_size)
                pools["forget_emb"] = torch.cat([pools["forget_emb"], found.float().to(t.core.device)])
                pools["forget_anchor"] = torch.cat([pools["forget_anchor"], pools["forget_anchor"][: len(memorized)]])
            t.base.train()
            loss_f, loss_p, drawn = _step_losses(t, pools, _step_generator(seed, step), batch_size,
                                                 bool(preserved and preserve_weight > 0), len(memorized))
            on_memorized += drawn
            loss = loss_f + preserve_weight * loss_p
            accelerator.backward(loss)
            t.optimizer.step()
            t.optimizer.zero_grad()
            losses.append(float(loss.detach()))
            forget_losses.append(float(loss_f.detach()))
            preserve_losses.append(float(loss_p.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        t.base.eval()
        accelerator.wait_for_everyone()
        if gradient_checkpointing:
            t.base.disable_gradient_checkpointing()
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(t.base)) if t.frozen is None else None
        del t
    return {
        "lora_state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()} if state else None,
        "weights": weights,
        "losses": losses,
        "forget_losses": forget_losses,
        "preserve_losses": preserve_losses,
        "forget_set": len(pools["forget_emb"]),
        "memorized_share": on_memorized / (steps * batch_size),
        "unet_evals": counter.unet_evals + pools["pool_evals"],
        "seconds": time.perf_counter() - start,
    }


def _pools(pipe, memorized: list[str], anchors: list[str], preserved: list[str], seed: int, pool_n: int,
           sample_steps: int, guidance_scale: float) -> dict:
    """Text embeddings of the memorized prompts (rows of the forget set), the anchors and the preserved prompts,
    and the x0 pools the frozen model samples for them (counted by hand: the pipeline bypasses the core)."""
    core = UNetCore(pipe)
    forget_table, forget_index, _ = core.encode_prompts(memorized)
    forget_emb = forget_table[forget_index].float()
    unique_anchors = list(dict.fromkeys(anchors))
    anchor_table, anchor_index, _ = core.encode_prompts(unique_anchors)
    anchor_emb = anchor_table[anchor_index].float()
    passes = 2 if guidance_scale > 1 else 1
    pools = {"forget_emb": forget_emb, "anchor_emb": anchor_emb, "pres_emb": None, "preserve_pool": None,
             "forget_anchor": torch.tensor([unique_anchors.index(a) for a in anchors]),
             "forget_pool": generate_from_embeddings(pipe, torch.cat([forget_emb, anchor_emb]), pool_n, seed,
                                                     sample_steps, guidance_scale, output_type="latent"),
             "pool_evals": (len(forget_emb) + len(anchor_emb)) * pool_n * sample_steps * passes}
    if preserved:
        pres_table, pres_index, _ = core.encode_prompts(preserved)
        pools["pres_emb"] = pres_table[pres_index].float()
        pools["preserve_pool"] = generate_from_embeddings(pipe, pools["pres_emb"], pool_n, seed, sample_steps,
                                                          guidance_scale, output_type="latent")
        pools["pool_evals"] += len(pools["pres_emb"]) * pool_n * sample_steps * passes
    return pools


@dataclasses.dataclass
class _Trainable:
    """The trained UNet (`trained`, DDP-wrapped under a launch; `base` unwrapped), its optimizer, the cores of the
    targets (`core`: the frozen copy for full weights, else the adapter switched off) and of the trained forward
    (`train_core`), and the current model's parts the inner attack runs on."""

    accelerator: Accelerator
    trained: torch.nn.Module
    base: torch.nn.Module
    optimizer: torch.optim.Optimizer
    core: UNetCore
    train_core: UNetCore
    frozen: torch.nn.Module | None
    attack_parts: dict


def _trainable(pipe, accelerator: Accelerator, weights: str, rank: int, seed: int, lr: float, batch_size: int,
               gradient_checkpointing: bool) -> _Trainable:
    """The LoRA added to `pipe.unet` (initialised from `seed` only) or, for full weights, every UNet weight made
    trainable beside a frozen copy; prepared by the Accelerator."""
    unet = pipe.unet
    unet.requires_grad_(False)
    frozen = None
    if weights == "lora":
        with torch.random.fork_rng(devices=[]):  # the gaussian LoRA init depends on `seed` only
            torch.manual_seed(int(seed))
            unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
    else:
        frozen = copy.deepcopy(unet).eval()  # the source model's predictions are the targets
        unet.requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr, accelerator.device)
    trained, optimizer = accelerator.prepare(unet, optimizer)
    base = accelerator.unwrap_model(trained)
    core = UNetCore(pipe, batch_size * 2)  # frozen targets and attacks, on the unwrapped UNet
    train_core = UNetCore(pipe, batch_size * 2)
    train_core.parts = dataclasses.replace(train_core.parts, unet=trained)  # DDP-wrapped forward
    attack_parts = dict(unet=base, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        scheduler=pipe.scheduler, vae=pipe.vae)
    if frozen is not None:
        core = UNetCore({**attack_parts, "unet": frozen}, batch_size * 2)
    return _Trainable(accelerator, trained, base, optimizer, core, train_core, frozen, attack_parts)


def _step_losses(t: _Trainable, pools: dict, gen: torch.Generator, batch_size: int,
                 preserve: bool, memorized: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(forget loss, preservation loss, forget rows on a memorized prompt itself) of one step: this process's
    rows of the step's global draws, noised pool latents, the trained prediction against the target model's
    prediction for the anchor (forget) or the prompt itself (preserved). Every other forget request is one of
    the `memorized` prompts, however large the attacks grew the forget set (it holds `memorized` entries per
    attack, so the modulo keeps that draw uniform)."""
    core, accelerator = t.core, t.accelerator
    world, device = accelerator.num_processes, core.device
    rows = slice(accelerator.process_index * batch_size, (accelerator.process_index + 1) * batch_size)
    shape, T = tuple(core.latent_shape), core.num_train_timesteps
    draws = _draw(gen, batch_size * world, len(pools["forget_emb"]), len(pools["forget_pool"]), shape, T)
    draws[0][::2] %= memorized
    f_entry, f_pool, f_t, f_noise = (x[rows] for x in draws)
    latents = [core.add_noise(pools["forget_pool"][f_pool], f_noise.to(device), f_t)]
    timesteps = [f_t]
    cond = [pools["forget_emb"][f_entry]]
    target_emb = [pools["anchor_emb"][pools["forget_anchor"][f_entry]]]
    if preserve:
        p_entry, p_pool, p_t, p_noise = (x[rows] for x in _draw(
            gen, batch_size * world, len(pools["pres_emb"]), len(pools["preserve_pool"]), shape, T))
        latents.append(core.add_noise(pools["preserve_pool"][p_pool], p_noise.to(device), p_t))
        timesteps.append(p_t)
        cond.append(pools["pres_emb"][p_entry])
        target_emb.append(pools["pres_emb"][p_entry])
    latents, timesteps = torch.cat(latents), torch.cat(timesteps)
    cond, target_emb = torch.cat(cond), torch.cat(target_emb)
    with torch.no_grad():
        if t.frozen is not None:
            target = core.eps(latents, timesteps, target_emb)
        else:
            t.base.disable_adapters()
            try:
                target = core.eps(latents, timesteps, target_emb)
            finally:
                t.base.enable_adapters()
    pred = t.train_core.eps(latents, timesteps, cond, grad=True)
    k = len(f_entry)
    loss_f = F.mse_loss(pred[:k], target[:k])
    loss_p = F.mse_loss(pred[k:], target[k:]) if len(pred) > k else pred.new_zeros(())
    return loss_f, loss_p, int((f_entry < memorized).sum())


def merged_unet(unet):
    """A copy of `unet` with its LoRA adapter fused into the weights and the LoRA layers removed."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        raise MemtrainError("the UNet has no LoRA adapter to merge: run unlearn() on it first")
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged
