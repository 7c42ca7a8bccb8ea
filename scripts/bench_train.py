"""Step time and peak memory of `memtrain train` against a minimal plain PyTorch loop.

The plain loop is the algorithm of diffusers' `examples/text_to_image/train_text_to_image.py`
without Accelerate: frozen VAE encode -> latent_dist.sample() * scaling_factor, randn noise,
random timesteps, DDPMScheduler.add_noise, frozen text encoder on the tokenized captions, UNet
forward, MSE against the epsilon (or v) target, backward, clip grad norm, AdamW step, LR scheduler
step; a torch DataLoader over the same imagefolder with the same resize/crop/flip/normalize. The
model, data, batch size and optimizer settings are those of the memtrain recipe.

Each run is a fresh subprocess (so its peak RSS is its own) running with one torch thread. A global
optimizer post-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`) timestamps
every optimizer step of either loop without touching trainer/: the step time is the median
interval between consecutive steps after `--warmup` steps (data loading, forward, backward,
optimizer, logging: the whole iteration), as wall time and as process CPU time. On a busy machine
the CPU time is the steadier of the two (a single-threaded process waiting for a core accrues no
CPU time); with dataloader workers it misses the workers' share. The hook stops the run after
warmup + steps, so the final checkpoint/export of memtrain is in neither the time nor the peak.
Runs are interleaved in rounds (plain, memtrain, variants..., then the reverse order) so machine
noise and drift hit every row alike. Peak RSS is each subprocess's ru_maxrss; "@warm" is the RSS
after the warm-up steps.

Variants are memtrain runs with extra recipe overrides, reported against the plain loop AND the
memtrain baseline of the same invocation: a preset name (see PRESETS) or NAME:key=value[ key=value].
The variant `monitor` turns on the memorization monitor with the `monitor:` settings of
recipes/toy-mitigated.yaml (probe of 32 members, 32 held-out pairs, 32 novel prompts, batch 64)
every `--monitor-every` steps (default 200, that recipe's cadence), without the W&B table, on the
toy data's labels.jsonl. The monitor runs once every N
steps, which a median never sees: its row is read in the MEAN step time (the "mean" columns, every
row has them), and --steps must then be a multiple of the cadence so the window holds whole calls.

    OMP_NUM_THREADS=1 python scripts/bench_train.py                       # toy model + toy data
    OMP_NUM_THREADS=1 python scripts/bench_train.py --variants rt mask dedup
    OMP_NUM_THREADS=1 python scripts/bench_train.py --variants monitor --steps 200 --rounds 2
    OMP_NUM_THREADS=1 python scripts/bench_train.py --model trainer/toy/toy_base \\
        --variants "gni:data.captions.embedding_noise=0.1" "rt2:data.captions.random_token_p=0.1 data.captions.random_token_count=4"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "toy.yaml"
MONITOR_RECIPE = ROOT / "recipes" / "toy-mitigated.yaml"  # the `monitor` row's settings
sys.path.insert(0, str(ROOT))

# mitigation rows: name -> recipe overrides (a memtrain run each); shared with `memtrain compare --alone`
from trainer.mitigate.presets import PRESETS  # noqa: E402

# recipe features the plain loop does not implement (it is the minimal diffusers loop)
UNSUPPORTED = {
    "model.lora.rank": lambda r: r.model.lora.rank > 0,
    "model.train_text_encoder": lambda r: r.model.train_text_encoder,
    "train.gradient_accumulation_steps": lambda r: r.train.gradient_accumulation_steps != 1,
    "train.mixed_precision": lambda r: r.train.mixed_precision != "no",
    "train.gradient_checkpointing": lambda r: r.train.gradient_checkpointing,
    "train.ema": lambda r: r.train.ema,
    "train.snr_gamma": lambda r: r.train.snr_gamma is not None,
    "train.scale_lr": lambda r: r.train.scale_lr,
    "data.caption_dropout": lambda r: bool(r.data.caption_dropout),
}


class StopBench(Exception):
    """Raised by the step hook after the last measured step."""


# ---------------------------------------------------------------- child side


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def install_step_clock(total: int, warmup: int) -> tuple[list[tuple[float, float]], dict]:
    """(wall, process CPU) time after every optimizer step of any torch optimizer; raises StopBench
    after `total` steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []
    extra: dict = {}

    def hook(optimizer, args, kwargs):
        stamps.append((time.perf_counter(), time.process_time()))
        if len(stamps) == warmup:
            extra["rss_after_warmup_mb"] = rss_mb()
        if len(stamps) >= total:
            raise StopBench

    register_optimizer_step_post_hook(hook)
    return stamps, extra


