import numpy as np
import pytest
import torch

from trainer.io import MemtrainError
from trainer.measure.replication import (
    l2_matrix,
    replication_metrics,
    summarize_replication,
    tiled_l2_matrix,
    tiled_l2_pairs,
    unique_images,
)


def rand_images(n, seed, c=3, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=g)


def ref_l2(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.sqrt(np.mean((a[i] - b[j]) ** 2))
    return out


def ref_tiled(a, b, t):
    a, b = a.double().numpy(), b.double().numpy()
    rows = np.array_split(np.arange(a.shape[2]), t)
    cols = np.array_split(np.arange(a.shape[3]), t)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            worst = 0.0
            for r in rows:
                for c in cols:
                    ta = a[i][:, r][:, :, c]
                    tb = b[j][:, r][:, :, c]
                    worst = max(worst, np.sqrt(np.mean((ta - tb) ** 2)))
            out[i, j] = worst
    return out


def test_l2_matrix_matches_double_loop_and_blocking():
    a, b = rand_images(5, 0), rand_images(7, 1)
    ref = ref_l2(a, b)
    full = l2_matrix(a, b, block=1000)
    assert full.shape == (5, 7) and full.dtype == torch.float32
    np.testing.assert_allclose(full.numpy(), ref, atol=1e-6)
    for block in (1, 2, 3):  # blocks that do not divide 5 or 7
        assert torch.allclose(l2_matrix(a, b, block=block), full, atol=1e-7)
    # identical images are at distance exactly 0 (no cancellation noise)
    assert float(l2_matrix(a[:1], a[:1])[0, 0]) < 1e-6


def test_l2_known_value():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(l2_matrix(a, b)[0, 0]) == pytest.approx(0.5)  # sqrt(1 / 4)


@pytest.mark.parametrize("size,tiles", [(8, 4), (10, 4), (9, 2), (8, 1)])
def test_tiled_l2_matches_reference(size, tiles):
    a, b = rand_images(4, 2, h=size, w=size), rand_images(6, 3, h=size, w=size)
    ref = ref_tiled(a, b, tiles)
    got = tiled_l2_matrix(a, b, tiles_per_side=tiles, block=1000)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert torch.allclose(tiled_l2_matrix(a, b, tiles_per_side=tiles, block=3), got, atol=1e-7)
    if tiles == 1:
        assert torch.allclose(got, l2_matrix(a, b), atol=1e-6)
    pairs = tiled_l2_pairs(a, b[:4], tiles_per_side=tiles, block=3)
    np.testing.assert_allclose(pairs.numpy(), np.diag(ref[:, :4]), atol=1e-6)


def test_tiled_l2_catches_a_localized_copy_difference():
    a = rand_images(1, 4, h=8, w=8)
    b = a.clone()
    b[:, :, :2, :2] = 1.0 - b[:, :, :2, :2]  # one of the 16 tiles inverted
    tile_err = float(torch.sqrt(((a - b)[:, :, :2, :2] ** 2).mean()))
    assert float(tiled_l2_matrix(a, b)[0, 0]) == pytest.approx(tile_err, abs=1e-6)
    assert float(l2_matrix(a, b)[0, 0]) == pytest.approx(tile_err / 4, abs=1e-6)  # 1/16 of the area


def reference_metrics(gen, train, k, alpha, tiles):
    d = ref_l2(gen, train)
    order = np.argsort(d, axis=1, kind="stable")
    srt = np.take_along_axis(d, order, axis=1)
    kk = min(k, train.shape[0])
    nl2 = srt[:, 0] / (alpha * srt[:, :kk].mean(1))
    tiled = np.array(
        [ref_tiled(gen[i : i + 1], train[order[i, 0]][None], tiles)[0, 0] for i in range(len(gen))]
    )
    return order[:, 0], srt[:, 0], srt[:, 1], srt[:, 0] / srt[:, 1], nl2, tiled


def planted():
    train = rand_images(60, 5)
    gen = rand_images(6, 6)
    noise = torch.randn(train[17].shape, generator=torch.Generator().manual_seed(7))
    gen[2] = (train[17] + 0.01 * noise).clamp(0, 1)
    return gen, train


def test_replication_metrics_match_reference_and_flag_planted_copy():
    gen, train = planted()
    m = replication_metrics(gen, train, k=50, alpha=0.5, tiles_per_side=4)
    nn, l2, l2b, ratio, nl2, tiled = reference_metrics(gen, train, 50, 0.5, 4)
    assert m["nn_index"].tolist() == nn.tolist()
    assert int(m["nn_index"][2]) == 17
    for key, ref in [("l2", l2), ("l2_second", l2b), ("ratio", ratio), ("nl2", nl2), ("tiled_l2", tiled)]:
        np.testing.assert_allclose(m[key].numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=key)
    expected = [False, False, True, False, False, False]
    for flag in ("ratio_memorized", "tiled_extracted", "nl2_memorized"):
        assert m[flag].dtype == torch.bool
        assert m[flag].tolist() == expected, flag
    # the random generations are far from every criterion, not just barely over
    others = [0, 1, 3, 4, 5]
    assert float(m["ratio"][others].min()) > 0.8
    assert float(m["nl2"][others].min()) > 1.6
    assert float(m["tiled_l2"][others].min()) > 0.3


def test_replication_metrics_blocking_and_k_clipping():
    gen, train = planted()
    a = replication_metrics(gen, train, block=1000)
    b = replication_metrics(gen, train, block=4)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), equal_nan=True), key
    small = train[:5]
    m = replication_metrics(gen, small, k=50)
    d = ref_l2(gen, small)
    np.testing.assert_allclose(m["knn_mean_l2"].numpy(), d.mean(1), rtol=1e-5)  # k clipped to 5
    np.testing.assert_allclose(m["nl2"].numpy(), d.min(1) / (0.5 * d.mean(1)), rtol=1e-5)
    # k = 1: nL2 is L2 / (alpha * L2) = 1 / alpha, NN2 still defined
    m1 = replication_metrics(gen, train, k=1, alpha=0.5)
    np.testing.assert_allclose(m1["nl2"].numpy(), 2.0, rtol=1e-5)
    assert torch.isfinite(m1["ratio"]).all()


