"""Resume with a changed recipe: every key that changes the training trajectory is recorded in the checkpoint
and compared (one error listing the changes, unless `checkpoint.allow_changes` names them, then the summary
does); keys that do not change it stay free; a refused RNG state file is one error naming it."""

from __future__ import annotations

import fractions
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from trainer.cli import main
from trainer.tracking import read_jsonl
from trainer.training.checkpoints import CHECKPOINT_INFO


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_data) -> tuple[Path, Path]:
    """(recipe, run): 2 steps at learning rate 1e-3, constant schedule, a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("resume_recipe")
    recipe = write_recipe(root / "r.yaml", tiny_model, tiny_data / "train", root / "run",
                          train={"max_steps": 2}, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    return recipe, root / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def resume(recipe: Path, out: Path, *overrides: str) -> int:
    return main(["train", str(recipe), f"output.dir={out}", "checkpoint.resume=latest", *overrides])


def steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "logs" / "metrics.jsonl")]


def test_a_changed_trajectory_key_is_refused_listing_every_change(trained, tmp_path, tiny_data, capsys):
    recipe, run = trained
    out = copy_run(run, tmp_path)
    other_data = shutil.copytree(tiny_data / "train", tmp_path / "other-data")
    capsys.readouterr()
    code = resume(recipe, out, "train.max_steps=4", "train.learning_rate=2e-3", "train.noise_offset=0.1",
                  f"data.path={other_data}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    for change in ("train.learning_rate 0.001 -> 0.002", "train.noise_offset 0.0 -> 0.1",
                   f"data.path '{(tiny_data / 'train').resolve()}' -> '{other_data.resolve()}'",
                   "checkpoint.allow_changes=[data.path,train.learning_rate,train.noise_offset]"):
        assert change in err, (change, err)
    assert steps(out) == [1, 2]  # nothing trained, nothing rewritten


def test_allowed_changes_resume_and_the_summary_names_them(trained, tmp_path, capsys):
    recipe, run = trained
    out = copy_run(run, tmp_path)
    capsys.readouterr()
    assert resume(recipe, out, "train.max_steps=4", "train.learning_rate=2e-3", "train.noise_offset=0.1",
                  "checkpoint.allow_changes=[train.learning_rate,train.noise_offset]") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["allowed_changes"] == {"train.learning_rate": [0.001, 0.002], "train.noise_offset": [0.0, 0.1]}
    rows = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["lr"] for r in rows] == [1e-3, 1e-3, 2e-3, 2e-3]
    # the new checkpoint records the new values: resuming it with them is no change
    info = json.loads((out / "checkpoints" / "checkpoint-4" / CHECKPOINT_INFO).read_text())
    assert info["recipe"]["train.learning_rate"] == 2e-3 and info["recipe"]["train.noise_offset"] == 0.1


def test_free_keys_and_the_same_paths_written_otherwise_resume(trained, tmp_path, tiny_model, tiny_data, capsys):
    """Logging, checkpointing, the output, a longer run under a constant schedule and keys the recipe does not use
    are free; a model path with a trailing slash or through a symlink is the same model."""
    recipe, run = trained
    out = copy_run(run, tmp_path)
    (tmp_path / "model-link").symlink_to(tiny_model)
    capsys.readouterr()
    assert resume(recipe, out, "train.max_steps=3", "log.every_steps=2", "checkpoint.every_steps=1",
                  "checkpoint.total_limit=1", "train.dataloader_num_workers=0", "train.gradient_checkpointing=true", "data.cache=true",
                  f"model.pretrained={tmp_path / 'model-link'}/", f"data.path={tiny_data / 'train'}/",
                  "model.lora.target_modules=[to_k]", "train.ema_decay=0.5") == 0  # unused by this recipe
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["new_steps"] == 1 and "allowed_changes" not in summary


def test_a_schedule_that_depends_on_max_steps_refuses_a_longer_run(tmp_path, tiny_model, tiny_data, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, output={"export": "none"},
                          train={"max_steps": 2, "lr_scheduler": "linear"})
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert resume(recipe, out, "train.max_steps=4") == 2
    assert "train.max_steps 2 -> 4" in capsys.readouterr().err
    assert resume(recipe, out, "train.max_steps=4", "checkpoint.allow_changes=[train.max_steps]") == 0
    assert steps(out) == [1, 2, 3, 4]


def test_a_checkpoint_of_an_earlier_version_is_compared_on_what_it_recorded(trained, tmp_path, tiny_model, capsys):
    recipe, run = trained
    out = copy_run(run, tmp_path)
    info_file = out / "checkpoints" / "checkpoint-2" / CHECKPOINT_INFO
    legacy = {"model": f"{tiny_model}/", "lora_rank": 0, "lora_target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
              "train_text_encoder": False, "ema": True, "global_batch": 4, "step": 2}
    info_file.write_text(json.dumps(legacy))
    capsys.readouterr()
    assert resume(recipe, out, "train.max_steps=3") == 2
    assert "train.ema True -> False" in capsys.readouterr().err
    info_file.write_text(json.dumps(dict(legacy, ema=False)))
    assert resume(recipe, out, "train.max_steps=3", "train.learning_rate=5e-4") == 0  # not recorded then


@pytest.mark.parametrize("damage", ["planted-object", "not-rng-states"])
def test_a_refused_rng_state_file_is_one_clear_error(trained, tmp_path, capsys, damage):
    """accelerate refuses such a file and resumes without the RNG state (not the exact resume promised)."""
    recipe, run = trained
    out = copy_run(run, tmp_path)
    state = out / "checkpoints" / "checkpoint-2" / "random_states_0.pkl"
    torch.save({"step": 0, "x": fractions.Fraction(1, 3)} if damage == "planted-object" else {"step": 0}, state)
    capsys.readouterr()
    assert resume(recipe, out, "train.max_steps=3") == 2
    err = capsys.readouterr().err
    assert str(state) in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert "earlier checkpoint" in err and steps(out) == [1, 2]