def child_memtrain(job: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from trainer.config import load_recipe
    from trainer.recipe import TrainRecipe
    from trainer.training.loop import train

    recipe = load_recipe(TrainRecipe, job["recipe"], job["overrides"])
    stamps, extra = install_step_clock(job["warmup"] + job["steps"], job["warmup"])
    try:
        train(recipe)
    except StopBench:
        pass
    return dict(stamps=stamps, **extra)


def child_plain(job: dict) -> dict:
    """The diffusers train_text_to_image.py algorithm as a plain loop (no trainer imports)."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    h = job["plain"]
    model, data = h["model"], Path(h["data"])
    torch.manual_seed(h["seed"])
    random.seed(h["seed"])
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if tokenizer.model_max_length > 1000:  # a tokenizer saved without it (memtrain does the same)
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    if h["prediction_type"]:
        noise_scheduler.register_to_config(prediction_type=h["prediction_type"])
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    resolution = h["resolution"] or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if h["max_samples"]:
        rows = rows[: h["max_samples"]]

    def transform(image: Image.Image) -> torch.Tensor:
        # torchvision's Resize(resolution, BILINEAR), Center/RandomCrop, RandomHorizontalFlip,
        # ToTensor, Normalize([0.5], [0.5]) (torchvision is not a dependency)
        w, h_ = image.size
        scale = resolution / min(w, h_)
        if (w, h_) != (resolution, resolution):
            image = image.resize(
                (max(resolution, round(w * scale)), max(resolution, round(h_ * scale))),
                Image.Resampling.BILINEAR,
            )
        w, h_ = image.size
        if h["center_crop"]:
            left, top = (w - resolution) // 2, (h_ - resolution) // 2
        else:
            left, top = random.randint(0, w - resolution), random.randint(0, h_ - resolution)
        image = image.crop((left, top, left + resolution, top + resolution))
        if h["random_flip"] and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    caption_column = h["caption_column"]

    class ImageFolder(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            with Image.open(data / row["file_name"]) as im:
                image = im.convert("RGB")
            caption = row[caption_column]
            caption = caption if isinstance(caption, str) else caption[0]
            ids = tokenizer(
                caption,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            return {"pixel_values": transform(image), "input_ids": ids}

    def collate(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples])
        return {
            "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    loader = torch.utils.data.DataLoader(
        ImageFolder(),
        shuffle=True,
        collate_fn=collate,
        batch_size=h["batch_size"],
        num_workers=h["num_workers"],
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=h["learning_rate"],
        betas=(h["adam_beta1"], h["adam_beta2"]),
        weight_decay=h["adam_weight_decay"],
        eps=h["adam_epsilon"],
    )
    lr_scheduler = get_scheduler(
        h["lr_scheduler"], optimizer, num_warmup_steps=h["lr_warmup_steps"], num_training_steps=h["max_steps"]
    )

    stamps, extra = install_step_clock(job["warmup"] + job["steps"], job["warmup"])
    unet.train()
    try:
        while True:
            for batch in loader:
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                if h["noise_offset"]:  # https://www.crosslabs.org//blog/diffusion-with-offset-noise
                    noise += h["noise_offset"] * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,)).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                loss.backward()
                if h["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), h["max_grad_norm"])
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                loss.item()  # the example logs the loss every step
    except StopBench:
        pass
    return dict(stamps=stamps, **extra)


def run_child(job_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    t0 = time.perf_counter()
    result = child_plain(job) if job["kind"] == "plain" else child_memtrain(job)
    result.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- parent side


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """Presets, NAME:key=value specs (`mitigations.parse_mitigation_specs`) and `monitor`."""
    from trainer.io import MemtrainError
    from trainer.mitigate.presets import parse_mitigation_specs

    try:
        return [("monitor", []) if spec == "monitor" else  # built by monitor_variant once the data is known
                parse_mitigation_specs([spec], "--variants", reserved=("plain", "memtrain", "monitor"))[0]
                for spec in dict.fromkeys(specs)]
    except MemtrainError as e:
        raise SystemExit(str(e)) from None


def monitor_variant(data: str, every: int) -> tuple[str, list[str]]:
    """The `monitor` row: the `monitor:` section of recipes/toy-mitigated.yaml every `every` steps,
    on the toy data's labels, without the W&B table (no tracker here)."""
    import yaml

    labels = Path(data).parent / "labels.jsonl"
    if not labels.exists():
        raise SystemExit(f"--variants monitor: no {labels}; the monitor row needs toy data (memtrain toy-data), "
                         "whose labels.jsonl holds the held-out pairs and novel prompts")
    section = yaml.safe_load(MONITOR_RECIPE.read_text())["monitor"]
    section.update(every_steps=every, heldout=str(labels), novel_prompts=str(labels), table_generations=0)
    return "monitor", [f"monitor.{key}={value}" for key, value in section.items() if value is not None]


def prepare_inputs(args, tmp: Path) -> tuple[str, str]:
    """The model directory and the imagefolder (train split) to benchmark on."""
    sys.path.insert(0, str(ROOT))
    if args.model:
        model = str(Path(args.model).resolve())
    else:
        from trainer.toy.base import TinySize, build_components, build_tokenizer, save_pipeline
        from trainer.toy.world import vocabulary

        model = str(save_pipeline(build_components(build_tokenizer(vocabulary()), TinySize()), tmp / "model"))
    if args.data:
        data = Path(args.data).resolve()
        if not (data / "metadata.jsonl").exists() and (data / "train" / "metadata.jsonl").exists():
            data = data / "train"
    else:
        from trainer.toy.world import ToyDataConfig, make_toy_data

        make_toy_data(tmp / "data", ToyDataConfig())
        data = tmp / "data" / "train"
    if not (data / "metadata.jsonl").exists():
        raise SystemExit(f"--data {data}: the plain loop reads an imagefolder with metadata.jsonl")
    return model, str(data)


def plain_settings(recipe, model: str, data: str) -> dict:
    bad = [key for key, test in UNSUPPORTED.items() if test(recipe)]
    if bad:
        raise SystemExit(
            f"the plain loop does not implement {', '.join(bad)}; benchmark with them unset "
            "(or add them to a --variants row, which runs memtrain only)"
        )
    r, t = recipe, recipe.train
    return dict(
        model=model,
        data=data,
        seed=t.seed,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_weight_decay=t.adam_weight_decay,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        noise_offset=t.noise_offset,
        lr_scheduler=t.lr_scheduler,
        lr_warmup_steps=t.lr_warmup_steps,
        max_steps=t.max_steps,
        num_workers=t.dataloader_num_workers,
        resolution=r.data.resolution,
        center_crop=r.data.center_crop,
        random_flip=r.data.random_flip,
        max_samples=r.data.max_samples,
        caption_column=r.data.caption_column,
        prediction_type=r.model.prediction_type,
    )


def run_job(job: dict, tmp: Path, tag: str) -> dict:
    job_path, result_path = tmp / f"{tag}.job.json", tmp / f"{tag}.result.json"
    job = dict(job, result=str(result_path))
    job_path.write_text(json.dumps(job))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(job_path)],
        env=env,
        cwd=str(tmp),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result_path.exists():
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{tag}: the benchmark subprocess failed (exit {proc.returncode})")
    result = json.loads(result_path.read_text())
    stamps = result["stamps"]
    warmup = job["warmup"]
    if len(stamps) < warmup + job["steps"]:
        raise SystemExit(
            f"{tag}: only {len(stamps)} optimizer steps ran; raise train.max_steps or lower --steps"
        )
    measured = list(zip(stamps[warmup - 1 :], stamps[warmup:], strict=False))
    result["wall"] = [b[0] - a[0] for a, b in measured]
    result["cpu"] = [b[1] - a[1] for a, b in measured]
    return result


