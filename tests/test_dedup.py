import argparse
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer.commands import dedup as dedup_command
from trainer.data import Rows
from trainer.io import MANIFEST, MemtrainError
from trainer.measure.features import embed_images
from trainer.mitigate import dedup as dedup

SIZE = 48


def random_shapes(rng: random.Random) -> Image.Image:
    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    im = Image.new("RGB", (SIZE, SIZE), colour())
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randrange(SIZE - 8), rng.randrange(SIZE - 8)
        x1, y1 = rng.randint(x0 + 6, SIZE), rng.randint(y0 + 6, SIZE)
        kind = rng.choice(["ellipse", "rectangle", "polygon"])
        if kind == "polygon":
            draw.polygon([(rng.randrange(SIZE), rng.randrange(SIZE)) for _ in range(3)], fill=colour())
        else:
            getattr(draw, kind)([x0, y0, x1, y1], fill=colour())
    return im


def near_copy(im: Image.Image, kind: str, seed: int) -> Image.Image:
    a = np.asarray(im, dtype=np.float64).copy()
    r = np.random.default_rng(seed)
    if kind == "noise":
        a += r.normal(0, 2.0, a.shape)
    elif kind == "pixel":
        a[r.integers(SIZE), r.integers(SIZE)] = 255 - a[r.integers(SIZE), r.integers(SIZE)]
    elif kind == "brighter":
        a = a * 1.03 + 4
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def planted():
    """12 distinct images, 4 of which get near copies; returns (images, captions, planted groups)."""
    rng = random.Random(0)
    images = [random_shapes(rng) for _ in range(12)]
    captions: list = [f"distinct image number {i}" for i in range(12)]
    groups = []
    for k, (base, kinds) in enumerate(
        [(0, ["noise", "pixel"]), (3, ["pixel"]), (5, ["noise", "brighter", "pixel"]), (8, ["noise"])]
    ):
        members = [base]
        for j, kind in enumerate(kinds):
            members.append(len(images))
            images.append(near_copy(images[base], kind, seed=10 * k + j))
            captions.append(captions[base] if j == 0 else f"copy {j} of {base}")
        groups.append(frozenset(members))
    # caption duplicates: an exact copy of a caption on a distinct image, and a normalized-only copy
    captions[1] = "A red circle, on blue!"
    captions[2] = ["a red circle on blue", "second caption"]
    captions[4] = captions[9]
    return images, captions, groups


def write_imagefolder(root, images, captions):
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
            im.save(root / "images" / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"images/{i:03d}.png", "text": cap}) + "\n")
    return root


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    dedup_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dedup", *map(str, argv)])
    return args.func(args)


@pytest.mark.parametrize("embedding", ["pixels", "phash"])
def test_planted_groups_found_and_no_false_groups(planted, embedding):
    images, captions, groups = planted
    report = dedup.dedup_report(images, captions, embedding=embedding, progress=False)
    found = {frozenset(g["members"]) for g in report["image_groups"]}
    assert found == set(groups)
    s = report["summary"]
    assert s["image_groups"] == 4 and s["duplicates_to_drop"] == 7 and s["largest_group"] == 4
    big = report["image_groups"][0]
    assert (
        big["size"] == 4
        and big["representative"] == 5
        and big["min_similarity_to_representative"] >= report["threshold"]
    )


def test_many_distinct_images_make_no_groups():
    rng = random.Random(1)
    images = [random_shapes(rng) for _ in range(150)]
    for embedding in ("pixels", "phash"):
        emb = embed_images(images, embedding=embedding, progress=False)
        groups, pairs = dedup.near_duplicate_groups(emb, dedup.default_threshold(embedding))
        assert groups == [] and pairs == 0


def test_toy_world_duplicates_are_exactly_the_planted_ones(tmp_path):
    from trainer.data import load_rows
    from trainer.toy.world import ToyDataConfig, make_toy_data

    make_toy_data(
        tmp_path / "toy", ToyDataConfig(n_duplicated=4, copies=3, n_singletons=120, n_heldout=0, n_novel=0)
    )
    rows = load_rows(str(tmp_path / "toy" / "train"))
    report = dedup.dedup_report(rows.images, rows.captions, names=rows.names, progress=False)
    found = {frozenset(str(rows.images[i].name) for i in g["members"]) for g in report["image_groups"]}
    expected = {frozenset(f"dup{i:04d}_{j:03d}.png" for j in range(3)) for i in range(4)}
    assert found == expected
    assert {frozenset(g["members"]) for g in report["caption_groups_exact"]} == {
        frozenset(g["members"]) for g in report["image_groups"]
    }


