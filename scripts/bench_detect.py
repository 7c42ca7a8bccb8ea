"""Benchmark the detectors against the raw throughput of batched UNet forwards.

For each detector: UNet evaluations per prompt (sample), prompts per second, and the ratio of its
UNet-evaluation rate to the rate of plain batched UNet forwards of the same batch size, latent
shape and 77-token conditioning, measured in the same run, interleaved with the detector (best of
`--repeats` timings each). A ratio near 1 means the detector's own work (text encoding, noise,
DDIM updates, attention recording, reductions) costs little next to the UNet. `ratio+text` also
credits the text-encoder rows the detector needs at the raw batched text-encoder rate: what is
left is the core's own overhead. On a tiny model one text-encoder row costs a sizable fraction of
a UNet eval, so 1-2-eval detectors (entropy, Wen first step) are bounded well below 1 by `ratio`.

    python scripts/bench_detect.py                         # tiny random SD-shaped model (TinySize())
    python scripts/bench_detect.py --image-size 128        # the same at 32x32 latents (UNet-bound, as SD is)
    python scripts/bench_detect.py --model path/to/pipeline --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import trainer.detect as D
from trainer.core.unet_core import UNetCore, count_evals  # noqa: E402
from trainer.toy.base import TinySize  # noqa: E402

WORDS = (
    "a an the photo painting drawing of with on in under near red blue green yellow black white small large "
    "old young cat dog bird horse car house tree river mountain city street beach forest portrait landscape "
    "sitting standing running flying sunset night morning winter summer"
).split()


def make_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        out.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))))
    return sorted(out)


def load(args) -> dict | object:
    if args.model is None:
        from trainer.toy.base import build_components, build_tokenizer

        parts = build_components(build_tokenizer(WORDS), TinySize(image_size=args.image_size), seed=0)
        for name in ("unet", "text_encoder", "vae"):
            parts[name].to(args.device).eval()
        return parts
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(args.device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def raw_unet_job(core: UNetCore, batch_size: int, forwards: int):
    """Plain batched UNet forwards (no_grad) of the detector's batch size, latent shape and 77 tokens."""
    unet = core.parts.unet
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((batch_size, *core.latent_shape), generator=g).to(core.device, core.dtype)
    t = torch.randint(0, 1000, (batch_size,), generator=g).to(core.device)
    length = core.parts.tokenizer.model_max_length
    e = torch.randn((batch_size, length, core.cross_attention_dim), generator=g).to(core.device, core.dtype)

    def run():
        with torch.no_grad():
            for _ in range(forwards):
                unet(x, t, encoder_hidden_states=e, return_dict=False)

    return run


def raw_text_job(core: UNetCore, batch_size: int, forwards: int):
    """Plain batched text-encoder forwards of the same batch size."""
    te = core.parts.text_encoder
    ids = core.tokenize(make_prompts(batch_size, seed=7)).to(next(te.parameters()).device)

    def run():
        with torch.no_grad():
            for _ in range(forwards):
                te(ids, return_dict=False)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers StableDiffusionPipeline directory (default: tiny random model)")
    p.add_argument(
        "--image-size", type=int, default=32,
        help="image side of the tiny random model (default 32: the toy base's 8x8 latents; 128 gives 32x32 latents, "
        "where a UNet eval outweighs a text-encoder row as on SD)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="with --model"
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per UNet forward (default 16)")
    p.add_argument(
        "--prompts", type=int, default=64, help="prompts (or CLiD samples) per timing (default 64)"
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings; the best of each is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    p.add_argument("--only", nargs="*", help="detector names to run (default all)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    factor = 2 ** (len(TinySize().vae_channels) - 1)  # the tiny VAE's downsampling
    if args.image_size < 2 * factor or args.image_size % factor:
        p.error(f"--image-size must be a multiple of {factor} and at least {2 * factor}, got {args.image_size}")
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)

    components = load(args)
    bs = args.batch_size
    core = UNetCore(components, bs)
    prompts = make_prompts(args.prompts)
    g = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn((args.prompts, *core.latent_shape), generator=g).to(core.device)

    detectors = {
        "wen_first_n1": lambda ps: D.noise_magnitude(components, ps, n=1, batch_size=bs),
        "wen_first_n4": lambda ps: D.noise_magnitude(components, ps, n=4, batch_size=bs),
        "wen_10steps_n1": lambda ps: D.noise_magnitude(components, ps, n=1, steps=10, batch_size=bs),
        "anisotropy_n1": lambda ps: D.anisotropy(components, ps, n=1, batch_size=bs),
        "attention_entropy_n1": lambda ps: D.attention_entropy(components, ps, n=1, batch_size=bs),
        "clid_latents": lambda ps: D.clid_features(components, latents[: len(ps)], ps, batch_size=bs),
    }
    if args.only:
        unknown = sorted(set(args.only) - set(detectors))
        if unknown:
            p.error(f"unknown detector(s) {unknown}; choose from {sorted(detectors)}")
        detectors = {k: v for k, v in detectors.items() if k in args.only}

    print(
        f"model={args.model or f'tiny TinySize(image_size={args.image_size})'} device={args.device} dtype={core.dtype} latent={core.latent_shape} "
        f"batch={bs} prompts={len(prompts)} threads={args.threads}"
    )
    print(
        "ratio = detector UNet evals/s / raw batched UNet evals/s;  ratio+text = time of the same UNet evals\n"
        "and text-encoder rows done as raw batched forwards / detector time (overhead beyond the two models)"
    )
    header = (
        f"{'detector':22s} {'evals/prompt':>12s} {'text/prompt':>11s} {'prompts/s':>10s} {'evals/s':>9s} "
        f"{'raw evals/s':>11s} {'ratio':>6s} {'ratio+text':>10s}"
    )
    print(header)
    results = []
    for name, fn in detectors.items():
        fn(prompts[: min(len(prompts), bs)])  # warm-up
        with count_evals() as counter:
            fn(prompts)
        evals, text_rows = counter.unet_evals, counter.text_rows
        unet_forwards, text_forwards = max(1, evals // bs), max(1, text_rows // bs)
        jobs = dict(
            detector=lambda fn=fn: fn(prompts),
            unet=raw_unet_job(core, bs, unet_forwards),
            text=raw_text_job(core, bs, text_forwards),
        )
        best = dict.fromkeys(jobs, float("inf"))
        for _ in range(args.repeats):  # interleaved, best of each: robust to other load on the machine
            for key, job in jobs.items():
                best[key] = min(best[key], timed(job, core.device))
        seconds = best["detector"]
        raw = unet_forwards * bs / best["unet"]
        text = text_forwards * bs / best["text"]
        row = dict(
            detector=name,
            evals_per_prompt=evals / len(prompts),
            text_rows_per_prompt=text_rows / len(prompts),
            prompts_per_s=len(prompts) / seconds,
            evals_per_s=evals / seconds,
            raw_evals_per_s=raw,
            raw_text_rows_per_s=text,
            ratio=evals / seconds / raw,
            ratio_incl_text=(evals / raw + text_rows / text) / seconds,
            batch_size=bs,
        )
        results.append(row)
        print(
            f"{name:22s} {row['evals_per_prompt']:12.1f} {row['text_rows_per_prompt']:11.2f} "
            f"{row['prompts_per_s']:10.2f} {row['evals_per_s']:9.1f} {raw:11.1f} {row['ratio']:6.3f} "
            f"{row['ratio_incl_text']:10.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
