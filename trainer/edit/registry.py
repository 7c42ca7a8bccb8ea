"""The edits `memtrain edit` runs (`EDITS`) and how one is applied to a loaded pipeline.

An edit is one function `run(pipe, texts, options, spec) -> result` over the loaded pipeline (the prompt lists in
`texts`: memorized, anchors, preserved and any its `check` added; `options`: its own keyword options) and one
`Edit` entry in `EDITS`; its options are a dataclass whose fields become the flags of `memtrain edit NAME` and
the keys of the spec's `options` (each field's `metadata["help"]`). `apply_edit` runs it and measures what it
changed. docs/architecture.md, "Adding an edit".
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from trainer.config import from_dict
from trainer.core.components import load_lora_weights
from trainer.core.distributed import is_main_process
from trainer.core.unet_core import count_unet_samples
from trainer.edit.neurons import nemo_block
from trainer.edit.prune import subspace_prune
from trainer.edit.save import changed_weights, lora_changes, snapshot
from trainer.edit.spec import EditSpec, read_texts
from trainer.edit.uce import LAYERS, LORA_TOL, uce_edit, uce_lora
from trainer.edit.unlearn import unlearn
from trainer.io import MemtrainError


def option(default, help: str, prompts: bool = False):
    """A field of an edit's options: its default and `--help` text (`prompts`: the value is a prompt file)."""
    return field(default=default, metadata={"help": help, "prompts": prompts})


@dataclass
class NoOptions:
    """An edit without options of its own."""


@dataclass(frozen=True)
class Edit:
    """One edit (module docstring): `description` (its `--help` line, citing the paper), `run`, its `options`
    dataclass, `check(options, spec) -> extra prompt lists` (checks that need no model, one MemtrainError naming
    the flag), `lora_output(options)` (True when it writes a LoRA file: `run` returns `lora_state_dict`),
    `report(result)` (keys added to edit.json), `files(result)` (JSON files written beside the weights) and
    `nothing_found` (why a run that changed no weight did so)."""

    description: str
    run: Callable[[Any, dict, dict, EditSpec], dict]
    options: type = NoOptions
    check: Callable[[dict, EditSpec], dict] = lambda options, spec: {}
    lora_output: Callable[[dict], bool] = lambda options: False
    report: Callable[[dict], dict] = lambda result: {}
    files: Callable[[dict], dict] = lambda result: {}
    nothing_found: str = "the edit left every weight as it was"


