"""`memtrain edit` on the tiny pipeline: `uce` writes a loadable pipeline (or LoRA) whose changed weights
are the ones edit.json counts, `--evaluate` puts evaluate reports of the source and the edit side by side,
and bad input fails with one clear error (exit code 2) before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from trainer.cli import main
from trainer.core.attention import cross_attention_modules
from trainer.core.components import load_pipeline
from trainer.edit.registry import EDITS, Edit, option
from trainer.edit.save import (
    LORA_FILE,
    changed_weights,
    load_for_edit,
    save_edited,
    save_lora,
    snapshot,
)
from trainer.edit.uce import uce_edit
from trainer.io import MANIFEST, MemtrainError
from trainer.prompts import read_labelled_prompts
from trainer.sample.generate import generate_images

MEMORIZED = "a large green ring and a small orange ring"


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(mean((a - b)^2)) per image: the L2 change edit.json reports."""
    return (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt()


def files_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def prompts(tmp_path):
    (tmp_path / "memorized.txt").write_text(MEMORIZED + "\n")
    (tmp_path / "preserved.txt").write_text("small purple diamond\na large yellow triangle and a large blue cross\n")
    return tmp_path


def edit(*argv) -> int:
    return main(["edit", *map(str, argv)])


def test_help_of_every_method(capsys):
    for method in ("prune", "neurons", "unlearn", "uce"):
        with pytest.raises(SystemExit) as exit_info:
            edit(method, "--help")
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: memtrain edit {method}" in out and "--memorized" in out and "--out" in out


def test_uce_writes_a_loadable_pipeline_with_per_layer_counts(tiny_model, prompts, tmp_path):
    source_files = files_digest(tiny_model)
    out = tmp_path / "edited"
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--preserved",
                prompts / "preserved.txt", "--out", out) == 0
    assert files_digest(tiny_model) == source_files  # the source is never modified
    report = json.loads((out / "edit.json").read_text())
    assert report["method"] == "uce" and report["output"] == "pipeline" and report["unet_evals"] == 0
    assert report["files"] == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert (out / "edit.md").read_text().count(".attn2.to_") == len(report["changed"])

    before = load_pipeline(tiny_model).unet.state_dict()
    after = load_pipeline(out).unet.state_dict()  # loads
    actual = {k: int((after[k] != v).sum()) for k, v in before.items() if not torch.equal(after[k], v)}
    expected = {f"{m}.{p}.weight" for m in cross_attention_modules(load_pipeline(tiny_model).unet)
                for p in ("to_k", "to_v")}
    assert set(actual) == expected and actual == report["changed"]
    assert report["total_changed"] == sum(actual.values())
    index, source_index = (json.loads((d / "model_index.json").read_text()) for d in (out, tiny_model))
    assert index["scheduler"] == source_index["scheduler"]  # the source's own scheduler is kept

    # writing again into an earlier edit output replaces it
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--out", out, "--lam", "0.5") == 0
    assert json.loads((out / "edit.json").read_text())["parameters"]["lam"] == 0.5  # an earlier edit is replaced


@pytest.mark.parametrize("method, options", [("prune", ["--steps", "2"]), ("neurons", ["--check", "magnitude"]),
                                             ("unlearn", ["--steps", "2"]), ("unlearn", ["--steps", "2", "--merge"]),
                                             ("uce", []), ("uce", ["--as-lora"])])
def test_no_edit_modifies_its_source(tiny_model, prompts, tmp_path, method, options):
    """Every method, pipeline and LoRA outputs: the source's files are byte for byte as before."""
    source_files = files_digest(tiny_model)
    out = tmp_path / "edited"
    assert edit(method, tiny_model, "--memorized", prompts / "memorized.txt", "--preserved", prompts / "preserved.txt",
                "--out", out, *options) == 0
    assert json.loads((out / "edit.json").read_text())["method"] == method
    assert files_digest(tiny_model) == source_files


def test_uce_as_lora_loads_in_a_stock_pipeline(tiny_model, prompts, tmp_path):
    out = tmp_path / "lora"
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--out", out, "--as-lora") == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "edit.json", "edit.md", LORA_FILE]
    report = json.loads((out / "edit.json").read_text())
    assert report["output"] == "lora" and report["result"]["lora"]["max_residual"] <= 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == set(report["changed"]) and len(changed) == 2 * len(cross_attention_modules(pipe.unet))


