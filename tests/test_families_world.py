"""The families world: deterministic, related families, Zipf duplicate counts, the labels schema
every command reads, and `memtrain toy-data --world families`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.config import load_recipe
from trainer.core.components import load_pipeline
from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration
from trainer.measure.replication import replication_metrics, unique_images, vae_roundtrip
from trainer.measure.verdict import GRADIENT_METRIC, L2_METRIC, verdict_scores
from trainer.prompts import read_labelled_prompts
from trainer.recipe import TrainRecipe
from trainer.report.sections import replication_verdict
from trainer.sample.generate import generate_images
from trainer.toy import families
from trainer.toy.base import TOY_BASE, build_tokenizer
from trainer.toy.checker import is_toy_caption_set
from trainer.toy.study import load_image_dir
from trainer.toy.world import read_labels, vocabulary
from trainer.training.loop import train

SMALL = dict(n_families=4, n_duplicated=5, max_copies=16, min_copies=3, n_singletons=24, n_heldout=12, n_novel=8)


def digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "data"
    return out, families.make_families_data(out, families.FamiliesConfig(seed=3, **SMALL))


def test_deterministic_from_the_seed(small, tmp_path):
    out, summary = small
    again = families.make_families_data(tmp_path / "again", families.FamiliesConfig(seed=3, **SMALL))
    assert digest(tmp_path / "again") == digest(out) and again == dict(summary, out=str(tmp_path / "again"))
    families.make_families_data(tmp_path / "other", families.FamiliesConfig(seed=4, **SMALL))
    assert digest(tmp_path / "other") != digest(out)


def test_duplicate_counts_are_zipf_and_copies_identical(small):
    out, summary = small
    copies = families.zipf_copies(families.FamiliesConfig(**SMALL))
    assert copies == [16, 8, 5, 4, 3]  # round(16 / k), at least 3
    assert summary["copies"] == copies
    labels = read_labels(out / "labels.jsonl")
    train = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(train) == sum(copies) + SMALL["n_singletons"] == summary["train_images"]
    dup = [r for r in labels if r["group"] == "duplicated"]
    assert [r["copies"] for r in dup] == copies
    for row in dup:
        rows = [t for t in train if t["text"] == row["text"]]
        assert len(rows) == row["copies"]
        assert len({(out / "train" / t["file_name"]).read_bytes() for t in rows}) == 1
    for row in (r for r in labels if r["group"] == "singleton"):
        assert sum(t["text"] == row["text"] for t in train) == 1
    # the default: 64 ... 4 copies, as in the training set
    assert families.zipf_copies(families.FamiliesConfig())[::15] == [64, 4]


def test_labels_schema_every_command_reads(small):
    out, _ = small
    labels = read_labels(out / "labels.jsonl")
    groups = {g: [r for r in labels if r["group"] == g] for g in ("duplicated", "singleton", "heldout", "novel")}
    assert [len(v) for v in groups.values()] == [5, 24, 12, 8]
    assert len({r["text"] for r in labels}) == len(labels)  # every caption unique
    for r in labels:
        assert (r["file_name"] is None) == (r["group"] == "novel")
        if r["file_name"]:
            assert (out / r["file_name"]).is_file()
        assert 0 <= r["family"] < SMALL["n_families"]
    train_texts = {json.loads(line)["text"] for line in (out / "train" / "metadata.jsonl").read_text().splitlines()}
    assert not train_texts & {r["text"] for r in groups["heldout"] + groups["novel"]}
    # held-out crops are an imagefolder of their own (`--heldout DATA/heldout`)
    held = [json.loads(line) for line in (out / "heldout" / "metadata.jsonl").read_text().splitlines()]
    assert [f"heldout/{h['file_name']}" for h in held] == [r["file_name"] for r in groups["heldout"]]
    # the prompt reader gives the roles the toy world's labels give
    rows = read_labelled_prompts(out / "labels.jsonl")
    assert [r.member for r in rows] == [{"duplicated": 1, "singleton": 1, "heldout": 0}.get(r.group) for r in rows]
    assert [r.label for r in rows] == [{"duplicated": 1, "novel": 0}.get(r.group) for r in rows]
    # captions: toy words only (the toy base tokenizes them), the first phrase names the family, and never
    # a shape-world caption (so no shape-world alignment check is applied to them)
    tok = build_tokenizer(vocabulary())
    for r in labels:
        assert set(r["text"].split()) <= set(vocabulary())
        assert len(tok(r["text"]).input_ids) <= tok.model_max_length  # never truncated
    first = {}
    for r in labels:
        first.setdefault(r["family"], set()).add(r["text"].split(" and ")[0])
    assert all(len(v) == 1 for v in first.values()) and len(set.union(*first.values())) == SMALL["n_families"]
    assert not any(is_toy_caption_set([r["text"]]) for r in labels)
    assert len(list((out / "scenes").glob("*.png"))) == SMALL["n_families"]


def test_heldout_crops_lie_nearest_their_own_family(tmp_path):
    """The hard null: a held-out crop is related to its family's training crops (nearer them than to any
    other family's), yet no crop is a copy of another (they differ by >= min_offset px)."""
    out = tmp_path / "d"
    families.make_families_data(out, families.FamiliesConfig(seed=0, n_novel=0))
    labels = read_labels(out / "labels.jsonl")
    train, names = load_image_dir(out / "train")
    held, _ = load_image_dir(out / "heldout")
    family_of = {r["file_name"]: r["family"] for r in labels if r["file_name"]}
    train_family = torch.tensor([family_of.get(f"train/{n}", -1) for n in names])
    dup_files = {r["file_name"]: r for r in labels if r["group"] == "duplicated"}
    for i, n in enumerate(names):  # copies 1.. of a duplicated crop are named dupXXXX_NNN
        if train_family[i] < 0:
            train_family[i] = dup_files[f"train/{n.rsplit('_', 1)[0]}_000.png"]["family"]
    held_family = torch.tensor([r["family"] for r in labels if r["group"] == "heldout"])
    dist = torch.cdist(held.flatten(1), train.flatten(1))
    same = dist.masked_fill(train_family[None] != held_family[:, None], float("inf")).min(1).values
    other = dist.masked_fill(train_family[None] == held_family[:, None], float("inf")).min(1).values
    # in pixel L2 (measured at seed 0: 63 of 64, median ratio 0.65); one crop of a busy region can lie
    # nearer a similar-coloured region of another scene
    assert (same < other).float().mean() >= 0.9 and (same / other).median() < 0.8, (same / other)
    # related, not copies: the nearest training crop is never (nearly) the held-out crop itself
    rmse = same / (3 * 32 * 32) ** 0.5
    assert rmse.min() > 0.02


