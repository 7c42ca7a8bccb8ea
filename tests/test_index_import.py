"""`memtrain index --from-faiss` (trainer/measure/index_import.py): a faiss index and metadata parquet laid out as
clip-retrieval writes them (image.index, metadata/metadata_N.parquet, img_emb/img_emb_N.npy), built here with
faiss and pyarrow from the tiny training split, become a memtrain index equal to the one `memtrain index` builds,
which `evaluate --index --guard amg` searches; bad input fails with one error and nothing written."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import optional_extra

from trainer.cli import main
from trainer.data import load_images, load_rows
from trainer.measure.embedders import make_embedder
from trainer.measure.index import ANN_FILE, TrainingIndex

pytestmark = optional_extra("faiss")
RESOLUTION = 16  # the tiny model's
# files 9 and 10: their names sort 10 before 9, the rows' order is 9 then 10 (clip-retrieval's numbering)
PARTS = {"metadata_9.parquet": slice(0, 10), "metadata_10.parquet": slice(10, 16)}


def clip_retrieval_layout(root, train, factory: str, shuffled: bool = False):
    """root/image.index (faiss `factory` over the pixel embeddings of `train`), root/metadata/*.parquet
    (image_path, caption, url) and root/img_emb/*.npy, rows in the training split's order (`shuffled`: in another
    order, named by absolute paths, as a clip-retrieval run elsewhere would record them)."""
    import faiss

    rows = load_rows(str(train))
    names = [str(p.relative_to(train)) for p in rows.images]
    vectors = make_embedder("pixels")(load_images(rows.images, names, RESOLUTION, progress=False)).numpy()
    if shuffled:
        order = np.random.default_rng(0).permutation(len(names))
        names, vectors = [str((train / names[i]).resolve()) for i in order], vectors[order]
        rows.captions = [rows.captions[i] for i in order]
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    root.mkdir()
    faiss.write_index(index, str(root / "image.index"))
    (root / "metadata").mkdir()
    (root / "img_emb").mkdir()
    for i, (name, part) in enumerate(PARTS.items()):
        pq.write_table(pa.table({"image_path": names[part], "caption": [c[0] for c in rows.captions[part]],
                                 "url": [f"https://example.org/{n}" for n in names[part]]}), root / "metadata" / name)
        np.save(root / "img_emb" / f"img_emb_{9 + i}.npy", vectors[part])
    return vectors, names, [c[0] for c in rows.captions]


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "index"
    assert main(["index", str(tiny_data / "train"), "--out", str(out), "--resolution", str(RESOLUTION),
                 "--no-progress"]) == 0
    return TrainingIndex.load(out)


@pytest.fixture(scope="module")
def imported(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-retrieval")
    vectors, names, captions = clip_retrieval_layout(root / "ivf", tiny_data / "train", "IVF2,Flat")
    (root / "ivf" / "index_infos.json").write_text(json.dumps({"index_key": "IVF2,Flat", "index_param": "nprobe=1"}))
    out = root / "imported"
    assert main(["index", "--from-faiss", str(root / "ivf"), "--metadata", str(root / "ivf" / "metadata"),
                 "--embedding", "pixels", "--resolution", str(RESOLUTION), "--out", str(out), "--no-progress"]) == 0
    return out, vectors, names, captions


def test_imported_index_equals_the_built_one(imported, built):
    out, vectors, names, captions = imported
    index = TrainingIndex.load(out, embedding="pixels", resolution=RESOLUTION)
    # no image embedded again: the vectors are read back from image.index, rows in the metadata's natural order
    assert index.file_names == names and index.captions == captions == built.captions
    assert torch.equal(index.embeddings, built.embeddings)  # the same pixel embeddings, stored as float16
    assert index.duplicate_caption_groups == built.duplicate_caption_groups
    meta = json.loads((out / "index.json").read_text())["meta"]
    assert meta["imported"]["faiss_type"] == "IndexIVFFlat" and meta["imported"]["caption_column"] == "caption"
    assert meta["imported"]["name_column"] == "image_path"
    assert meta["imported"]["infos"] == {"index_key": "IVF2,Flat", "index_param": "nprobe=1"}  # autofaiss's, as found
    # the IVF index is kept as the approximate search, tuned on its held sample; it finds what exact search finds
    assert (out / ANN_FILE).is_file() and index.ann_index is not None and meta["ann"]["recall_at_1"] == 1.0
    assert meta["ann"]["factory"] == "IVF2,Flat" and meta["ann"]["nprobe"] == 2  # tuned here: nprobe 1 misses
    q = torch.from_numpy(vectors) + 0.01 * torch.randn(vectors.shape, generator=torch.Generator().manual_seed(0))
    (s_ann, i_ann), (s_exact, i_exact) = index.search(q, k=1), built.search(q, k=1, backend="torch")
    assert torch.allclose(s_ann, s_exact, atol=1e-6)
    assert (built.copy_ids()[i_ann[:, 0].numpy()] == built.copy_ids()[i_exact[:, 0].numpy()]).all()


def test_evaluate_and_amg_search_the_imported_index(imported, tiny_model, tiny_data, tmp_path, capsys):
    out_index = imported[0]
    index = TrainingIndex.load(out_index)
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--out", str(out),
                 "--steps", "3", "-n", "1", "--batch-size", "64", "--detectors", "noise", "--index", str(out_index),
                 "--guard", "amg", "--amg-c1", "0", "--amg-c3", "0", "--quality-feature", "toy",
                 "--train-data", str(tiny_data / "train")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["replication"]["training_rows"] == report["replication"]["train_images"] == 16
    ix = report["replication"]["index"]
    assert ix["images"] == 16 and ix["path"] == str(out_index)
    for g in ix["generations"]:  # the names and captions are the imported metadata's
        assert g["nearest_file"] == index.file_names[g["nearest_index"]]
        assert g["nearest_caption"] == index.captions[g["nearest_index"]]
    assert report["guard"]["guard"] == "amg"
    capsys.readouterr()


def test_dedup_searches_an_imported_index_with_or_without_inverted_lists(imported, tiny_data, tmp_path, capsys):
    """`dedup --index --search index`: an imported IVF index lends its lists; an HNSW one (autofaiss' choice
    for small sets) has none, so k-means lists are used and the report says so; both find the exact groups
    (the tiny split's duplicates are bit-identical images), also when the index holds the rows in another order
    under absolute paths (matched to the data's rows by file name)."""
    clip_retrieval_layout(tmp_path / "hnsw", tiny_data / "train", "HNSW8,Flat", shuffled=True)
    hnsw = tmp_path / "hnsw-imported"
    assert main(["index", "--from-faiss", str(tmp_path / "hnsw"), "--metadata", str(tmp_path / "hnsw" / "metadata"),
                 "--embedding", "pixels", "--resolution", str(RESOLUTION), "--out", str(hnsw), "--no-progress"]) == 0
    reports = {}
    for name, index, search in (("exact", imported[0], "exact"), ("ivf", imported[0], "index"),
                                ("hnsw", hnsw, "index")):
        out = tmp_path / f"dedup-{name}"
        assert main(["dedup", str(tiny_data / "train"), "--index", str(index), "--search", search, "--probe", "2",
                     "--out", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    groups = [[g["members"] for g in reports[k]["image_groups"]] for k in ("exact", "ivf", "hnsw")]
    assert groups[0] and groups[0] == groups[1] == groups[2]
    assert reports["ivf"]["lists"] == "the inverted lists of --index's IVF index"
    assert reports["hnsw"]["lists"] == "k-means lists: --index's IndexHNSWFlat has no inverted lists"
    assert "IndexHNSWFlat has no inverted lists" in (tmp_path / "dedup-hnsw" / "report.md").read_text()
    # data the index does not name row by row: one error, nothing written
    assert main(["dedup", str(tiny_data / "heldout"), "--index", str(hnsw), "--out", str(tmp_path / "other")]) == 2
    assert "cannot be matched to the data's" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_fast_scan_index_with_its_npy_embeddings(tiny_data, tmp_path, capsys):
    """A 4-bit fast-scan PQ index cannot give its vectors back: it is imported with the .npy files it was built
    from (exact vectors), and without them the error names --embeddings."""
    vectors, _, _ = clip_retrieval_layout(tmp_path / "pq", tiny_data / "train", "IVF1,PQ18x4fs")
    base = ["index", "--from-faiss", str(tmp_path / "pq" / "image.index"), "--metadata",
            str(tmp_path / "pq" / "metadata"), "--resolution", str(RESOLUTION), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "bad")]) == 2
    assert "--embeddings" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "ok"), "--embeddings", str(tmp_path / "pq" / "img_emb"),
                 "--dtype", "float32"]) == 0
    index = TrainingIndex.load(tmp_path / "ok")
    assert torch.allclose(index.embeddings, torch.from_numpy(vectors), atol=1e-6)
    assert json.loads(capsys.readouterr().out)["imported"]["faiss_type"] == "IndexIVFPQFastScan"


def test_bad_imports_fail_with_one_clear_error(imported, tiny_data, tmp_path, capsys):
    root = imported[0].parent / "ivf"
    meta = root / "metadata"
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"caption": ["a"] * 15}), short)
    no_caption = tmp_path / "nocap.parquet"
    pq.write_table(pa.table({"url": ["u"] * 16}), no_caption)
    bad_npy = tmp_path / "emb.npy"
    np.save(bad_npy, np.zeros((15, 198), np.float32))
    base = ["index", "--from-faiss", str(root), "--resolution", str(RESOLUTION), "--no-progress"]
    cases = [
        (["--metadata", str(meta), "--embedding", "gradients"], r"holds 198-d vectors, but the gradients embedder "
                                                                r"gives 1350-d"),
        (["--metadata", str(short)], r"15 rows in 1 parquet file\(s\), but the faiss index holds 16 vectors"),
        (["--metadata", str(no_caption)], r"nocap.parquet: no caption column .*set --caption-column"),
        (["--metadata", str(meta), "--caption-column", "title"], r"no column 'title'"),
        (["--metadata", str(meta), "--embeddings", str(bad_npy)], r"15 rows, the faiss index holds 16"),
        (["--metadata", str(tmp_path / "none")], r"--metadata .*none: does not exist"),
        (["--metadata", str(meta)], r"--resolution"),  # filled below: without --resolution
        ([str(tiny_data / "train"), "--metadata", str(meta)], r"--from-faiss takes no DATA"),
        (["--metadata", str(meta), "--resolution", "5"], r"--resolution must be in 8..4096"),
    ]
    for i, (extra, message) in enumerate(cases):
        argv = [*base, *extra, "--out", str(tmp_path / f"out{i}")]
        if message == r"--resolution":
            argv.remove("--resolution")
            argv.remove(str(RESOLUTION))
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err), (extra, err)
        assert not (tmp_path / f"out{i}").exists()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "not-an-index").write_text("hello")
    assert main(["index", "--from-faiss", str(tmp_path / "in" / "not-an-index"), "--metadata", str(meta), "--resolution", "16",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a faiss index" in capsys.readouterr().err