def summarize(name: str, overrides: list[str], runs: list[dict]) -> dict:
    return dict(
        name=name,
        overrides=overrides,
        steps=sum(len(r["wall"]) for r in runs),
        wall_s=statistics.median(d for r in runs for d in r["wall"]),
        cpu_s=statistics.median(d for r in runs for d in r["cpu"]),
        wall_mean_s=statistics.fmean(d for r in runs for d in r["wall"]),
        cpu_mean_s=statistics.fmean(d for r in runs for d in r["cpu"]),
        round_wall_s=[statistics.median(r["wall"]) for r in runs],
        round_cpu_s=[statistics.median(r["cpu"]) for r in runs],
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
        rss_after_warmup_mb=max(r.get("rss_after_warmup_mb", 0.0) for r in runs),
    )


def print_table(rows: list[dict], goal: float) -> None:
    plain, base = rows[0], rows[1]

    def ratios(row: dict, ref: dict) -> str:
        if row is ref or (ref is base and row is plain):
            return f"{'-':>6} {'-':>6} {'-':>6} {'-':>6}"
        return (
            f"{row['wall_s'] / ref['wall_s']:>6.3f} {row['cpu_s'] / ref['cpu_s']:>6.3f} "
            f"{row['wall_mean_s'] / ref['wall_mean_s']:>6.3f} {row['peak_rss_mb'] / ref['peak_rss_mb']:>6.3f}"
        )

    print(f"{'':<10} {'median s/step':>15} {'mean':>7} {'peak RSS MB':>17} {'vs plain':>27} {'vs memtrain':>27}")
    header = (
        f"{'variant':<10} {'wall':>7} {'cpu':>7} {'wall':>7} {'peak':>8} {'@warm':>8}   {'wall':>6} {'cpu':>6} "
        f"{'mean':>6} {'RSS':>6}   {'wall':>6} {'cpu':>6} {'mean':>6} {'RSS':>6}   per-round wall/plain, cpu/plain"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        per_round = " ".join(
            f"{w / pw:.3f}" for w, pw in zip(row["round_wall_s"], plain["round_wall_s"], strict=True)
        )
        per_round_cpu = " ".join(
            f"{c / pc:.3f}" for c, pc in zip(row["round_cpu_s"], plain["round_cpu_s"], strict=True)
        )
        print(
            f"{row['name']:<10} {row['wall_s']:>7.4f} {row['cpu_s']:>7.4f} {row['wall_mean_s']:>7.4f} "
            f"{row['peak_rss_mb']:>8.0f} "
            f"{row['rss_after_warmup_mb']:>8.0f}   {ratios(row, plain)}   {ratios(row, base)}   "
            f"{per_round}, {per_round_cpu}"
        )
    for row in rows[2:]:
        print(f"  {row['name']}: {' '.join(row['overrides'])}")
        if row["name"] == "monitor":
            ratio = row["wall_mean_s"] / base["wall_mean_s"]
            print(f"  monitor/memtrain mean wall step time = {ratio:.3f} (goal <= 1.10): "
                  f"{'OK' if ratio <= 1.10 else 'ABOVE GOAL'}")
    for kind in ("wall", "cpu"):
        ratio = base[f"{kind}_s"] / plain[f"{kind}_s"]
        print(
            f"memtrain/plain {kind} step time = {ratio:.3f} (goal <= {goal:.2f}): "
            f"{'OK' if ratio <= goal else 'ABOVE GOAL'}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers SD pipeline directory (default: a fresh TinySize toy pipeline)")
    p.add_argument(
        "--data", help="imagefolder directory, or a toy-data root with train/ (default: fresh toy data)"
    )
    p.add_argument(
        "--recipe",
        default=str(DEFAULT_RECIPE),
        help="base memtrain recipe; its batch size, optimizer and data settings are the plain loop's too "
        "(default: recipes/toy.yaml; 'none' = TrainRecipe defaults)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the base recipe for every row, e.g. train.batch_size=16",
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="SPEC",
        help=f"extra memtrain rows: a preset ({', '.join(PRESETS)}) or NAME:key=value[ key=value]",
    )
    p.add_argument("--monitor-every", type=int, default=200, help="cadence of the `monitor` row (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps before timing (default 10)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run (default 20)")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, alternating the order (default 3)"
    )
    p.add_argument("--goal", type=float, default=1.03, help="target memtrain/plain step-time ratio")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("--warmup, --steps and --rounds must be >= 1")
    variants = parse_variants(args.variants)
    if any(name == "monitor" for name, _ in variants) and (args.monitor_every < 1 or args.steps % args.monitor_every):
        raise SystemExit(f"--variants monitor: --steps {args.steps} must be a multiple of --monitor-every "
                         f"{args.monitor_every}, so the timed window holds whole monitor calls")

    sys.path.insert(0, str(ROOT))
    from trainer.config import load_recipe
    from trainer.recipe import TrainRecipe

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        tmp = Path(tmp_name)
        model, data = prepare_inputs(args, tmp)
        variants = [monitor_variant(data, args.monitor_every) if name == "monitor" else (name, o)
                    for name, o in variants]
        recipe_path = None if args.recipe == "none" else str(Path(args.recipe).resolve())
        total = args.warmup + args.steps
        base_overrides = [
            f"model.pretrained={model}",
            f"data.path={data}",
            # diffusers' train_text_to_image.py trains the UNet only; so does the comparison
            "model.train_text_encoder=false",
            "train.ema=false",  # ... and without --use_ema (the plain loop has no EMA; a variant row may set it)
            *args.set,
            f"train.max_steps={max(total + 10, 10 * total)}",  # the hook stops the run; keep the LR schedule long
            "checkpoint.every_steps=1000000000",
            "checkpoint.resume=null",
            "output.export=none",
            "log.progress=false",
            "log.validation_prompts=[]",
            "log.trackers=[]",
        ]
        base_recipe = load_recipe(TrainRecipe, recipe_path, base_overrides)
        for _name, overrides in variants:  # fail on a bad key now, not after minutes of runs
            load_recipe(TrainRecipe, recipe_path, base_overrides + overrides).validate()
        plain = plain_settings(base_recipe, model, data)
        rows = [("plain", []), ("memtrain", [])] + variants
        print(
            f"model {model}\ndata {data} | batch {plain['batch_size']} | warm-up {args.warmup}, "
            f"{args.steps} measured steps x {args.rounds} rounds | rows: {', '.join(n for n, _ in rows)}",
            flush=True,
        )
        results: dict[str, list[dict]] = {name: [] for name, _ in rows}
        for rnd in range(args.rounds):
            order = rows if rnd % 2 == 0 else rows[::-1]
            for name, overrides in order:
                tag = f"r{rnd}-{name}"
                job = dict(
                    kind="plain" if name == "plain" else "memtrain",
                    warmup=args.warmup,
                    steps=args.steps,
                    plain=plain,
                    recipe=recipe_path,
                    overrides=base_overrides + overrides + [f"output.dir={tmp / tag}"],
                )
                r = run_job(job, tmp, tag)
                results[name].append(r)
                print(
                    f"  round {rnd + 1} {name:<10} wall {statistics.median(r['wall']):.4f} s/step  "
                    f"cpu {statistics.median(r['cpu']):.4f} s/step  peak {r['peak_rss_mb']:.0f} MB  "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
    summary = [summarize(name, overrides, results[name]) for name, overrides in rows]
    print()
    print_table(summary, args.goal)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    model=args.model or "fresh TinySize toy pipeline",
                    data=args.data or "fresh toy data (ToyDataConfig())",
                    warmup=args.warmup,
                    steps=args.steps,
                    rounds=args.rounds,
                    batch_size=plain["batch_size"],
                    rows=summary,
                ),
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
