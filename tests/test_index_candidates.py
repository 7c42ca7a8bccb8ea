"""`evaluate --index ... --train-data` loads only the training rows the index finds nearest to the generations and
held-out images (trainer/measure/index_candidates.py), and `check_images` stays cheap on large sets: measured on
the tiny pipeline and the tiny toy dataset against the exact (load-everything) path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.data import check_images, load_images, load_rows, open_image
from trainer.io import MemtrainError
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.measure.index_candidates import candidate_rows
from trainer.measure.index_data import row_file_name, training_rows
from trainer.prompts import group_name, read_labelled_prompts
from trainer.report.sections import replication_section
from trainer.sample.generate import generate_images


def as_imported(index: TrainingIndex, train: Path, extra: torch.Tensor) -> TrainingIndex:
    """`index` as an imported one would be: no fingerprint of the training set, rows in another order named by
    absolute paths and URLs (as clip-retrieval's metadata names them), and one image that is not a training row."""
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(0)).tolist()
    names = [str((train / index.file_names[i]).resolve()) if k % 2 else f"https://example.org/{index.file_names[i]}"
             for k, i in enumerate(order)]
    return TrainingIndex(torch.cat([index.embeddings[order], extra.to(index.embeddings.dtype)]),
                         [index.captions[i] for i in order] + ["elsewhere"], names + ["/elsewhere/img.png"], [],
                         index.embedding, index.resolution, meta={"imported": {}})


@pytest.mark.parametrize("kind", ["built", "imported"])
def test_replication_loads_only_the_index_candidates(kind, tiny_model, tiny_data, tmp_path):
    """Built from the training set (its fingerprint) or imported (matched to the training rows by file name):
    only the nearest rows are loaded, and the nearest distances are the exact ones."""
    assert main(["index", str(tiny_data / "train"), "--out", str(tmp_path / "index"), "--resolution", "16",
                 "--no-progress"]) == 0
    index, embedder = TrainingIndex.load(tmp_path / "index"), make_embedder("pixels")
    train = load_rows(str(tiny_data / "train"))
    train_names = [row_file_name(p, tiny_data / "train", i) for i, p in enumerate(train.images)]
    if kind == "imported":
        outside = load_rows(str(tiny_data / "heldout"))
        index = as_imported(index, tiny_data / "train",
                            embedder(load_images(outside.images[:1], outside.names[:1], 16, progress=False)))
        mapping = training_rows(index, train_names)
        assert sorted(mapping[:-1]) == list(range(16)) and mapping[-1] == -1
        assert [train_names[r] for r in mapping[:-1]] == [n.split("/", 3)[-1] if n.startswith("https:") else
                                                          str(Path(n).relative_to((tiny_data / "train").resolve()))
                                                          for n in index.file_names[:-1]]
        assert training_rows(index, train_names + ["not/in/the/index.png"]) is None  # cannot bound: load all
    pipe = load_pipeline(tiny_model)
    rows = read_labelled_prompts(tiny_data / "labels.jsonl")
    gen_rows = [r for r in rows if r.label == 1][:2]
    generated = generate_images(pipe, [r.text for r in gen_rows], 1, 0, 2, 7.5, 64, progress=False)
    held = load_rows(str(tiny_data / "heldout"))
    heldout = load_images(held.images, held.names, 16, progress=False)
    groups = [group_name(r) for r in gen_rows]
    common = (pipe, generated, gen_rows, 1, groups, rows, tiny_data, str(tiny_data / "train"), 16)
    exact, _ = replication_section(*common, heldout=heldout, progress=False)
    picked = candidate_rows(index, embedder, [generated, heldout], k=2)
    near, _ = replication_section(*common, heldout=heldout, progress=False, index=index, embedder=embedder,
                                  candidates=2)
    assert exact["train_images"] == exact["training_rows"] == near["training_rows"] == 16
    picked = np.unique(training_rows(index, train_names)[picked])
    assert near["train_images"] == len(picked) - (picked[0] < 0) < 16
    assert "rows --index finds nearest" in near["training_images"]
    assert ("matched to training rows by file name" in near["training_images"]) == (kind == "imported")
    # a subset of the references: never nearer than the exact nearest; here the same nearest image for each
    for a, b in zip(exact["generations"], near["generations"], strict=True):
        assert b["l2"] >= a["l2"] - 1e-6
        assert b["l2"] == pytest.approx(a["l2"], abs=1e-6)
    # with candidates >= N every row is loaded: the exact report
    full, _ = replication_section(*common, heldout=heldout, progress=False, index=index, embedder=embedder)
    assert full["train_images"] == 16 and full["generations"] == exact["generations"]


def test_check_images_samples_large_sets_and_names_a_bad_file(tiny_data, tmp_path):
    rows = load_rows(str(tiny_data / "train"))
    check_images(rows)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rows.images[5], rows.names[5] = bad, "train/bad.png"
    with pytest.raises(MemtrainError, match="train/bad.png: image cannot be decoded"):
        check_images(rows)  # below the sampling size: every image is decoded
    rows.images[5] = tmp_path / "missing.png"
    with pytest.raises(MemtrainError, match="train/bad.png: image file is missing"):
        check_images(rows, sample=4)  # above it: every file must exist, a sample is decoded
    rows.images[5] = bad
    outcomes = set()
    for seed in range(20):  # a bad file outside the sample passes the check, in it fails named
        try:
            check_images(rows, sample=4, seed=seed)
            outcomes.add("passed")
        except MemtrainError as e:
            assert "train/bad.png: image cannot be decoded" in str(e)
            outcomes.add("named")
    assert outcomes == {"passed", "named"}
    with pytest.raises(MemtrainError, match="train/bad.png: image cannot be decoded"):  # ... and fails when read
        open_image(rows.images[5], rows.names[5])


def test_an_imported_index_names_webdataset_samples_by_their_key():
    """clip-retrieval records a webdataset sample by its key alone: it stands for the "SHARD:KEY" row when no other
    shard holds that key; a key in two shards names neither, and the full name still matches."""
    index = TrainingIndex(torch.zeros(4, 2), [""] * 4, ["000000003", "000000001", "/out/000000002", "elsewhere"], [],
                          "pixels", 16)
    shards = ["00000.tar:000000001", "00000.tar:000000002", "00001.tar:000000003"]
    assert training_rows(index, shards).tolist() == [2, 0, 1, -1]
    twice = ["00000.tar:000000001", "00000.tar:000000002", "00001.tar:000000003", "00002.tar:000000003"]
    assert training_rows(index, twice) is None  # key 000000003 is in two shards: no row of its own
    index.file_names[0] = "00002.tar:000000003"
    assert training_rows(index, twice) is None  # 00001.tar:000000003 is still unnamed
    index.file_names[3] = "00001.tar:000000003"
    assert training_rows(index, twice).tolist() == [3, 0, 1, 2]