def test_evaluate_before_and_after(tiny_model, tiny_data, prompts, tmp_path):
    out = tmp_path / "evaluated"
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--preserved", prompts / "preserved.txt",
                "--out", out, "--evaluate",
                tiny_data / "labels.jsonl", "--eval-n", "1", "--eval-steps", "2", "--eval-detectors", "noise,clid",
                "--batch-size", "64", "--wandb", "--quality-feature", "toy") == 0
    report = json.loads((out / "edit.json").read_text())
    ev = report["evaluation"]
    assert ev["named_in_prompts"] == 1
    for side in ("before", "after"):
        assert (out / f"eval_{side}" / "report.json").is_file()
        s = ev[side]
        assert s["replication"]["named"]["generations"] == 1  # the named duplicated prompt
        assert s["replication"]["unnamed"]["generations"] >= 1  # the other duplicated prompt(s)
        assert s["replication"]["general"]["generations"] >= 2
        assert {"toy_alignment", "kid"} <= set(s["quality"]["general"])
        assert set(s["detectors"]) == {"noise"} and {"clid_th", "clid_vec", "loss"} <= set(s["membership"])
        assert {"forgotten/clid_th", "other members/clid_th"} <= set(s["membership"])
    # the after side measured the edited model: the named prompt's detector score moved, every general one's less
    # (measured: 0.35 against at most 0.23; without --preserved UCE moves this random model's prompts alike)
    scores = {side: {p["text"]: p["scores"]["noise"] for p in
                     json.loads((out / f"eval_{side}" / "report.json").read_text())["trigger"]["prompts"]}
              for side in ("before", "after")}
    assert scores["after"][MEMORIZED] != scores["before"][MEMORIZED]
    general = [r.text for r in read_labelled_prompts(tiny_data / "labels.jsonl") if r.label == 0]
    assert 2 <= len(general) == len(scores["before"]) - 2  # every prompt but the 2 duplicated ones
    named_moved = abs(scores["after"][MEMORIZED] - scores["before"][MEMORIZED])
    assert all(abs(scores["after"][t] - scores["before"][t]) < named_moved for t in general), scores
    # the generations at the same seeds (as the edit's own evaluation makes them): the general prompts' change
    # is edit.json's, below the unedited model's seed-to-seed spread (measured: at most 0.019 against at least
    # 0.235), and below the named prompt's change (0.028)
    kw = dict(n=1, steps=2, guidance_scale=7.5, batch_size=64, progress=False)
    source, edited = load_pipeline(tiny_model), load_pipeline(out)
    general_change = rms(generate_images(edited, general, seed=0, **kw), generate_images(source, general, seed=0, **kw))
    change = ev["general_l2_change"]
    assert change["generations"] == len(general)
    assert change["mean"] == pytest.approx(float(general_change.mean()), abs=1e-6)
    assert change["max"] == pytest.approx(float(general_change.max()), abs=1e-6)
    seed_spread = rms(generate_images(source, general, seed=1, **kw), generate_images(source, general, seed=0, **kw))
    named_change = rms(generate_images(edited, [MEMORIZED], seed=0, **kw), generate_images(source, [MEMORIZED], seed=0, **kw))
    assert 0 < change["max"] < float(seed_spread.min()), (general_change, seed_spread)
    assert change["max"] < float(named_change), (general_change, named_change)
    # one copy verdict before and after: the before report's calibration, reused (the edit leaves the VAE alone)
    verdicts = {side: json.loads((out / f"eval_{side}" / "report.json").read_text())["verdict"]
                for side in ("before", "after")}
    assert verdicts["before"]["calibrated"] and verdicts["before"]["calibration"] == verdicts["after"]["calibration"]
    assert verdicts["after"]["reused"].startswith("the earlier report's calibration")
    assert verdicts["before"]["vae"] == verdicts["after"]["vae"]
    md = (out / "edit.md").read_text()
    assert verdicts["before"]["criterion"] in md[:md.index("## Parameters")]
    assert "| replication named: fraction_replicated |" in md and "General prompts' generations" in md
    assert (out / "wandb").is_dir()  # the offline W&B run went into OUT