def test_replication_metrics_single_training_image():
    gen, train = planted()
    m = replication_metrics(gen, train[17:18])
    assert m["nn_index"].tolist() == [0] * 6
    assert torch.isnan(m["l2_second"]).all() and torch.isnan(m["ratio"]).all()
    assert not m["ratio_memorized"].any()
    assert m["tiled_extracted"].tolist() == [False, False, True, False, False, False]


def test_unique_images_on_planted_duplicates():
    base = rand_images(4, 8)
    idx = [2, 0, 2, 1, 3, 0, 2]
    images = base[idx]
    near = base[1:2].clone()
    near[0, 0, 0, 0] += 1e-3 if near[0, 0, 0, 0] < 0.5 else -1e-3  # a near-copy is not a duplicate
    images = torch.cat([images, near])
    uniq, inv = unique_images(images)
    assert uniq.shape == (5, 3, 8, 8)
    assert torch.equal(uniq[:4], base[[2, 0, 1, 3]])  # first-occurrence order
    assert torch.equal(uniq[4], near[0])
    assert inv.tolist() == [0, 1, 0, 2, 3, 1, 0, 4]
    assert torch.equal(uniq[inv], images)
    u0, i0 = unique_images(images[:0])
    assert u0.shape[0] == 0 and i0.numel() == 0


def test_duplicates_break_the_ratio_and_unique_images_fixes_it():
    train = rand_images(20, 9)
    with_dups = torch.cat([train, train[3:4], train[3:4]])
    gen = train[3:4].clone()
    with pytest.warns(UserWarning, match="duplicates"):
        bad = replication_metrics(gen, with_dups)
    assert not bool(bad["ratio_memorized"][0])
    uniq, inv = unique_images(with_dups)
    good = replication_metrics(gen, uniq)
    assert bool(good["ratio_memorized"][0]) and float(good["ratio"][0]) == 0.0
    assert bool(good["nl2_memorized"][0]) and bool(good["tiled_extracted"][0])
    rows = (inv == good["nn_index"][0]).nonzero().flatten().tolist()
    assert rows == [3, 20, 21]


def test_summarize_replication():
    v = np.arange(1, 101, dtype=float)
    s = summarize_replication(torch.tensor(v), threshold=90, higher_is_replication=True)
    assert s["n"] == 100 and s["n_nan"] == 0
    assert s["mean"] == pytest.approx(50.5)
    assert s["max"] == 100 and s["min"] == 1
    assert s["p95"] == pytest.approx(95.05)  # linear interpolation, as numpy
    assert s["p5"] == pytest.approx(5.95)
    assert s["fraction"] == pytest.approx(0.10)  # 91..100
    low = summarize_replication(list(v) + [float("nan")], threshold=10, higher_is_replication=False)
    assert low["fraction"] == pytest.approx(9 / 100) and low["n_nan"] == 1  # 1..9 (strict)
    incl = summarize_replication(v, threshold=10, higher_is_replication=False, inclusive=True)
    assert incl["fraction"] == pytest.approx(0.10)
    with pytest.raises(MemtrainError, match="no values"):
        summarize_replication([float("nan")], threshold=0.5, higher_is_replication=True)


def test_input_validation():
    a = rand_images(2, 10)
    with pytest.raises(MemtrainError, match="float"):
        l2_matrix((a * 255).to(torch.uint8), a)
    with pytest.raises(MemtrainError, match=r"\[0, 1\]"):
        l2_matrix(a * 2 - 1, a)
    with pytest.raises(MemtrainError, match="same channels and size"):
        l2_matrix(a, rand_images(2, 11, h=16, w=16))
    with pytest.raises(MemtrainError, match="tiles"):
        tiled_l2_matrix(a, a, tiles_per_side=9)
    with pytest.raises(MemtrainError, match="no images"):
        replication_metrics(a, a[:0])
