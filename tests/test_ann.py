"""Approximate search (trainer/measure/ann.py): the index chosen under a memory budget, its real size, its
recall@1 against exact search on queries it was not tuned on, the memory-mapped round trip, and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import optional_extra

from trainer.cli import main
from trainer.io import MemtrainError
from trainer.measure import ann
from trainer.measure.index import ANN_FILE, TrainingIndex
from trainer.mitigate import dedup

needs_faiss = optional_extra("faiss")


def clustered(n: int, d: int, clusters: int, seed: int = 0, noise: float = 0.35) -> torch.Tensor:
    """Unit vectors around `clusters` random centres: the structure image embeddings have."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    x = centres[torch.randint(clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g) / d**0.5
    return torch.nn.functional.normalize(x, dim=1)


def test_the_budget_picks_flat_then_sq8_then_fewer_pq_bytes():
    n, d = 10_000_000, 512
    assert ann.n_lists(n) == 4096 and ann.n_lists(1000) == 25
    chosen = [ann.choose_factory(n, d, ann.parse_memory(b)) for b in ("30G", "8G", "2G", "600M")]
    assert chosen == ["IVF4096,Flat", "IVF4096,SQ8", "IVF4096,PQ256x4fs", "IVF4096,PQ64x4fs"]
    for factory, budget in zip(chosen, ("30G", "8G", "2G", "600M"), strict=True):
        assert ann.index_bytes(factory, n, d) <= ann.parse_memory(budget)
    with pytest.raises(MemtrainError, match=r"smallest, IVF4096,PQ32x4fs, needs 0\.\d+ GiB\); raise --max-memory"):
        ann.choose_factory(n, d, ann.parse_memory("100M"))
    with pytest.raises(MemtrainError, match="give a size such as 4G"):
        ann.parse_memory("4X")


@needs_faiss
@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "IVF64,PQ16x4fs"])
def test_estimated_bytes_match_the_written_index(tmp_path, factory):
    x = clustered(20_000, 64, 50)
    index = ann.build(x, factory, progress=False)
    ann.faiss.write_index(index, str(tmp_path / "i.faiss"))
    written = (tmp_path / "i.faiss").stat().st_size
    assert 0.7 < ann.index_bytes(factory, 20_000, 64) / written < 1.3


@needs_faiss
def test_recall_on_fresh_queries_reaches_the_target(tmp_path):
    """Tuned on its held sample, the index's top-1 on 300 other rows (nearest other row) matches exact search
    at least at the target rate; the index saved and memory-mapped back answers the same."""
    x = clustered(30_000, 48, 10, noise=1.0).half()  # clusters split across lists: nprobe 1 misses neighbours
    index, record, held = ann.build_tuned(x, "IVF128,SQ8", None, target=0.95, progress=False)
    assert record["recall_at_1"] >= 0.95 and record["nprobe"] < 128 and record["held_sample"] == 1000
    assert record["recall_by_nprobe"]["1"] < 0.95  # nprobe had to grow: the search is approximate
    fresh = np.setdiff1d(np.arange(0, 30_000, 97), held["ids"])[:300]
    truth_ids, truth_sims = ann.exact_neighbours(x, fresh)
    sims, ids = ann.search(index, x, x[torch.from_numpy(fresh)].float().numpy(), 2)
    other = torch.where(ids[:, 0] == torch.from_numpy(fresh), sims[:, 1], sims[:, 0]).numpy()
    assert (other >= truth_sims - 1e-4).mean() >= 0.93
    exact = x[torch.from_numpy(ids[:, 0].numpy())].float() @ x[torch.from_numpy(fresh)].float().T
    assert torch.allclose(sims[:, 0], exact.diagonal(), atol=1e-5)  # exact similarities of the candidates

    train = TrainingIndex(x, [f"c{i}" for i in range(len(x))], [f"f{i}" for i in range(len(x))], [], "pixels", 8,
                          {"ann": record})
    train.ann_index, train.ann_held = index, held
    train.save(tmp_path / "idx")
    loaded = TrainingIndex.load(tmp_path / "idx")
    assert loaded.ann_index is not None
    q = x[torch.from_numpy(fresh)].float()
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(q, k=3), train.search(q, k=3, backend="ann"),
                                                 strict=True))
    assert ann.held_recall(loaded.ann_index, loaded.embeddings, loaded.ann_held) == record["recall_at_1"]
    exact_sims = loaded.search(q, k=1, backend="torch")[0]
    assert (loaded.search(q, k=1)[0] <= exact_sims + 1e-5).all()


