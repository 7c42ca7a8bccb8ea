"""The toy world memorizes: `memtrain demo` end to end on the committed toy base (about 10 minutes)."""

import json

import pytest

from trainer.demo import RATIO_THRESHOLD, run_demo


@pytest.mark.slow
def test_demo_replicates_duplicated_prompts_not_novel_ones(tmp_path):
    report = run_demo(tmp_path / "demo", progress=False)
    groups = report["groups"]
    # measured on this machine (2400 steps): duplicated 88%, singleton 2%, novel 16% (ratio < 0.5, guidance 3)
    assert groups["duplicated"]["replication_rate"] >= 0.6
    assert groups["duplicated"]["replication_rate"] >= 3 * max(groups["novel"]["replication_rate"], 0.01)
    assert groups["singleton"]["replication_rate"] <= 0.1
    # a duplicated prompt brings back ITS image far more often than a singleton caption does
    assert groups["duplicated"]["nearest_is_own_image"] >= 0.8 > 5 * groups["singleton"]["nearest_is_own_image"]
    # what novel prompts replicate are the duplicated images (memorized images leak to related prompts)
    leaked = [g for g in report["generations"] if g["group"] == "novel" and g["ratio_memorized"]]
    assert all(g["nearest_group"] == "duplicated" for g in leaked), leaked
    # the criterion never fires on real new images of the same distribution
    assert report["calibration"]["flagged_rate"] == 0.0
    assert report["calibration"]["ratio_min"] > RATIO_THRESHOLD
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["groups"] == groups
    assert (tmp_path / "demo" / "replication.png").stat().st_size > 0
    assert "replication rate (ratio < 0.5)" in (tmp_path / "demo" / "report.md").read_text()


@pytest.mark.slow
def test_ground_truth_detectors_on_the_demo_model(tmp_path):
    """Issue 3's ground truth: on the demo's fine-tune, with the toy labels, the first-step detectors
    tell duplicated from novel prompts (n = 1) and CLiD tells training pairs from held-out ones."""
    from trainer.evaluate import evaluate

    run_demo(tmp_path / "demo", progress=False)
    report = evaluate(tmp_path / "demo" / "train" / "pipeline", tmp_path / "demo" / "data" / "labels.jsonl",
                      out=tmp_path / "eval", generate=False, detectors="noise,anisotropy,clid", progress=False)
    detectors = report["trigger"]["detectors"]
    for name in ("noise", "anisotropy"):
        assert detectors[name]["auroc"] >= 0.95, (name, detectors[name])
        assert detectors[name]["tpr_at_1fpr"] >= 0.8, (name, detectors[name])
    assert report["membership"]["scores"]["clid_th"]["auroc"] >= 0.9
