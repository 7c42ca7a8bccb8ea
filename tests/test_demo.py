"""The toy world memorizes: `memtrain demo` end to end on the committed toy base (trained once per test
session by conftest's `demo_run`), the detectors' ground truth on the demo's model, and the headline edit
and guard results of docs/results.md on it.

Each test has its own timeout that counts the test alone, not the demo's training (conftest bounds that
with DEMO_TRAIN_TIMEOUT). The bounds are those that held on every machine the demo was measured on
(docs/results.md, "The demo"); each says where it comes from. Measured figures are not asserted."""

import json

import pytest

from trainer.cli import main
from trainer.report.evaluate import evaluate
from trainer.toy.demo import RATIO_THRESHOLD

# the test's own work, on a loaded 2-core machine: generation and evaluation take minutes, training none
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200, func_only=True)]


def test_demo_replicates_duplicated_prompts_not_novel_ones(demo_run):
    out, report = demo_run
    groups = report["groups"]
    # Measured (2400 steps, EMA, ratio < 0.5, guidance 3): duplicated / singleton / novel 97% / 7% / 7% on the
    # machine of record, 84% / 5% / 13% on a fresh one, 75% / 5% / 12% without EMA on a CPU without AVX-512.
    # 0.6 is below the lowest duplicated figure by 15 points (2 of 32 generations ~ 6 points of noise each way);
    # fewer steps or a smaller batch gave 19-28% (docs/results.md), which this must catch.
    assert groups["duplicated"]["fraction_replicated"] >= 0.6
    # memorization, not a criterion that fires everywhere: the highest novel rate measured, 13%, times 4 is
    # 52% < 60%; the 0.01 floor keeps "4x" meaningful when no novel generation replicates
    assert groups["duplicated"]["fraction_replicated"] >= 4 * max(groups["novel"]["fraction_replicated"], 0.01)
    # singletons (100 views each) measured 5-7%: 0.15 is twice the highest, and a model memorizing every
    # training image (the failure this guards against) is far above it
    assert groups["singleton"]["fraction_replicated"] <= 0.15
    # a duplicated prompt brings back ITS image (measured 100%) far more often than a singleton caption does
    # (measured 4%): 0.8 leaves 6 of 32 generations to other images, the factor 5 keeps singletons below 16%
    assert groups["duplicated"]["nearest_is_own_image"] >= 0.8 > 5 * groups["singleton"]["nearest_is_own_image"]
    # what the other prompts replicate are the duplicated images (memorized images leak to related prompts;
    # 18 of 18 on the machine of record): non-empty, so the check below is not vacuous
    leaked = [g for g in report["generations"] if g["group"] != "duplicated" and g["ratio_memorized"]]
    assert leaked, "no singleton or novel generation replicated: the leak this test documents is gone"
    assert all(g["nearest_group"] == "duplicated" for g in leaked), leaked
    # the criterion never fires on real new images of the same distribution (held-out images: exactly 0,
    # the demo's criterion was chosen so; docs/toy-world.md)
    assert report["calibration"]["flagged_rate"] == 0.0
    assert report["calibration"]["ratio_min"] > RATIO_THRESHOLD
    assert (out / "replication.png").stat().st_size > 0
    assert "replication rate (ratio < 0.5)" in (out / "report.md").read_text()


def test_ground_truth_detectors_on_the_demo_model(demo_run, tmp_path):
    """Duplicated vs novel prompts (n = 1) and training vs held-out pairs on the demo's fine-tune
    (EMA weights). Measured on an AMD EPYC at seed 0: Wen first step AUROC 0.993 (TPR@1%FPR 0.81),
    anisotropy 0.988 (0.56), CLiD_th 0.924. The targets were AUROC >= 0.95 with TPR >= 0.8, and
    CLiD >= 0.9. The bounds leave room for machines that train differently: the
    recipe without EMA gave Wen 0.973 / 0.967 AUROC on two machines with TPR 0.50 on both."""
    out, _ = demo_run
    report = evaluate(out / "train" / "pipeline", out / "data" / "labels.jsonl", out=tmp_path / "eval",
                      generate=False, detectors="noise,anisotropy,clid", progress=False)
    detectors = report["trigger"]["detectors"]
    # AUROC 0.95 is the target and held on every machine (lowest measured: 0.967, without EMA). TPR at 1% FPR
    # is 16 duplicated prompts against the 2 highest of 200 novel ones, so one prompt moves it by 0.06: the
    # bounds are the lowest measured (Wen 0.50 without EMA; anisotropy 0.56 at seed 0, 0.69 at others) less
    # a prompt or two; the 0.8 target is not met by anisotropy at every seed (docs/results.md).
    for name, min_tpr in (("noise", 0.5), ("anisotropy", 0.4)):
        assert detectors[name]["auroc"] >= 0.95, (name, detectors[name])
        assert detectors[name]["tpr_at_1fpr"] >= min_tpr, (name, detectors[name])
    membership = report["membership"]
    # CLiD_th measured 0.92-0.93 at three seeds with EMA, 0.898-0.906 without: 0.88 is below both; a model
    # that memorized nothing sits near 0.5. The 16 duplicated images were separated perfectly (1.000) everywhere.
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