def run_fails(capsys, *argv) -> str:
    assert edit(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    return err


def test_bad_input_fails_before_writing(tiny_model, prompts, tmp_path, capsys):
    source_files = files_digest(tiny_model)
    out = tmp_path / "never"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    mem = prompts / "memorized.txt"
    assert "--memorized" in run_fails(capsys, "uce", tiny_model, "--memorized", empty, "--out", out)
    assert "is the source" in run_fails(capsys, "uce", tiny_model, "--memorized", mem, "--out", tiny_model)
    assert "inside the source" in run_fails(capsys, "uce", tiny_model, "--memorized", mem, "--out",
                                            tiny_model / "unet" / "edited")
    assert "--lam must be > 0" in run_fails(capsys, "uce", tiny_model, "--memorized", mem, "--out", out, "--lam", "0")
    for eps in ("0", "-0.1"):
        assert "--attack-eps must be > 0" in run_fails(capsys, "unlearn", tiny_model, "--memorized", mem, "--out",
                                                       out, "--attack-eps", eps)
    # a LoRA of another base: its to_k takes 48-dim inputs, the tiny model's 32
    module = cross_attention_modules(load_pipeline(tiny_model).unet)[0] + ".to_k"
    foreign = save_lora({f"unet.{module}.lora.down.weight": torch.zeros(2, 48),
                         f"unet.{module}.lora.up.weight": torch.zeros(32, 2)}, tmp_path / "foreign")
    err = run_fails(capsys, "uce", tiny_model, "--memorized", mem, "--out", out, "--lora", foreign)
    assert str(foreign) in err and "input size 48 != 32" in err
    # an unrelated non-empty directory is not replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert "keep.txt and no .memtrain-manifest.json" in run_fails(capsys, "uce", tiny_model, "--memorized", mem,
                                                                "--out", other)
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))
    assert files_digest(tiny_model) == source_files


def test_an_edit_that_changes_nothing_says_so(tiny_model, prompts, tmp_path, capsys):
    """A memorized prompt anchored to itself: UCE's solution is W0, so nothing is removed; the report says so
    and OUT still holds a loadable (unchanged) model."""
    out = tmp_path / "unchanged"
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--anchors", prompts / "memorized.txt",
                "--out", out) == 0
    assert "warning: nothing was changed" in capsys.readouterr().err
    report = json.loads((out / "edit.json").read_text())
    assert report["nothing_changed"] is True and report["total_changed"] == 0 and report["changed"] == {}
    assert "Warning: nothing was changed" in (out / "edit.md").read_text()
    before, after = (load_pipeline(d).unet.state_dict() for d in (tiny_model, out))
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_save_edited_writes_the_weights_then_edit_json(tiny_model, tmp_path):
    pipe = load_for_edit(tiny_model, device="cpu")
    before = snapshot(pipe.unet)
    assert changed_weights(before, pipe.unet) == {}
    result = uce_edit(pipe, [MEMORIZED])
    assert changed_weights(before, pipe.unet) == result["changed"]
    with pytest.raises(MemtrainError, match="is the source"), save_edited(pipe, tiny_model, tiny_model, {}):
        pass
    out = tmp_path / "saved"
    with save_edited(pipe, out, tiny_model, {"method": "uce"}) as tmp:
        assert sorted(p.name for p in tmp.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    assert not list(tmp_path.glob(".*tmp-*"))
    assert json.loads((out / "edit.json").read_text())["tool"] == "memtrain edit"
    assert changed_weights(before, load_pipeline(out).unet) == result["changed"]
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))


def test_a_second_edit_reuses_the_cached_before_evaluation(tiny_model, tiny_data, prompts, tmp_path, capsys):
    """`edit --evaluate` caches the source's evaluation under a key of its files, the prompt file and the
    settings: a second edit of the same checkpoint copies it (the same report.json, timings included, which a
    recomputation would not reproduce) and the same general generations (the same L2 change for the same
    edit); other settings miss the cache."""
    cache = tmp_path / "cache"
    common = ["--memorized", prompts / "memorized.txt", "--evaluate", tiny_data / "labels.jsonl", "--eval-n", "1",
              "--eval-steps", "2", "--eval-detectors", "noise", "--batch-size", "64", "--eval-cache", cache]
    runs = {}
    for name, extra in (("first", []), ("second", []), ("other", ["--eval-steps", "3"])):
        assert edit("uce", tiny_model, *common, *extra, "--out", tmp_path / name) == 0
        runs[name] = json.loads((tmp_path / name / "edit.json").read_text())["evaluation"]
        runs[name]["stderr"] = capsys.readouterr().err
    assert runs["first"]["before_cache"]["reused"] is False
    assert runs["second"]["before_cache"] == {"reused": True, "entry": runs["first"]["before_cache"]["entry"]}
    assert "reusing" in runs["second"]["stderr"] and "reusing" not in runs["first"]["stderr"]
    assert runs["other"]["before_cache"]["reused"] is False  # --eval-steps is part of the key
    assert len(list((cache / "evaluations").iterdir())) == 2
    first, second = ((tmp_path / n / "eval_before" / "report.json").read_bytes() for n in ("first", "second"))
    assert first == second
    assert runs["second"]["general_l2_change"] == runs["first"]["general_l2_change"]
    assert runs["second"]["before"] == runs["first"]["before"] and runs["second"]["after"] == runs["first"]["after"]
    assert "reused from the cache" in (tmp_path / "second" / "edit.md").read_text()
    assert edit("uce", tiny_model, *common, "--no-eval-cache", "--out", tmp_path / "fresh") == 0
    assert "before_cache" not in json.loads((tmp_path / "fresh" / "edit.json").read_text())["evaluation"]