def test_cli_world_option(tmp_path, capsys):
    assert main(["toy-data", str(tmp_path / "f"), "--world", "families", "--n-families", "3", "--n-duplicated", "2",
                 "--max-copies", "6", "--min-copies", "2", "--n-singletons", "6", "--n-heldout", "3",
                 "--n-novel", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world"] == "families" and summary["copies"] == [6, 3] and summary["train_images"] == 15
    assert json.loads((tmp_path / "f" / "config.json").read_text())["world"] == "families"
    # the default stays the shape world
    assert main(["toy-data", str(tmp_path / "s"), "--n-duplicated", "1", "--copies", "2", "--n-singletons", "2",
                 "--n-heldout", "1", "--n-novel", "1"]) == 0
    assert "world" not in json.loads(capsys.readouterr().out)
    assert is_toy_caption_set([r["text"] for r in read_labels(tmp_path / "s" / "labels.jsonl")])
    for argv, error in ((["--world", "families", "--copies", "4"], "--copies belongs to --world shapes"),
                        (["--max-copies", "4"], "--max-copies belongs to --world families"),
                        (["--world", "families", "--min-copies", "1"], "--min-copies must be >= 2"),
                        (["--world", "families", "--max-copies", "3", "--min-copies", "4"], "--max-copies (3) must be")):
        assert main(["toy-data", str(tmp_path / "x"), *argv]) == 2
        assert error in capsys.readouterr().err
    with pytest.raises(MemtrainError, match="cannot cut"):
        families.make_families_data(tmp_path / "y", families.FamiliesConfig(n_families=1, n_singletons=400))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()



@pytest.mark.slow
def test_a_fine_tune_copies_planted_duplicates_and_the_default_verdict_flags_them(tmp_path):
    """The toy base fine-tuned on a small families world brings back its duplicated views: most
    generations of the duplicated prompts are nearest their own view (through the model's VAE; chance is
    1 in 60). The default copy verdict (the gradient ratio), calibrated at 5% on half of 96 held-out views
    of the same scenes, flags most of those copies and at most 5% (+2 standard errors) of the other half,
    where the pixel L2 calibrated the same way flags fewer copies; `edit uce --evaluate` judges before and
    after by that one calibration, and AMG over a calibrated gradients index removes most copies. About 6 minutes (2,400 steps at batch 16, one process; 800 steps were not
    enough: 1 of 8 nearest their own view)."""
    data = tmp_path / "data"
    families.make_families_data(data, families.FamiliesConfig(seed=0, n_families=4, n_duplicated=2, max_copies=32,
                                                              min_copies=16, n_singletons=56, n_heldout=96, n_novel=0))
    recipe = load_recipe(TrainRecipe, "toy", [f"model.pretrained={TOY_BASE}", f"data.path={data / 'train'}",
                                              f"output.dir={tmp_path / 'train'}", "train.max_steps=2400",
                                              "train.batch_size=16", "train.ema=false", "log.progress=false",
                                              "checkpoint.every_steps=2400"])
    train(recipe)
    pipe = load_pipeline(tmp_path / "train" / "pipeline")
    labels = read_labels(data / "labels.jsonl")
    images, names = load_image_dir(data / "train")
    unique, inverse = unique_images(images)
    source_of = {f"train/{name}": int(inverse[i]) for i, name in enumerate(names)}
    dup = [r for r in labels if r["group"] == "duplicated"]
    refs = vae_roundtrip(pipe, unique)
    held = load_image_dir(data / "heldout")[0]
    verdict = replication_verdict(pipe, refs, unique, held[::2], fpr=0.05)
    cal = verdict["calibration"]
    assert cal.metric == GRADIENT_METRIC and cal.calibrated
    fresh = verdict_scores(vae_roundtrip(pipe, held[1::2]), refs, cal)
    assert cal.flags(fresh).mean() <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / len(fresh))

    generations = generate_images(pipe, [r["text"] for r in dup], n=4, guidance_scale=3.0, progress=False)
    m = replication_metrics(generations, refs)
    own = (m["gradient_nn_index"] == torch.tensor([source_of[r["file_name"]] for r in dup for _ in range(4)])).numpy()
    assert own.mean() >= 0.5, m["gradient_nn_index"]
    flagged = cal.flags(verdict_scores(generations, refs, cal))
    assert flagged[own].mean() >= 0.5, (m["gradient_ratio"], cal.threshold)
    pixel = Calibration.from_dict(verdict["record"]["alternatives"][L2_METRIC])
    assert pixel.flags(m["l2"].numpy())[own].sum() <= flagged[own].sum()

    # an edit's report shows the removal by the same calibrated verdict: UCE on the duplicated prompts
    (tmp_path / "named.txt").write_text("".join(r["text"] + "\n" for r in dup))
    singles = [r for r in labels if r["group"] == "singleton"]
    (tmp_path / "preserved.txt").write_text("".join(r["text"] + "\n" for r in singles[:16]))
    prompts = tmp_path / "prompts.jsonl"
    negatives = [{"text": r["text"], "label": 0} for r in singles[16:24]]  # the detectors need non-memorized prompts
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [*({**r, "label": 1} for r in dup), *negatives]))
    assert main(["edit", "uce", str(tmp_path / "train" / "pipeline"), "--memorized", str(tmp_path / "named.txt"),
                 "--preserved", str(tmp_path / "preserved.txt"), "--out", str(tmp_path / "uce"), "--evaluate",
                 str(prompts), "--data", str(data), "--heldout", str(data / "heldout"), "--train-data", str(data / "train"),
                 "--eval-n", "4", "--guidance-scale", "3", "--eval-detectors", "noise", "--no-eval-cache"]) == 0
    evaluation = json.loads((tmp_path / "uce" / "edit.json").read_text())["evaluation"]
    assert evaluation["verdict"]["before"]["calibrated"] and GRADIENT_METRIC in evaluation["verdict"]["before"]["criterion"]
    before = evaluation["before"]["replication"]["named"]["fraction_replicated"]
    after = evaluation["after"]["replication"]["named"]["fraction_replicated"]
    # both sides judged by the before report's calibration; UCE leaves most of this small model's copies
    # (measured 100% -> 87.5%: docs/results.md, issue 25's gap), so the test asks only that it removes none less
    assert str(evaluation["verdict"]["after"]["reused"]).startswith("the earlier report's")
    assert before >= 0.3 and after <= before, (before, after)

    # AMG over a gradients index calibrated on the held-out views (through the model's VAE), judged by the same
    # verdict: most of the copies go (measured on the full families world: 98%, docs/results.md), none saturate
    assert main(["index", str(data / "train"), "--out", str(tmp_path / "index"), "--embedding", "gradients",
                 "--heldout", str(data / "heldout"), "--vae", str(tmp_path / "train" / "pipeline"), "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "train" / "pipeline"), "--prompts", str(prompts), "--data", str(data),
                 "--train-data", str(data / "train"), "--heldout", str(data / "heldout"), "-n", "4",
                 "--guidance-scale", "3", "--detectors", "noise", "--index", str(tmp_path / "index"), "--guard", "amg",
                 "--out", str(tmp_path / "amg")]) == 0
    guard = json.loads((tmp_path / "amg" / "report.json").read_text())["guard"]
    trigger = guard["groups"]["trigger"]
    unguarded, guarded = trigger["unguarded"]["fraction_replicated"], trigger["guarded"]["fraction_replicated"]
    assert "calibrated at 1.0% false positives" in guard["trigger"] and guard["options"]["max_ratio"] == 0.0
    assert unguarded >= 0.3 and guarded <= 0.25 * unguarded, (unguarded, guarded)
    assert trigger["guarded"]["saturation_max"] <= trigger["guarded"]["unguarded_saturation_max"] + 0.02
