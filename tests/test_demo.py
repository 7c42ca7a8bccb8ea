"""The toy world memorizes: `memtrain demo` end to end on the committed toy base (about 7 minutes)."""

import json

import pytest

from trainer.demo import RATIO_THRESHOLD, run_demo


@pytest.mark.slow
def test_demo_replicates_duplicated_prompts_not_novel_ones(tmp_path):
    report = run_demo(tmp_path / "demo", progress=False)
    groups = report["groups"]
    # measured on this machine: duplicated 50%, singleton 0%, novel 5% (ratio < 0.5, guidance 3)
    assert groups["duplicated"]["replication_rate"] >= 0.4
    assert groups["novel"]["replication_rate"] <= 0.05
    assert groups["duplicated"]["replication_rate"] >= 5 * max(groups["novel"]["replication_rate"], 0.01)
    # a duplicated prompt brings back ITS image far more often than a singleton caption does
    assert groups["duplicated"]["nearest_is_own_image"] >= 0.5 > 5 * groups["singleton"]["nearest_is_own_image"]
    # the criterion never fires on real new images of the same distribution
    assert report["calibration"]["flagged_rate"] == 0.0
    assert report["calibration"]["ratio_min"] > RATIO_THRESHOLD
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["groups"] == groups
    assert (tmp_path / "demo" / "replication.png").stat().st_size > 0
    assert "replication rate (ratio < 0.5)" in (tmp_path / "demo" / "report.md").read_text()
