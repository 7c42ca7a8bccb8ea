"""Bad input gets one clear error naming the file, row or key; exit code 2; nothing half written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY, write_recipe

from trainer.cli import main
from trainer.toy import world as toy_world
from trainer.toy.base import build_components, build_tokenizer, save_pipeline


def run_fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    return err


def assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


@pytest.fixture
def data_copy(tmp_path, tiny_data):
    target = tmp_path / "data"
    shutil.copytree(tiny_data / "train", target)
    return target


def test_unknown_key_suggests_close_ones(tmp_path, capsys, tiny_model, tiny_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out")
    err = run_fails(capsys, "train", str(recipe), "train.lerning_rate=0.1")
    assert "unknown key `train.lerning_rate`" in err and "`train.learning_rate`" in err
    # in the YAML file itself, the file is named
    recipe.write_text(recipe.read_text().replace('"checkpoint"', '"chekpoint"'))
    err = run_fails(capsys, "train", str(recipe))
    assert str(recipe) in err and "`checkpoint`" in err
    assert_nothing_written(tmp_path / "out")


def test_wrong_type_and_out_of_range(tmp_path, capsys, tiny_model, tiny_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out")
    assert "`train.max_steps` must be int" in run_fails(capsys, "train", str(recipe), "train.max_steps=many")
    assert "`train.mixed_precision` must be one of" in run_fails(capsys, "train", str(recipe),
                                                                 "train.mixed_precision=fp8")
    err = run_fails(capsys, "train", str(recipe), "data.captions.random_token_p=1.5")
    assert "`data.captions.random_token_p`" in err and "[0, 1]" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_and_corrupt_images(tmp_path, capsys, tiny_model, data_copy):
    rows = [json.loads(line) for line in (data_copy / "metadata.jsonl").read_text().splitlines()]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data_copy, out)
    (data_copy / rows[2]["file_name"]).unlink()
    err = run_fails(capsys, "train", str(recipe))
    assert "metadata.jsonl, line 3" in err and rows[2]["file_name"] in err and "missing" in err
    (data_copy / rows[2]["file_name"]).write_bytes(b"\x89PNG not really a png")
    err = run_fails(capsys, "train", str(recipe))
    assert "line 3" in err and "cannot be decoded" in err
    assert_nothing_written(out)


def test_missing_caption_column_and_empty_caption(tmp_path, capsys, tiny_model, data_copy):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data_copy, out)
    err = run_fails(capsys, "train", str(recipe), "data.caption_column=caption")
    assert "no caption column `caption`" in err and "data.caption_column" in err and "line 1" in err
    lines = (data_copy / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    row["text"] = "  "
    lines[4] = json.dumps(row)
    (data_copy / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    err = run_fails(capsys, "train", str(recipe))
    assert "line 5" in err and "empty caption" in err
    assert_nothing_written(out)


def test_model_whose_dimensions_do_not_fit(tmp_path, capsys, tiny_model, tiny_data):
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model, bad)
    other = build_components(build_tokenizer(toy_world.vocabulary()), TINY.__class__(
        **{**TINY.__dict__, "text_dim": 48}))
    save_pipeline(other, tmp_path / "other")
    shutil.rmtree(bad / "text_encoder")
    shutil.copytree(tmp_path / "other" / "text_encoder", bad / "text_encoder")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", bad, tiny_data / "train", out)
    err = run_fails(capsys, "train", str(recipe))
    assert "cross_attention_dim=32" in err and "hidden_size=48" in err
    (tmp_path / "not_a_model").mkdir()
    err = run_fails(capsys, "train", str(recipe), f"model.pretrained={tmp_path / 'not_a_model'}")
    assert "not a diffusers pipeline directory" in err
    assert_nothing_written(out)


def test_resume_from_incompatible_checkpoint(tmp_path, capsys, tiny_model, tiny_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          train={"max_steps": 2}, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    err = run_fails(capsys, "train", str(recipe), "checkpoint.resume=latest", "model.lora.rank=4",
                    "train.max_steps=4")
    assert "model.lora.rank 0 -> 4" in err and "checkpoint-2" in err
    err = run_fails(capsys, "train", str(recipe), f"checkpoint.resume={tmp_path / 'nowhere'}")
    assert "no such checkpoint directory" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_generate_and_evaluate_never_replace_a_directory_they_did_not_write(tmp_path, capsys, tiny_model, tiny_data):
    """Pointed at a training run (or any other directory), --out is refused and left as it was; an earlier
    output of the same command is replaced."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "recipe.yaml").write_text("train: {}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    err = run_fails(capsys, "generate", str(tiny_model), "--prompts", str(prompts), "--out", str(run), "--steps", "2")
    assert str(run) in err and "choose another --out" in err
    err = run_fails(capsys, "evaluate", str(tiny_model), "--prompts", str(prompts), "--out", str(run),
                    "--no-generate", "--detectors", "noise")
    assert "choose another --out" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    out = tmp_path / "gen"
    for _ in range(2):  # the second run replaces the first one's output
        assert main(["generate", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--steps", "2"]) == 0
    assert (out / "generations.jsonl").exists()


@pytest.mark.parametrize("override, key", [
    ("train.snr_gamma=-5", "train.snr_gamma"), ("train.snr_gamma=0", "train.snr_gamma"),
    ("data.max_samples=-1", "data.max_samples"), ("data.resolution=0", "data.resolution"),
    ("model.lora.alpha=-4", "model.lora.alpha"), ("train.lr_warmup_steps=-1", "train.lr_warmup_steps"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("train.adam_beta1=1.5", "train.adam_beta1"),
    ("train.adam_epsilon=0", "train.adam_epsilon"), ("train.seed=-3", "train.seed"),
    ("log.validation_images=0", "log.validation_images"),
])
def test_out_of_range_values_are_refused_before_loading(tmp_path, capsys, override, key):
    err = run_fails(capsys, "train", "toy", "model.pretrained=/nowhere", "data.path=/nowhere",
                    f"output.dir={tmp_path / 'out'}", override)
    assert f"`{key}`" in err
    assert_nothing_written(tmp_path / "out")


def test_a_section_given_twice_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 3\ntrain:\n  batch_size: 2\n")
    err = run_fails(capsys, "train", str(recipe))
    assert "line 3" in err and "`train` is given twice" in err


def test_prompt_files_bom_binary_and_directory(tmp_path, capsys, tiny_model):
    from trainer.prompts import read_prompts

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa small red circle\n".encode())
    assert read_prompts(bom) == [{"text": "a small red circle"}]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    assert "not UTF-8" in run_fails(capsys, "generate", str(tiny_model), "--prompts", str(binary), "--out",
                                    str(tmp_path / "o"))
    assert "is a directory" in run_fails(capsys, "generate", str(tiny_model), "--prompts", str(tmp_path),
                                         "--out", str(tmp_path / "o"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle\n")
    for n in ("0", "-1"):
        assert "-n must be >= 1" in run_fails(capsys, "generate", str(tiny_model), "--prompts", str(prompts), "-n", n,
                                              "--out", str(tmp_path / "o"))
    assert_nothing_written(tmp_path / "o")


def test_file_names_outside_the_dataset_or_not_strings(tmp_path, capsys, tiny_model, data_copy):
    meta = data_copy / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    for bad, message in (('"../../secret.png"', "outside the dataset"), ("7", "must be a path string")):
        first = lines[0].split('"file_name": ', 1)
        rest = first[1].split(",", 1)[1]
        meta.write_text("\n".join([first[0] + '"file_name": ' + bad + "," + rest, *lines[1:]]) + "\n")
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data_copy, tmp_path / "out")
        err = run_fails(capsys, "train", str(recipe))
        assert message in err and "line 1" in err
        assert_nothing_written(tmp_path / "out")