def test_uce_edit_removes_the_named_prompts_replication(demo_run, tmp_path):
    """docs/results.md: UCE took the 8 named duplicated prompts from 62.5% replication to 0% (ratio < 1/3)."""
    out, _ = demo_run
    prompts = _named_and_general(out, tmp_path)
    assert main(["edit", "uce", str(out / "train" / "pipeline"), "--memorized", str(tmp_path / "named.txt"),
                 "--preserved", str(tmp_path / "preserved.txt"), "--out", str(tmp_path / "uce"), "--evaluate",
                 str(prompts), "--data", str(out / "data"), "--train-data", str(out / "data" / "train"),
                 "--eval-n", "2", "--guidance-scale", "3", "--eval-detectors", "noise"]) == 0
    evaluation = json.loads((tmp_path / "uce" / "edit.json").read_text())["evaluation"]
    before = evaluation["before"]["replication"]["named"]["fraction_replicated"]
    after = evaluation["after"]["replication"]["named"]["fraction_replicated"]
    # 16 generations each side. Measured 62.5% -> 0%. 0.3 (5 of 16) says the named prompts replicate before
    # the edit, else there is nothing to remove; "at most a quarter" is the headline claim (README), which a
    # UCE that does nothing (after = before) or only dents replication fails
    assert before >= 0.3 and after <= 0.25 * before, (before, after)


def test_amg_guard_stops_the_duplicated_prompts_replicating(demo_run, tmp_path):
    """docs/results.md: AMG with the trigger calibrated on held-out images (pixel index) removes >= 90% of the
    duplicated prompts' index copies, without saturating, and where it never fired the generation is
    bit-equal to unguarded sampling."""
    out, _ = demo_run
    prompts = _named_and_general(out, tmp_path)
    assert main(["index", str(out / "data" / "train"), "--out", str(tmp_path / "index"), "--heldout",
                 str(out / "data" / "heldout"), "--vae", str(out / "train" / "pipeline")]) == 0
    report = evaluate(out / "train" / "pipeline", prompts, data=out / "data", train_data=str(out / "data" / "train"),
                      n=2, guidance_scale=3, detectors="noise", guard="amg", index=tmp_path / "index",
                      out=tmp_path / "eval", progress=False)
    trigger = report["guard"]["groups"]["trigger"]
    unguarded, guarded = (trigger["unguarded"]["fraction_replicated_index"],
                          trigger["guarded"]["fraction_replicated_index"])
    # 32 generations each side; the target: >= 90% of the index copies removed (docs/results.md)
    assert unguarded >= 0.3 and guarded <= 0.1 * unguarded, (unguarded, guarded)
    assert "calibrated at 1.0% false positives" in report["guard"]["trigger"]
    for group in ("trigger", "general"):  # no saturated blotches where the guard fired
        g = report["guard"]["groups"][group]["guarded"]
        assert g["saturation_max"] <= g["unguarded_saturation_max"] + 0.02, g
    # bit-equal where the guard never fired: some general generations were left unguarded (measured: it fired
    # on 67-73% of them), so the maximum is over a non-empty set
    general = report["guard"]["groups"]["general"]["guarded"]
    assert general["fraction_intervened"] < 1, general
    assert general["max_abs_change_not_intervened"] == 0.0, general


def test_dori_retriggers_the_named_prompts_after_uce_and_not_the_control(demo_run, tmp_path):
    """DoRI (Kowalczuk et al. 2026) needs a model that memorizes: the demo's is the only one in the suite whose
    generations copy in pixels (tests/test_dori.py checks the attack's mechanics on a tiny model). After UCE
    removes the 8 named prompts, DoRI's 50 steps bring their copies back, while as many singleton members
    (trained once, not memorized) are not copied from their captions in as many steps: the paper's control."""
    out, _ = demo_run
    prompts = _named_and_general(out, tmp_path)
    labels = [json.loads(line) for line in (out / "data" / "labels.jsonl").read_text().splitlines() if line.strip()]
    singletons = [r for r in labels if r["group"] == "singleton"][:8]
    novel = [r for r in labels if r["group"] == "novel"][100:108]  # the detectors need non-memorized prompts
    heldout = [r for r in labels if r["group"] == "heldout"]  # they calibrate the copy verdict (the default one)
    named = (tmp_path / "named.txt").read_text().splitlines()
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if json.loads(line)["text"] in named]
    attacked = tmp_path / "attacked.jsonl"
    attacked.write_text("".join(json.dumps(r) + "\n" for r in rows + novel + singletons + heldout))
    assert main(["edit", "uce", str(out / "train" / "pipeline"), "--memorized", str(tmp_path / "named.txt"),
                 "--preserved", str(tmp_path / "preserved.txt"), "--out", str(tmp_path / "uce")]) == 0
    report = evaluate(tmp_path / "uce", attacked, out=tmp_path / "eval", data=out / "data", n=1, guidance_scale=3,
                      detectors="noise", attack="dori", dori_steps=50, dori_control_steps=50, batch_size=16,
                      progress=False)
    dori = report["dori"]
    plain, attacked_final = dori["memorized"]["replication"][0], dori["memorized"]["replication"][-1]
    control = dori["control"]["replication"][-1]
    # docs/results.md ("Edits under both attacks"): after UCE the named prompts' copies come back under DoRI
    # (measured on the demo model of branch h23cal: 0% at step 0 -> 75% at 10 -> 87.5% at 50, control 0 of 8;
    # on the unedited model the control reached 1 of 8 at step 50); the bound asks for a re-trigger of at
    # least 3 of the 8 prompts' generations above step 0 and a control of at most 1 of 8
    assert attacked_final >= plain + 3 / 8 and control <= 1 / 8, (dori["memorized"], dori["control"])
