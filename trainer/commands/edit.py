"""`memtrain edit`: remove memorized content from a released checkpoint, and measure what the edit did.

    memtrain edit {prune,neurons,unlearn,uce} CKPT --memorized FILE --out DIR [--lora W] [--anchors FILE]
        [--preserved FILE] [--evaluate PROMPTS [--data DIR]] [--wandb] [method options]

Writes a pipeline directory or `pytorch_lora_weights.safetensors` atomically into OUT, with `edit.json`
/ `edit.md`; `--evaluate` compares `memtrain evaluate` before and after. Methods: docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer.commands.evaluate import add_quality_argument
from trainer.core.components import load_lora_weights
from trainer.core.distributed import is_main_process, main_process_value, on_main_process, process_device
from trainer.core.unet_core import count_unet_samples
from trainer.detect import DETECTORS
from trainer.detect.dori import DORI_STEPS
from trainer.edit.neurons import nemo_block
from trainer.edit.prune import subspace_prune
from trainer.edit.save import (
    EDIT_TOOL,
    changed_weights,
    check_checkpoint,
    check_edit_output,
    load_for_edit,
    save_lora,
    snapshot,
    write_pipeline,
)
from trainer.edit.uce import LAYERS, LORA_TOL, uce_edit, uce_lora
from trainer.edit.unlearn import INNER_ATTACKS, WEIGHTS, unlearn
from trainer.io import MemtrainError, atomic_dir, write_json
from trainer.measure.calibration import DEFAULT_FPR, check_fpr
from trainer.prompts import read_labelled_prompts, read_prompts
from trainer.report.attack_sections import parse_attacks, parse_eps
from trainer.report.edit import evaluate_edit, flat_numbers
from trainer.report.eval_cache import default_root, evaluation_key, lookup, read_entry, store
from trainer.report.evaluate import parse_detectors
from trainer.report.render import edit_markdown
from trainer.sample.generate import generate_images
from trainer.tracking import log_wandb_summary, start_wandb_run

METHODS = {
    "prune": "subspace deletion (Chavhan et al. 2024): zero the Wanda-scored FFN weights the memorized prompts use",
    "neurons": "NeMo (Hintersdorf et al. 2024): find and block the cross-attention value neurons of memorization",
    "unlearn": "fine-tune (LoRA or full UNet): memorized prompts predict like their anchors, preserved prompts "
               "unchanged",
    "uce": "closed-form cross-attention edit (UCE, Gandikota et al. 2024) of attn2.to_k / to_v",
}


# ---------------------------------------------------------------- CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="diffusers pipeline directory (with model_index.json); never modified")
    p.add_argument("--memorized", required=True, help="prompts to remove: text (one a line) or JSONL with text")
    p.add_argument("--anchors", help="what each memorized prompt should produce instead: one prompt for all or one "
                   "per memorized prompt, same order (default: the empty prompt)")
    p.add_argument("--preserved", help="prompts whose outputs must stay as they are")
    p.add_argument("--lora", help="LoRA of the same base (file or directory): fused into CKPT before the edit")
    p.add_argument("--out", required=True, help="output directory (written atomically; never the source)")
    p.add_argument("--evaluate", metavar="PROMPTS", help="labelled prompt file: run `memtrain evaluate` before and "
                   "after the edit (OUT/eval_before, OUT/eval_after) and compare them in edit.json / edit.md")
    p.add_argument("--data", help="with --evaluate: root that file_name paths resolve under (default: the prompt "
                   "file's directory)")
    p.add_argument("--train-data", help="with --evaluate: the training set replication is measured against "
                   "(imagefolder or datasets path; default: the member images of the prompt file)")
    p.add_argument("--heldout", help="with --evaluate: images never trained on (imagefolder) that calibrate the copy "
                   "verdict (member-0 rows of the prompt file count too); see `memtrain evaluate --help`")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="with --evaluate: false-positive rate of the "
                   f"calibrated thresholds (default {DEFAULT_FPR:g})")
    p.add_argument("--eval-n", type=int, default=2, help="with --evaluate: generations per prompt (default 2)")
    p.add_argument("--eval-steps", type=int, default=50, help="with --evaluate: DDIM steps of the generations")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="with --evaluate: generation guidance")
    p.add_argument("--clip", help="with --evaluate: local CLIPModel directory for the CLIP score")
    add_quality_argument(p)
    p.add_argument("--eval-detectors", default=",".join(DETECTORS), help="with --evaluate: detectors to run "
                   f"(comma-separated subset of {','.join(DETECTORS)}; clid = membership)")
    p.add_argument("--eval-attack", nargs="?", const="dori,bounded", metavar="dori,bounded", help="with --evaluate: "
                   "re-trigger the memorized prompts before and after the edit (`memtrain evaluate --attack`); bare "
                   "--eval-attack runs both")
    p.add_argument("--eval-attack-eps", default="0.1", help="with --eval-attack bounded: budgets eps (default 0.1)")
    p.add_argument("--eval-attack-steps", type=int, default=20, help="with --eval-attack bounded: steps (default 20)")
    p.add_argument("--eval-dori-steps", type=int, default=DORI_STEPS,
                   help=f"with --eval-attack dori: DoRI steps (default {DORI_STEPS}, the paper's)")
    p.add_argument("--eval-dori-control-steps", type=int, default=0, help="with --eval-attack dori: steps of the "
                   "non-memorized control images (default 0: the control is `memtrain evaluate --attack dori`'s job)")
    p.add_argument("--eval-cache", metavar="DIR", help="with --evaluate: where the source's evaluation is cached and "
                   "reused by later edits of the same checkpoint, prompt file and settings (default $MEMTRAIN_CACHE, "
                   "else ~/.cache/memtrain)")
    p.add_argument("--no-eval-cache", action="store_true", help="with --evaluate: always evaluate the source anew "
                   "and cache nothing")
    p.add_argument("--wandb", action="store_true", help="log edit.json's numbers to W&B (respects WANDB_MODE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="samples per UNet forward (default 16)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="remove memorized prompts from a checkpoint (prune, neurons, unlearn, uce)",
                       description="Edit a released checkpoint so that memorized prompts stop reproducing their "
                       "training images; writes a pipeline directory or a LoRA plus edit.json / edit.md.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)

    m = methods.add_parser("prune", help=METHODS["prune"], description=METHODS["prune"] + ".")
    _common(m)
    m.add_argument("--base", help="base prompts the scores are compared with (default: the empty prompt)")
    m.add_argument("--fraction", type=float, default=0.01, help="top fraction of each row's scores (default 0.01)")
    m.add_argument("--steps", type=int, default=10, help="first sampling steps recorded (default 10)")

    m = methods.add_parser("neurons", help=METHODS["neurons"], description=METHODS["neurons"] + ".")
    _common(m)
    m.add_argument("--reference", help="non-memorized prompts for the activation statistics (default: --preserved)")
    m.add_argument("--check", choices=("ssim", "magnitude"), default="ssim",
                   help="when a prompt counts as still memorized during the search: the paper's SSIM of the "
                   "first-step noise difference (default), or its magnitude above every reference prompt's")

    m = methods.add_parser("unlearn", help=METHODS["unlearn"], description=METHODS["unlearn"] + ".")
    _common(m)
    m.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    m.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    m.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    m.add_argument("--adversarial", action="store_true", help="add re-triggering embedding perturbations to the "
                   "forget set (Kowalczuk et al. 2025)")
    m.add_argument("--adversarial-every", type=int, default=25, help="steps between attacks (default 25)")
    m.add_argument("--attack-eps", type=float, default=0.1, help="perturbation budget ||d|| <= eps ||e|| (> 0)")
    m.add_argument("--merge", action="store_true", help="write a merged pipeline instead of the LoRA file")
    m.add_argument("--weights", choices=WEIGHTS, default="lora", help="lora (default: a LoRA file) or full (every "
                   "UNet weight, as Kowalczuk et al. 2026's adversarial fine-tuning; writes a pipeline)")
    m.add_argument("--inner-attack", choices=INNER_ATTACKS, default="dori", help="with --adversarial: the attack run "
                   "on the current model, dori (default; the memorized prompt's sample as target) or bounded")
    m.add_argument("--attack-steps", type=int, default=10, help="with --adversarial: inner attack steps (default 10)")
    m.add_argument("--preserve-weight", type=float, default=1.0, help="weight of the preserved prompts' term "
                   "(>= 0, default 1)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    m.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="Accelerate's mixed precision of the trained forward (default no)")

    m = methods.add_parser("uce", help=METHODS["uce"], description=METHODS["uce"] + ".")
    _common(m)
    m.add_argument("--lam", type=float, default=0.1, help="weight of ||W - W0||^2 (> 0; default 0.1)")
    m.add_argument("--preserve-scale", type=float, default=1.0, help="weight of the preserved prompts (default 1)")
    m.add_argument("--layers", default=",".join(LAYERS), help="attn2 projections to edit (default to_k,to_v)")
    m.add_argument("--as-lora", action="store_true", help="write the exact low-rank update as a LoRA file")
    m.add_argument("--lora-rank", type=int, help="LoRA rank (default: smallest with relative residual <= tol)")
    m.add_argument("--lora-tol", type=float, default=LORA_TOL, help=f"LoRA residual tolerance (default {LORA_TOL:g})")
    p.set_defaults(func=run)


# ---------------------------------------------------------------- checks


def _positive(value, flag: str, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise MemtrainError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _texts(path: str | None, flag: str) -> list[str]:
    if path is None:
        return []
    if not Path(path).exists():
        raise MemtrainError(f"{flag} {path}: no such file")
    try:
        return [r["text"] for r in read_prompts(path)]
    except MemtrainError as e:
        raise MemtrainError(f"{flag}: {e}") from None


def read_paths(args: argparse.Namespace) -> dict:
    """The files and directories an edit reads besides CKPT: --out may not hold any of them."""
    names = ("lora", "memorized", "anchors", "preserved", "evaluate", "data", "train_data", "clip", "base", "reference")
    return {f"--{name.replace('_', '-')}": getattr(args, name, None) for name in names}


def check_args(args: argparse.Namespace) -> dict:
    """Every check that needs no model: prompt files, numbers, paths. Returns the prompt lists."""
    texts = {"memorized": _texts(args.memorized, "--memorized"), "anchors": _texts(args.anchors, "--anchors"),
             "preserved": _texts(args.preserved, "--preserved")}
    if texts["anchors"] and len(texts["anchors"]) not in (1, len(texts["memorized"])):
        raise MemtrainError(f"--anchors {args.anchors}: {len(texts['anchors'])} prompts for "
                            f"{len(texts['memorized'])} memorized prompts; give one (used for all) or one per "
                            "memorized prompt")
    for flag, value in (("--eval-n", args.eval_n), ("--eval-steps", args.eval_steps),
                        ("--batch-size", args.batch_size)):
        if int(value) < 1:
            raise MemtrainError(f"{flag} must be >= 1, got {value}")
    if args.method == "prune":
        if not 0 < args.fraction <= 1:
            raise MemtrainError(f"--fraction must be in (0, 1], got {args.fraction}")
        _positive(args.steps, "--steps")
        texts["base"] = _texts(args.base, "--base")
    elif args.method == "neurons":
        reference = args.reference or args.preserved
        if reference is None:
            raise MemtrainError("neurons: --reference FILE (non-memorized prompts) is required when there is no "
                                "--preserved file")
        texts["reference"] = _texts(reference, "--reference" if args.reference else "--preserved")
    elif args.method == "unlearn":
        for flag, value in (("--rank", args.rank), ("--steps", args.steps), ("--lr", args.lr),
                            ("--adversarial-every", args.adversarial_every), ("--attack-eps", args.attack_eps),
                            ("--attack-steps", args.attack_steps)):
            _positive(value, flag)
        _positive(args.preserve_weight, "--preserve-weight", allow_zero=True)
        if args.lora and not args.merge and args.weights == "lora":
            raise MemtrainError("unlearn: with --lora the result is relative to CKPT + LoRA; pass --merge to write "
                                "a merged pipeline")
    elif args.method == "uce":
        _positive(args.lam, "--lam")
        _positive(args.preserve_scale, "--preserve-scale", allow_zero=True)
        if args.lora_rank is not None:
            _positive(args.lora_rank, "--lora-rank")
        if not 0 < args.lora_tol < 1:
            raise MemtrainError(f"--lora-tol must be in (0, 1), got {args.lora_tol}")
        args.layers = [x.strip() for x in args.layers.split(",") if x.strip()]
        bad = [x for x in args.layers if x not in LAYERS]
        if bad or not args.layers:
            raise MemtrainError(f"--layers: {', '.join(bad) or 'empty'}; choose from {', '.join(LAYERS)}")
        if args.lora and args.as_lora:
            raise MemtrainError("uce: --as-lora with --lora would drop the input LoRA; write a pipeline instead")
    if args.evaluate is not None:
        texts["evaluate"] = read_labelled_prompts(args.evaluate)
        parse_detectors(args.eval_detectors)
        if "bounded" in parse_attacks(args.eval_attack):
            parse_eps(args.eval_attack_eps)
        if args.data is not None and not Path(args.data).is_dir():
            raise MemtrainError(f"--data {args.data}: not a directory")
        if args.heldout is not None and not Path(args.heldout).is_dir():
            raise MemtrainError(f"--heldout {args.heldout}: not a directory (an imagefolder of images never trained on)")
        check_fpr(args.fpr)
    elif args.data is not None or args.heldout is not None or args.eval_attack is not None:
        raise MemtrainError("--data, --heldout and --eval-attack are only used with --evaluate PROMPTS")
    check_checkpoint(args.checkpoint)
    if args.lora is not None and not Path(args.lora).exists():
        raise MemtrainError(f"--lora {args.lora}: no such file or directory")
    check_edit_output(args.out, args.checkpoint, read_paths(args))
    return texts


# ---------------------------------------------------------------- the edit


def _plain(value):
    """A JSON-friendly copy of a method's result (tensors and state dicts left out)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k != "lora_state_dict" and not torch.is_tensor(v)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def run_method(pipe, args: argparse.Namespace, texts: dict) -> dict:
    """Run the chosen edit on `pipe`; returns its result (for LoRA outputs, `lora_state_dict` holds the LoRA)."""
    memorized, anchors, preserved = texts["memorized"], texts["anchors"] or None, texts["preserved"] or None
    if args.method == "prune":
        return subspace_prune(pipe, memorized, base=texts["base"] or None, fraction=args.fraction,
                              steps=args.steps, seed=args.seed, batch_size=args.batch_size, progress=is_main_process())
    if args.method == "neurons":
        return nemo_block(pipe, memorized, texts["reference"], seed=args.seed, check=args.check,
                          batch_size=args.batch_size, progress=is_main_process())
    if args.method == "unlearn":
        return unlearn(pipe, memorized, anchors=anchors, preserved=preserved, rank=args.rank, steps=args.steps,
                       lr=args.lr, adversarial=args.adversarial, adversarial_every=args.adversarial_every,
                       attack_eps=args.attack_eps, seed=args.seed, weights=args.weights,
                       inner_attack=args.inner_attack, attack_steps=args.attack_steps, preserve_weight=args.preserve_weight,
                       gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision)
    common = dict(anchors=anchors, preserved=preserved, lam=args.lam, preserve_scale=args.preserve_scale,
                  layers=args.layers, batch_size=args.batch_size)
    if args.as_lora:
        return uce_lora(pipe, memorized, rank=args.lora_rank, tol=args.lora_tol, **common)
    return uce_edit(pipe, memorized, **common)


