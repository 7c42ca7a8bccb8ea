"""`memtrain edit EDIT [SPEC.yaml | CHECKPOINT] [key=value ...] [--flags]`: the command line mapped onto an
`EditSpec` (`trainer.edit.spec`): a YAML spec file (or the checkpoint), then `key=value` overrides, then the flags
given (each flag sets the spec key of its name; the edit's own flags its `options`), then
`trainer.report.edit_run.run_edit`. One sub-command per registered edit (`trainer.edit.registry.EDITS`).

    memtrain edit {prune,neurons,unlearn,uce} CKPT --memorized FILE --out DIR [--lora W] [--anchors FILE]
        [--preserved FILE] [--evaluate PROMPTS [--data DIR]] [--wandb] [method options]

Writes a pipeline directory or `pytorch_lora_weights.safetensors` atomically into OUT, with `edit.json`
/ `edit.md`; `--evaluate` compares `memtrain evaluate` before and after. Methods: docs/methods.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from trainer.commands.evaluate import add_quality_argument
from trainer.config import OVERRIDES, apply_overrides, describe_keys, from_dict, read_recipe_tree
from trainer.core.distributed import is_main_process
from trainer.detect import DETECTORS
from trainer.detect.dori import DORI_STEPS
from trainer.edit.registry import EDITS
from trainer.edit.spec import EditSpec
from trainer.io import MemtrainError
from trainer.measure.calibration import DEFAULT_FPR
from trainer.report.edit_run import run_edit

NOT_SPEC_KEYS = {"func", "command", "source", "overrides"}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every edit shares (each sets the EditSpec key of its name)."""
    p.add_argument("source", nargs="?", metavar="SPEC.yaml | CHECKPOINT", help="a YAML EditSpec file, or the "
                   "diffusers pipeline directory (with model_index.json); never modified")
    p.add_argument("overrides", nargs="*", default=[], help="spec key=value overrides (e.g. eval_n=4 options.lam=0.5)")
    p.add_argument("--memorized", help="prompts to remove: text (one a line) or JSONL with text (required)")
    p.add_argument("--anchors", help="what each memorized prompt should produce instead: one prompt for all or one "
                   "per memorized prompt, same order (default: the empty prompt)")
    p.add_argument("--preserved", help="prompts whose outputs must stay as they are")
    p.add_argument("--lora", help="LoRA of the same base (file or directory): fused into CKPT before the edit")
    p.add_argument("--out", help="output directory (written atomically; never the source; required)")
    p.add_argument("--evaluate", metavar="PROMPTS", help="labelled prompt file: run `memtrain evaluate` before and "
                   "after the edit (OUT/eval_before, OUT/eval_after) and compare them in edit.json / edit.md")
    p.add_argument("--data", help="with --evaluate: root that file_name paths resolve under (default: the prompt "
                   "file's directory)")
    p.add_argument("--train-data", help="with --evaluate: the training set replication is measured against "
                   "(imagefolder or datasets path; default: the member images of the prompt file)")
    p.add_argument("--heldout", help="with --evaluate: images never trained on (imagefolder) that calibrate the copy "
                   "verdict (member-0 rows of the prompt file count too); see `memtrain evaluate --help`")
    p.add_argument("--fpr", type=float, help="with --evaluate: false-positive rate of the calibrated thresholds "
                   f"(default {DEFAULT_FPR:g})")
    p.add_argument("--eval-n", type=int, help="with --evaluate: generations per prompt (default 2)")
    p.add_argument("--eval-steps", type=int, help="with --evaluate: DDIM steps of the generations (default 50)")
    p.add_argument("--guidance-scale", type=float, help="with --evaluate: generation guidance (default 7.5)")
    p.add_argument("--clip", help="with --evaluate: local CLIPModel directory for the CLIP score")
    add_quality_argument(p)
    p.add_argument("--eval-detectors", help="with --evaluate: detectors to run (comma-separated subset of "
                   f"{','.join(DETECTORS)}; clid = membership; default all)")
    p.add_argument("--eval-attack", nargs="?", const="dori,bounded", metavar="dori,bounded", help="with --evaluate: "
                   "re-trigger the memorized prompts before and after the edit (`memtrain evaluate --attack`); bare "
                   "--eval-attack runs both")
    p.add_argument("--eval-attack-eps", help="with --eval-attack bounded: budgets eps (default 0.1)")
    p.add_argument("--eval-attack-steps", type=int, help="with --eval-attack bounded: steps (default 20)")
    p.add_argument("--eval-dori-steps", type=int, help=f"with --eval-attack dori: DoRI steps (default {DORI_STEPS}, "
                   "the paper's)")
    p.add_argument("--eval-dori-control-steps", type=int, help="with --eval-attack dori: steps of the non-memorized "
                   "control images (default 0: the control is `memtrain evaluate --attack dori`'s job)")
    p.add_argument("--eval-cache", metavar="DIR", help="with --evaluate: where the source's evaluation is cached and "
                   "reused by later edits of the same checkpoint, prompt file and settings (default $MEMTRAIN_CACHE, "
                   "else ~/.cache/memtrain)")
    p.add_argument("--no-eval-cache", action="store_true", help="with --evaluate: always evaluate the source anew "
                   "and cache nothing")
    p.add_argument("--wandb", action="store_true", help="log edit.json's numbers to W&B (respects WANDB_MODE)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--batch-size", type=int, help="samples per UNet forward (default 16)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")


