"""`memtrain evaluate --attack / --index / --guard` on the tiny random pipeline and the tiny toy dataset:
each section is in report.json and report.md with numbers that are the library's own (recomputed here
from the same generations), and bad input fails with one clear error before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.cli import main
from trainer.core.components import load_pipeline
from trainer.io import MemtrainError
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.measure.verdict import GU_RATIO
from trainer.report import evaluate as E
from trainer.report.attack_sections import attack_panels
from trainer.sample.amg import PIXEL_FALLBACK, Threshold
from trainer.sample.generate import generate_images

FAST = ["--steps", "3", "-n", "1", "--batch-size", "64", "--detectors", "noise"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("index") / "index"
    assert main(["index", str(tiny_data / "train"), "--out", str(out), "--resolution", "16", "--no-progress"]) == 0
    return out


def fraction(values) -> float:
    return sum(values) / len(values)


def test_attack_index_and_guard_sections(tmp_path, tiny_model, tiny_data, index_dir, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--train-data",
                 str(tiny_data / "train"), "--out", str(out), *FAST, "--attack", "bounded", "--attack-eps", "0.1,0.2",
                 "--attack-steps", "1", "--index", str(index_dir), "--guard", "amg", "--amg-c1", "0", "--amg-c3", "0",
                 "--quality-feature", "toy"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for title in ("## Re-trigger test", "## Replication (training-image index)", "## Guarded sampling"):
        assert title in md, title
    for attacker in ("noise", "image"):  # the attacked generations, beside their nearest training images
        for eps in (0.1, 0.2):
            name = f"attack_bounded_{attacker}_eps{eps:g}.png"
            assert (out / name).stat().st_size > 0 and name in report["files"] and f"]({name})" in md

    # re-trigger test: the 2 duplicated (label 1) prompts, both attackers (their rows have file_name)
    attack = report["attack"]
    assert attack["criterion"] == report["verdict"]["criterion"]  # copies under attack: the report's verdict
    assert attack["prompts"] == 2 and [r["eps"] for r in attack["rows"]] == [0.1, 0.2]
    for row in attack["rows"]:
        assert 0 <= row["plain"] <= 1
        for who in ("noise", "image"):
            assert 0 <= row[who]["replication"] <= 1 and row[who]["unet_evals"] > 0
            assert row[who]["max_delta_norm_ratio"] <= row["eps"] * (1 + 1e-5)
            assert printed[f"attack/eps{row['eps']:g}/{who}"] == row[who]["replication"]
    # total cost: both attacks (unet_evals of each) plus one generation of 3 steps x 2 (CFG) per prompt and image
    sampled = 2 * 3 * 2 * (1 + sum(r[w] is not None for r in attack["rows"] for w in ("noise", "image")))
    attacks = sum(a["unet_evals"] for a in attack["attackers"].values())
    assert report["cost"]["attack"]["unet_evals"] == attack["unet_evals"] == attacks + sampled

    # index replication: the nearest training image of each generation, as the index finds it
    ix = report["replication"]["index"]
    assert ix["threshold"] == PIXEL_FALLBACK and ix["images"] == 16
    assert "uncalibrated" in ix["criterion"] and ix["criterion"] in md  # the report names its criterion
    assert "groups" in report["replication"]  # the L2-ratio section is kept (training images given)
    pipe = load_pipeline(tiny_model)
    texts = [g["text"] for g in ix["generations"]]
    generated = generate_images(pipe, texts, 1, 0, 3, 7.5, 64, progress=False)
    index = TrainingIndex.load(index_dir)
    sims, nn = index.search(make_embedder("pixels")(generated), k=2)
    copies = index.copy_ids()  # exact copies tie: the report may name another copy of the same image
    for g, s, j in zip(ix["generations"], sims.tolist(), nn.tolist(), strict=True):
        assert g["similarity"] == pytest.approx(s[0], abs=1e-5) and copies[g["nearest_index"]] == copies[j[0]]
        assert g["nearest_file"] == index.file_names[g["nearest_index"]]
        assert g["nearest_caption"] == index.captions[g["nearest_index"]]
        assert g["second_similarity"] <= g["similarity"] + 1e-6
    for group, s in ix["groups"].items():
        flags = [g["similarity"] > ix["threshold"] for g in ix["generations"] if g["group"] == group]
        assert s["fraction_replicated"] == fraction(flags)
        assert printed[f"replication_index/{group}/fraction_replicated"] == s["fraction_replicated"]

    # guarded sampling with no despecification nor dissimilarity (and no caption > 20 times): AMG never
    # changes a step, the outputs are the unguarded ones
    guard = report["guard"]
    assert report["verdict"]["criterion"] in guard["criteria"]["fraction_replicated"]
    assert guard["guard"] == "amg" and guard["generations"] == len(texts) and set(guard["groups"]) == {"trigger",
                                                                                                      "general"}
    assert guard["guarded"]["seconds_per_image"] > 0 and guard["guarded"]["unet_evals_per_image"] >= 2 * 3
    for group, s in guard["groups"].items():
        u, g = s["unguarded"], s["guarded"]
        assert g["fraction_intervened"] == 0 and g["fraction_steps_intervened"] == 0
        assert g["max_abs_change_not_intervened"] < 1e-5  # the guarded loop is the stock DDIM loop
        assert g["fraction_replicated"] == u["fraction_replicated"] == report["replication"]["groups"][group][
            "fraction_replicated"]
        assert g["fraction_replicated_index"] == u["fraction_replicated_index"] == ix["groups"][group][
            "fraction_replicated"]
        assert g["toy_alignment"] == pytest.approx(u["toy_alignment"], abs=1e-6)
        assert 0 <= g["toy_alignment"] <= 1
    assert not any(r["intervened"] for r in guard["records"])


def test_index_only_replication_and_wen_guard(tmp_path, tiny_model, tiny_data, index_dir):
    memorized, general = tmp_path / "memorized.txt", tmp_path / "general.txt"
    rows = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines()]
    memorized.write_text("".join(r["text"] + "\n" for r in rows if r["group"] == "duplicated"))
    general.write_text("".join(r["text"] + "\n" for r in rows if r["group"] == "novel"))
    report = E.evaluate(tiny_model, memorized=memorized, not_memorized=general, out=tmp_path / "eval", n=1,
                        steps=3, detectors="noise", index=index_dir, index_threshold=0.0, guard="wen",
                        guard_options={"target": 0.0, "max_iters": 1}, progress=False)
    rep = report["replication"]
    assert "groups" not in rep and any("replication from --index only" in n for n in report["notes"])
    assert rep["index"]["threshold"] == 0.0
    for s in rep["index"]["groups"].values():  # cosine of two images' pixel descriptors > 0 or not
        assert 0 <= s["fraction_replicated"] <= 1 and -1 <= s["similarity_mean"] <= s["similarity_max"] <= 1
    guard = report["guard"]
    for s in guard["groups"].values():
        # a target of 0 is never reached: Wen et al.'s loop runs its one iteration on every prompt
        assert s["guarded"]["fraction_intervened"] == 1 and s["guarded"]["mean_iterations"] == 1
        assert "fraction_replicated" not in s["guarded"] and 0 <= s["guarded"]["fraction_replicated_index"] <= 1
    assert "## Guarded sampling" in (tmp_path / "eval" / "report.md").read_text()


def test_amg_that_always_fires(tmp_path, tiny_model, tiny_data, index_dir):
    """A threshold below every cosine: AMG intervenes at every step of every generation and moves them."""
    report = E.evaluate(tiny_model, tiny_data / "labels.jsonl", out=tmp_path / "eval", n=1, steps=3,
                        detectors="noise", index=index_dir, guard="amg",
                        guard_options={"threshold": Threshold(-1.0)},
                        progress=False)
    guard = report["guard"]
    for s in guard["groups"].values():
        g = s["guarded"]
        assert g["fraction_intervened"] == 1 and g["fraction_steps_intervened"] == 1
        assert g["max_abs_change_not_intervened"] is None
    assert all(r["num_steps_intervened"] == 3 for r in guard["records"])
    # the dissimilarity gradient goes through x0, the VAE decoder and the embedder only (the authors' code):
    # no UNet evaluation beyond the sampler's when no caption is frequent enough for deduplication
    assert guard["guarded"]["unet_evals_per_image"] == guard["unguarded"]["unet_evals_per_image"]
    for s in guard["groups"].values():  # the bounded guard moves the images without saturating them
        g = s["guarded"]
        assert g["intervened_rmse_mean"] > 0 and g["saturation_max"] <= g["unguarded_saturation_max"] + 0.05


@pytest.mark.parametrize("extra, message", [
    (dict(attack=True, attack_eps="0.1,0"), "--attack-eps"),
    (dict(attack=True, attack_eps=(-0.1,)), "--attack-eps"),
    (dict(guard="amg"), "--guard amg needs --index"),
    (dict(attack=True, generate=False), "--no-generate"),
    (dict(attack="dori,pgd"), "--attack"),
    (dict(attack="dori", dori_steps=-1), "--dori-steps"),
])
def test_bad_extras(tmp_path, tiny_model, tiny_data, extra, message):
    with pytest.raises(MemtrainError, match=message):
        E.evaluate(tiny_model, tiny_data / "labels.jsonl", out=tmp_path / "eval", progress=False, **extra)
    assert not (tmp_path / "eval").exists()


def test_dori_section(tmp_path, tiny_model, tiny_data):
    """`--attack dori`: the memorized rows' curve and the control of as many singleton (member) rows, in report.json
    and report.md; the bounded attack is not run."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--train-data",
                 str(tiny_data / "train"), "--out", str(out), *FAST, "--attack", "dori", "--dori-steps", "2",
                 "--dori-control-steps", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    dori = report["dori"]
    assert "attack" not in report and report["config"]["attack"] == ["dori"]
    assert dori["prompts"] == 2 and dori["memorized"]["checkpoints"] == [0, 2]
    assert dori["control"]["checkpoints"] == [0, 3] and len(dori["control"]["texts"]) == 2
    assert dori["criterion"] == report["verdict"]["criterion"]  # copies judged by the report's verdict
    # at step 0 DoRI's embeddings are the prompts' own: the same share of copies as the plain generations
    # (the verdict plus "nearest is the row's own image")
    plain = [g for g in report["replication"]["generations"] if g["group"] == "trigger"]
    assert dori["memorized"]["replication"][0] <= fraction([g["replicated"] for g in plain])
    assert report["cost"]["dori"]["unet_evals"] == dori["unet_evals"] > 0
    md = (out / "report.md").read_text()
    assert "## DoRI" in md
    # the attacked generations are drawn beside their nearest training images, one figure per curve
    for name in ("attack_dori.png", "attack_dori_control.png"):
        assert (out / name).stat().st_size > 0 and name in report["files"] and f"]({name})" in md
    assert "_generated" not in (out / "report.json").read_text()


