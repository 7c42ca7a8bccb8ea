"""The toy world memorizes: `memtrain demo` end to end on the committed toy base (trained once for every
test here), the detectors' ground truth on the demo's model, and the headline edit and guard results
of docs/results.md on it."""

import json

import pytest

from trainer.toy.demo import RATIO_THRESHOLD, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, progress=False)


@pytest.mark.slow
def test_demo_replicates_duplicated_prompts_not_novel_ones(demo):
    out, report = demo
    groups = report["groups"]
    # measured on an AMD EPYC (2400 steps, EMA): duplicated 97%, singleton 7%, novel 7% (ratio < 0.5, guidance 3)
    assert groups["duplicated"]["fraction_replicated"] >= 0.6
    assert groups["duplicated"]["fraction_replicated"] >= 4 * max(groups["novel"]["fraction_replicated"], 0.01)
    assert groups["singleton"]["fraction_replicated"] <= 0.15
    # a duplicated prompt brings back ITS image far more often than a singleton caption does
    assert groups["duplicated"]["nearest_is_own_image"] >= 0.8 > 5 * groups["singleton"]["nearest_is_own_image"]
    # what the other prompts replicate are the duplicated images (memorized images leak to related prompts)
    leaked = [g for g in report["generations"] if g["group"] != "duplicated" and g["ratio_memorized"]]
    assert all(g["nearest_group"] == "duplicated" for g in leaked), leaked
    # the criterion never fires on real new images of the same distribution
    assert report["calibration"]["flagged_rate"] == 0.0
    assert report["calibration"]["ratio_min"] > RATIO_THRESHOLD
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["groups"] == groups
    assert (out / "replication.png").stat().st_size > 0
    assert "replication rate (ratio < 0.5)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_ground_truth_detectors_on_the_demo_model(demo, tmp_path):
    """Duplicated vs novel prompts (n = 1) and training vs held-out pairs on the demo's fine-tune
    (EMA weights). Measured on an AMD EPYC at seed 0: Wen first step AUROC 0.993 (TPR@1%FPR 0.81),
    anisotropy 0.988 (0.56), CLiD_th 0.924. The targets were AUROC >= 0.95 with TPR >= 0.8, and
    CLiD >= 0.9. The bounds leave room for machines that train differently: the
    recipe without EMA gave Wen 0.973 / 0.967 AUROC on two machines with TPR 0.50 on both."""
    from trainer.report.evaluate import evaluate

    out, _ = demo
    report = evaluate(out / "train" / "pipeline", out / "data" / "labels.jsonl", out=tmp_path / "eval",
                      generate=False, detectors="noise,anisotropy,clid", progress=False)
    detectors = report["trigger"]["detectors"]
    for name, min_tpr in (("noise", 0.5), ("anisotropy", 0.4)):
        assert detectors[name]["auroc"] >= 0.95, (name, detectors[name])
        assert detectors[name]["tpr_at_1fpr"] >= min_tpr, (name, detectors[name])
    membership = report["membership"]
    assert membership["scores"]["clid_th"]["auroc"] >= 0.88
    assert membership["by_group"]["duplicated"]["clid_th"] >= 0.99


def _named_and_general(out, tmp_path):
    rows = [json.loads(line) for line in (out / "data" / "labels.jsonl").read_text().splitlines() if line.strip()]
    duplicated = [r for r in rows if r["group"] == "duplicated"]
    novel = [r for r in rows if r["group"] == "novel"]
    (tmp_path / "named.txt").write_text("".join(r["text"] + "\n" for r in duplicated[:8]))
    (tmp_path / "preserved.txt").write_text("".join(r["text"] + "\n" for r in novel[:32]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in duplicated + novel[100:132]))
    return prompts


@pytest.mark.slow
def test_uce_edit_removes_the_named_prompts_replication(demo, tmp_path):
    """docs/results.md: UCE took the 8 named duplicated prompts from 62.5% replication to 0% (ratio < 1/3)."""
    from trainer.cli import main

    out, _ = demo
    prompts = _named_and_general(out, tmp_path)
    assert main(["edit", "uce", str(out / "train" / "pipeline"), "--memorized", str(tmp_path / "named.txt"),
                 "--preserved", str(tmp_path / "preserved.txt"), "--out", str(tmp_path / "uce"), "--evaluate",
                 str(prompts), "--data", str(out / "data"), "--train-data", str(out / "data" / "train"),
                 "--eval-n", "2", "--guidance-scale", "3", "--eval-detectors", "noise"]) == 0
    evaluation = json.loads((tmp_path / "uce" / "edit.json").read_text())["evaluation"]
    before = evaluation["before"]["replication"]["named"]["fraction_replicated"]
    after = evaluation["after"]["replication"]["named"]["fraction_replicated"]
    assert before >= 0.3 and after <= 0.25 * before, (before, after)


@pytest.mark.slow
def test_amg_guard_stops_the_duplicated_prompts_replicating(demo, tmp_path):
    """docs/results.md: AMG with the trigger calibrated on held-out images (pixel index) removes >= 90% of the
    duplicated prompts' index copies, without saturating, and where it never fired the generation is
    bit-equal to unguarded sampling."""
    from trainer.cli import main
    from trainer.report.evaluate import evaluate

    out, _ = demo
    prompts = _named_and_general(out, tmp_path)
    assert main(["index", str(out / "data" / "train"), "--out", str(tmp_path / "index"), "--heldout",
                 str(out / "data" / "heldout"), "--vae", str(out / "train" / "pipeline")]) == 0
    report = evaluate(out / "train" / "pipeline", prompts, data=out / "data", train_data=str(out / "data" / "train"),
                      n=2, guidance_scale=3, detectors="noise", guard="amg", index=tmp_path / "index",
                      out=tmp_path / "eval", progress=False)
    trigger = report["guard"]["groups"]["trigger"]
    unguarded, guarded = (trigger["unguarded"]["fraction_replicated_index"],
                          trigger["guarded"]["fraction_replicated_index"])
    assert unguarded >= 0.3 and guarded <= 0.1 * unguarded, (unguarded, guarded)
    assert "calibrated at 1.0% false positives" in report["guard"]["trigger"]
    for group in ("trigger", "general"):
        g = report["guard"]["groups"][group]["guarded"]
        assert g["saturation_max"] <= g["unguarded_saturation_max"] + 0.02, g
    assert report["guard"]["groups"]["general"]["guarded"]["max_abs_change_not_intervened"] in (0.0, None)
