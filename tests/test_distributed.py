"""A real 2-process (gloo, CPU) training equals a 1-process run with the same global batch, gradient for
gradient (the optimizer made plain SGD: conftest.SGD)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SGD, assert_same_sgd_steps, write_recipe

from trainer.cli import main
from trainer.tracking import read_jsonl
from trainer.training.launch import free_port


def test_two_processes_match_one_process(tmp_path, tiny_model, tiny_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "two",
                          train={"batch_size": 2, "max_steps": 4, "snr_gamma": 5.0, **SGD})
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "trainer.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and '"steps": 4' in summaries[0]  # only the main process prints the summary
    one = tmp_path / "one"
    assert main(["train", str(recipe), "train.batch_size=4", f"output.dir={one}"]) == 0

    # both ranks saved their RNG state; only the main process logged
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-4"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    two_log, one_log = read_jsonl(tmp_path / "two" / "logs" / "metrics.jsonl"), read_jsonl(one / "logs" / "metrics.jsonl")
    assert [r["step"] for r in two_log] == [1, 2, 3, 4]
    assert_same_sgd_steps(tiny_model, tmp_path / "two" / "pipeline", one / "pipeline")
    for a, b in zip(two_log, one_log, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(b["loss"])


def test_two_processes_mask_as_one_process(tmp_path, tiny_model, tiny_data):
    """The adaptive loss mask's window is gathered from both processes in global batch order: 2 processes of
    batch 2 mask the same samples, with the same thresholds, as 1 process of batch 4."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "two",
                          train={"batch_size": 2, "max_steps": 6, "loss_mask_quantile": 0.5, "loss_mask_window": 8,
                                 "loss_mask_timestep_bins": 2})
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           "-m", "trainer.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    assert main(["train", str(recipe), "train.batch_size=4", f"output.dir={one}"]) == 0
    two_log, one_log = read_jsonl(tmp_path / "two" / "logs" / "metrics.jsonl"), read_jsonl(one / "logs" / "metrics.jsonl")
    assert [r["masked"] for r in two_log] == [r["masked"] for r in one_log]
    assert sum(r["masked"] for r in one_log) > 0 and "mask_threshold" in one_log[-1]
    for a, b in zip(two_log, one_log, strict=True):
        assert abs(a.get("mask_threshold", 0) - b.get("mask_threshold", 0)) <= 1e-5 * abs(b.get("mask_threshold", 1))


@pytest.mark.slow
def test_two_processes_print_no_grad_strides_notice(tmp_path, tiny_model, tiny_data):
    """At 8 samples per process oneDNN's gradient of a 1x1 convolution has other strides on its size-1 dimensions
    than DDP's bucket view; DDP said so once per process."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "two",
                          train={"batch_size": 16, "max_steps": 1}, output={"export": "none"})
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "trainer.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Grad strides" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr[-3000:]
