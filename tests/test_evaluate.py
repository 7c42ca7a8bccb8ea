"""`memtrain evaluate` on a tiny random pipeline and the tiny toy dataset: the report's numbers are the
library's own (recomputed here from the per-prompt / per-sample values), the figures exist, and bad
input fails with one clear error before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_dedup import TinySSCD
from test_metrics import pairwise_auc
from test_monitor import wandb_records

from trainer import prompts
from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.io import MANIFEST, MemtrainError
from trainer.measure import features as F
from trainer.measure.metrics import auroc, tpr_at_fpr
from trainer.measure.verdict import GRADIENT_METRIC
from trainer.report import evaluate as E
from trainer.sample.generate import generate_images
from trainer.toy import world as toy_world
from trainer.toy.base import build_tokenizer
from trainer.toy.checker import TOY_QUALITY, toy_features

FAST = ["--steps", "2", "-n", "2", "--batch-size", "64"]  # 2 DDIM steps keep the generations cheap


def run_evaluate(*argv) -> int:
    return main(["evaluate", *map(str, argv)])


def run_fails(capsys, *argv) -> str:
    assert run_evaluate(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    return err


def no_temp_dirs(parent) -> bool:
    return not list(parent.glob(".*tmp-*"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (as in test_dedup) with the toy tokenizer saved beside it."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tokenizer(toy_world.vocabulary())
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, projection_dim=16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sscd") / "sscd.torchscript.pt"
    torch.jit.script(TinySSCD()).save(str(path))
    return path


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    home = tmp_path / "wandb-home"
    home.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run goes into OUT/wandb
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home))


# ---------------------------------------------------------------- end to end


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_protocol_end_to_end(tmp_path, tiny_model, tiny_data, offline_wandb, capsys):
    from trainer.core.components import load_pipeline
    from trainer.detect import prompt as D

    out = tmp_path / "eval"
    assert run_evaluate(tiny_model, "--prompts", tiny_data / "labels.jsonl", "--train-data", tiny_data / "train",
                        "--out", out, *FAST, "--wandb", "--quality-feature", "toy") == 0
    assert "report.md" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for key in ("config", "label_mapping", "roc_convention", "counts", "trigger", "replication", "membership",
                "quality", "cost", "files"):
        assert key in report, key
    for name in ("report.md", "roc.png", "roc_membership.png", "scores_by_group.png", "replicated.png"):
        assert (out / name).stat().st_size > 0, name
        assert name in report["files"]
    assert no_temp_dirs(tmp_path)

    # trigger scenario: toy groups duplicated -> 1, novel -> 0; singleton / heldout not scored
    trigger = report["trigger"]
    prompts = trigger["prompts"]
    assert trigger["labelled"] and trigger["n_positive"] == 2 and trigger["n_negative"] == 4
    assert [p["group"] for p in prompts] == ["duplicated"] * 2 + ["novel"] * 4
    labels = [p["label"] for p in prompts]
    for name in ("noise", "noise10", "anisotropy", "entropy"):
        d = trigger["detectors"][name]
        scores = [p["scores"][name] for p in prompts]
        assert d["auroc"] == auroc(scores, labels)
        assert d["tpr_at_1fpr"] == tpr_at_fpr(scores, labels, 0.01)
    # the scores are the detectors' own with n = 1 and the 50-step schedule
    pipe = load_pipeline(tiny_model)
    texts = [p["text"] for p in prompts]
    np.testing.assert_allclose([p["scores"]["noise"] for p in prompts], D.noise_magnitude(pipe, texts, n=1).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose([p["scores"]["noise10"] for p in prompts],
                               D.noise_magnitude(pipe, texts, n=1, steps=10).numpy(), rtol=1e-6)
    np.testing.assert_allclose([p["scores"]["anisotropy"] for p in prompts], D.anisotropy(pipe, texts).M.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert trigger["detectors"]["noise"]["unet_evals"] == 2 * 6
    assert trigger["detectors"]["noise10"]["unet_evals"] == 20 * 6
    assert trigger["detectors"]["anisotropy"]["unet_evals"] == 4 * 6
    assert trigger["detectors"]["entropy"]["unet_evals"] == 1 * 6

    # replication: 2 generations per labelled prompt, against the 10 unique training images
    rep = report["replication"]
    assert rep["train_images"] == 16 and rep["unique_train_images"] == 10
    gens = rep["generations"]
    assert [g["group"] for g in gens] == ["trigger"] * 4 + ["general"] * 8
    assert all("nearest_is_own_image" in g for g in gens[:4]) and not any("nearest_is_own_image" in g for g in gens[4:])
    # the copy verdict: the gradient ratio, calibrated on the 4 held-out rows (member 0) through the VAE
    cal = rep["calibration"]
    assert report["verdict"]["calibrated"] and cal["metric"] == GRADIENT_METRIC
    assert cal["n_heldout"] == 4 and cal["fpr_heldout"] == 0.0 and cal["n_positive"] == 10
    assert report["verdict"]["criterion"] in (out / "report.md").read_text().split("## Trigger")[0]
    for group in ("trigger", "general"):
        rows = [g for g in gens if g["group"] == group]
        ratio = np.array([g["ratio"] for g in rows])
        s = rep["groups"][group]
        assert s["generations"] == len(rows)
        assert [g["score"] for g in rows] == [g["gradient_ratio"] for g in rows]
        assert s["fraction_replicated"] == np.mean([g["gradient_ratio"] < cal["threshold"] for g in rows])
        assert s["fraction_ratio_1_3"] == np.mean(ratio < 1 / 3)
        assert s["similarity_p95"] == pytest.approx(np.percentile(1 - ratio, 95))
        assert s["similarity_max"] == pytest.approx(np.max(1 - ratio))
    assert report["cost"]["generation"]["unet_evals"] == 6 * 2 * 2 * 2  # prompts x n x steps x (cond, uncond)
    # diagnostic: the ROC numbers again without the novel prompts whose generations replicate
    verified = trigger["without_replicating_negatives"]
    replicating = {g["text"] for g in gens if g["group"] == "general" and g["replicated"]}
    keep = [p for p in prompts if not (p["label"] == 0 and p["text"] in replicating)]
    assert verified["excluded"] == sorted(replicating)
    assert verified["n_negative"] == sum(p["label"] == 0 for p in keep) > 0
    for name in ("noise", "anisotropy"):
        scores, kept_labels = [p["scores"][name] for p in keep], [p["label"] for p in keep]
        assert verified["detectors"][name] == {"auroc": auroc(scores, kept_labels),
                                               "tpr_at_1fpr": tpr_at_fpr(scores, kept_labels, 0.01)}

    # membership: 10 members (2 duplicated + 8 singletons), 4 held-out; out-of-fold scores
    mem = report["membership"]
    assert mem["members"] == 10 and mem["non_members"] == 4 and len(mem["alphas"]) == 2
    assert mem["unet_evals"] == 15 * 14
    assert sorted(set(mem["groups"])) == ["duplicated", "heldout", "singleton"]
    for name in ("clid_th", "clid_vec", "loss"):
        assert mem["scores"][name]["auroc"] == auroc(mem["per_sample"][name], mem["member_flags"])
        assert mem["scores"][name]["tpr_at_1fpr"] == tpr_at_fpr(mem["per_sample"][name], mem["member_flags"])
    assert np.allclose(mem["per_sample"]["loss"], np.array(mem["features"])[:, -1])
    # per member group: that group's members against all 4 non-members, pairwise
    for group, count in (("duplicated", 2), ("singleton", 8)):
        assert mem["by_group"][group]["members"] == count
        for name in ("clid_th", "clid_vec", "loss"):
            values = np.array(mem["per_sample"][name])
            pick = np.isin(mem["groups"], [group, "heldout"])
            assert mem["by_group"][group][name] == pytest.approx(
                pairwise_auc(values[pick], np.array(mem["groups"])[pick] == group))

    # quality: toy alignment and KID against the 4 held-out images, in the feature the flag named
    assert report["quality"]["feature"].startswith("pix8+palette:") and report["quality"]["alignment"] == "toy_alignment"
    for group in ("trigger", "general"):
        q = report["quality"]["groups"][group]
        assert 0 <= q["toy_alignment"] <= 1 and np.isfinite(q["kid"]) and "clip_score" not in q

    md = (out / "report.md").read_text()
    for heading in ("## Trigger scenario", "## Replication", "## Membership (CLiD)", "## Quality", "## Cost"):
        assert heading in md
    assert "TPR at 1% FPR = the TPR of the last ROC point" in md and "shadow split" in md

    # W&B offline run inside OUT/wandb with the summary numbers and the figures
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = {}
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            logged.update({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    assert json.loads(logged["trigger/noise/auroc"]) == pytest.approx(trigger["detectors"]["noise"]["auroc"])
    assert json.loads(logged["membership/clid_th/auroc"]) == pytest.approx(mem["scores"]["clid_th"]["auroc"])
    assert json.loads(logged["figures/roc/_type"]) == "image-file"


def test_without_replicating_negatives_leaves_out_the_novel_prompts_that_replicate():
    from trainer.report.sections import without_replicating_negatives

    scores = {"a": 3.0, "b": 2.0, "x": 2.5, "y": 1.0, "z": 0.5}
    labels = {"a": 1, "b": 1, "x": 0, "y": 0, "z": 0}
    trigger = {"labelled": True, "detectors": {"noise": {}},
               "prompts": [{"text": t, "label": labels[t], "scores": {"noise": v}} for t, v in scores.items()]}
    gens = [{"group": "general", "text": t, "replicated": t == "x"} for t in "xxyyzz"]
    gens += [{"group": "trigger", "text": "a", "replicated": True}]
    everything = [scores[t] for t in scores], [labels[t] for t in scores]
    assert (auroc(*everything), tpr_at_fpr(*everything, 0.01)) == (pytest.approx(5 / 6), 0.5)
    verified = without_replicating_negatives(trigger, {"generations": gens})
    assert verified == {"excluded": ["x"], "n_negative": 2, "detectors": {"noise": {"auroc": 1.0, "tpr_at_1fpr": 1.0}}}
    assert without_replicating_negatives({**trigger, "labelled": False}, {"generations": gens}) is None


def test_the_quality_feature_is_chosen_by_name_not_by_the_captions(tmp_path, tiny_model):
    """Toy captions without a choice are scored in pix8 (no alignment); an unknown name fails before any work."""
    prompts = tmp_path / "prompts" / "p.txt"
    prompts.parent.mkdir()
    prompts.write_text("a small red circle\na large green square\n")
    with pytest.raises(MemtrainError, match="--quality-feature: unknown 'palette'; choose from pix8"):
        E.evaluate(tiny_model, prompts, out=tmp_path / "bad", quality_feature="palette", progress=False)
    assert not (tmp_path / "bad").exists()
    report = E.evaluate(tiny_model, prompts, out=tmp_path / "eval", n=1, steps=2, detectors="noise",
                        progress=False)
    assert report["quality"]["feature"].startswith("pix8:") and "alignment" not in report["quality"]
    assert set(report["quality"]["groups"]["all"]) == {"generations", "notes"}


def test_plain_text_prompts_give_scores_only(tmp_path, tiny_model):
    prompts = tmp_path / "prompts" / "p.txt"
    prompts.parent.mkdir()
    prompts.write_text("a small red circle\n\na large green square\n")
    report = E.evaluate(tiny_model, prompts, out=tmp_path / "eval", n=1, steps=2, detectors="noise,entropy",
                        progress=False, quality_feature=TOY_QUALITY)
    trigger = report["trigger"]
    assert not trigger["labelled"] and trigger["n_prompts"] == 2
    assert set(trigger["detectors"]) == {"noise", "entropy"}
    assert all("auroc" not in d for d in trigger["detectors"].values())
    assert [p["group"] for p in trigger["prompts"]] == ["unlabelled"] * 2
    assert "replication" not in report and "membership" not in report
    assert any("replication skipped" in note for note in report["notes"])
    q = report["quality"]["groups"]["all"]
    assert q["generations"] == 2 and "toy_alignment" in q and "kid" not in q
    files = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert files == [MANIFEST, "report.json", "report.md", "scores_by_group.png"]


def test_no_generate_keeps_detectors_and_membership(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "eval"
    assert run_evaluate(tiny_model, "--prompts", tiny_data / "labels.jsonl", "--out", out, "--no-generate",
                        "--detectors", "entropy,clid") == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["trigger"]["detectors"]) == ["entropy"] and "membership" in report
    assert "replication" not in report and "quality" not in report and "generation" not in report["cost"]
    assert any("--no-generate" in note for note in report["notes"])
    assert report["cost"]["total"]["unet_evals"] == 1 * 6 + 15 * 14
    assert sorted(report["files"]) == ["report.json", "report.md", "roc.png", "roc_membership.png",
                                       "scores_by_group.png"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_clip_score_and_sscd(tmp_path, tiny_model, tiny_data, clip_dir, sscd_file):
    from transformers import CLIPModel

    from trainer.measure.features import embed_images, load_sscd

    report = E.evaluate(tiny_model, tiny_data / "labels.jsonl", train_data=str(tiny_data / "train"),
                        out=tmp_path / "eval", n=1, steps=2,
                        detectors="noise", sscd=sscd_file, clip=clip_dir, progress=False)
    assert "membership" not in report and any("clid not in --detectors" in n for n in report["notes"])
    for group, s in report["replication"]["groups"].items():
        sscd = [g["sscd"] for g in report["replication"]["generations"] if g["group"] == group]
        assert s["sscd_max"] == pytest.approx(max(sscd))
        assert s["sscd_fraction"] == np.mean(np.array(sscd) > 0.5)
        assert 0 <= report["quality"]["groups"][group]["clip_score"] <= 100
    assert "SSCD p95" in (tmp_path / "eval" / "report.md").read_text()

    # the CLIP score against CLIPModel's own logits: logits_per_image = exp(logit_scale) * cos
    scorer = F.load_clip_scorer(clip_dir)
    images = torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    captions = ["a small red circle", "a large green ring", "a small black cross"]
    model, processor, tokenizer = scorer
    pixels = processor(images=F.to_pil(images), return_tensors="pt")["pixel_values"]
    ids = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = CLIPModel.from_pretrained(clip_dir)(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                                     pixel_values=pixels).logits_per_image
        cos = (logits.diagonal() / model.logit_scale.exp()).double().numpy()
    np.testing.assert_allclose(F.clip_scores(scorer, images, captions), 100 * np.maximum(cos, 0), rtol=1e-4,
                               atol=1e-4)

    # SSCD similarity against dedup's SSCD embedding of the same images
    gen, refs = images[:2], torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    a = embed_images(F.to_pil(gen), embedding="sscd", sscd=sscd_file, progress=False)
    b = embed_images(F.to_pil(refs), embedding="sscd", sscd=sscd_file, progress=False)
    np.testing.assert_allclose(F.sscd_similarity(load_sscd(sscd_file), gen, refs), (a @ b.T).max(axis=1),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pieces


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(7, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / 35
    assert F.kid(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    with pytest.raises(MemtrainError, match="at least 2"):
        F.kid(torch.from_numpy(x[:1]), torch.from_numpy(y))
    images = torch.rand((2, 3, 32, 32))
    assert toy_features(images).shape == (2, 8 * 8 * 3 + len(toy_world.COLORS))


def test_prompt_file_roles(tmp_path, tiny_data):
    rows = prompts.read_labelled_prompts(tiny_data / "labels.jsonl")
    by_group = {}
    for r in rows:
        by_group.setdefault(r.group, set()).add((r.label, r.member))
    assert by_group == {"duplicated": {(1, 1)}, "singleton": {(None, 1)}, "heldout": {(None, 0)},
                        "novel": {(0, None)}}
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x", "group": "duplicated", "label": 0}\n\n{"text": "y", "label": 1}\n'
                    '{"text": "z", "member": 0, "file_name": "a.png"}\n')
    rows = prompts.read_labelled_prompts(path)
    assert [(r.text, r.line, r.label, r.member) for r in rows] == [("x", 1, 0, None), ("y", 3, 1, None),
                                                                   ("z", 4, None, 0)]


def test_group_names_are_data(tmp_path, tiny_data):
    """Another dataset's group names play the same roles through a label-groups file; a bad file is one error."""
    renamed = {"duplicated": "copied", "novel": "fresh", "singleton": "once", "heldout": "unseen"}
    path = tmp_path / "labels.jsonl"
    rows = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "group": renamed[r["group"]]}) + "\n" for r in rows))
    groups = tmp_path / "groups.yaml"
    groups.write_text("memorized: [copied]\nnot_memorized: [fresh]\nmembers: [copied, once]\nnon_members: [unseen]\n")
    schema = prompts.LabelGroups.load(groups)
    default = prompts.read_labelled_prompts(tiny_data / "labels.jsonl")
    assert [(r.label, r.member) for r in prompts.read_labelled_prompts(path, schema)] == [
        (r.label, r.member) for r in default]
    assert "group copied" in schema.mapping() and "group duplicated" in prompts.LabelGroups.load().mapping()
    groups.write_text("memorized: copied\n")
    with pytest.raises(MemtrainError, match=f"--label-groups {groups}: needs exactly the keys memorized, "):
        prompts.LabelGroups.load(groups)