def lora_changes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """{module weight: entries of the merged update up @ down that are non-zero} of a diffusers-format LoRA."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for down, up in (("lora.down", "lora.up"), ("lora_A", "lora_B")):
            for part, role in ((down, "down"), (up, "up")):
                if f".{part}." in key:
                    pairs.setdefault(key[: key.index(f".{part}.")], {})[role] = value
    out = {}
    for module, p in pairs.items():
        if "down" in p and "up" in p:
            update = p["up"].double().flatten(1) @ p["down"].double().flatten(1)
            out[f"{module.removeprefix('unet.')}.weight"] = int((update != 0).sum())
    return out


def _parameters(args: argparse.Namespace) -> dict:
    skip = {"func", "command", "method", "checkpoint", "out"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _say(message: str) -> None:
    if is_main_process():
        print(f"memtrain edit: {message}", file=sys.stderr, flush=True)


def cached_before(args: argparse.Namespace, eval_kw: dict) -> tuple[Path | None, str | None, Path | None]:
    """(cache root, key, entry or None) of the source's before-evaluation; (None, None, None) without a cache.
    The main process hashes the checkpoint; every process gets its answer."""
    if args.evaluate is None or args.no_eval_cache:
        return None, None, None
    root = Path(args.eval_cache) if args.eval_cache else default_root()
    key = None
    if is_main_process():
        settings = {k: v for k, v in eval_kw.items()
                    if k not in ("device", "progress", "data", "train_data", "clip", "heldout")}
        settings["device"] = str(args.device or process_device())
        key = evaluation_key(args.checkpoint, args.lora, args.evaluate, args.data or Path(args.evaluate).parent,
                             {"train_data": args.train_data, "clip": args.clip, "heldout": args.heldout}, settings)
    key = main_process_value(key)
    return root, key, main_process_value(lookup(root, key) if is_main_process() else None)


def run(args: argparse.Namespace) -> int:
    texts = check_args(args)
    source, out = Path(args.checkpoint), Path(args.out)
    _say(f"loading {source}")
    pipe = load_for_edit(source, args.lora, args.device or process_device())
    evaluating = args.evaluate is not None
    general = [r.text for r in texts["evaluate"] if r.label == 0] if evaluating else []
    progress = is_main_process()
    gen_kw = dict(n=args.eval_n, seed=args.seed, steps=args.eval_steps, guidance_scale=args.guidance_scale,
                  batch_size=args.batch_size, progress=progress, across_processes=True)
    eval_kw = dict(n=args.eval_n, batch_size=args.batch_size, seed=args.seed, data=args.data,
                   train_data=args.train_data, clip=args.clip, quality_feature=args.quality_feature,
                   steps=args.eval_steps,
                   guidance_scale=args.guidance_scale, device=args.device, detectors=args.eval_detectors,
                   progress=progress, heldout=args.heldout, fpr=args.fpr, attack=args.eval_attack or False,
                   attack_eps=args.eval_attack_eps, attack_steps=args.eval_attack_steps,
                   dori_steps=args.eval_dori_steps, dori_control_steps=args.eval_dori_control_steps)
    cache_root, cache_key, entry = cached_before(args, eval_kw)
    general_before = None
    if entry is not None:
        _say(f"the source's evaluation is cached: reusing {entry}")
        general_before = read_entry(entry, None)[1]
    if general and general_before is None:
        _say("generating the general prompts before the edit")
        general_before = generate_images(pipe, general, **gen_kw)
    _say(f"{args.method}: {METHODS[args.method]}")

    before = snapshot(pipe.unet)
    t0 = time.perf_counter()
    with count_unet_samples(pipe.unet) as evals:
        result = run_method(pipe, args, texts)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak so far

    full = args.method == "unlearn" and args.weights == "full"
    lora_out = (args.method == "unlearn" and not args.merge and not full) or (args.method == "uce" and args.as_lora)
    state = result.get("lora_state_dict")
    if args.method == "unlearn" and not full:
        if state is None:
            raise MemtrainError("unlearn returned no LoRA state dict")
        if args.merge:
            load_lora_weights(pipe, state)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    changed = lora_changes(state) if lora_out else changed_weights(before, pipe.unet)
    report = {"tool": EDIT_TOOL, "method": args.method, "description": METHODS[args.method],
              "source": str(source), "source_lora": args.lora, "out": str(out),
              "output": "lora" if lora_out else "pipeline",
              "parameters": _parameters(args),
              "prompts": {k: len(v) for k, v in texts.items() if k != "evaluate"},
              "changed": changed, "total_changed": sum(changed.values()), "layers_changed": len(changed),
              "seconds": round(seconds, 3), "unet_evals": evals[0], "peak_memory_mb": round(peak_mb, 1),
              "result": _plain(result)}
    if args.method == "neurons":
        report["neurons_found"] = sum(len(v) for v in result.get("neurons", {}).values())
    report["skipped"] = dict(result.get("skipped") or {})
    if report["skipped"] and is_main_process():
        print(f"memtrain edit {args.method}: {len(report['skipped'])} of {len(set(texts['memorized']))} memorized "
              "prompts skipped (nothing blocked for them; also in edit.md):", file=sys.stderr)
        for prompt, why in report["skipped"].items():
            print(f"  - {prompt!r}: {why}", file=sys.stderr)
    if not changed:
        why = ("no memorization neurons were found: the prompts may not be memorized"
               if args.method == "neurons" else "the edit left every weight as it was")
        if result.get("skipped"):
            why += f"; {len(result['skipped'])} prompts skipped, listed in edit.md with the reasons"
        report["nothing_changed"] = True
        report["warning"] = f"nothing was changed ({why}); OUT holds the unchanged model"
        if is_main_process():
            print(f"memtrain edit {args.method}: warning: {report['warning']}", file=sys.stderr)
    else:
        report["nothing_changed"] = False

    inputs = {"CHECKPOINT": source, **read_paths(args)}
    check_edit_output(out, source, inputs)
    with on_main_process(atomic_dir(out, "edit", inputs)) as tmp:  # other processes of a launch only evaluate
        if tmp is not None:
            if lora_out:
                save_lora(state, tmp)
            else:
                write_pipeline(pipe, tmp, source)
            if args.method == "neurons":
                write_json(_plain(result.get("neurons", {})), tmp / "neurons.json")
            report["files"] = sorted([p.name for p in tmp.iterdir()] + ["edit.json", "edit.md"])
        edited = main_process_value(tmp)  # written by the main process: every process evaluates it
        del pipe
        if evaluating:
            _say("evaluating the source (before) and the edit (after)" if entry is None
                 else "evaluating the edit (after)")
            report["evaluation"] = evaluate_edit(
                source, edited, args.evaluate, args.memorized, args.lora, lora_out, general, general_before, gen_kw,
                eval_kw, cached=entry)
        if tmp is None:
            return 0
        if evaluating and cache_key is not None and entry is None:
            try:
                report["evaluation"]["before_cache"] = {"reused": False, "entry": str(store(
                    cache_root, cache_key, tmp / "eval_before", general_before,
                    {"checkpoint": str(source), "lora": args.lora, "prompts": args.evaluate, "settings": eval_kw}))}
            except OSError as e:  # a cache that cannot be written costs the next edit time, not this one its result
                _say(f"warning: cannot cache the source's evaluation in {cache_root} ({e}); pass --eval-cache DIR")
        write_json(report, tmp / "edit.json")
        (tmp / "edit.md").write_text(edit_markdown(report))
        if args.wandb:
            run = start_wandb_run(tmp, report["parameters"], "edit", f"edit {report['method']} {Path(report['source']).name}")
            log_wandb_summary(run, flat_numbers(report), tmp, [])
            run.finish()
    summary = {"out": str(out), "method": args.method, "total_changed": report["total_changed"],
               "layers_changed": report["layers_changed"], "seconds": report["seconds"],
               "unet_evals": report["unet_evals"]}
    print(json.dumps(summary, indent=2))
    return 0
