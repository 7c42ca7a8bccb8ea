"""Guard options checked once for `generate` and `evaluate` (issue 24), and the index's copy threshold
calibrated on held-out images, stored in index.json and used by `evaluate --index` and the AMG trigger
(issue 23)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.data import load_images
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.measure.index_calibration import image_sources
from trainer.report import evaluate as E
from trainer.sample.amg import SSCD_THRESHOLD
from trainer.sample.guard import GuardedPipeline

BAD = [
    (["--guard-threshold", "2"], "--guard-threshold"),
    (["--guard-threshold=-1"], "--guard-threshold"),
    (["--guard-threshold", "nan"], "--guard-threshold"),
    (["--amg-c1=-13"], "--amg-c1"),
    (["--amg-c3=-1"], "--amg-c3"),
    (["--amg-check-every", "0"], "--amg-check-every"),
    (["--wen-max-iters", "0"], "--wen-max-iters"),
    (["--wen-target=-3"], "--wen-target"),
    (["--wen-lr", "0"], "--wen-lr"),
]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
@pytest.mark.parametrize("extra, flag", BAD)
def test_guard_option_out_of_range_is_one_error_naming_it(command, extra, flag, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    argv = [command, str(tmp_path / "no-model"), "--prompts", str(prompts), "--out", str(out), "--guard", "amg",
            "--index", str(tmp_path / "no-index"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {flag} must be" in err[0], err
    assert not out.exists()


def test_index_threshold_out_of_range_is_one_error(tmp_path, capsys):
    argv = ["evaluate", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "p.txt"), "--index",
            str(tmp_path / "i"), "--index-threshold", "2", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "error: --index-threshold must be a cosine similarity" in capsys.readouterr().err


def test_index_without_guard_warns_that_it_is_unused(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    argv = ["generate", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "1",
            "--index", str(tmp_path / "some-index")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"--index {tmp_path / 'some-index'} is unused without --guard amg" in err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("cal") / "index"
    assert main(["index", str(tiny_data / "train"), "--out", str(out), "--resolution", "16", "--no-progress",
                 "--heldout", str(tiny_data / "heldout"), "--fpr", "0.3"]) == 0
    return out


def test_index_calibration_is_the_held_out_order_statistic(calibrated, tiny_data):
    index = TrainingIndex.load(calibrated)
    copy = index.copy_calibration()
    assert json.loads((calibrated / "index.json").read_text())["calibration"]["copy"]["threshold"] == copy.threshold
    sources, names = image_sources(tiny_data / "heldout", "--heldout")
    held = make_embedder("pixels")(load_images(sources, names, 16, progress=False))
    null = np.sort(index.search(held, k=1)[0][:, 0].double().numpy())[::-1]
    k = math.floor(0.3 * len(null))  # at most floor(fpr n) held-out images flagged
    assert copy.calibrated and copy.n_heldout == len(null) == 4
    assert copy.threshold == pytest.approx(null[k]) and copy.fpr_heldout <= 0.3
    assert copy.recall is None  # no --vae: not measured, and the record says so
    assert "recall not measured" in copy.source
    assert index.null_similarity() == pytest.approx(float(held.double().mean(0) @ index.embeddings.double().mean(0)))


def test_calibration_drives_evaluate_and_the_amg_trigger(calibrated, tiny_model, tiny_data, tmp_path):
    index = TrainingIndex.load(calibrated)
    copy = index.copy_calibration()
    report = E.evaluate(tiny_model, tiny_data / "labels.jsonl", out=tmp_path / "eval", n=1, steps=2,
                        detectors="noise", index=calibrated, progress=False)
    ix = report["replication"]["index"]
    assert ix["threshold"] == copy.threshold and ix["criterion"] == copy.describe()
    assert "calibrated at 30.0% false positives on 4 held-out" in (tmp_path / "eval" / "report.md").read_text()
    for g in ix["generations"]:
        assert g["replicated"] == (g["similarity"] > copy.threshold)
    guarded = GuardedPipeline.from_pipe(load_pipeline(tiny_model), index=index, guard="amg")
    assert guarded.trigger == copy.describe() and guarded.guard.config.threshold == SSCD_THRESHOLD
    scale = guarded.guard.config.scale
    assert scale.trigger == copy.threshold and scale.null == pytest.approx(index.null_similarity())
    assert scale(copy.threshold) == pytest.approx(SSCD_THRESHOLD(0))  # a clean estimate at the threshold triggers


def test_vae_references_and_positives_give_the_recall(tmp_path, tiny_data, tiny_model, capsys):
    out = tmp_path / "index"
    assert main(["index", str(tiny_data / "train"), "--out", str(out), "--resolution", "16", "--no-progress",
                 "--heldout", str(tiny_data / "heldout"), "--vae", str(tiny_model)]) == 0
    index = TrainingIndex.load(out)
    copy = index.copy_calibration()
    assert copy.source.startswith("training images as stored") and copy.n_positive == 16
    assert 0.0 <= copy.recall <= 1.0 and copy.fpr_target == 0.01
    assert json.loads(capsys.readouterr().out)["calibration"] == copy.describe()
    # the index holds the training images as the model's VAE reproduces them, without --heldout too
    assert index.meta["references"] == f"through the VAE of {tiny_model}"
    assert main(["index", str(tiny_data / "train"), "--out", str(tmp_path / "i2"), "--vae", str(tiny_model),
                 "--resolution", "16", "--no-progress"]) == 0
    plain = tmp_path / "i3"
    assert main(["index", str(tiny_data / "train"), "--out", str(plain), "--resolution", "16", "--no-progress"]) == 0
    through_vae, stored = TrainingIndex.load(tmp_path / "i2"), TrainingIndex.load(plain)
    assert torch.equal(through_vae.embeddings, index.embeddings) and stored.meta["references"] == "as stored"
    assert not torch.allclose(through_vae.embeddings.float(), stored.embeddings.float(), atol=1e-3)