def test_flat_images_match_only_similar_colours():
    ims = [Image.new("RGB", (16, 16), c) for c in [(0, 0, 0), (2, 1, 0), (255, 255, 255), (200, 30, 30)]]
    emb = embed_images(ims, progress=False)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    groups, _ = dedup.near_duplicate_groups(emb, 0.95)
    assert groups == [[0, 1]]


def test_blocked_search_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    for a, b in [(3, 250), (250, 40), (40, 41), (7, 8), (100, 101), (101, 102)]:
        emb[b] = emb[a] + 0.05 * rng.normal(size=16)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    brute_pairs = int((np.triu(sim, 1) >= 0.95).sum())
    expected = [[3, 40, 41, 250], [100, 101, 102], [7, 8]]
    for block in (7, 64, 4096):
        groups, pairs = dedup.near_duplicate_groups(emb, 0.95, block=block)
        assert groups == expected and pairs == brute_pairs
    monkeypatch.setattr(dedup, "_COMPRESS_EDGES", 2)  # fold links into a spanning forest constantly
    assert dedup.near_duplicate_groups(emb, 0.95, block=7)[0] == expected
    groups, _ = dedup.near_duplicate_groups(emb, 0.95, search="semdedup", clusters=4)
    assert groups == expected  # each planted pair is far closer than any cluster boundary


def test_caption_groups_exact_and_normalized(planted):
    _, captions, _ = planted
    cap = dedup.caption_groups(captions)
    exact = {frozenset(g) for g in cap["exact"]}
    normalized = {frozenset(g) for g in cap["normalized"]}
    assert exact == {
        frozenset({0, 12}),
        frozenset({3, 14}),
        frozenset({5, 15}),
        frozenset({8, 18}),
        frozenset({4, 9}),
    }
    assert normalized == exact | {frozenset({1, 2})}
    assert dedup.normalize_caption("  A red   Circle, on blue! ") == "a red circle on blue"
    assert dedup.caption_groups(["x", ["y", "x"], ["y"], "z"])["exact"] == [[0, 1, 2]]


def test_drop_and_reweight_policies():
    groups = [[1, 4, 6], [2, 3]]
    keep = dedup.dedup_weights(groups, 8, "drop")
    assert keep.dtype == bool and keep.tolist() == [True, True, True, False, False, True, False, True]
    w = dedup.dedup_weights(groups, 8, "reweight")
    assert np.isclose(w[[1, 4, 6]].sum(), 1.0) and np.isclose(w[[2, 3]].sum(), 1.0)
    assert w[[0, 5, 7]].tolist() == [1.0, 1.0, 1.0] and np.isclose(w.sum(), 5.0)
    assert dedup.dedup_weights([], 3, "drop").all()
    with pytest.raises(MemtrainError, match="policy"):
        dedup.dedup_weights(groups, 8, "shrink")
    with pytest.raises(MemtrainError, match="two"):
        dedup.dedup_weights([[0, 1], [1, 2]], 8, "reweight")
    with pytest.raises(MemtrainError, match="outside"):
        dedup.dedup_weights([[0, 9]], 8, "drop")


def test_apply_dedup_policy_for_training(planted):
    images, captions, _ = planted
    caps = [[c] if isinstance(c, str) else c for c in captions]
    rows = Rows(list(images), caps, "mem", [f"row {i}" for i in range(len(images))])
    kept, weights = dedup.apply_dedup_policy(rows, "drop", progress=False)
    assert (
        weights is None
        and len(kept.images) == len(images) - 7
        and kept.names[:3] == ["row 0", "row 1", "row 2"]
    )
    same, weights = dedup.apply_dedup_policy(rows, "reweight", progress=False)
    assert (
        same is rows
        and isinstance(weights, torch.Tensor)
        and np.isclose(weights.sum().item(), len(images) - 7)
    )


