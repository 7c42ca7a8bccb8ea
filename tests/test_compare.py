"""`memtrain compare`: plain vs mitigated on a tiny model, the recipe overlay, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.config import apply_overrides, load_recipe, read_recipe_tree
from trainer.io import MemtrainError
from trainer.measure.verdict import GRADIENT_METRIC
from trainer.mitigate.presets import PRESETS
from trainer.recipe import TrainRecipe
from trainer.toy import world as toy_world
from trainer.toy.base import TinySize, build_components, build_tokenizer, save_pipeline
from trainer.toy.compare import (
    MITIGATED_RECIPE,
    PLAIN_RECIPE,
    compare,
    match_exposure,
    monitor_curves,
    parse_alone,
    plan_runs,
)
from trainer.toy.render import compare_markdown
from trainer.tracking import read_jsonl

# 32 px like the toy data (the replication study compares generations with the training images as they are)
TINY32 = TinySize(image_size=32, vae_channels=(16, 32, 32), latent_channels=4, unet_channels=(32, 32), text_dim=32,
                  text_layers=1, text_heads=2, attention_head_dim=2)
DATA = toy_world.ToyDataConfig(seed=3, n_duplicated=2, copies=4, n_singletons=8, n_heldout=4, n_novel=4)
TINY_RUN = ["train.max_steps=4", "train.batch_size=4", "train.learning_rate=1e-3", "checkpoint.every_steps=4",
            "log.every_steps=1", "monitor.every_steps=2", "monitor.members=8", "monitor.heldout_count=4",
            "monitor.novel_count=4", "monitor.batch_size=8"]


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny32"
    save_pipeline(build_components(build_tokenizer(toy_world.vocabulary()), TINY32, seed=0), out)
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny32) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare") / "out"
    report = compare(out, tiny32, alone="rt", n=1, overrides=TINY_RUN, steps=2, data_config=DATA, progress=False)
    return out, report


def test_mitigated_recipe_is_the_plain_one_plus_mitigations():
    plain = load_recipe(TrainRecipe, PLAIN_RECIPE)
    mitigated = load_recipe(TrainRecipe, MITIGATED_RECIPE)
    mitigated.validate()
    for key in ("max_steps", "batch_size", "learning_rate", "lr_scheduler", "seed"):
        assert getattr(mitigated.train, key) == getattr(plain.train, key)
    assert mitigated.data.dedup == "drop" and plain.data.dedup == "none"
    assert mitigated.data.captions.enabled and not plain.data.captions.enabled
    assert mitigated.monitor.every_steps > 0 and plain.monitor.every_steps == 0
    # the overlay holds no training keys of its own: the steps come from toy.yaml
    overlay = MITIGATED_RECIPE.read_text()
    assert "extends: toy.yaml" in overlay and "max_steps" not in overlay
    assert read_recipe_tree(MITIGATED_RECIPE)["train"] == read_recipe_tree(PLAIN_RECIPE)["train"]


def test_each_alone_run_gets_only_its_own_mitigation(tmp_path, tiny32):
    """Regression: the overrides of one run must not leak into the next (nested recipe sections were
    shared between the trees of the runs, so `--alone dedup,rt,cwr` trained cwr with all three)."""
    runs = plan_runs(tmp_path, tiny32, parse_alone("dedup,rt,cwr"), [], PLAIN_RECIPE, MITIGATED_RECIPE, False)
    got = {r["name"]: (r["recipe"].data.dedup, r["recipe"].data.captions.random_token_p,
                       r["recipe"].data.captions.word_repeat_p) for r in runs}
    assert got == {"plain": ("none", 0.0, 0.0), "mitigated": ("drop", 0.1, 0.1), "dedup": ("drop", 0.0, 0.0),
                   "rt": ("none", 0.1, 0.0), "cwr": ("none", 0.0, 0.1)}
    tree = read_recipe_tree(MITIGATED_RECIPE)
    before = json.dumps(tree, sort_keys=True)
    apply_overrides(tree, ["data.dedup=none", "monitor.members=3"])
    assert json.dumps(tree, sort_keys=True) == before  # overrides apply to a copy, nested sections too


def test_extends_resolves_relative_and_rejects_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  max_steps: 7\n  batch_size: 3\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ntrain:\n  batch_size: 5\n")
    recipe = load_recipe(TrainRecipe, tmp_path / "b.yaml", ["train.learning_rate=0.5"])
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.train.learning_rate) == (7, 5, 0.5)
    (tmp_path / "c.yaml").write_text("extends: d.yaml\n")
    (tmp_path / "d.yaml").write_text("extends: c.yaml\n")
    with pytest.raises(MemtrainError, match="cycle"):
        load_recipe(TrainRecipe, tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(MemtrainError, match="missing.yaml"):
        load_recipe(TrainRecipe, tmp_path / "e.yaml")


def test_compare_writes_both_runs_side_by_side(compared):
    out, report = compared
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["plain", "mitigated", "rt"]
    # same data, same number of optimizer steps
    assert runs["plain"]["steps"] == runs["mitigated"]["steps"] == runs["rt"]["steps"] == 4
    # de-duplication really dropped the planted copies: 2 images x 4 copies -> 2 rows
    assert runs["plain"]["data"]["trained_rows"] == runs["plain"]["data"]["rows"] == 2 * 4 + 8
    assert runs["mitigated"]["data"]["trained_rows"] == 2 + 8
    assert runs["rt"]["data"]["trained_rows"] == 16 and runs["rt"]["mitigation"] == PRESETS["rt"]
    assert runs["mitigated"]["captions"] == {"random_token_p": 0.1, "word_repeat_p": 0.1}
    # and the mitigated run trained on the de-duplicated rows: its member probe names each image once
    probe = json.loads((out / "runs" / "mitigated" / "monitor.json").read_text())["probe"]["members"]
    dup_captions = {r["text"] for r in toy_world.read_labels(out / "data" / "labels.jsonl") if r["group"] == "duplicated"}
    assert sum(m["caption"] in dup_captions for m in probe) <= 2
    assert len({m["name"] for m in probe}) == len(probe) == 8

    table = (out / "compare.md").read_text()
    assert "| plain | 4 | 16 |" in table and "| mitigated | 4 | 10 |" in table
    assert "## Each mitigation on its own" in table and "| rt | 4 | 16 |" in table
    assert json.loads((out / "compare.json").read_text())["runs"][1]["name"] == "mitigated"
    with Image.open(out / "clid_curves.png") as png:
        assert png.size[0] > 200 and png.size[1] > 150
    for r in runs.values():
        assert r["replication"]["duplicated"]["generations"] == 2  # 2 prompts x n=1
        assert 0.0 <= r["general"]["toy_alignment"] <= 1.0 and "kid" in r["general"]
        assert (out / "runs" / r["name"] / "report" / "report.md").exists()
        assert r["monitor_cost"]["calls"] == 2 and r["monitor_cost"]["seconds"] > 0
    # each generation names the group of its nearest training image: the nearest image of a
    # duplicated prompt's generation that is its own image is a duplicated one
    gens = json.loads((out / "runs" / "plain" / "report" / "report.json").read_text())["generations"]
    assert {g["nearest_group"] for g in gens} <= {"duplicated", "singleton"}
    # every training image is some prompt's source here, so every generation's nearest image has a known group
    source_group = {g["source"]: g["group"] for g in gens if g["source"] >= 0}
    assert gens and all(g["nn_index"] in source_group for g in gens)
    assert [g["nearest_group"] for g in gens] == [source_group[g["nn_index"]] for g in gens]
    assert all(g["nearest_is_source"] == (g["nn_index"] == g["source"]) for g in gens)
    # beside the study's criterion, evaluate's default verdict calibrated on the data's held-out images
    study = json.loads((out / "runs" / "plain" / "report" / "report.json").read_text())
    verdict = study["verdict"]
    assert verdict["calibrated"] and verdict["metric"] == GRADIENT_METRIC and verdict["n_heldout"] > 0
    assert [g["verdict_copy"] for g in gens] == [g["gradient_ratio"] < verdict["threshold"] for g in gens]
    dup = [g["verdict_copy"] for g in gens if g["group"] == "duplicated"]
    assert runs["plain"]["replication"]["duplicated"]["fraction_verdict"] == sum(dup) / len(dup)
    assert "copies (verdict)" in table and study["verdict_text"] in (out / "runs" / "plain" / "report" / "report.md").read_text()


def test_exposure_per_distinct_image_and_the_membership_verdict(compared):
    """16 draws (4 steps x batch 4): the plain run over 16 rows sees a lone image once and a duplicated one
    (4 copies) 4 times; the de-duplicated run over 10 rows sees every distinct image 1.6 times. When CLiD
    rises while duplicated replication falls, the verdict line says so and names the exposure."""
    out, report = compared
    runs = {r["name"]: r["data"]["exposure"] for r in report["runs"]}
    assert {k: runs["plain"][k] for k in ("samples", "distinct_images", "views_median", "views_max")} == {
        "samples": 16, "distinct_images": 10, "views_median": 1.0, "views_max": 4.0}
    assert runs["mitigated"]["distinct_images"] == 10 and runs["mitigated"]["trained_rows"] == 10
    assert runs["mitigated"]["views_median"] == pytest.approx(1.6) == runs["mitigated"]["views_max"]
    assert runs["rt"]["views_median"] == 1.0
    md = (out / "compare.md").read_text()
    assert "| plain | 4 | 16 | 1, 4 |" in md and "| mitigated | 4 | 10 | 1.6, 1.6 |" in md

    plain, mitigated = report["runs"][0], report["runs"][1]
    verdict = next(line for line in md.splitlines() if line.startswith("- mitigated vs plain:"))
    assert f"CLiD AUC {plain['final_monitor']['clid_auc']:.3f} -> {mitigated['final_monitor']['clid_auc']:.3f}" in verdict
    rose = copy.deepcopy(report)  # the situation of the issue: replication fell, membership rose
    rose["runs"][0]["replication"]["duplicated"]["fraction_replicated"] = 1.0
    rose["runs"][1]["replication"]["duplicated"]["fraction_replicated"] = 0.0
    rose["runs"][1]["final_monitor"]["clid_auc"] = rose["runs"][0]["final_monitor"]["clid_auc"] + 0.1
    verdict = next(line for line in compare_markdown(rose).splitlines() if line.startswith("- mitigated vs plain:"))
    assert "membership rose while replication fell" in verdict
    assert "1.6 times vs 1 (1.6x as often" in verdict and "--match epochs" in verdict
    rose["match"] = "epochs"
    verdict = next(line for line in compare_markdown(rose).splitlines() if line.startswith("- mitigated vs plain:"))
    assert "at matched exposure" in verdict
    fell = copy.deepcopy(rose)
    fell["runs"][1]["final_monitor"]["clid_auc"] = fell["runs"][0]["final_monitor"]["clid_auc"] - 0.1
    fell["runs"][1]["final_monitor"]["clid_tpr_at_1fpr"] = fell["runs"][0]["final_monitor"]["clid_tpr_at_1fpr"]
    assert "membership rose" not in compare_markdown(fell)


def test_match_epochs_gives_each_run_the_plain_runs_views_per_distinct_image(tmp_path, tiny32):
    """`--match epochs`: 8 plain steps of batch 4 over 16 rows = 2 views of a lone image; the de-duplicated
    (10 rows) and the reweighted run (weights summing to 10) reach 2 views in 5 steps, rt keeps 8."""
    toy_world.make_toy_data(tmp_path / "data", DATA)
    runs = plan_runs(tmp_path, tiny32, parse_alone("rt,reweight"), [*TINY_RUN, "train.max_steps=8"], PLAIN_RECIPE,
                     MITIGATED_RECIPE, False, match="epochs")
    rows = match_exposure(runs, "epochs")
    assert {r["name"]: r["recipe"].train.max_steps for r in runs} == {"plain": 8, "mitigated": 5, "rt": 8,
                                                                       "reweight": 5}
    assert {name: r["exposure"]["views_median"] for name, r in rows.items()} == pytest.approx(
        {"plain": 2.0, "mitigated": 2.0, "rt": 2.0, "reweight": 2.0})
    different = tmp_path / "other.yaml"  # steps of their own: refused when steps are matched, not with epochs
    different.write_text(f"extends: {MITIGATED_RECIPE}\ntrain:\n  max_steps: 3\n")
    with pytest.raises(MemtrainError, match="max_steps"):
        plan_runs(tmp_path, tiny32, [], [], PLAIN_RECIPE, different, False)
    assert len(plan_runs(tmp_path, tiny32, [], [], PLAIN_RECIPE, different, False, match="epochs")) == 2
    runs = plan_runs(tmp_path, tiny32, [], TINY_RUN, PLAIN_RECIPE, MITIGATED_RECIPE, False)
    assert [r["recipe"].train.max_steps for r in runs] == [4, 4]
    assert match_exposure(runs, "steps")["mitigated"]["exposure"]["views_median"] == pytest.approx(1.6)


def test_clid_values_are_those_of_each_runs_jsonl_and_monitor(compared):
    out, report = compared
    for r in report["runs"]:
        rows = [row for row in read_jsonl(out / "runs" / r["name"] / "logs" / "metrics.jsonl")
                if "monitor/clid_auc" in row]
        assert [c["step"] for c in r["curves"]] == [row["step"] for row in rows] == [2, 4]
        assert [c["clid_auc"] for c in r["curves"]] == [row["monitor/clid_auc"] for row in rows]
        assert r["final_monitor"]["clid_tpr_at_1fpr"] == rows[-1]["monitor/clid_tpr_at_1fpr"]
        history = json.loads((out / "runs" / r["name"] / "monitor.json").read_text())["history"]
        assert [h["clid_auc"] for h in history] == pytest.approx([c["clid_auc"] for c in r["curves"]])
        assert f"{r['final_monitor']['clid_auc']:.3f}" in (out / "compare.md").read_text()


def test_monitor_keeps_training_identical(compared):
    """The plain run of the comparison (monitor on) is the demo's plain training: the monitor restores
    the RNG, so its final weights equal an unmonitored run's."""
    from safetensors.torch import load_file

    from trainer.training.loop import train

    out, report = compared
    plain = next(r for r in report["runs"] if r["name"] == "plain")
    recipe = load_recipe(TrainRecipe, PLAIN_RECIPE, [
        f"model.pretrained={report['base']}", f"data.path={out / 'data' / 'train'}",
        f"output.dir={out / 'unmonitored'}", "log.progress=false", *TINY_RUN, "monitor.every_steps=0"])
    train(recipe)
    a = load_file(Path(plain["output_dir"]) / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unmonitored" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_monitor_curves_reads_only_monitor_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 4, "monitor/clid_auc": 0.7, "monitor/seconds": 1.0}\n'
                    '{"step": 2, "monitor/clid_auc": 0.6}\n')
    assert monitor_curves(path) == [{"step": 2, "clid_auc": 0.6}, {"step": 4, "clid_auc": 0.7, "seconds": 1.0}]


