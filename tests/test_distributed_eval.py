"""`memtrain evaluate`, `memtrain generate` and `memtrain edit --evaluate` on 2 real processes (gloo, CPU)
give the 1-process outputs: the processes share whole batches of detector prompts, CLiD images and
generations (stock and guarded), the main process alone writes and prints. The counts are odd so the
shares are uneven. The commands run in one launch (a short driver script) to pay the start-up once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import trainer
from trainer.cli import main
from trainer.training.launch import free_port

DRIVER = """import sys, json
from trainer.cli import main
sys.exit(max(main(argv) for argv in json.loads(sys.argv[1])))
"""


def evaluate_args(model, data, prompts) -> list[str]:
    return ["evaluate", str(model), "--prompts", str(prompts), "--data", str(data), "--train-data",
            str(data / "train"), "--steps", "2", "-n", "2", "--batch-size", "4",
            "--detectors", "noise,anisotropy,entropy,clid", "--guard", "wen"]


def generate_args(model, prompts) -> list[str]:
    return ["generate", str(model), "--prompts", str(prompts), "-n", "2", "--steps", "2", "--batch-size", "4"]


def edit_args(model, memorized, labelled, data) -> list[str]:
    return ["edit", "uce", str(model), "--memorized", str(memorized), "--evaluate", str(labelled), "--data", str(data),
            "--eval-n", "1", "--eval-steps", "2", "--eval-detectors", "noise,clid", "--batch-size", "4",
            "--no-eval-cache"]  # both sides evaluate (the cache would hand the second run the first's evaluation)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_data):
    """Both commands on 2 processes (one launch) and on 1 process: {"one": dir, "two": dir, "stdout": ...}."""
    root = tmp_path_factory.mktemp("distributed")
    rows = (tiny_data / "labels.jsonl").read_text().splitlines()
    labelled = root / "labels.jsonl"
    labelled.write_text("\n".join(rows[:17]) + "\n")  # 5 labelled prompts, 14 membership images
    plain = root / "prompts.txt"
    plain.write_text("a red square\na blue circle\na green triangle\na red circle\na blue square\n")
    memorized = root / "memorized.txt"
    memorized.write_text(rows_text(rows[0]) + "\n")
    commands = {side: [[*evaluate_args(tiny_model, tiny_data, labelled), "--out", str(root / side / "evaluate")],
                       [*generate_args(tiny_model, plain), "--out", str(root / side / "generate")],
                       [*edit_args(tiny_model, memorized, labelled, tiny_data), "--out", str(root / side / "edit")]]
                for side in ("one", "two")}
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    source = str(Path(trainer.__file__).parent.parent)  # the driver imports this copy of trainer
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(driver), json.dumps(commands["two"])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for argv in commands["one"]:
        assert main(argv) == 0
    return {"one": root / "one", "two": root / "two", "stdout": proc.stdout}


def rows_text(line: str) -> str:
    return json.loads(line)["text"]


def comparable(value):
    """A report without wall-clock times, peak memory and the run's own paths (all that may differ between
    the runs)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()
                if "seconds" not in k and k not in ("device", "out", "checkpoint", "title", "peak_memory_mb")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def test_evaluate_on_two_processes_writes_the_one_process_report(runs):
    assert runs["stdout"].count('"report"') == 1, runs["stdout"]  # the main process alone prints
    two = json.loads((runs["two"] / "evaluate" / "report.json").read_text())
    one = json.loads((runs["one"] / "evaluate" / "report.json").read_text())
    # batches of 4: 5 labelled prompts to score (4 + 1), 14 CLiD images (8 + 6), 10 generations (8 + 2)
    assert len(one["trigger"]["prompts"]) == 5 and one["cost"]["generation"]["images"] == 10
    assert one["membership"]["members"] + one["membership"]["non_members"] == 14
    assert one["guard"]["generations"] == 10
    assert comparable(two) == comparable(one)  # bit for bit: the same batches on 1 or 2 processes
    files = sorted(p.name for p in (runs["one"] / "evaluate").iterdir())
    assert sorted(p.name for p in (runs["two"] / "evaluate").iterdir()) == files
    assert not list(runs["two"].glob(".*tmp*"))


def test_generate_on_two_processes_writes_the_one_process_images(runs):
    assert runs["stdout"].count('"images"') == 1, runs["stdout"]
    one, two = runs["one"] / "generate", runs["two"] / "generate"
    assert (two / "generations.jsonl").read_text() == (one / "generations.jsonl").read_text()
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 10 and names == sorted(p.name for p in two.glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(one / name)), np.asarray(Image.open(two / name))), name


def test_edit_evaluation_on_two_processes_is_the_one_process_evaluation(runs):
    assert runs["stdout"].count('"method"') == 1, runs["stdout"]
    one, two = runs["one"] / "edit", runs["two"] / "edit"
    edit_one, edit_two = (json.loads((d / "edit.json").read_text()) for d in (one, two))
    assert edit_one["evaluation"]["general_l2_change"]["generations"] > 0
    assert comparable(edit_two) == comparable(edit_one)
    for side in ("eval_before", "eval_after"):
        report_one, report_two = (json.loads((d / side / "report.json").read_text()) for d in (one, two))
        assert comparable(report_two) == comparable(report_one)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
