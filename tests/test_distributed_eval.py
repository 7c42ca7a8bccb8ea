"""`memtrain evaluate` and `memtrain generate` on 2 real processes (gloo, CPU) give the 1-process outputs:
the processes share whole batches of detector prompts, CLiD samples and generations, the main process
alone writes and prints. The prompt counts are odd so the shares are uneven."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

from trainer.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(*argv) -> subprocess.CompletedProcess:
    port = free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "trainer.cli", *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def without_timings(value):
    """The report without wall-clock times (the only numbers that may differ between runs)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def odd_prompt_file(tiny_data, path, count):
    rows = (tiny_data / "labels.jsonl").read_text().splitlines()
    path.write_text("\n".join(rows[:count]) + "\n")
    return path


def test_evaluate_on_two_processes_writes_the_one_process_report(tmp_path, tiny_model, tiny_data):
    prompts = odd_prompt_file(tiny_data, tmp_path / "labels.jsonl", 17)
    args = ["evaluate", tiny_model, "--prompts", prompts, "--data", tiny_data, "--train-data", tiny_data / "train",
            "--steps", "2",
            "-n", "2", "--batch-size", "4", "--detectors", "noise,anisotropy,entropy,clid", "--guard", "wen"]
    proc = run_two_processes(*args, "--out", tmp_path / "two")
    assert proc.stdout.count('"report"') == 1, proc.stdout  # the main process alone prints
    assert main([*map(str, args), "--out", str(tmp_path / "one")]) == 0

    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    # batches of 4: 5 labelled prompts (4 + 1 to score), 14 CLiD images (8 + 6), 10 generations (8 + 2)
    assert len(one["trigger"]["prompts"]) == 5 and one["cost"]["generation"]["images"] == 10
    assert one["membership"]["members"] + one["membership"]["non_members"] == 14
    assert one["guard"]["generations"] == 10
    two["config"].pop("device"), one["config"].pop("device")
    assert without_timings(two) == without_timings(one)  # bit for bit: the same batches on 1 or 2 processes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not list(tmp_path.glob(".*tmp*"))


def test_generate_on_two_processes_writes_the_one_process_images(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\na red circle\na blue square\n")
    args = ["generate", tiny_model, "--prompts", prompts, "-n", "2", "--steps", "2", "--batch-size", "4"]
    proc = run_two_processes(*args, "--out", tmp_path / "two")
    assert proc.stdout.count('"images"') == 1, proc.stdout
    assert main([*map(str, args), "--out", str(tmp_path / "one")]) == 0

    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "generations.jsonl").read_text() == (one / "generations.jsonl").read_text()
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 10 and names == sorted(p.name for p in two.glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(one / name)), np.asarray(Image.open(two / name))), name