@needs_faiss
def test_cli_builds_an_approximate_index(tmp_path, tiny_data, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(tiny_data / "train"), "--out", str(out), "--approx", "IVF2,Flat", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["search"]["factory"] == "IVF2,Flat" and summary["search"]["recall_at_1"] == 1.0
    assert (out / ANN_FILE).is_file()
    index = TrainingIndex.load(out)
    q = index.embeddings.float() + 0.01
    found, exact = index.search(q, k=1), index.search(q, k=1, backend="torch")
    assert torch.allclose(found[0], exact[0], atol=1e-6)  # ties: the toy set stores images 4 times
    assert (index.copy_ids()[found[1][:, 0].numpy()] == index.copy_ids()[exact[1][:, 0].numpy()]).all()
    for args, match in ((["--approx", "NOPE"], "not auto, exact, choose or a faiss index_factory"),
                        (["--max-memory", "lots"], "give a size such as 4G"),
                        (["--target-recall", "1.5"], r"--target-recall must be in \(0, 1\]")):
        assert main(["index", str(tiny_data / "train"), "--out", str(tmp_path / "bad"), *args]) == 2
        assert re.search(match, capsys.readouterr().err)
        assert not (tmp_path / "bad").exists()


@needs_faiss
def test_dedup_through_inverted_lists_finds_the_exact_groups():
    """20,000 clustered vectors with 300 planted near-copy groups (2-4 members, cos > 0.98): the inverted-list
    search (each row in its 2 nearest of 128 lists) finds the groups of the exact all-pairs search."""
    g = torch.Generator().manual_seed(1)
    x = clustered(20_000, 32, 40, noise=1.0)
    for _ in range(300):
        members = torch.randint(20_000, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        x[members] = torch.nn.functional.normalize(x[members[0]] + 0.02 * torch.randn(len(members), 32, generator=g), dim=1)
    exact, exact_pairs = dedup.near_duplicate_groups(x, 0.95)
    found, pairs = dedup.near_duplicate_groups(x.half(), 0.95, search="index", probe=2)
    assert len(exact) >= 250
    assert found == exact and pairs == exact_pairs
    lists = dedup.ivf_lists(x, probe=2)
    assert len(lists) == ann.n_lists(20_000) and sum(len(m) for m in lists) == 2 * 20_000
    assert max(len(m) for m in lists) < 20_000 / 10  # memory bounded by a list, not by N^2


@needs_faiss
def test_dedup_cli_with_an_index_uses_its_embeddings_and_lists(tmp_path, tiny_data):
    index_dir = tmp_path / "idx"
    assert main(["index", str(tiny_data / "train"), "--out", str(index_dir), "--approx", "IVF2,Flat",
                 "--no-progress"]) == 0
    assert main(["dedup", str(tiny_data / "train"), "--out", str(tmp_path / "exact")]) == 0
    assert main(["dedup", str(tiny_data / "train"), "--out", str(tmp_path / "ivf"), "--index", str(index_dir),
                 "--search", "index"]) == 0
    exact, ivf = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("exact", "ivf"))
    assert ivf["search"] == "index" and ivf["timing_s"]["embed"] < 0.01  # no re-embedding
    assert [g["members"] for g in ivf["image_groups"]] == [g["members"] for g in exact["image_groups"]]
