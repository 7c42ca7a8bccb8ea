"""Build the committed toy base model (trainer/toy/toy_base), as a released SD checkpoint is built:

1. a broad toy dataset (singletons only, its own seed: the demo's data is never in it);
2. the VAE: a tiny AutoencoderKL trained for reconstruction (a plain loop: the project's trainer
   trains diffusion models, not autoencoders), its scaling_factor set to 1/std of the latents
   as SD's 0.18215 was;
3. the UNet and the text encoder trained jointly with the project's own trainer
   (`trainer.training.train`, recipe recipes/toy-base.yaml) with 10% caption dropout so classifier-free
   guidance works.

    python scripts/build_toy_base.py                       # about 30 min on 2 cores (1,763 s measured)
    python scripts/build_toy_base.py --unet-steps 200 --out /tmp/base   # a quick smoke build
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.config import load_recipe
from trainer.io import atomic_dir
from trainer.recipe import TrainRecipe
from trainer.toy import world as toy_world
from trainer.toy.base import TinySize, build_components, build_tokenizer, save_pipeline
from trainer.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def load_images(root: Path) -> torch.Tensor:
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    arrays = [np.asarray(Image.open(root / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3, kl_weight: float = 1e-6,
              seed: int = 0) -> float:
    """Reconstruction (MSE) + a small KL term, AdamW with cosine decay; returns the final recon RMSE."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    start = time.time()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step} loss {loss.item():.5f} ({time.time() - start:.0f}s)", flush=True)
    vae.eval()
    with torch.no_grad():
        x = images[:256]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        return ((recon.clamp(-1, 1) - x) / 2).pow(2).mean().sqrt().item()


def export_checkpoint(work: Path, checkpoint: Path, out: Path) -> None:
    """The base from an accelerate checkpoint of the UNet + text encoder run (model.safetensors is
    the UNet, model_1.safetensors the text encoder, in the order the trainer prepares them)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(work / "init"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.unet.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    pipe.text_encoder.load_state_dict(load_file(str(checkpoint / "model_1.safetensors")), strict=False)
    info = json.loads((checkpoint / "memtrain_checkpoint.json").read_text())
    metrics = [json.loads(line) for line in (work / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "build.json").write_text(json.dumps({
            "unet_steps": info["step"], "from_checkpoint": checkpoint.name,
            "final_loss": [m["loss"] for m in metrics if m["step"] <= info["step"]][-1],
            "vae": json.loads((work / "vae.json").read_text()) if (work / "vae.json").exists() else None,
        }, indent=2))
    print(f"wrote {out} from {checkpoint}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "trainer" / "toy" / "toy_base"))
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    p.add_argument("--export-checkpoint", default=None, metavar="CKPT",
                   help="only export the base from a checkpoint of an earlier (interrupted) build in --work")
    args = p.parse_args()
    if args.export_checkpoint:
        export_checkpoint(Path(args.work), Path(args.export_checkpoint), Path(args.out))
        return
    torch.manual_seed(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="toy-base-"))
    t0 = time.time()
    data = work / "broad"
    if not (data / "train" / "metadata.jsonl").exists():
        cfg = toy_world.ToyDataConfig(seed=args.seed, n_duplicated=0, copies=0, n_singletons=args.images,
                                      n_heldout=0, n_novel=0, unique_captions=False)
        toy_world.make_toy_data(data, cfg)
    images = load_images(data / "train")
    print(f"data: {len(images)} images ({time.time() - t0:.0f}s)", flush=True)

    tokenizer = build_tokenizer(toy_world.vocabulary())
    parts = build_components(tokenizer, TinySize(), seed=args.seed)
    rmse = train_vae(parts["vae"], images, args.vae_steps, seed=args.seed)
    with torch.no_grad():
        latents = torch.cat([parts["vae"].encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)])
    scaling = float(1.0 / latents.std())
    parts["vae"].register_to_config(scaling_factor=scaling)
    print(f"vae: recon RMSE {rmse:.4f} in [0,1] units, scaling_factor {scaling:.4f} ({time.time() - t0:.0f}s)",
          flush=True)
    init = work / "init"
    save_pipeline(parts, init)

    recipe = load_recipe(TrainRecipe, ROOT / "recipes" / "toy-base.yaml", [
        f"model.pretrained={init}", f"data.path={data / 'train'}", f"train.max_steps={args.unet_steps}",
        f"output.dir={work / 'run'}", f"train.seed={args.seed}", "output.overwrite=true",  # --work is scratch
    ])
    summary = train(recipe)
    print(f"unet: {summary} ({time.time() - t0:.0f}s)", flush=True)
    with atomic_dir(args.out) as tmp:
        shutil.copytree(work / "run" / "pipeline", tmp, dirs_exist_ok=True)
        (tmp / "build.json").write_text(json.dumps({
            "images": args.images, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "seed": args.seed,
            "vae_recon_rmse": rmse, "scaling_factor": scaling, "final_loss": summary["loss"],
            "build_seconds": round(time.time() - t0),
        }, indent=2))
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