# ---------------------------------------------------------------- bad input


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["no_model_index", "missing_checkpoint", "missing_sscd", "missing_clip",
                                  "vision_only_clip", "empty", "bad_json", "no_text", "bad_label",
                                  "no_negatives", "no_positives", "missing_image", "bad_detector",
                                  "missing_heldout", "bad_fpr", "bad_groups", "sscd_criterion_without_sscd"])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys, tiny_model, tiny_data, case):
    out = tmp_path / "out"
    labels = tiny_data / "labels.jsonl"
    ckpt, prompts, extra, expected = tiny_model, labels, [], None
    if case == "no_model_index":
        ckpt = tmp_path / "notapipeline"
        ckpt.mkdir()
        expected = [str(ckpt), "no model_index.json"]
    elif case == "missing_checkpoint":
        ckpt, expected = tmp_path / "nothere", [str(tmp_path / "nothere"), "no such directory"]
    elif case == "missing_sscd":
        extra, expected = ["--sscd", tmp_path / "sscd.pt"], ["--sscd", "no such file"]
    elif case == "missing_clip":
        extra, expected = ["--clip", tmp_path / "clip"], ["--clip", "no such file"]
    elif case == "vision_only_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                                       intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2)).save_pretrained(tmp_path / "v")
        extra, expected = ["--clip", tmp_path / "v"], ["full CLIPModel"]
    elif case == "empty":
        prompts = write(tmp_path / "p" / "empty.txt", "\n  \n")
        expected = [str(prompts), "no prompts"]
    elif case == "bad_json":
        prompts = write(tmp_path / "p" / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
        expected = [str(prompts), "line 2", "not valid JSON"]
    elif case == "no_text":
        prompts = write(tmp_path / "p" / "notext.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n')
        expected = [str(prompts), "line 2", "`text`"]
    elif case == "bad_label":
        prompts = write(tmp_path / "p" / "label.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n')
        expected = [str(prompts), "line 2", "`label` must be 0 or 1"]
    elif case in ("no_negatives", "no_positives"):
        value = 1 if case == "no_negatives" else 0
        prompts = write(tmp_path / "p" / "one.jsonl", f'{{"text": "a", "label": {value}}}\n{{"text": "b", "label": {value}}}\n')
        expected = [str(prompts), "no negatives" if value else "no positives"]
    elif case == "missing_image":
        prompts = write(tmp_path / "p" / "img.jsonl", '{"text": "a", "group": "heldout", "file_name": "x/none.png"}\n')
        expected = [str(prompts), "line 1", "none.png", "does not exist"]
    elif case == "bad_detector":
        extra, expected = ["--detectors", "noise,sail"], ["--detectors", "sail"]
    elif case == "missing_heldout":
        extra, expected = ["--heldout", tmp_path / "none"], ["--heldout", "not a directory"]
    elif case == "bad_fpr":
        extra, expected = ["--fpr", "1.5"], ["--fpr must be in (0, 1)"]
    elif case == "bad_groups":
        extra, expected = ["--groups", "trigger,novel"], ["--groups", "novel"]
    elif case == "sscd_criterion_without_sscd":
        extra, expected = ["--criterion", "sscd"], ["--criterion sscd", "--sscd"]
    err = run_fails(capsys, ckpt, "--prompts", prompts, "--out", out, *FAST, *extra)
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists() and no_temp_dirs(tmp_path)


def test_labels_error_names_the_prompt_file_in_the_api(tmp_path, tiny_model):
    prompts = write(tmp_path / "one.jsonl", '{"text": "a", "label": 1}\n')
    with pytest.raises(MemtrainError, match=r"one\.jsonl: the labelled prompts have no negatives"):
        E.evaluate(tiny_model, prompts, out=tmp_path / "o", progress=False)


def test_a_real_style_training_set_and_a_caption_keyed_prompt_set(tmp_path, tiny_model):
    """An imagefolder that is not the toy world's (photos-like captions, its own layout) as --train-data, and a
    prompt set in the published format (Wen et al.'s JSONL: `caption`, `index`, `url`) plus a plain list of
    non-memorized prompts: replication is measured against that training set, quality with the pixel feature."""
    from PIL import Image

    data = tmp_path / "my-dataset"
    (data / "pics").mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    captions = [f"a photo of object number {i} on a wooden table" for i in range(6)]
    with open(data / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            pixels = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(data / "pics" / f"{i}.png")
            f.write(json.dumps({"file_name": f"pics/{i}.png", "text": caption}) + "\n")
    memorized = tmp_path / "sdv1_memorized.jsonl"
    memorized.write_text("".join(json.dumps({"caption": c, "index": i, "url": f"http://example/{i}"}) + "\n"
                                 for i, c in enumerate(captions[:3])))
    not_memorized = tmp_path / "general.txt"
    not_memorized.write_text("a painting of a lighthouse at night\na sketch of a mountain village\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--memorized", str(memorized), "--not-memorized", str(not_memorized),
                 "--train-data", str(data), "--out", str(out), "-n", "1", "--steps", "2",
                 "--detectors", "noise"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["memorized"] == 3 and report["counts"]["not_memorized"] == 2
    assert report["trigger"]["n_positive"] == 3 and report["trigger"]["n_negative"] == 2
    replication = report["replication"]
    assert replication["train_images"] == 6 and str(data) in replication["training_images"]
    assert all(0 <= g["nn_index"] < replication["unique_train_images"] for g in replication["generations"])
    assert report["quality"]["feature"].startswith("pix8:")  # not the toy palette: these are not toy captions
    assert all("toy_alignment" not in q for q in report["quality"]["groups"].values())


# ---------------------------------------------------------------- the spec and the section registry


def test_a_yaml_spec_with_overrides_and_flags(tmp_path, tiny_model, tiny_data, capsys):
    """SPEC.yaml, then key=value, then flags: each later source wins; a bad key names the close match."""
    spec = tmp_path / "eval.yaml"
    spec.write_text(f"checkpoint: {tiny_model}\nprompts: {tiny_data / 'labels.jsonl'}\nout: {tmp_path / 'eval'}\n"
                    "detectors: [noise]\nsteps: 5\nn: 1\ngenerate: true\nguard: wen\nguard_options: {max_iters: 1}\n")
    assert run_evaluate(spec, "steps=2", "groups=[general]", "--seed", "3", "--wen-lr", "0.1") == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    c = report["config"]
    assert (c["steps"], c["seed"], c["n"], c["detectors"], c["groups"], c["guard"]) == (
        2, 3, 1, ["noise"], ["general"], "wen")
    # the guard's options: the spec's, the flag over them, the declared defaults under them
    assert report["guard"]["options"] == {"target": 3.0, "lr": 0.1, "max_iters": 1}
    assert "drop --no-generate" in run_fails(capsys, spec, "--no-generate")  # the flag is generate=false
    err = run_fails(capsys, spec, "stepz=2")
    assert "unknown key `stepz`; did you mean `steps`" in err
    err = run_fails(capsys, spec, "guard_options={lr: 0}")
    assert "--wen-lr must be > 0, got 0" in err
    err = run_fails(capsys, spec, "guard_options={c1: 1}")
    assert "unknown key c1 for guard wen" in err


def brightness(run: E.EvalRun) -> None:
    """A section as docs/architecture.md adds one: the mean pixel value of each group's generations."""
    if run.generated is not None:
        run.report["brightness"] = {g: float(run.generated[[i for i, x in enumerate(run.gen_groups) if x == g]].mean())
                                    for g in dict.fromkeys(run.gen_groups)}


def brightness_lines(report: dict) -> list[str]:
    rows = report.get("brightness", {})
    return ["## Brightness", "", "| group | mean |", "|---|---|", *[f"| {g} | {v:.4f} |" for g, v in rows.items()], ""]


def test_a_new_section_is_two_functions_and_one_registry_line(monkeypatch, tmp_path, tiny_model, tiny_data):
    monkeypatch.setitem(E.SECTIONS, "brightness", E.Section("brightness", brightness, brightness_lines))
    report = E.evaluate(E.EvalSpec(checkpoint=str(tiny_model), prompts=str(tiny_data / "labels.jsonl"),
                                   out=str(tmp_path / "eval"), n=1, steps=2, detectors="noise"), progress=False)
    rows = [r for r in prompts.read_labelled_prompts(tiny_data / "labels.jsonl") if r.label is not None]
    pipe = load_pipeline(tiny_model)
    for group, label in (("trigger", 1), ("general", 0)):
        texts = [r.text for r in rows if r.label == label]
        images = generate_images(pipe, texts, 1, 0, 2, 7.5, batch_size=32, progress=False)
        assert report["brightness"][group] == pytest.approx(float(images.mean()), abs=1e-6)
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert f"| trigger | {report['brightness']['trigger']:.4f} |" in markdown
    assert markdown.index("## Brightness") > markdown.index("## Quality")  # rendered in registry order
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["brightness"] == report["brightness"]


def test_sections_selects_the_report_sections_and_what_they_read(tmp_path, tiny_model, tiny_data, capsys):
    """`sections: [quality]` (or --sections quality) runs the quality section and those it reads (the generations,
    the replication section's held-out and training images): the same quality and replication numbers as the
    whole report, no detector section; an unknown name fails."""
    common = ["--prompts", tiny_data / "labels.jsonl", "-n", "1", "--steps", "2", "--detectors", "noise",
              "--quality-feature", "pix8"]
    assert run_evaluate(tiny_model, *common, "--out", tmp_path / "all") == 0
    assert run_evaluate(tiny_model, "sections=[quality]", *common, "--out", tmp_path / "quality") == 0
    full, quality = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("all", "quality"))
    assert quality["quality"] == full["quality"] and quality["quality"]["groups"]["general"]["kid"] > 0
    assert quality["replication"]["groups"] == full["replication"]["groups"]
    assert "trigger" in full and "trigger" not in quality
    assert set(quality["cost"]) == {"generation", "replication", "quality", "total"}
    assert "## Quality" in (tmp_path / "quality" / "report.md").read_text()
    assert "choose from detectors,generate" in run_fails(capsys, tiny_model, *common, "--sections", "qualty",
                                                         "--out", tmp_path / "never")
    assert "--sections guard: not switched on" in run_fails(capsys, tiny_model, *common, "--sections", "guard",
                                                            "--out", tmp_path / "never")
    assert not (tmp_path / "never").exists()
