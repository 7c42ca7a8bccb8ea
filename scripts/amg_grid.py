"""Usage: scripts/amg_grid.py R [PIPELINE DATA] -- R/gen_none (unguarded) above R/gen_amg (guarded), 4x nearest
upscale, written to R/amg_grid.png (the AMG PNGs of docs/results.md). With PIPELINE and DATA (its training
imagefolder DATA/train), a first row shows each unguarded generation's nearest training image as the model's
VAE reproduces it (the verdict's references), and each generation is labelled with its gradient ratio, the
default copy verdict's score."""

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.core.components import load_pipeline
from trainer.data import load_images, load_rows
from trainer.measure.replication import replication_metrics, unique_images, vae_roundtrip

SCALE = 4
LABEL = 14  # pixels above a labelled row


def to_pil(image: torch.Tensor, size: int) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def main(run: Path, pipeline: str | None = None, data: str | None = None) -> Path:
    plain, guarded = sorted((run / "gen_none").glob("*.png")), sorted((run / "gen_amg").glob("*.png"))
    w = Image.open(plain[0]).size[0]
    size = w * SCALE
    rows = [load_images(plain, [p.name for p in plain], w, progress=False),
            load_images(guarded, [p.name for p in guarded], w, progress=False)]
    labels = [None, None]
    if pipeline is not None:
        train = load_rows(str(Path(data) / "train"))
        references = vae_roundtrip(load_pipeline(pipeline), unique_images(
            load_images(train.images, train.names, w, progress=False))[0])
        scores = [replication_metrics(x, references) for x in rows]
        rows.insert(0, references[scores[0]["gradient_nn_index"]])
        labels = [None] + [[f"{float(v):.2f}" for v in s["gradient_ratio"]] for s in scores]
    pad = LABEL if pipeline is not None else 4
    grid = Image.new("RGB", (len(plain) * size, len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, texts) in enumerate(zip(rows, labels, strict=True)):
        top = r * (size + pad) + (pad if pipeline is not None else 0)
        for i, image in enumerate(images):
            grid.paste(to_pil(image, size), (i * size, top))
            if texts:
                draw.text((i * size + 2, top - LABEL + 1), texts[i], fill="black")
    grid.save(run / "amg_grid.png")
    return run / "amg_grid.png"


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), *sys.argv[2:4]))
