"""Sharded training sets (trainer/data_shards.py): webdataset tar shards and img2dataset parquet files, written
in the test from the toy imagefolder, read like it, trained from with exact resume, indexed and de-duplicated."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_recipe
from test_resume import assert_same_run

from trainer.cli import main
from trainer.data import EpochSampler, load_images, load_rows, shard_ids
from trainer.io import MemtrainError
from trainer.measure.index import TrainingIndex


def imagefolder_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def write_tar_shards(folder: Path, out: Path, per_shard: int, caption_as: str = "txt") -> list[Path]:
    """img2dataset's webdataset layout: KEY.png + KEY.txt (or KEY.json) per sample, `per_shard` samples a tar."""
    out.mkdir(parents=True, exist_ok=True)
    rows, shards = imagefolder_rows(folder), []
    for s in range(0, len(rows), per_shard):
        shard = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, row in enumerate(rows[s : s + per_shard], s):
                caption = row["text"] if caption_as == "txt" else json.dumps({"caption": row["text"]})
                for name, data in ((f"{i:09d}.png", (folder / row["file_name"]).read_bytes()),
                                   (f"{i:09d}.{caption_as}", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


def write_parquet_shards(folder: Path, out: Path, per_shard: int, row_group: int = 3) -> list[Path]:
    """img2dataset's parquet layout: columns key, caption and jpg (the image bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, shards = imagefolder_rows(folder), []
    for s in range(0, len(rows), per_shard):
        part = rows[s : s + per_shard]
        table = pa.table({"key": [f"{i:09d}" for i in range(s, s + len(part))],
                          "caption": [r["text"] for r in part],
                          "jpg": [(folder / r["file_name"]).read_bytes() for r in part]})
        shard = out / f"{s // per_shard:05d}.parquet"
        pq.write_table(table, shard, row_group_size=row_group)
        shards.append(shard)
    return shards


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    write_tar_shards(tiny_data / "train", root / "tar", per_shard=5)
    write_tar_shards(tiny_data / "train", root / "tarjson", per_shard=7, caption_as="json")
    write_parquet_shards(tiny_data / "train", root / "parquet", per_shard=6)
    return {"tar": root / "tar", "brace": root / "tar" / "{00000..00003}.tar", "json": root / "tarjson",
            "parquet": root / "parquet"}


@pytest.mark.parametrize("kind", ["tar", "brace", "json", "parquet"])
def test_shards_read_like_the_imagefolder(tiny_data, shards, kind):
    """Same captions and the same decoded pixels, row for row, as the imagefolder the shards were made from."""
    folder = load_rows(str(tiny_data / "train"))
    sharded = load_rows(str(shards[kind]))
    assert sharded.captions == folder.captions
    a = load_images(folder.images, folder.names, 16, progress=False)
    b = load_images(sharded.images, sharded.names, 16, progress=False)
    assert torch.equal(a, b)
    assert len(load_rows(str(shards[kind]), max_samples=3).images) == 3


def test_sampler_reads_one_shard_at_a_time(tiny_data, shards):
    """Each epoch draws every row once, shard after shard (shards in an order drawn per epoch)."""
    rows = load_rows(str(shards["tar"]))
    ids = shard_ids(rows)
    assert ids.tolist() == [i // 5 for i in range(len(rows.images))]
    assert shard_ids(load_rows(str(tiny_data / "train"))) is None
    sampler = EpochSampler(len(rows.images), seed=0, shards=ids)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(rows.images)))
        visited = [int(ids[i]) for i in order]
        blocks = [s for j, s in enumerate(visited) if j == 0 or s != visited[j - 1]]
        assert len(blocks) == len(set(blocks)) == int(ids.max()) + 1  # contiguous: each shard read once
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 4
    weighted = EpochSampler(len(rows.images), seed=0, weights=torch.ones(len(rows.images)), shards=ids)
    visited = [int(ids[i]) for i in weighted]
    assert sum(visited[j] != visited[j - 1] for j in range(1, len(visited))) <= int(ids.max())


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_training_on_shards_resumes_exactly(tmp_path, tiny_model, shards, kind):
    """Stopped inside epoch 1 (4 batches of 4 = one epoch of 16 rows), resumed: losses and weights equal the
    uninterrupted run's bit for bit."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, shards[kind], tmp_path / "full",
                          train={"max_steps": 7}, checkpoint={"every_steps": 5})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=5", "output.export=none"]) == 0
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    assert_same_run(tmp_path / "full", part, 7)


def test_index_and_dedup_of_shards_equal_the_imagefolder(tmp_path, tiny_data, shards, capsys):
    for kind in ("tar", "parquet"):
        assert main(["index", str(shards[kind]), "--out", str(tmp_path / f"index-{kind}"), "--no-progress"]) == 0
        assert main(["dedup", str(shards[kind]), "--out", str(tmp_path / f"dedup-{kind}")]) == 0
    assert main(["index", str(tiny_data / "train"), "--out", str(tmp_path / "index-folder"), "--no-progress"]) == 0
    assert main(["dedup", str(tiny_data / "train"), "--out", str(tmp_path / "dedup-folder")]) == 0
    folder = TrainingIndex.load(tmp_path / "index-folder")
    reports = {k: json.loads((tmp_path / f"dedup-{k}" / "report.json").read_text()) for k in ("folder", "tar", "parquet")}
    for kind in ("tar", "parquet"):
        index = TrainingIndex.load(tmp_path / f"index-{kind}")
        assert torch.equal(index.embeddings, folder.embeddings)
        assert index.captions == folder.captions
        assert index.file_names[0] == f"00000.{kind}:000000000"
        assert [g["members"] for g in reports[kind]["image_groups"]] == [g["members"] for g in reports["folder"]["image_groups"]]
    assert reports["folder"]["summary"]["image_groups"] == 2  # the toy set's 2 duplicated images


def test_bad_shards_name_the_shard_and_sample(tmp_path, tiny_data, shards):
    with pytest.raises(MemtrainError, match=r"00004\.tar does not exist \(6 of 10 missing\)"):
        load_rows(str(shards["tar"] / "{00000..00009}.tar"))
    bad = tmp_path / "nocaption"
    bad.mkdir()
    with tarfile.open(bad / "00000.tar", "w") as tar:
        data = (tiny_data / "train" / imagefolder_rows(tiny_data / "train")[0]["file_name"]).read_bytes()
        info = tarfile.TarInfo("000000007.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(MemtrainError, match=r"00000\.tar, sample 000000007: no caption"):
        load_rows(str(bad))
    pq.write_table(pa.table({"caption": ["a"], "url": ["http://x"]}), tmp_path / "meta.parquet")
    with pytest.raises(MemtrainError, match=r"meta\.parquet: no image column .*data\.image_column"):
        load_rows(str(tmp_path / "meta.parquet"))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(MemtrainError, match="cannot read the tar shard"):
        load_rows(str(tmp_path / "gz"))