def test_unknown_alone_name_fails_listing_the_valid_ones(tmp_path, capsys, tiny32):
    assert parse_alone("RT, cwr,rt") == [("rt", PRESETS["rt"]), ("cwr", PRESETS["cwr"])]
    assert parse_alone("all") == [(name, overrides) for name, overrides in PRESETS.items()]
    custom = "mask3:train.loss_mask_threshold=3.0 train.seed=1"
    assert parse_alone(f"rt,{custom}") == [("rt", PRESETS["rt"]),
                                           ("mask3", ["train.loss_mask_threshold=3.0", "train.seed=1"])]
    for bad, message in (("plain:train.seed=1", "the name 'plain' is taken"), ("x:train.seed", "NAME:key=value"),
                         ("rt,rt:train.seed=2", "the name 'rt' is taken")):
        with pytest.raises(MemtrainError, match=message):
            parse_alone(bad)
    code = main(["compare", "--out", str(tmp_path / "out"), "--base", str(tiny32), "--alone", "rt,nope"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown mitigation 'nope'" in err
    assert all(name in err for name in PRESETS)
    assert not (tmp_path / "out").exists()


def test_bad_input_fails_before_writing(tmp_path, capsys, tiny32):
    out = tmp_path / "out"
    assert main(["compare", "--out", str(out), "--base", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["compare", "--out", str(out), "--base", str(tiny32), "monitor.every_steps=0"]) == 2
    assert "monitor.every_steps" in capsys.readouterr().err
    assert main(["compare", "--out", str(out), "--base", str(tiny32), "train.lerning_rate=1"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    different = tmp_path / "other.yaml"
    different.write_text(f"extends: {MITIGATED_RECIPE}\ntrain:\n  max_steps: 3\n")
    with pytest.raises(MemtrainError, match="max_steps"):
        compare(out, tiny32, mitigated_recipe=different, progress=False)
    assert not out.exists()