def test_attack_panels_title_each_verdict():
    """The attack figures' titles: an exact copy of the targeted image is a COPY; an exact copy of another
    training image is one for the bounded attack but not for DoRI (which wants the targeted image nearest)."""
    references = torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    generated = references[[2, 3]]
    for own_only, second in ((True, "not a copy"), (False, "COPY")):
        shown, nearest, titles = attack_panels(generated, references, [2, 1], ["a", "b"], 1, GU_RATIO, own_only)
        assert torch.equal(nearest, references[[2, 3]]) and torch.equal(shown, generated)
        assert titles[0].startswith("COPY") and "nearest: own image; a" in titles[0]
        assert titles[1].startswith(second + ":") and "nearest: other image; b" in titles[1]
    _, _, titles = attack_panels(references[[0, 0]], references, None, ["c"], 2, GU_RATIO, False)
    assert len(titles) == 2 and all(t.startswith("COPY") and "nearest" not in t for t in titles)


def test_cli_attack_eps_error(tmp_path, tiny_model, tiny_data, capsys):
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--out",
                 str(tmp_path / "e"), "--attack", "--attack-eps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--attack-eps" in err
    assert main(["evaluate", str(tiny_model), "--prompts", str(tiny_data / "labels.jsonl"), "--out",
                 str(tmp_path / "e"), "--guard", "amg"]) == 2
    assert "--index" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_guard_index_resolution_mismatch(tmp_path, tiny_model, tiny_data):
    other = tmp_path / "index8"
    assert main(["index", str(tiny_data / "train"), "--out", str(other), "--resolution", "8", "--no-progress"]) == 0
    with pytest.raises(MemtrainError, match="resolution"):
        E.evaluate(tiny_model, tiny_data / "labels.jsonl", out=tmp_path / "eval", index=other, guard="amg",
                   progress=False, detectors="noise")