def test_neurons_names_skipped_prompts_on_the_console_and_in_edit_md(tiny_model, tmp_path, capsys):
    """On the untrained tiny model NeMo's memorization check (check=magnitude: the prompt's first-step ||d(c)||
    above every reference prompt's) skips prompts; each skip is named with its reason on stderr and in edit.md,
    not only in edit.json."""
    (tmp_path / "memorized.txt").write_text(f"{MEMORIZED}\nsmall purple diamond\n")
    (tmp_path / "reference.txt").write_text("small purple diamond\na large yellow triangle and a large blue cross\n")
    out = tmp_path / "nemo"
    assert edit("neurons", tiny_model, "--memorized", tmp_path / "memorized.txt", "--reference",
                tmp_path / "reference.txt", "--check", "magnitude", "--out", out) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "edit.json").read_text())
    assert report["skipped"] and set(report["skipped"]) <= {MEMORIZED, "small purple diamond"}
    md = (out / "edit.md").read_text()
    assert f"Memorized prompts skipped by the edit: {len(report['skipped'])} (nothing was removed for them)." in md
    assert md.index("## Skipped") < md.index("## Parameters")  # before the details
    for prompt, why in report["skipped"].items():
        assert "not memorized" in why
        assert f"'{prompt}': {why}" in err
        assert f"| {prompt} | {why.replace('|', chr(92) + '|')} |" in md  # a table cell: | escaped
    assert f"{len(report['skipped'])} of 2 memorized prompts skipped" in err


def test_edit_md_leads_with_a_verdict_per_target_and_the_attacks(tiny_model, tiny_data, prompts, tmp_path):
    """edit.md opens with the verdict of each target (removed, each attack, unnamed reduced, quality kept), each
    status following from edit.json's numbers, and the attacks' named / unnamed replication equals the per-prompt
    results in eval_after/report.json; the seed-to-seed spread is the unedited model's own (two seeds)."""
    out = tmp_path / "verdict"
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--preserved", prompts / "preserved.txt",
                "--out", out, "--evaluate", tiny_data / "labels.jsonl", "--eval-n", "2", "--eval-steps", "2",
                "--eval-detectors", "noise", "--batch-size", "64", "--quality-feature", "toy", "--no-eval-cache",
                "--eval-attack", "--eval-dori-steps", "2", "--eval-attack-steps", "2") == 0
    report = json.loads((out / "edit.json").read_text())
    ev = report["evaluation"]
    rows = {r["target"]: r for r in ev["verdict_per_target"]}
    removed = rows["named prompts removed (replication <= 5%)"]
    assert removed["after"] == ev["after"]["replication"]["named"]["fraction_replicated"]
    assert removed["status"] == ("removed" if removed["after"] <= 0.05 else "not removed")
    after = json.loads((out / "eval_after" / "report.json").read_text())
    named = set((prompts / "memorized.txt").read_text().split("\n")) - {""}
    dori = after["dori"]
    expect = np.mean([v for t, v in zip(dori["texts"], dori["memorized"]["per_prompt_final"], strict=True) if t in named])
    assert ev["after"]["attacks"]["dori"]["named"] == pytest.approx(expect)
    bounded = after["attack"]["rows"][0]["image"]["per_prompt"]
    expect = np.mean([v for t, v in zip(after["attack"]["texts"], bounded, strict=True) if t in named])
    assert ev["after"]["attacks"]["bounded image 0.1"]["named"] == pytest.approx(expect)
    attacked = [r for t, r in rows.items() if t.startswith("named prompts stay removed under")]
    assert len(attacked) == 3  # DoRI and the bounded attack's two attackers
    for r in attacked:
        assert r["status"] == ("holds" if r["after"] <= 0.05 else "re-triggered" if removed["after"] <= 0.05
                               else "still copies")
    quality = ev["quality_verdict"]
    spread = ev["seed_spread"]
    assert spread["seeds"] == 2 and spread["l2"] > 0
    assert quality["l2 change"]["status"] == ("kept" if quality["l2 change"]["after"] <= spread["l2"] else "lost")
    kept = quality["toy_alignment"]
    assert kept["status"] == ("kept" if kept["before"] - kept["after"] <= kept["spread"] else "lost")
    general = [r.text for r in read_labelled_prompts(tiny_data / "labels.jsonl") if r.label == 0]
    kw = dict(steps=2, guidance_scale=7.5, batch_size=64, progress=False)
    source = load_pipeline(tiny_model)
    seeds = [generate_images(source, general, n=1, seed=s, **kw) for s in (0, 1)]
    assert spread["l2"] == pytest.approx(float(rms(seeds[1], seeds[0]).mean()), abs=1e-5)
    md = (out / "edit.md").read_text()
    assert md.index("## Verdict") < md.index("## Plain prompt and re-trigger attacks") < md.index("## Parameters")
    for r in ev["verdict_per_target"]:
        assert f"| {r['target']} | **{r['status']}** |" in md
    assert "| DoRI, 2 steps |" in md and "| bounded attack eps 0.1, image known |" in md


