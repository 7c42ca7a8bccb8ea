import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import optional_extra
from PIL import Image
from safetensors.torch import load_file

from trainer import cli
from trainer.data import image_to_tensor, open_image
from trainer.io import MemtrainError
from trainer.measure import index as index_module
from trainer.measure.embedders import make_embedder
from trainer.measure.features import embed_images, pixel_embedding
from trainer.measure.index import TrainingIndex
from trainer.measure.index_build import build_index


def as_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    return (image_to_tensor(image, resolution, True, False, None)[None] + 1.0) / 2.0


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory):
    """The tiny training split indexed through the CLI; (index dir, printed summary)."""
    out = tmp_path_factory.mktemp("index") / "train-index"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["index", str(tiny_data / "train"), "--out", str(out), "--no-progress"]) == 0
    return out, json.loads(stdout.getvalue())


def random_index(n: int, d: int, dtype=torch.float32, seed: int = 0) -> TrainingIndex:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    names = [f"row {i}" for i in range(n)]
    return TrainingIndex(emb, names, names, [], "synthetic", 0)


def test_cli_index_of_the_training_split(built, tiny_data):
    out, summary = built
    index = TrainingIndex.load(out, embedding="pixels", resolution=32)
    # 2 duplicated images x 4 copies + 8 singletons; toy images are 32x32
    assert summary["images"] == len(index) == 16 and summary["resolution"] == 32 and summary["dim"] == 198
    assert index.embeddings.shape == (16, 198)
    # float16 storage, on disk too
    assert index.embeddings.dtype == torch.float16 and summary["dtype"] == "float16"
    assert load_file(str(out / "embeddings.safetensors"))["embeddings"].dtype == torch.float16
    assert json.loads((out / "index.json").read_text())["dtype"] == "float16"
    # every training image finds itself (or an identical copy) with cosine ~1
    embed = make_embedder("pixels")
    files = [tiny_data / "train" / name for name in index.file_names]
    queries = embed(torch.cat([as_tensor(open_image(f, str(f)), 32) for f in files]))
    sims, idx = index.search(queries, k=1)
    assert sims.shape == idx.shape == (16, 1)
    assert (sims[:, 0] > 0.999).all()
    for i, j in enumerate(idx[:, 0].tolist()):
        assert j == i or files[j].read_bytes() == files[i].read_bytes()
    # the nearest *other* image of a singleton is not a near-copy
    singles = [i for i, f in enumerate(files) if f.name.startswith("single")]
    sims2, _ = index.search(queries[singles], k=2)
    assert (sims2[:, 1] < 0.95).all()


def test_duplicate_caption_groups_are_the_duplicated_rows(built):
    index = TrainingIndex.load(built[0])
    expected = {}
    for i, name in enumerate(index.file_names):
        m = re.match(r"images/(dup\d+)_\d+\.png", name)
        if m:
            expected.setdefault(m.group(1), set()).add(i)
    assert len(expected) == 2 and all(len(g) == 4 for g in expected.values())
    assert {frozenset(g) for g in index.duplicate_caption_groups} == {frozenset(g) for g in expected.values()}
    duplicated = set().union(*expected.values())
    assert [index.caption_is_duplicated(i) for i in range(len(index))] == [i in duplicated for i in range(16)]
    assert built[1]["duplicate_caption_groups"] == 2 and built[1]["rows_with_duplicated_captions"] == 8


