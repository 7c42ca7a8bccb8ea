import numpy as np
import pytest
import torch
from PIL import Image

from trainer.io import MemtrainError
from trainer.plots import (
    _to_display,
    save_curves,
    save_image_grid,
    save_replication_grid,
    save_roc_curves,
    save_score_histograms,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_size=(200, 150), max_size=(4000, 4000)):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
        assert min_size[0] <= w <= max_size[0] and min_size[1] <= h <= max_size[1], (w, h)
        rgb = np.asarray(im.convert("RGB"))
    assert not list(path.parent.glob(".*tmp-*")), "temporary file left behind"
    return rgb


def solid(n, rgb, size=32):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_to_display_upscales_small_images_with_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 32, 32), generator=g)
    arr = _to_display(x, "x")
    assert arr.shape == (2, 128, 128, 3) and arr.dtype == np.uint8
    blocks = arr.reshape(2, 32, 4, 32, 4, 3)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # every 4x4 block is one source pixel
    assert np.array_equal(blocks[:, :, 0, :, 0], (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
    gray = _to_display(torch.full((1, 1, 256, 256), 0.5), "gray")
    assert gray.shape == (1, 256, 256, 3)  # large enough: not upscaled, gray to RGB


def test_replication_grid_puts_generated_left_of_nearest(tmp_path):
    gen, near = solid(3, [1.0, 0.0, 0.0]), solid(3, [0.0, 0.0, 1.0])
    path = tmp_path / "figs" / "replication.png"
    out = save_replication_grid(
        path, gen, near, ["duplicated L2=0.010", "singleton L2=0.400", "novel"], ncols=2
    )
    assert out == path
    rgb = check_png(path).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)
    assert red.sum() > 3 * 2000 and blue.sum() > 3 * 2000
    # in the first row, every pair's red half is left of its blue half
    ys, xs = np.nonzero(red)
    yb, xb = np.nonzero(blue)
    assert xs.min() < xb.min() and xs.mean() < xb.mean()


def test_replication_grid_rejects_mismatched_inputs(tmp_path):
    gen = solid(2, [1.0, 0.0, 0.0])
    with pytest.raises(MemtrainError, match="one per image"):
        save_replication_grid(tmp_path / "a.png", gen, gen, ["only one"])
    with pytest.raises(MemtrainError, match="same shape"):
        save_replication_grid(tmp_path / "b.png", gen, gen[:1])
    assert list(tmp_path.iterdir()) == []


def test_image_grid(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.rand((5, 1, 32, 32), generator=g)
    check_png(save_image_grid(tmp_path / "grid.png", images, [f"prompt {i}" for i in range(5)], ncols=3))


@pytest.mark.parametrize("log_x", [False, True])
def test_roc_curves(tmp_path, log_x):
    curves = {
        "noise-norm": (np.array([0, 0, 0.5, 1]), np.array([0, 0.5, 1, 1]), 0.875),
        "random": (np.array([0, 1]), np.array([0, 1]), 0.5),
    }
    path = tmp_path / "roc.png"
    rgb = check_png(save_roc_curves(path, curves, log_x=log_x))
    if log_x:  # two panels side by side
        assert rgb.shape[1] > 1.6 * rgb.shape[0]
    with pytest.raises(MemtrainError):
        save_roc_curves(tmp_path / "x.png", {})


def test_score_histograms(tmp_path):
    rng = np.random.default_rng(0)
    scores = {
        "noise-norm": {"duplicated": rng.normal(3, 1, 20), "singleton": rng.normal(0, 1, 200)},
        "entropy": {"duplicated": torch.tensor([1.0, float("nan"), 1.0]), "novel": [1.0, 1.0]},  # constant
        "empty": {"duplicated": []},
        "clid": {"member": rng.normal(size=30), "heldout": rng.normal(size=30)},
    }
    check_png(
        save_score_histograms(tmp_path / "hist.png", scores, title="detector scores"), min_size=(600, 300)
    )


def test_curves(tmp_path):
    series = {
        "frac nL2<1.4": ([0, 100, 200, 300], [0.0, 0.1, 0.4, float("nan")]),
        "p95 SSCD": ([0, 300], [0.2, 0.7]),
    }
    path = save_curves(
        tmp_path / "curves.png", series, "memorization over training", "value", thresholds={"SSCD 0.5": 0.5}
    )
    check_png(path)
    with pytest.raises(MemtrainError, match="3 steps but 2 values"):
        save_curves(tmp_path / "bad.png", {"x": ([0, 1, 2], [0, 1])}, "t", "y")
