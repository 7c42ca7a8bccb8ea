"""Usage: scripts/amg_grid.py R -- R/gen_none (top) and R/gen_amg (bottom) side by side, 4x nearest upscale,
written to R/amg_grid.png (the AMG PNGs of docs/results.md)."""

import sys
from pathlib import Path

from PIL import Image

SCALE = 4


def main(run: Path) -> Path:
    plain, guarded = sorted((run / "gen_none").glob("*.png")), sorted((run / "gen_amg").glob("*.png"))
    w, h = Image.open(plain[0]).size
    grid = Image.new("RGB", (len(plain) * w * SCALE, 2 * h * SCALE + 4), "white")
    for i, (x, y) in enumerate(zip(plain, guarded, strict=True)):
        grid.paste(Image.open(x).resize((w * SCALE, h * SCALE), Image.NEAREST), (i * w * SCALE, 0))
        grid.paste(Image.open(y).resize((w * SCALE, h * SCALE), Image.NEAREST), (i * w * SCALE, h * SCALE + 4))
    grid.save(run / "amg_grid.png")
    return run / "amg_grid.png"


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
