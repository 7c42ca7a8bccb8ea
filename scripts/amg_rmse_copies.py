"""Usage: scripts/amg_rmse_copies.py DATA R -- copies among R/gen_none and R/gen_amg by pixel RMSE to the nearest
training image of DATA/train, the threshold calibrated at 1% false positives on DATA/heldout's RMSE to their
nearest training image (`trainer.measure.calibration`)."""

import sys
from pathlib import Path

import torch

from trainer.data import load_images
from trainer.measure.calibration import calibrate
from trainer.measure.index_calibration import image_sources


def load(path: Path, resolution: int) -> torch.Tensor:
    sources, names = image_sources(path, "dir")
    return load_images(sources, names, resolution, progress=False)


def main(data: Path, run: Path, resolution: int = 32) -> None:
    train = load(data / "train", resolution).flatten(1)

    def nearest_rmse(x: torch.Tensor) -> torch.Tensor:
        return (torch.cdist(x.flatten(1), train) / train.shape[1] ** 0.5).min(1).values

    cal = calibrate(nearest_rmse(load(data / "heldout", resolution)).numpy(),
                    "pixel RMSE to the nearest training image", False, 0.01)
    print(cal.describe())
    for side in ("gen_none", "gen_amg"):
        flags = cal.flags(nearest_rmse(load(run / side, resolution)).numpy())
        print(side, f"{int(flags.sum())}/{len(flags)} copies")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
