"""The calibrated copy verdict: thresholds chosen at a stated false-positive rate on held-out images decide
"copy" in `evaluate` (and its attack, guard and edit reports), name themselves in the report's first lines,
and say "uncalibrated" when there are no held-out images; detectors flag prompts at a threshold calibrated on
the non-memorized prompts. Real VAE (the toy base's), real images, no mocks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.measure.calibration import Calibration, calibrate
from trainer.measure.embedders import make_embedder
from trainer.measure.replication import replication_metrics, vae_roundtrip
from trainer.measure.verdict import GRADIENT_METRIC, L2_METRIC, RATIO_METRIC, verdict_scores
from trainer.report.evaluate import grid_picks
from trainer.report.sections import detector_verdict, replication_verdict
from trainer.toy import world as toy_world
from trainer.toy.base import TOY_BASE

FAST = ["--steps", "2", "-n", "1", "--batch-size", "64", "--detectors", "noise"]
SHIFTS = [(0, 0), (0, 3), (3, 0), (0, -3)]  # four related crops of a scene: the training family
HELD_SHIFTS = [(2, 2), (-3, 1)]  # never-trained crops of the same scenes


def _image(scene, rng: random.Random) -> torch.Tensor:
    return torch.from_numpy(np.asarray(toy_world.render(scene, rng), dtype=np.float32) / 255).permute(2, 0, 1)


def _family_world(n_scenes: int, seed: int = 0):
    """Training images in families (shifted crops of one scene, as photos of one object), held-out crops of the
    same scenes, and images of new scenes."""
    rng = random.Random(seed)
    bases = [_image(toy_world.random_scene(rng), rng) for _ in range(2 * n_scenes)]
    crop = lambda x, s: torch.roll(x, shifts=s, dims=(1, 2))  # noqa: E731
    train = torch.stack([crop(b, s) for b in bases[:n_scenes] for s in SHIFTS])
    related = torch.stack([crop(b, s) for b in bases[:n_scenes] for s in HELD_SHIFTS])
    new = torch.stack(bases[n_scenes:])
    return train, related, new


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = load_pipeline(TOY_BASE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibrated_verdict_flags_copies_in_a_family_world_and_holds_its_rate(toy_pipe):
    train, related, new = _family_world(40)
    references = vae_roundtrip(toy_pipe, train)
    # the null: half of the held-out images (related crops and new scenes), the other half checks the rate
    calib = torch.cat([related[::2], new[::2]])
    fresh = torch.cat([related[1::2], new[1::2]])
    verdict = replication_verdict(toy_pipe, references, train, calib, fpr=0.02)
    cal = verdict["calibration"]
    assert cal.metric == GRADIENT_METRIC and cal.calibrated and cal.n_heldout == len(calib)
    assert cal.fpr_heldout <= 0.02 and cal.n_positive == len(train) and cal.recall is not None
    assert set(verdict["record"]["alternatives"]) == {GRADIENT_METRIC, L2_METRIC, RATIO_METRIC}

    # planted copies: training images with small pixel noise, through the VAE (what a generated copy looks like)
    g = torch.Generator().manual_seed(0)
    noisy = (train[::4] + 0.03 * torch.randn(train[::4].shape, generator=g)).clamp(0, 1)
    copies = vae_roundtrip(toy_pipe, noisy)
    scores = verdict_scores(copies, references, cal)
    assert cal.flags(scores).all(), (cal, scores)
    # the held-out crops of the training scenes are the close ones: the threshold comes from them
    related_l2 = replication_metrics(vae_roundtrip(toy_pipe, related), references)["l2"].numpy()
    new_l2 = replication_metrics(vae_roundtrip(toy_pipe, new), references)["l2"].numpy()
    assert np.median(related_l2) < np.median(new_l2)
    assert verdict["record"]["heldout_in_training"] == 0
    # training images passed as held-out by mistake are counted (the report says to remove them)
    mixed = replication_verdict(toy_pipe, references, train, torch.cat([calib, train[:5]]), fpr=0.02)
    assert mixed["record"]["heldout_in_training"] == 5
    # an earlier verdict is reused for the same VAE (even without held-out images), recalibrated for another
    again = replication_verdict(toy_pipe, references, train, None, reuse=verdict["record"])
    assert again["calibration"] == cal and again["record"]["reused"].startswith("the earlier report's")
    other = replication_verdict(toy_pipe, references, train, calib, fpr=0.02, reuse={**verdict["record"], "vae": "x"})
    assert other["record"]["reused"].startswith("not reused") and other["calibration"] == cal
    # and the calibrated threshold does not flag more fresh held-out images than the stated rate allows
    # (2% of 80, binomial slack of two standard deviations)
    fresh_scores = verdict_scores(vae_roundtrip(toy_pipe, fresh), references, cal)
    assert cal.flags(fresh_scores).mean() <= 0.02 + 2 * np.sqrt(0.02 * 0.98 / len(fresh))


def test_detector_verdict_threshold_recall_and_flagged_prompts():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(3.0, 0.5, 20), rng.normal(1.0, 0.5, 300)])
    labels = np.array([1] * 20 + [0] * 300)
    v = detector_verdict(scores, labels, "noise", fpr=0.01)
    cal = Calibration.from_dict(v["calibration"])
    assert cal == calibrate(scores[labels == 0], "noise", True, 0.01, scores[labels == 1], "memorized prompts")
    assert (scores[labels == 0] > cal.threshold).sum() == 3  # floor(1% of 300)
    assert v["flagged"] == np.flatnonzero(scores > cal.threshold).tolist()
    assert cal.recall == np.mean(scores[labels == 1] > cal.threshold) > 0.5
    unlabelled = detector_verdict(scores, None, "noise")
    assert unlabelled["calibration"] is None and "uncalibrated" in unlabelled["verdict"] and not unlabelled["flagged"]


def _first_lines(path, n: int = 4) -> str:
    return "\n".join(path.read_text().splitlines()[:n])


def test_evaluate_names_its_verdict_calibrated_or_not(tmp_path, tiny_model, tiny_data):
    labels = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines() if line.strip()]
    no_heldout = tmp_path / "no_heldout.jsonl"
    no_heldout.write_text("".join(json.dumps(r) + "\n" for r in labels if r["group"] != "heldout"))

    # without held-out images: Gu et al.'s ratio, said to be uncalibrated in the first lines
    out = tmp_path / "uncal"
    assert main(["evaluate", str(tiny_model), "--prompts", str(no_heldout), "--data", str(tiny_data),
                 "--train-data", str(tiny_data / "train"), "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["verdict"]["calibrated"]
    assert report["verdict"]["calibration"]["metric"] == RATIO_METRIC
    assert "uncalibrated" in _first_lines(out / "report.md") and "ratio < 0.3333" in _first_lines(out / "report.md")
    gens = report["replication"]["generations"]
    assert [g["replicated"] for g in gens] == [g["ratio"] < 1 / 3 for g in gens]

    # with --heldout DIR (the toy held-out split) and every generation group
    out = tmp_path / "cal"
    assert main(["evaluate", str(tiny_model), "--prompts", str(no_heldout), "--data", str(tiny_data),
                 "--train-data", str(tiny_data / "train"), "--heldout", str(tiny_data / "heldout"), "--out", str(out),
                 "--groups", "trigger,general,member,heldout", "--fpr", "0.05", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    v = report["verdict"]
    assert v["calibrated"] and v["calibration"]["n_heldout"] == 4 and v["calibration"]["fpr_target"] == 0.05
    assert v["calibration"]["metric"] == GRADIENT_METRIC and "--heldout" in v["heldout_from"]
    assert v["criterion"] in _first_lines(out / "report.md")
    rep = report["replication"]
    # no held-out rows in this prompt file: the held-out group is generated from --heldout DIR's captions
    assert set(rep["groups"]) == {"trigger", "general", "member", "heldout"}
    heldout_captions = [json.loads(line)["text"] for line in (tiny_data / "heldout" / "metadata.jsonl").read_text()
                        .splitlines() if line.strip()]
    assert [g["text"] for g in rep["generations"] if g["group"] == "heldout"] == heldout_captions  # n = 1
    for g in rep["generations"]:
        assert g["score"] == g["gradient_ratio"] and g["replicated"] == (g["score"] < v["calibration"]["threshold"])
    assert (out / "replicated.png").is_file()
    # the detector's verdict: its threshold flags at most 5% of the non-memorized prompts' scores
    d = report["trigger"]["detectors"]["noise"]
    prompts = report["trigger"]["prompts"]
    negatives = [p["scores"]["noise"] for p in prompts if p["label"] == 0]
    assert d["calibration"]["threshold"] == max(negatives)  # 4 negatives: floor(5% of 4) = 0 may be flagged
    assert d["flagged"] == [i for i, p in enumerate(prompts) if p["scores"]["noise"] > max(negatives)]


def test_heldout_rows_are_generated_and_judged(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--train-data",
                 str(tiny_data / "train"), "--out", str(out), "--groups", "trigger,heldout", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["calibrated"] and "member-0 rows" in report["verdict"]["heldout_from"]
    groups = [g["group"] for g in report["replication"]["generations"]]
    assert groups == ["trigger"] * 2 + ["heldout"] * 4
    assert "| heldout | 4 |" in (out / "report.md").read_text()


def test_a_user_without_memorized_labels_gets_flagged_prompts(tmp_path, tiny_model, tiny_data):
    """Known non-memorized prompts (label 0) beside unlabelled prompts to judge: the detector's threshold is
    calibrated on the former, and the prompts above it are flagged."""
    labels = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines() if line.strip()]
    rows = [{"text": r["text"], "label": 0} for r in labels if r["group"] == "novel"]
    rows += [{"text": r["text"]} for r in labels if r["group"] in ("duplicated", "singleton")]
    prompts = tmp_path / "judge.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--no-generate",
                 *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    trigger = report["trigger"]
    assert not trigger["labelled"] and trigger["n_prompts"] == len(rows)
    d = trigger["detectors"]["noise"]
    scores = np.array([p["scores"]["noise"] for p in trigger["prompts"]])
    reference = scores[[p["label"] == 0 for p in trigger["prompts"]]]
    assert d["calibration"]["n_heldout"] == 4 and d["calibration"]["threshold"] == reference.max()
    assert d["flagged"] == np.flatnonzero(scores > reference.max()).tolist()
    assert all(trigger["prompts"][i]["label"] is None for i in d["flagged"])
    md = (out / "report.md").read_text()
    assert "known non-memorized prompts (label 0) calibrate" in md and d["verdict"] in md


def test_replicated_png_shows_both_sides_of_the_line():
    order = list(range(40))  # most copy-like first
    picks = grid_picks(order, [i < 20 for i in order])
    assert picks[:8] == list(range(8))  # the most copy-like
    assert picks[8:12] == [16, 17, 18, 19] and picks[12:] == [20, 21, 22, 23]  # the last copies, the first passes
    assert grid_picks(order, [False] * 40) == list(range(16))
    assert grid_picks(order[:5], [True] * 5) == list(range(5))


def test_gradients_embedding_tells_copies_from_relatives(toy_pipe):
    """The `gradients` index embedding: a decoded copy of a training image is nearer it than any related crop
    of the same scene is to its nearest training crop."""
    train, related, _ = _family_world(20, seed=1)
    g = torch.Generator().manual_seed(0)
    copies = vae_roundtrip(toy_pipe, (train[::4] + 0.03 * torch.randn(train[::4].shape, generator=g)).clamp(0, 1))
    references, relatives = vae_roundtrip(toy_pipe, train), vae_roundtrip(toy_pipe, related)
    embed = make_embedder("gradients")
    assert embed.dim == embed(train[:1]).shape[1] and torch.allclose(embed(train).norm(dim=1), torch.ones(len(train)))
    refs = embed(references)
    copy_sim = (embed(copies) @ refs.T).max(1).values
    relative_sim = (embed(relatives) @ refs.T).max(1).values
    assert copy_sim.min() > relative_sim.max(), (copy_sim, relative_sim)
