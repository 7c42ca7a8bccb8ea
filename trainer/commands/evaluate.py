"""`memtrain evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.commands.guard_options import add_guard_arguments, guard_options
from trainer.core.distributed import is_main_process
from trainer.detect import DETECTORS
from trainer.detect.dori import CONTROL_STEPS, DORI_STEPS
from trainer.io import check_output
from trainer.measure.calibration import DEFAULT_FPR
from trainer.measure.features import QUALITY_FEATURES
from trainer.measure.replication import CRITERIA
from trainer.report.evaluate import evaluate, flat_summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="memorization report of a checkpoint: detectors, replication, membership, quality",
        description="MemBench-style evaluation of a diffusers checkpoint: detector AUROC / TPR at 1% FPR on labelled "
        "prompts, replication of generations against the training images, CLiD membership inference and image "
        "quality. Writes OUT/report.json, OUT/report.md and PNG figures (atomically).")
    p.add_argument("checkpoint", help="diffusers pipeline directory (with model_index.json)")
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
    p.add_argument("--out", default="runs/evaluate", help="output directory (default runs/evaluate; replaced)")
    p.add_argument("-n", type=int, default=2, help="generations per prompt for replication / quality (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per UNet forward (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the generations (default 50; the "
                   "detectors always use the 50-step schedule)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--data", help="root that file_name paths resolve under (default: the prompt file's directory)")
    p.add_argument("--sscd", help="SSCD TorchScript file: adds SSCD similarity to the replication section")
    p.add_argument("--clip", help="local CLIPModel directory (with tokenizer files): CLIP score, and KID in CLIP features")
    add_quality_argument(p)
    p.add_argument("--wandb", action="store_true", help="log the summary and figures to W&B (respects WANDB_MODE)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (no replication or quality)")
    p.add_argument("--detectors", default=",".join(DETECTORS),
                   help=f"comma-separated subset of {','.join(DETECTORS)} (default all; clid = membership)")
    c = p.add_argument_group("copy verdict and generation groups")
    c.add_argument("--heldout", help="imagefolder (or datasets directory) of images never trained on: calibrates the "
                   "copy verdict at --fpr false positives on them (member-0 / group heldout rows of the prompt file "
                   "count too); without any, Gu et al.'s ratio < 1/3, reported as uncalibrated")
    c.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help=f"false-positive rate of every calibrated threshold: the copy verdict on held-out images, "
                   f"the detectors' on non-memorized prompts (default {DEFAULT_FPR:g})")
    c.add_argument("--criterion", default="auto", choices=("auto", *CRITERIA),
                   help="the copy verdict's score: gradient (NN1/NN2 ratio of the image gradients), l2 (to the "
                   "nearest training image), ratio (NN1/NN2, Gu et al.), sscd (needs --sscd); auto = sscd with "
                   "--sscd, else gradient")
    c.add_argument("--groups", default="trigger,general",
                   help="prompt rows to generate from: trigger (label 1), general (label 0), member (other training "
                   "members, e.g. toy singletons), heldout (member 0: the verdict's false-positive rate on "
                   "generations); default trigger,general")
    p.add_argument("--device", help="torch device (default: this process's accelerator under accelerate launch, else cuda if "
                   "available, else cpu)")
    x = p.add_argument_group("re-trigger test, training-image index")
    x.add_argument("--attack", nargs="?", const="dori,bounded", metavar="dori,bounded",
                   help="re-trigger tests of the memorized prompts: dori (Kowalczuk et al. 2026: the text embedding "
                   "optimised towards the prompt's training image, with the non-memorized members as control) and "
                   "bounded (||d|| <= eps ||e||, no image known and image known); bare --attack runs both")
    x.add_argument("--dori-steps", type=int, default=DORI_STEPS, help=f"DoRI steps (default {DORI_STEPS}, the paper's)")
    x.add_argument("--dori-control-steps", type=int, default=CONTROL_STEPS,
                   help=f"DoRI steps for the non-memorized member images (default {CONTROL_STEPS})")
    x.add_argument("--attack-eps", default="0.05,0.1,0.2",
                   help="comma-separated budgets eps > 0: ||d|| <= eps * ||e|| (default 0.05,0.1,0.2)")
    x.add_argument("--attack-steps", type=int, default=20, help="attack optimisation steps (default 20)")
    x.add_argument("--index", help="training-image index (`memtrain index`): replication from nearest-neighbour "
                   "search, without loading the training images")
    x.add_argument("--index-model", help="CLIP model directory / SSCD TorchScript file of a clip / sscd index")
    x.add_argument("--index-threshold", type=float,
                   help="cosine similarity in (-1, 1) above which a generation replicates (default: the index's "
                   "calibration from `memtrain index --heldout`; else 0.5 for sscd, 0.85 for pixels; required for clip)")
    add_guard_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    options = guard_options(args, index_has_other_use=True)  # --index also serves replication
    check_output(args.out, "evaluate", {"CHECKPOINT": args.checkpoint, "--train-data": args.train_data,
                                        "--data": args.data, "--index": args.index, "--heldout": args.heldout,
                                        **read_paths(args)})
    report = evaluate(args.checkpoint, args.prompts, memorized=args.memorized, not_memorized=args.not_memorized,
                      train_data=args.train_data, out=args.out, lora=args.lora, n=args.n,
                      batch_size=args.batch_size, seed=args.seed, data=args.data, sscd=args.sscd, clip=args.clip,
                      wandb=args.wandb, generate=not args.no_generate, detectors=args.detectors, steps=args.steps,
                      guidance_scale=args.guidance_scale, device=args.device, attack=args.attack,
                      attack_eps=args.attack_eps, attack_steps=args.attack_steps,
                      dori_steps=args.dori_steps, dori_control_steps=args.dori_control_steps, index=args.index,
                      index_model=args.index_model, index_threshold=args.index_threshold, guard=args.guard,
                      guard_options=options, heldout=args.heldout, fpr=args.fpr, criterion=args.criterion,
                      groups=args.groups, quality_feature=args.quality_feature,
                      label_groups=args.label_groups)
    if is_main_process():
        print(json.dumps({"report": str(Path(args.out) / "report.md"), **flat_summary(report)}, indent=2))
    return 0


def add_quality_argument(parser: argparse.ArgumentParser) -> None:
    names = [*QUALITY_FEATURES, "clip"]
    parser.add_argument("--quality-feature", choices=names, help="feature space of KID (and the alignment score a "
                        f"feature has), one of {', '.join(names)}; default clip with --clip, else pix8; "
                        "named in the report")


def read_paths(args: argparse.Namespace) -> dict:
    """The input files of `evaluate` besides its directories: --out may not hold any of them."""
    return {"--prompts": args.prompts, "--label-groups": args.label_groups, "--memorized": args.memorized, "--not-memorized": args.not_memorized,
            "--lora": args.lora, "--sscd": args.sscd, "--clip": args.clip, "--index-model": args.index_model}