def test_a_yaml_spec_with_overrides_is_the_command_line(tiny_model, prompts, tmp_path, capsys):
    """`memtrain edit uce SPEC.yaml key=value --flag` builds the same EditSpec as the flags alone: the same
    weights; a misspelt option key fails naming it."""
    spec = tmp_path / "edit.yaml"
    spec.write_text(f"checkpoint: {tiny_model}\nmemorized: {prompts / 'memorized.txt'}\n"
                    f"preserved: {prompts / 'preserved.txt'}\nout: {tmp_path / 'from_spec'}\noptions:\n  lam: 0.5\n")
    assert edit("uce", spec, "options.lam=0.3", "--preserve-scale", "2") == 0
    assert edit("uce", tiny_model, "--memorized", prompts / "memorized.txt", "--preserved", prompts / "preserved.txt",
                "--out", tmp_path / "from_flags", "--lam", "0.3", "--preserve-scale", "2") == 0
    reports = [json.loads((tmp_path / d / "edit.json").read_text()) for d in ("from_spec", "from_flags")]
    assert reports[0]["parameters"]["lam"] == 0.3 and reports[0]["parameters"]["preserve_scale"] == 2.0
    assert reports[0]["parameters"] == reports[1]["parameters"] and reports[0]["changed"] == reports[1]["changed"]
    spec_weights, flag_weights = (load_pipeline(tmp_path / d).unet.state_dict() for d in ("from_spec", "from_flags"))
    assert all(torch.equal(spec_weights[k], v) for k, v in flag_weights.items())
    assert "did you mean `options.lam`" in run_fails(capsys, "uce", spec, "options.lamm=0.3")


@dataclasses.dataclass
class ScaleOptions:
    factor: float = option(0.5, "what the first cross-attention value projection is multiplied by")


def scale_value_projection(pipe, texts, options, spec):
    """A trivial edit: one weight matrix scaled (what adding an edit takes: this function and one registry line)."""
    module = cross_attention_modules(pipe.unet)[0]
    weight = pipe.unet.get_submodule(f"{module}.to_v").weight
    with torch.no_grad():
        weight.mul_(options["factor"])
    return {"scaled": f"{module}.to_v.weight", "prompts": len(texts["memorized"])}


def test_a_registered_edit_runs_through_the_command(tiny_model, prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(EDITS, "scale", Edit("scale one projection", scale_value_projection, ScaleOptions))
    out = tmp_path / "scaled"
    assert edit("scale", tiny_model, "--memorized", prompts / "memorized.txt", "--out", out, "--factor", "2") == 0
    report = json.loads((out / "edit.json").read_text())
    name = report["result"]["scaled"]
    before, after = (load_pipeline(d).unet.state_dict() for d in (tiny_model, out))
    assert torch.equal(after[name], 2 * before[name])
    assert report["changed"] == {name: before[name].numel()} and report["parameters"]["factor"] == 2.0
    assert report["method"] == "scale" and report["output"] == "pipeline"
