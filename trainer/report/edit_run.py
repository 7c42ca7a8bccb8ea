"""`run_edit(spec)`: one `memtrain edit` from its `EditSpec` (`trainer.edit.spec`). Check everything that needs no
model, load the checkpoint, apply the edit (`trainer.edit.registry`), save it (`trainer.edit.save.save_edited`),
and with `evaluate` compare `memtrain evaluate` before and after (`trainer.report.edit`); edit.json / edit.md,
and W&B on request. Under `accelerate launch` every process runs it (the evaluations are shared); the main one
writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.core.distributed import is_main_process, main_process_value, process_device
from trainer.edit.registry import EDITS, apply_edit, checked_inputs, plain, prompt_files
from trainer.edit.save import check_checkpoint, check_edit_output, load_for_edit, save_edited
from trainer.edit.spec import EditSpec, parameters
from trainer.io import MemtrainError
from trainer.measure.calibration import check_fpr
from trainer.prompts import read_labelled_prompts
from trainer.report.attack_sections import parse_attacks, parse_eps
from trainer.report.edit import evaluate_edit, flat_numbers
from trainer.report.eval_cache import default_root, evaluation_key, lookup, read_entry, store
from trainer.report.evaluate import parse_detectors
from trainer.report.render import edit_markdown
from trainer.sample.generate import generate_images
from trainer.tracking import log_wandb_summary, start_wandb_run


def say(message: str) -> None:
    if is_main_process():
        print(f"memtrain edit: {message}", file=sys.stderr, flush=True)


def input_paths(spec: EditSpec) -> dict:
    """The files and directories an edit reads besides CKPT: its output may not hold any of them."""
    names = ("lora", "memorized", "anchors", "preserved", "evaluate", "data", "train_data", "clip")
    return {**{f"--{name.replace('_', '-')}": getattr(spec, name) for name in names}, **prompt_files(spec)}


def check_edit(spec: EditSpec) -> tuple[dict, dict]:
    """Every check that needs no model (prompt files, numbers, the method's options, the evaluation's settings,
    the source and the output), before anything is loaded or written. Returns (prompt lists, options)."""
    texts, options = checked_inputs(spec)
    if spec.evaluate is not None:
        texts["evaluate"] = read_labelled_prompts(spec.evaluate)
        parse_detectors(spec.eval_detectors)
        if "bounded" in parse_attacks(spec.eval_attack):
            parse_eps(spec.eval_attack_eps)
        if spec.data is not None and not Path(spec.data).is_dir():
            raise MemtrainError(f"--data {spec.data}: not a directory")
        if spec.heldout is not None and not Path(spec.heldout).is_dir():
            raise MemtrainError(f"--heldout {spec.heldout}: not a directory (an imagefolder of images never trained on)")
        check_fpr(spec.fpr)
    elif spec.data is not None or spec.heldout is not None or spec.eval_attack is not None:
        raise MemtrainError("--data, --heldout and --eval-attack are only used with --evaluate PROMPTS")
    if spec.checkpoint is None:
        raise MemtrainError("CHECKPOINT (a diffusers pipeline directory) is required (or the spec key checkpoint)")
    check_checkpoint(spec.checkpoint)
    if spec.lora is not None and not Path(spec.lora).exists():
        raise MemtrainError(f"--lora {spec.lora}: no such file or directory")
    if spec.out is None:
        raise MemtrainError("--out DIR (the output directory) is required (or the spec key out)")
    check_edit_output(spec.out, spec.checkpoint, input_paths(spec))
    return texts, options


def evaluation_settings(spec: EditSpec) -> tuple[dict, dict]:
    """(generation keywords of the general prompts, `evaluate` keywords) of the before / after evaluations."""
    progress = is_main_process()
    gen_kw = dict(n=spec.eval_n, seed=spec.seed, steps=spec.eval_steps, guidance_scale=spec.guidance_scale,
                  batch_size=spec.batch_size, progress=progress, across_processes=True)
    eval_kw = dict(n=spec.eval_n, batch_size=spec.batch_size, seed=spec.seed, data=spec.data,
                   train_data=spec.train_data, clip=spec.clip, quality_feature=spec.quality_feature,
                   steps=spec.eval_steps, guidance_scale=spec.guidance_scale, device=spec.device,
                   detectors=spec.eval_detectors, progress=progress, heldout=spec.heldout, fpr=spec.fpr,
                   attack=spec.eval_attack or False, attack_eps=spec.eval_attack_eps,
                   attack_steps=spec.eval_attack_steps, dori_steps=spec.eval_dori_steps,
                   dori_control_steps=spec.eval_dori_control_steps)
    return gen_kw, eval_kw


def cached_before(spec: EditSpec, eval_kw: dict) -> tuple[Path | None, str | None, Path | None]:
    """(cache root, key, entry or None) of the source's before-evaluation; (None, None, None) without a cache.
    The main process hashes the checkpoint; every process gets its answer."""
    if spec.evaluate is None or spec.no_eval_cache:
        return None, None, None
    root = Path(spec.eval_cache) if spec.eval_cache else default_root()
    key = None
    if is_main_process():
        settings = {k: v for k, v in eval_kw.items()
                    if k not in ("device", "progress", "data", "train_data", "clip", "heldout")}
        settings["device"] = str(spec.device or process_device())
        key = evaluation_key(spec.checkpoint, spec.lora, spec.evaluate, spec.data or Path(spec.evaluate).parent,
                             {"train_data": spec.train_data, "clip": spec.clip, "heldout": spec.heldout}, settings)
    key = main_process_value(key)
    return root, key, main_process_value(lookup(root, key) if is_main_process() else None)


def edit_report(spec: EditSpec, texts: dict, options: dict, applied: dict) -> dict:
    """edit.json without the evaluation: what changed, at what cost, what was skipped and why nothing changed."""
    edit, result, changed = EDITS[spec.method], applied["result"], applied["changed"]
    report = {"tool": "memtrain edit", "method": spec.method, "description": edit.description,
              "source": str(spec.checkpoint), "source_lora": spec.lora, "out": str(spec.out),
              "output": "lora" if applied["lora_state_dict"] is not None else "pipeline",
              "parameters": parameters(spec, options),
              "prompts": {k: len(v) for k, v in texts.items() if k != "evaluate"},
              "changed": changed, "total_changed": sum(changed.values()), "layers_changed": len(changed),
              "seconds": round(applied["seconds"], 3), "unet_evals": applied["unet_evals"],
              "peak_memory_mb": round(applied["peak_memory_mb"], 1), "result": plain(result),
              **edit.report(result)}
    report["skipped"] = dict(result.get("skipped") or {})
    if report["skipped"] and is_main_process():
        print(f"memtrain edit {spec.method}: {len(report['skipped'])} of {len(set(texts['memorized']))} memorized "
              "prompts skipped (nothing blocked for them; also in edit.md):", file=sys.stderr)
        for prompt, why in report["skipped"].items():
            print(f"  - {prompt!r}: {why}", file=sys.stderr)
    report["nothing_changed"] = not changed
    if not changed:
        why = edit.nothing_found
        if result.get("skipped"):
            why += f"; {len(result['skipped'])} prompts skipped, listed in edit.md with the reasons"
        report["warning"] = f"nothing was changed ({why}); OUT holds the unchanged model"
        if is_main_process():
            print(f"memtrain edit {spec.method}: warning: {report['warning']}", file=sys.stderr)
    return report


def run_edit(spec: EditSpec) -> dict:
    """Run the edit the spec describes (module docstring); returns edit.json's dict."""
    texts, options = check_edit(spec)
    source, out = Path(spec.checkpoint), Path(spec.out)
    say(f"loading {source}")
    pipe = load_for_edit(source, spec.lora, spec.device or process_device())
    general = [r.text for r in texts["evaluate"] if r.label == 0] if spec.evaluate is not None else []
    gen_kw, eval_kw = evaluation_settings(spec)
    cache_root, cache_key, entry = cached_before(spec, eval_kw)
    general_before = None
    if entry is not None:
        say(f"the source's evaluation is cached: reusing {entry}")
        general_before = read_entry(entry, None)[1]
    if general and general_before is None:
        say("generating the general prompts before the edit")
        general_before = generate_images(pipe, general, **gen_kw)
    say(f"{spec.method}: {EDITS[spec.method].description}")
    applied = apply_edit(pipe, spec, texts, options)
    report = edit_report(spec, texts, options, applied)
    files = {name: plain(value) for name, value in EDITS[spec.method].files(applied["result"]).items()}
    with save_edited(pipe, out, source, report, applied["lora_state_dict"], input_paths(spec), files) as tmp:
        if tmp is not None:
            report["files"] = sorted([p.name for p in tmp.iterdir()] + ["edit.json", "edit.md"])
        edited = main_process_value(tmp)  # written by the main process: every process evaluates it
        del pipe
        if spec.evaluate is not None:
            say("evaluating the source (before) and the edit (after)" if entry is None else "evaluating the edit (after)")
            report["evaluation"] = evaluate_edit(
                source, edited, spec.evaluate, spec.memorized, spec.lora, report["output"] == "lora", general,
                general_before, gen_kw, eval_kw, cached=entry)
        if tmp is None:
            return report
        if spec.evaluate is not None and cache_key is not None and entry is None:
            try:
                report["evaluation"]["before_cache"] = {"reused": False, "entry": str(store(
                    cache_root, cache_key, tmp / "eval_before", general_before,
                    {"checkpoint": str(source), "lora": spec.lora, "prompts": spec.evaluate, "settings": eval_kw}))}
            except OSError as e:  # a cache that cannot be written costs the next edit time, not this one its result
                say(f"warning: cannot cache the source's evaluation in {cache_root} ({e}); pass --eval-cache DIR")
        (tmp / "edit.md").write_text(edit_markdown(report))
        if spec.wandb:
            run = start_wandb_run(tmp, report["parameters"], "edit", f"edit {report['method']} {source.name}")
            log_wandb_summary(run, flat_numbers(report), tmp, [])
            run.finish()
    return report
