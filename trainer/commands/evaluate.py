"""`memtrain evaluate [SPEC.yaml | CHECKPOINT] [key=value ...] [--flags]`: the command line mapped onto an
`EvalSpec` (`trainer.report.spec`): a YAML spec file (or none), then `key=value` overrides, then the flags
given (each flag sets the spec key of its name), then `trainer.report.evaluate.evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.commands.guard_options import (
    INDEX_THRESHOLD,
    add_guard_arguments,
    checked_guard_options,
    guard_paths,
)
from trainer.config import OVERRIDES, apply_overrides, describe_keys, from_dict, read_recipe_tree
from trainer.core.distributed import is_main_process
from trainer.detect import DETECTORS
from trainer.detect.dori import CONTROL_STEPS, DORI_STEPS
from trainer.io import MemtrainError, check_output
from trainer.measure.calibration import DEFAULT_FPR
from trainer.measure.features import QUALITY_FEATURES
from trainer.measure.verdict import CRITERIA
from trainer.report.evaluate import evaluate
from trainer.report.render import flat_summary
from trainer.report.spec import EvalSpec, input_paths
from trainer.sample.guard import GUARDS

NOT_SPEC_KEYS = {"func", "command", "source", "overrides", "guard_embedding", "no_generate"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="memorization report of a checkpoint: detectors, replication, membership, quality",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MemBench-style evaluation of a diffusers checkpoint: detector AUROC / TPR at 1% FPR on labelled "
        "prompts, replication of generations against the training images, CLiD membership inference and image "
        "quality. Writes OUT/report.json, OUT/report.md and PNG figures (atomically).\n\nThe settings are an "
        "EvalSpec: a YAML file (SPEC.yaml), key=value overrides after it, and the flags below, each setting the "
        "key of its name (--train-data: train_data; --no-generate: generate=false; a guard's options: "
        "guard_options).")
    p.epilog = "spec keys (key = default):\n" + "\n".join(describe_keys(EvalSpec))
    p.add_argument("source", nargs="?", metavar="SPEC.yaml | CHECKPOINT",
                   help="a YAML EvalSpec file, or the diffusers pipeline directory (with model_index.json)")
    p.add_argument("overrides", nargs="*", default=[], help="spec key=value overrides (e.g. n=4 groups=[trigger])")
    p.add_argument("--prompts", help="plain text (one prompt a line) or JSONL with text/prompt/caption and "
                   "optional label (1 memorized, 0 not), group, file_name, member; a toy labels.jsonl works as is")
    p.add_argument("--label-groups", help="YAML file of the roles of the prompt file's `group` values (keys "
                   "memorized, not_memorized, members, non_members; default: trainer/label_groups.yaml)")
    p.add_argument("--memorized", help="instead of --prompts: a list of memorized prompts (text or JSONL, e.g. "
                   "Wen et al.'s sdv1_500_memorized.jsonl)")
    p.add_argument("--not-memorized", help="with --memorized: a list of non-memorized prompts")
    p.add_argument("--train-data", help="the training set replication is measured against: an imagefolder "
                   "(metadata.jsonl/csv), a datasets save_to_disk directory or a local datasets path "
                   "(default: the member images named in the prompt file)")
    p.add_argument("--lora", help="LoRA weights (directory or pytorch_lora_weights.safetensors)")
    p.add_argument("--out", help="output directory (default runs/evaluate; replaced)")
    p.add_argument("-n", type=int, help="generations per prompt for replication / quality (default 2)")
    p.add_argument("--batch-size", type=int, help="samples per UNet forward (default 32)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--steps", type=int, help="DDIM steps of the generations (default 50; the detectors always use "
                   "the 50-step schedule)")
    p.add_argument("--guidance-scale", type=float, help="(default 7.5)")
    p.add_argument("--data", help="root that file_name paths resolve under (default: the prompt file's directory)")
    p.add_argument("--sscd", help="SSCD TorchScript file: adds SSCD similarity to the replication section")
    p.add_argument("--clip", help="local CLIPModel directory (with tokenizer files): CLIP score, and KID in CLIP features")
    add_quality_argument(p)
    p.add_argument("--wandb", action="store_true", help="log the summary and figures to W&B (respects WANDB_MODE)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (no replication or quality)")
    p.add_argument("--sections", help="comma-separated report sections to run (with those they read from; default "
                   "every section the other options ask for): detectors, generate, replication, membership, quality, "
                   "attack, guard")
    p.add_argument("--detectors", help=f"comma-separated subset of {','.join(DETECTORS)} (default all; clid = "
                   "membership)")
    c = p.add_argument_group("copy verdict and generation groups")
    c.add_argument("--heldout", help="imagefolder (or datasets directory) of images never trained on: calibrates the "
                   "copy verdict at --fpr false positives on them (member-0 / group heldout rows of the prompt file "
                   "count too); without any, Gu et al.'s ratio < 1/3, reported as uncalibrated")
    c.add_argument("--fpr", type=float, help=f"false-positive rate of every calibrated threshold: the copy verdict on "
                   f"held-out images, the detectors' on non-memorized prompts (default {DEFAULT_FPR:g})")
    c.add_argument("--criterion", choices=("auto", *CRITERIA),
                   help="the copy verdict's score: gradient (NN1/NN2 ratio of the image gradients), l2 (to the "
                   "nearest training image), ratio (NN1/NN2, Gu et al.), sscd (needs --sscd); auto (default) = sscd "
                   "with --sscd, else gradient")
    c.add_argument("--groups", help="prompt rows to generate from: trigger (label 1), general (label 0), member (other "
                   "training members, e.g. toy singletons), heldout (member-0 rows, else the captions of --heldout "
                   "DIR: the verdict's false-positive rate on generations); default trigger,general")
    p.add_argument("--device", help="torch device (default: this process's accelerator under accelerate launch, else "
                   "cuda if available, else cpu)")
    x = p.add_argument_group("re-trigger test, training-image index")
    x.add_argument("--attack", nargs="?", const="dori,bounded", metavar="dori,bounded",
                   help="re-trigger tests of the memorized prompts: dori (Kowalczuk et al. 2026: the text embedding "
                   "optimised towards the prompt's training image, with the non-memorized members as control) and "
                   "bounded (||d|| <= eps ||e||, no image known and image known); bare --attack runs both")
    x.add_argument("--dori-steps", type=int, help=f"DoRI steps (default {DORI_STEPS}, the paper's)")
    x.add_argument("--dori-control-steps", type=int,
                   help=f"DoRI steps for the non-memorized member images (default {CONTROL_STEPS})")
    x.add_argument("--attack-eps", help="comma-separated budgets eps > 0: ||d|| <= eps * ||e|| (default 0.05,0.1,0.2)")
    x.add_argument("--attack-steps", type=int, help="attack optimisation steps (default 20)")
    x.add_argument("--index", help="training-image index (`memtrain index`): replication from nearest-neighbour "
                   "search, without loading the training images")
    x.add_argument("--index-model", help="CLIP model directory / SSCD TorchScript file of a clip / sscd index")
    x.add_argument(INDEX_THRESHOLD.flag, type=float,
                   help="cosine similarity in (-1, 1) above which a generation replicates (default: the index's "
                   "calibration from `memtrain index --heldout`; else 0.5 for sscd, 0.85 for pixels; required for clip)")
    add_guard_arguments(p, defaults=False)
    p.set_defaults(func=_run)


def add_quality_argument(parser: argparse.ArgumentParser) -> None:
    names = [*QUALITY_FEATURES, "clip"]
    parser.add_argument("--quality-feature", choices=names, help="feature space of KID (and the alignment score a "
                        f"feature has), one of {', '.join(names)}; default clip with --clip, else pix8; "
                        "named in the report")


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """The EvalSpec of the command line: SPEC.yaml (or a CHECKPOINT), the key=value overrides, the flags given."""
    source, overrides = getattr(args, "source", None), list(args.overrides)
    tree, where = {}, OVERRIDES
    if source is not None and "=" in source and not Path(source).exists():
        overrides.insert(0, source)  # `memtrain evaluate key=value ...`
    elif source is not None and Path(source).suffix in (".yaml", ".yml"):
        if not Path(source).is_file():
            raise MemtrainError(f"spec {source}: no such file (want a YAML EvalSpec; keys: `memtrain evaluate --help`)")
        tree, where = read_recipe_tree(source), source
    elif source is not None:
        tree["checkpoint"] = source
    tree = apply_overrides(tree, overrides, EvalSpec)
    flags = vars(args)
    guard_flags = {o.dest for g in GUARDS.values() for o in g.options}
    tree.update({k: v for k, v in flags.items() if k not in NOT_SPEC_KEYS | guard_flags})
    if flags.get("no_generate"):
        tree["generate"] = False
    spec = from_dict(EvalSpec, tree, where=where)
    INDEX_THRESHOLD.check(spec.index_threshold)
    spec.guard_options = checked_guard_options(spec.guard, spec.guard_options,
                                               {k: v for k, v in flags.items() if k in guard_flags})
    return spec


def _run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    chosen = {o.dest: spec.guard_options.get(o.keyword) for o in GUARDS[spec.guard].options}
    check_output(spec.out, "evaluate", {**input_paths(spec), "--label-groups": spec.label_groups,
                                        **guard_paths(chosen)})
    report = evaluate(spec)
    if is_main_process():
        print(json.dumps({"report": str(Path(spec.out) / "report.md"), **flat_summary(report)}, indent=2))
    return 0