def positive(value, flag: str, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise MemtrainError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ---------------------------------------------------------------- prune (Chavhan et al. 2024)


@dataclass
class PruneOptions:
    base: str | None = option(None, "base prompts the scores are compared with (default: the empty prompt)", True)
    fraction: float = option(0.01, "top fraction of each row's scores (default 0.01)")
    steps: int = option(10, "first sampling steps recorded (default 10)")


def check_prune(options: dict, spec: EditSpec) -> dict:
    if not 0 < options["fraction"] <= 1:
        raise MemtrainError(f"--fraction must be in (0, 1], got {options['fraction']}")
    positive(options["steps"], "--steps")
    return {"base": read_texts(options["base"], "--base")}


def run_prune(pipe, texts: dict, options: dict, spec: EditSpec) -> dict:
    return subspace_prune(pipe, texts["memorized"], base=texts["base"] or None, fraction=options["fraction"],
                          steps=options["steps"], seed=spec.seed, batch_size=spec.batch_size,
                          progress=is_main_process())


# ---------------------------------------------------------------- neurons (NeMo, Hintersdorf et al. 2024)


@dataclass
class NeuronsOptions:
    reference: str | None = option(None, "non-memorized prompts for the activation statistics (default: "
                                   "--preserved)", True)
    check: Literal["ssim", "magnitude"] = option("ssim", "when a prompt counts as still memorized during the "
                                                 "search: the paper's SSIM of the first-step noise difference "
                                                 "(default), or its magnitude above every reference prompt's")


def check_neurons(options: dict, spec: EditSpec) -> dict:
    reference = options["reference"] or spec.preserved
    if reference is None:
        raise MemtrainError("neurons: --reference FILE (non-memorized prompts) is required when there is no "
                            "--preserved file")
    return {"reference": read_texts(reference, "--reference" if options["reference"] else "--preserved")}


def run_neurons(pipe, texts: dict, options: dict, spec: EditSpec) -> dict:
    return nemo_block(pipe, texts["memorized"], texts["reference"], seed=spec.seed, check=options["check"],
                      batch_size=spec.batch_size, progress=is_main_process())


def neurons_report(result: dict) -> dict:
    return {"neurons_found": sum(len(v) for v in result.get("neurons", {}).values())}


# ---------------------------------------------------------------- unlearn (LoRA or full UNet, adversarial)


@dataclass
class UnlearnOptions:
    rank: int = option(4, "LoRA rank (default 4)")
    steps: int = option(200, "training steps (default 200)")
    lr: float = option(1e-4, "learning rate (default 1e-4)")
    adversarial: bool = option(False, "add re-triggering embedding perturbations to the forget set (Kowalczuk "
                               "et al. 2025)")
    adversarial_every: int = option(25, "steps between attacks (default 25)")
    attack_eps: float = option(0.1, "perturbation budget ||d|| <= eps ||e|| (> 0)")
    merge: bool = option(False, "write a merged pipeline instead of the LoRA file")
    weights: Literal["lora", "full"] = option("lora", "lora (default: a LoRA file) or full (every UNet weight, as "
                                              "Kowalczuk et al. 2026's adversarial fine-tuning; writes a pipeline)")
    inner_attack: Literal["dori", "bounded"] = option("dori", "with --adversarial: the attack run on the current "
                                                      "model, dori (default; the memorized prompt's sample as "
                                                      "target) or bounded")
    attack_steps: int = option(10, "with --adversarial: inner attack steps (default 10)")
    preserve_weight: float = option(1.0, "weight of the preserved prompts' term (>= 0, default 1)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Accelerate's mixed precision of the trained "
                                                            "forward (default no)")


def check_unlearn(options: dict, spec: EditSpec) -> dict:
    for name in ("rank", "steps", "lr", "adversarial_every", "attack_eps", "attack_steps"):
        positive(options[name], f"--{name.replace('_', '-')}")
    positive(options["preserve_weight"], "--preserve-weight", allow_zero=True)
    if spec.lora and not options["merge"] and options["weights"] == "lora":
        raise MemtrainError("unlearn: with --lora the result is relative to CKPT + LoRA; pass --merge to write "
                            "a merged pipeline")
    return {}


def run_unlearn(pipe, texts: dict, options: dict, spec: EditSpec) -> dict:
    """`unlearn` with the command's options; a merged LoRA is fused into `pipe` (the weights then changed)."""
    result = unlearn(pipe, texts["memorized"], anchors=texts["anchors"] or None, preserved=texts["preserved"] or None,
                     rank=options["rank"], steps=options["steps"], lr=options["lr"],
                     adversarial=options["adversarial"], adversarial_every=options["adversarial_every"],
                     attack_eps=options["attack_eps"], seed=spec.seed, weights=options["weights"],
                     inner_attack=options["inner_attack"], attack_steps=options["attack_steps"],
                     preserve_weight=options["preserve_weight"], gradient_checkpointing=options["gradient_checkpointing"],
                     mixed_precision=options["mixed_precision"])
    if options["weights"] == "lora" and options["merge"]:
        load_lora_weights(pipe, result["lora_state_dict"])
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return result


# ---------------------------------------------------------------- uce (Gandikota et al. 2024)


@dataclass
class UceOptions:
    lam: float = option(0.1, "weight of ||W - W0||^2 (> 0; default 0.1)")
    preserve_scale: float = option(1.0, "weight of the preserved prompts (default 1)")
    layers: str = option(",".join(LAYERS), "attn2 projections to edit (default to_k,to_v)")
    as_lora: bool = option(False, "write the exact low-rank update as a LoRA file")
    lora_rank: int | None = option(None, "LoRA rank (default: smallest with relative residual <= tol)")
    lora_tol: float = option(LORA_TOL, f"LoRA residual tolerance (default {LORA_TOL:g})")


def check_uce(options: dict, spec: EditSpec) -> dict:
    positive(options["lam"], "--lam")
    positive(options["preserve_scale"], "--preserve-scale", allow_zero=True)
    if options["lora_rank"] is not None:
        positive(options["lora_rank"], "--lora-rank")
    if not 0 < options["lora_tol"] < 1:
        raise MemtrainError(f"--lora-tol must be in (0, 1), got {options['lora_tol']}")
    layers = options["layers"]
    layers = [x.strip() for x in layers.split(",") if x.strip()] if isinstance(layers, str) else list(layers)
    bad = [x for x in layers if x not in LAYERS]
    if bad or not layers:
        raise MemtrainError(f"--layers: {', '.join(bad) or 'empty'}; choose from {', '.join(LAYERS)}")
    options["layers"] = layers
    if spec.lora and options["as_lora"]:
        raise MemtrainError("uce: --as-lora with --lora would drop the input LoRA; write a pipeline instead")
    return {}


def run_uce(pipe, texts: dict, options: dict, spec: EditSpec) -> dict:
    common = dict(anchors=texts["anchors"] or None, preserved=texts["preserved"] or None, lam=options["lam"],
                  preserve_scale=options["preserve_scale"], layers=options["layers"], batch_size=spec.batch_size)
    if options["as_lora"]:
        return uce_lora(pipe, texts["memorized"], rank=options["lora_rank"], tol=options["lora_tol"], **common)
    return uce_edit(pipe, texts["memorized"], **common)


# ---------------------------------------------------------------- the registry

EDITS: dict[str, Edit] = {
    "prune": Edit("subspace deletion (Chavhan et al. 2024): zero the Wanda-scored FFN weights the memorized prompts "
                  "use", run_prune, PruneOptions, check_prune),
    "neurons": Edit("NeMo (Hintersdorf et al. 2024): find and block the cross-attention value neurons of "
                    "memorization", run_neurons, NeuronsOptions, check_neurons, report=neurons_report,
                    files=lambda result: {"neurons.json": result.get("neurons", {})},
                    nothing_found="no memorization neurons were found: the prompts may not be memorized"),
    "unlearn": Edit("fine-tune (LoRA or full UNet): memorized prompts predict like their anchors, preserved prompts "
                    "unchanged", run_unlearn, UnlearnOptions, check_unlearn,
                    lora_output=lambda o: o["weights"] == "lora" and not o["merge"]),
    "uce": Edit("closed-form cross-attention edit (UCE, Gandikota et al. 2024) of attn2.to_k / to_v", run_uce,
                UceOptions, check_uce, lora_output=lambda o: o["as_lora"]),
}


# ---------------------------------------------------------------- checking and applying an edit


def edit_of(spec: EditSpec) -> Edit:
    if spec.method not in EDITS:
        raise MemtrainError(f"method: {spec.method!r} is not an edit; choose from {', '.join(EDITS)}")
    return EDITS[spec.method]


def checked_inputs(spec: EditSpec) -> tuple[dict, dict]:
    """(prompt lists, the method's options with their defaults) after every check of the spec's own keys that
    needs no model: prompt files, numbers, the method's options."""
    edit = edit_of(spec)
    options = dataclasses.asdict(from_dict(edit.options, spec.options, prefix="options", where="edit options"))
    if spec.memorized is None:
        raise MemtrainError("--memorized FILE (the prompts to remove) is required (or the spec key memorized)")
    texts = {"memorized": read_texts(spec.memorized, "--memorized"), "anchors": read_texts(spec.anchors, "--anchors"),
             "preserved": read_texts(spec.preserved, "--preserved")}
    if texts["anchors"] and len(texts["anchors"]) not in (1, len(texts["memorized"])):
        raise MemtrainError(f"--anchors {spec.anchors}: {len(texts['anchors'])} prompts for "
                            f"{len(texts['memorized'])} memorized prompts; give one (used for all) or one per "
                            "memorized prompt")
    for flag, value in (("--eval-n", spec.eval_n), ("--eval-steps", spec.eval_steps),
                        ("--batch-size", spec.batch_size)):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    texts.update(edit.check(options, spec))
    return texts, options


def prompt_files(spec: EditSpec) -> dict:
    """{--flag: path} of the prompt files the method's options name (an output may not replace them)."""
    edit = EDITS.get(spec.method)
    fields = dataclasses.fields(edit.options) if edit else ()
    return {f"--{f.name.replace('_', '-')}": spec.options.get(f.name) for f in fields if f.metadata.get("prompts")}


def plain(value):
    """A JSON-friendly copy of an edit's result (tensors and state dicts left out)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if k != "lora_state_dict" and not torch.is_tensor(v)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def apply_edit(pipe, spec: EditSpec, texts: dict, options: dict) -> dict:
    """Run the spec's edit on `pipe` and measure it: {"result", "lora_state_dict" (LoRA outputs, else None),
    "changed" ({weight: changed entries}), "seconds", "unet_evals", "peak_memory_mb"}."""
    edit = edit_of(spec)
    before = snapshot(pipe.unet)
    t0 = time.perf_counter()
    with count_unet_samples(pipe.unet) as evals:
        result = edit.run(pipe, texts, options, spec)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak so far
    state = result.get("lora_state_dict") if edit.lora_output(options) else None
    if edit.lora_output(options) and state is None:
        raise MemtrainError(f"{spec.method} returned no LoRA state dict")
    changed = lora_changes(state) if state is not None else changed_weights(before, pipe.unet)
    return {"result": result, "lora_state_dict": state, "changed": changed, "seconds": seconds,
            "unet_evals": evals[0], "peak_memory_mb": peak_mb}