def add_option_arguments(p: argparse.ArgumentParser, options: type) -> None:
    """One flag per field of an edit's options dataclass (a bool is a switch, a Literal a choice)."""
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, type(int | None)):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kw: dict = {"help": f.metadata.get("help"), "dest": f.name}
        if tp is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = typing.get_args(tp)
        else:
            kw["type"] = tp
        p.add_argument(f"--{f.name.replace('_', '-')}", **kw)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help=f"remove memorized prompts from a checkpoint ({', '.join(EDITS)})",
                       description="Edit a released checkpoint so that memorized prompts stop reproducing their "
                       "training images; writes a pipeline directory or a LoRA plus edit.json / edit.md.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, edit in EDITS.items():
        m = methods.add_parser(name, help=edit.description, description=edit.description + ".",
                               argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="spec keys (key = default; the flags above set the key of their name, the "
                               "method's own flags options.NAME):\n" + "\n".join(describe_keys(EditSpec)))
        add_common_arguments(m)
        add_option_arguments(m.add_argument_group(f"{name} options"), edit.options)
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> EditSpec:
    """The EditSpec of the command line: SPEC.yaml (or a CHECKPOINT), the key=value overrides, the flags given."""
    source, overrides = getattr(args, "source", None), list(args.overrides)
    tree, where = {}, OVERRIDES
    if source is not None and "=" in source and not Path(source).exists():
        overrides.insert(0, source)  # `memtrain edit EDIT key=value ...`
    elif source is not None and Path(source).suffix in (".yaml", ".yml"):
        if not Path(source).is_file():
            raise MemtrainError(f"spec {source}: no such file (want a YAML EditSpec; keys: `memtrain edit "
                                f"{args.method} --help`)")
        tree, where = read_recipe_tree(source), source
    elif source is not None:
        tree["checkpoint"] = source
    tree = apply_overrides(tree, overrides, EditSpec)
    option_names = {f.name for f in dataclasses.fields(EDITS[args.method].options)}
    flags = {k: v for k, v in vars(args).items() if k not in NOT_SPEC_KEYS}
    tree["options"] = {**(tree.get("options") or {}), **{k: v for k, v in flags.items() if k in option_names}}
    tree.update({k: v for k, v in flags.items() if k not in option_names})
    return from_dict(EditSpec, tree, where=where)


def run(args: argparse.Namespace) -> int:
    report = run_edit(spec_from_args(args))
    if is_main_process():
        print(json.dumps({"out": report["out"], "method": report["method"], **{k: report[k] for k in (
            "total_changed", "layers_changed", "seconds", "unet_evals")}}, indent=2))
    return 0