def test_cli_writes_the_three_files(tmp_path, planted, capsys):
    images, captions, groups = planted
    data = write_imagefolder(tmp_path / "data", images, captions)
    out = tmp_path / "out"
    assert run_cli(data, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "groups.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert {frozenset(g["members"]) for g in report["image_groups"]} == set(groups)
    assert report["threshold"] == 0.95 and report["embedding"] == "pixels"
    assert len(report["caption_groups_exact"]) == 5 and len(report["caption_groups_normalized"]) == 6
    md = (out / "report.md").read_text()
    assert "Image near-duplicate groups" in md and "images/005.png" in md and "(normalized)" in md
    assert Image.open(out / "groups.png").size[0] > 100
    assert "4 near-duplicate groups" in capsys.readouterr().out
    # a second run with another embedding replaces the files in place
    assert run_cli(data, "--out", out, "--embedding", "phash", "--threshold", "0.9") == 0
    assert json.loads((out / "report.json").read_text())["embedding"] == "phash"


def test_cli_no_groups_still_writes_a_plot(tmp_path):
    rng = random.Random(5)
    data = write_imagefolder(tmp_path / "data", [random_shapes(rng) for _ in range(4)], ["a", "b", "c", "d"])
    assert run_cli(data, "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "groups.png").stat().st_size > 0
    assert "None found." in (tmp_path / "out" / "report.md").read_text()


def test_bad_inputs_name_the_file_and_row(tmp_path, planted):
    images, captions, _ = planted
    with pytest.raises(MemtrainError, match="no metadata.jsonl"):
        run_cli(tmp_path, "--out", tmp_path / "o")
    with pytest.raises(MemtrainError, match="not a directory"):
        run_cli(tmp_path / "nope", "--out", tmp_path / "o")

    data = write_imagefolder(tmp_path / "d1", images[:3], captions[:3])
    meta = data / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], json.dumps({"text": "no file"}), lines[2]]) + "\n")
    with pytest.raises(MemtrainError, match=r"metadata.jsonl, line 2: no `file_name`"):
        run_cli(data, "--out", tmp_path / "o")

    data = write_imagefolder(tmp_path / "d2", images[:3], captions[:3])
    (data / "images" / "001.png").unlink()
    with pytest.raises(MemtrainError, match=r"line 2 \(images/001.png\): image file is missing"):
        run_cli(data, "--out", tmp_path / "o")

    data = write_imagefolder(tmp_path / "d3", images[:3], captions[:3])
    (data / "images" / "002.png").write_bytes(b"not a png")
    with pytest.raises(MemtrainError, match=r"line 3 \(images/002.png\): image cannot be decoded"):
        run_cli(data, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

    good = write_imagefolder(tmp_path / "d4", images[:3], captions[:3])
    with pytest.raises(MemtrainError, match="--clip .*no such file"):
        run_cli(good, "--out", tmp_path / "o", "--clip", tmp_path / "missing_clip")
    with pytest.raises(MemtrainError, match="--sscd .*no such file"):
        run_cli(good, "--out", tmp_path / "o", "--embedding", "sscd", "--sscd", tmp_path / "sscd.pt")
    with pytest.raises(MemtrainError, match="needs --clip"):
        run_cli(good, "--out", tmp_path / "o", "--embedding", "clip")
    with pytest.raises(MemtrainError, match="threshold"):
        run_cli(good, "--out", tmp_path / "o", "--threshold", "1.5")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MemtrainError, match="TorchScript"):
        run_cli(good, "--out", tmp_path / "o", "--sscd", tmp_path / "junk.pt")


class TinySSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_sscd_torchscript_embedding(tmp_path, planted):
    images, captions, groups = planted
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(TinySSCD()).save(str(path))
    emb = embed_images(
        images[:3] + [images[0]], embedding="sscd", sscd=path, batch_size=2, progress=False
    )
    assert emb.shape == (4, 24) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(emb[0], emb[3])
    data = write_imagefolder(tmp_path / "data", images, captions)
    assert run_cli(data, "--out", tmp_path / "out", "--sscd", path, "--threshold", "0.999") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["embedding"] == "sscd"
    found = {frozenset(g["members"]) for g in report["image_groups"]}
    assert found  # the near copies are found at all (else the next line holds of nothing)
    assert all(any(f <= g for g in groups) for f in found)  # a random model only groups true copies here


@pytest.mark.parametrize("full", [False, True])
def test_clip_embedding_from_a_local_directory(tmp_path, planted, full):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    torch.manual_seed(0)
    if full:
        text = dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=16,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    model.save_pretrained(tmp_path / "clip")
    images = planted[0]
    emb = embed_images(
        images[:2] + [images[0]], embedding="clip", clip=tmp_path / "clip", progress=False
    )
    assert emb.shape == (3, 16) and np.allclose(emb[0], emb[2], atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