def test_search_equals_brute_force_cosine(built):
    index = TrainingIndex.load(built[0])
    g = torch.Generator().manual_seed(1)
    queries = torch.cat(
        [
            index.embeddings.float()[:5] + 0.05 * torch.randn(5, 198, generator=g),
            torch.randn(7, 198, generator=g),
        ]
    )
    sims, idx = index.search(queries, k=4)
    brute = F.normalize(queries, dim=1) @ index.embeddings.float().T
    ref, _ = brute.topk(4, dim=1)
    assert torch.allclose(sims, ref, atol=1e-6)
    assert torch.allclose(brute.gather(1, idx), sims, atol=1e-6)  # the returned rows have those similarities
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    # no ties among random rows: the indices are exactly brute force's
    rnd = random_index(500, 32)
    q = torch.randn(20, 32, generator=g)
    _, ref_idx = (F.normalize(q, dim=1) @ rnd.embeddings.T).topk(5, dim=1)
    assert torch.equal(rnd.search(q, k=5)[1], ref_idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunked_search_equals_unchunked(dtype):
    index = random_index(1000, 48, dtype)
    q = torch.randn(30, 48, generator=torch.Generator().manual_seed(2))
    whole = index.search(q, k=5, chunk=65536)
    for chunk in (97, 1, 999):
        part = index.search(q, k=5, chunk=chunk)
        assert torch.equal(part[1], whole[1]) and torch.allclose(part[0], whole[0], atol=1e-6)


@optional_extra("faiss")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_faiss_equals_exact(dtype, built):
    index = random_index(3000, 64, dtype, seed=3)
    q = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    exact, approx = index.search(q, k=3, backend="torch"), index.search(q, k=3, backend="faiss")
    assert torch.equal(approx[1], exact[1]) and torch.allclose(approx[0], exact[0], atol=1e-5)
    real = TrainingIndex.load(built[0])
    queries = real.embeddings.float()
    a, b = real.search(queries, k=1, backend="torch"), real.search(queries, k=1, backend="faiss")
    assert torch.allclose(a[0], b[0], atol=1e-5)  # identical copies may tie: compare similarities


@optional_extra("faiss")
def test_auto_backend_uses_faiss_for_few_queries_on_a_large_index(monkeypatch):
    monkeypatch.setattr(index_module, "FAISS_AUTO_MIN", 500)  # "large" for this test
    q = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
    small, large = random_index(400, 16), random_index(600, 16)
    small.search(q[:2])
    large.search(q)
    assert small._faiss is None and large._faiss is None  # few images, or many queries: torch
    exact = large.search(q[:2], k=2, backend="torch")
    auto = large.search(q[:2], k=2)
    assert large._faiss is not None and torch.equal(auto[1], exact[1])


def test_pixel_embedder_matches_dedup_and_is_differentiable():
    rng = np.random.default_rng(0)
    embed = make_embedder("pixels")
    assert embed.kind == "pixels" and embed.dim == 198
    for h, w in ((32, 32), (37, 23)):  # a multiple of 8 and an uneven size (PIL's BOX cell boundaries)
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
        image = Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        ours, theirs = embed(x)[0], torch.from_numpy(pixel_embedding(image))
        assert ours @ theirs > 0.999  # dedup rounds its thumbnail to 8 bits
    flat = Image.new("RGB", (16, 16), (200, 30, 90))
    x = torch.from_numpy(np.asarray(flat, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    assert torch.allclose(
        embed(x)[0], torch.from_numpy(pixel_embedding(flat)), atol=1e-3
    )  # colour descriptor

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    target = embed(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))).detach()
    sim = (embed(images) @ target.T).sum()
    sim.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # the gradient points somewhere useful: a small step raises the similarity
        stepped = (images + 0.05 * images.grad / images.grad.norm()).clamp(0, 1)
        assert (embed(stepped) @ target.T).sum() > sim


class TinySSCD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_sscd_and_clip_embedders(tmp_path, tiny_data):
    from transformers import CLIPConfig, CLIPModel

    sscd = tmp_path / "sscd.pt"
    torch.jit.script(TinySSCD()).save(str(sscd))
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        tmp_path / "clip"
    )
    files = sorted((tiny_data / "train" / "images").glob("*.png"))[:3]
    x = torch.cat([as_tensor(open_image(f, str(f)), 32) for f in files]).requires_grad_(True)
    for kind, path, dim in (("sscd", sscd, 24), ("clip", tmp_path / "clip", 16)):
        embed = make_embedder(kind, str(path), device="cpu")
        assert embed.kind == kind and embed.dim == dim
        ours = embed(x)
        assert ours.shape == (3, dim) and torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)
        # the same model through memtrain dedup's PIL preprocessing
        theirs = torch.from_numpy(embed_images(files, embedding=kind, **{kind: path}, progress=False))
        assert ((ours * theirs).sum(1) > 0.99).all()
        ours.sum().backward()
        assert x.grad.abs().sum() > 0
        x.grad = None
    out = tmp_path / "sscd-index"
    assert (
        cli.main(
            [
                "index",
                str(tiny_data / "train"),
                "--out",
                str(out),
                "--embedding",
                "sscd",
                "--model",
                str(sscd),
                "--dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    index = TrainingIndex.load(out, embedding="sscd", resolution=32)
    assert index.embeddings.dtype == torch.float32 and index.dim == 24


def test_bad_input(built, tiny_data, tmp_path, capsys, monkeypatch):
    out = built[0]
    with pytest.raises(MemtrainError, match="does not exist; build one with `memtrain index"):
        TrainingIndex.load(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(MemtrainError, match="is not a memtrain index"):
        TrainingIndex.load(tmp_path / "junk")
    TrainingIndex(torch.zeros(0, 198, dtype=torch.float16), [], [], [], "pixels", 32).save(tmp_path / "empty")
    with pytest.raises(MemtrainError, match="is empty"):
        TrainingIndex.load(tmp_path / "empty")
    with pytest.raises(MemtrainError, match="holds pixels embeddings, but sscd embeddings were requested"):
        TrainingIndex.load(out, embedding="sscd")
    with pytest.raises(MemtrainError, match="built from 32x32 images, but resolution 64"):
        TrainingIndex.load(out, resolution=64)
    with pytest.raises(MemtrainError, match="training data .*missing does not exist"):
        build_index(str(tmp_path / "missing"), str(tmp_path / "ix"), progress=False)
    with pytest.raises(MemtrainError, match="needs --model PATH"):
        build_index(str(tiny_data / "train"), str(tmp_path / "ix"), embedding="clip", progress=False)
    with pytest.raises(MemtrainError, match="overlaps the training data"):
        build_index(str(tiny_data / "train"), str(tiny_data / "train" / "ix"), progress=False)
    with pytest.raises(MemtrainError, match="holds notes.txt and no .memtrain-manifest.json"):
        build_index(str(tiny_data / "train"), str(tmp_path / "junk"), progress=False)
    with pytest.raises(MemtrainError, match=r"queries must be \[M, 198\]"):
        TrainingIndex.load(out).search(torch.randn(2, 10))
    monkeypatch.setattr(index_module, "faiss", None)  # as without the optional extra
    with pytest.raises(MemtrainError, match="needs faiss: pip install faiss-cpu"):
        TrainingIndex.load(out).search(torch.randn(2, 198), backend="faiss")
    assert not (tmp_path / "ix").exists() and not (tiny_data / "train" / "ix").exists()
    # through the CLI: exit code 2 and one line naming the problem
    assert cli.main(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "ix")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_mixed_sizes_need_a_resolution(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, size in enumerate([(40, 40), (48, 40), (40, 40)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(data / "images" / f"{i}.png")
        rows.append(
            json.dumps({"file_name": f"images/{i}.png", "text": "same caption" if i else "Same caption!"})
        )
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(MemtrainError, match=r"differ in size .*40x40.*48x40.*pass --resolution"):
        build_index(str(data), str(tmp_path / "ix"), progress=False)
    index = build_index(str(data), str(tmp_path / "ix"), resolution=24, progress=False)
    assert index.resolution == 24 and len(index) == 3
    assert index.duplicate_caption_groups == [[0, 1, 2]]  # normalized caption duplicates count
    assert TrainingIndex.load(Path(tmp_path / "ix"), resolution=24).file_names == [
        f"images/{i}.png" for i in range(3)
    ]
