"""Training reliability: exact resume after crashes (a real kill -9 mid-checkpoint), gradient accumulation
and 2 processes; a finished run resumed; one run per output directory; Ctrl-C; a full disk; damaged
checkpoints; checkpoint.at_end; WANDB_DIR."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from trainer.cli import main
from trainer.config import load_recipe
from trainer.recipe import TrainRecipe
from trainer.tracking import read_jsonl
from trainer.training.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "logs" / "metrics.jsonl")]


def assert_same_run(full: Path, part: Path, steps: int) -> None:
    """Every step logged once, each loss and the exported weights equal bit for bit."""
    assert metric_steps(full) == list(range(1, steps + 1))
    assert metric_steps(part) == list(range(1, steps + 1))
    la = {r["step"]: r["loss"] for r in read_jsonl(full / "logs" / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in read_jsonl(part / "logs" / "metrics.jsonl")}
    assert la == lb
    a, b = unet_weights(full), unet_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str, preexec_fn=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def default_sigint() -> None:
    # a test runner started in the background of a non-interactive shell (nohup ... &) ignores SIGINT, and a
    # child Python that starts with SIGINT ignored never raises KeyboardInterrupt: restore the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=ENV, preexec_fn=default_sigint,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, poll: float = 0.001) -> None:
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended first: {proc.stderr.read()[-2000:]}")
        time.sleep(poll)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "earlier",
                                             "command": "memtrain train other.yaml"}))


# ---------------------------------------------------------------- exact resume after crashes


def test_resume_after_an_interrupted_checkpoint_write_uses_the_last_complete_one(tmp_path, tiny_model, tiny_data):
    """The state a crash inside checkpoint-8's write leaves (total_limit=1): checkpoint-4, a partial
    `.checkpoint-8.tmp`, metrics rows 1-8. The resume continues from checkpoint-4, removes the leftover,
    logs each step once and ends with the losses and weights of an uninterrupted run."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full",
                          train={"max_steps": 10}, checkpoint={"every_steps": 4, "total_limit": 1})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=8", "checkpoint.total_limit=null",
                 "output.export=none"]) == 0
    leftover = part / "checkpoints" / ".checkpoint-8.tmp"
    (part / "checkpoints" / "checkpoint-8").rename(leftover)
    weights = leftover / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert metric_steps(part) == list(range(1, 9))

    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    assert not leftover.exists()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint-8"]
    assert_same_run(tmp_path / "full", part, 10)


def test_kill_9_during_a_checkpoint_write_then_resume_is_exact(tmp_path, tiny_model, tiny_data):
    """A real `kill -9` while `.checkpoint-N.tmp` exists (the run is stopped with SIGSTOP, the temp dir
    checked, then killed), then `resume=latest`: the stale lock is taken over, the leftover removed, and
    losses and weights equal an uninterrupted run."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full",
                          train={"max_steps": 30}, checkpoint={"every_steps": 1, "total_limit": 1})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    proc = start_cli("train", str(recipe), f"output.dir={part}")
    try:
        while True:
            wait_for(lambda: any((part / "checkpoints").glob(".checkpoint-*.tmp")), proc)
            os.kill(proc.pid, signal.SIGSTOP)
            if any((part / "checkpoints").glob(".checkpoint-*.tmp")):
                break
            os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (part / LOCK_NAME).exists() and not (part / "pipeline").exists()
    killed_at = max(metric_steps(part))
    assert killed_at < 30

    with pytest.warns(UserWarning, match="taking over the lock"):
        assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    assert not list((part / "checkpoints").glob(".checkpoint-*"))
    assert not (part / LOCK_NAME).exists()
    assert_same_run(tmp_path / "full", part, 30)


@pytest.mark.parametrize("stop", [2, 3], ids=["at-epoch-boundary", "inside-epoch-1"])
def test_resume_with_gradient_accumulation_is_exact(tmp_path, tiny_model, tiny_data, stop):
    """16 rows at batch 6 = 3 micro-batches an epoch; with accumulation 2 an epoch is 2 updates, the second
    of one micro-batch. A resume at the epoch boundary or inside epoch 1 equals the uninterrupted run."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full",
                          train={"max_steps": 6, "batch_size": 6, "gradient_accumulation_steps": 2},
                          checkpoint={"every_steps": stop})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", f"train.max_steps={stop}", "output.export=none"]) == 0
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    assert_same_run(tmp_path / "full", part, 6)


def test_resume_with_the_adaptive_loss_mask_is_exact(tmp_path, tiny_model, tiny_data):
    """The running ||d(c)|| window rides in the checkpoint: resumed after the warm-up (window 8 = 2 steps of
    batch 4), the masked counts, thresholds, losses and weights equal the uninterrupted run's."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full",
                          train={"max_steps": 8, "loss_mask_quantile": 0.5, "loss_mask_window": 8,
                                 "loss_mask_timestep_bins": 2},
                          checkpoint={"every_steps": 4})
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=4", "output.export=none"]) == 0
    assert (part / "checkpoints" / "checkpoint-4" / "loss_mask_window.safetensors").is_file()
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0
    assert_same_run(tmp_path / "full", part, 8)
    full_rows, part_rows = (read_jsonl(run / "logs" / "metrics.jsonl") for run in (tmp_path / "full", part))
    keys = ("masked", "mask_threshold", "noise_magnitude")
    assert [[r.get(k) for k in keys] for r in full_rows] == [[r.get(k) for k in keys] for r in part_rows]
    assert sum(r["masked"] for r in full_rows[4:]) > 0  # masking was on across the resume


def torchrun(recipe: Path, *overrides: str, port: int) -> subprocess.CompletedProcess:
    env = dict(ENV, ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "trainer.cli", "train", str(recipe), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_resume_is_exact_and_prints_one_summary(tmp_path, tiny_model, tiny_data):
    """2 gloo processes stopped at checkpoint-5 (inside epoch 1) and resumed under torchrun == an uninterrupted
    2-process run; only the main process prints the summary JSON."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full",
                          train={"max_steps": 7, "batch_size": 2, "snr_gamma": 5.0}, checkpoint={"every_steps": 5})
    full = torchrun(recipe, port=29641)
    summaries = [line for line in full.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["steps"] == 7
    part = tmp_path / "part"
    torchrun(recipe, f"output.dir={part}", "train.max_steps=5", "output.export=none", port=29642)
    resumed = torchrun(recipe, f"output.dir={part}", "checkpoint.resume=latest", port=29643)
    summaries = [line for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["new_steps"] == 2
    assert_same_run(tmp_path / "full", part, 7)


# ---------------------------------------------------------------- finished runs, checkpoint.at_end


def test_a_finished_run_resumed_trains_nothing(tmp_path, tiny_model, tiny_data, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    exported = out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    before = (exported.stat().st_mtime_ns, (out / "logs" / "metrics.jsonl").read_text())
    with pytest.warns(UserWarning, match="already complete"):
        assert main(["train", str(recipe), "checkpoint.resume=latest"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["new_steps"] == 0 and summary["export"] == str(out / "pipeline")
    assert summary["loss"] == read_jsonl(out / "logs" / "metrics.jsonl")[-1]["loss"]
    assert (exported.stat().st_mtime_ns, (out / "logs" / "metrics.jsonl").read_text()) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # a missing export (killed during it) is written from the final checkpoint
    weights = unet_weights(out)
    os.rename(out / "pipeline", tmp_path / "old-pipeline")
    with pytest.warns(UserWarning, match="already complete"):
        assert main(["train", str(recipe), "checkpoint.resume=latest"]) == 0
    assert all(torch.equal(weights[k], v) for k, v in unet_weights(out).items())
    # past max_steps: refused
    assert main(["train", str(recipe), "checkpoint.resume=latest", "train.max_steps=3"]) == 2
    assert "past train.max_steps=3" in capsys.readouterr().err


def test_no_unrequested_final_checkpoint_unless_at_end(tmp_path, tiny_model, tiny_data):
    for at_end, expected in ((False, ["checkpoint-2", "checkpoint-4"]),
                             (True, ["checkpoint-2", "checkpoint-4", "checkpoint-5"])):
        out = tmp_path / f"at-end-{at_end}"
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, train={"max_steps": 5},
                              checkpoint={"at_end": at_end}, output={"export": "none"})
        assert main(["train", str(recipe)]) == 0
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == expected
    # the demo recipe's last step is a multiple of its checkpoint interval: it still ends with a checkpoint
    toy = load_recipe(TrainRecipe, "toy", [])
    assert toy.train.max_steps % toy.checkpoint.every_steps == 0


# ---------------------------------------------------------------- one run per output directory


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, tiny_model, tiny_data, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, train={"max_steps": 2},
                          output={"export": "none"})
    holder = subprocess.Popen(["sleep", "600"])  # a live process on this host holds the lock
    try:
        for pid, host in ((holder.pid, socket.gethostname()), (os.getpid(), "another-host")):
            write_lock(out, pid, host)
            assert main(["train", str(recipe)]) == 2
            err = capsys.readouterr().err
            assert f"in use by another memtrain run (pid {pid} on host {host}" in err
            assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, lock kept
    finally:
        holder.kill()
        holder.wait()
    write_lock(out, dead_pid(), socket.gethostname())
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert main(["train", str(recipe)]) == 0
    assert not (out / LOCK_NAME).exists()
    assert metric_steps(out) == [1, 2]


def test_a_second_run_into_an_earlier_runs_dir_is_refused_unless_overwrite(tmp_path, tiny_model, tiny_data,
                                                                           capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", str(recipe), "train.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "checkpoint.resume=latest" in err and "output.overwrite=true" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert main(["train", str(recipe), "train.learning_rate=0.01", "train.max_steps=3",
                 "output.overwrite=true"]) == 0
    assert metric_steps(out) == [1, 2, 3]  # the earlier run's rows are gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert all(r["lr"] == 0.01 for r in read_jsonl(out / "logs" / "metrics.jsonl"))


# ---------------------------------------------------------------- Ctrl-C, full disk, damaged checkpoints


def test_ctrl_c_prints_one_line_exits_130_and_releases_the_lock(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          train={"max_steps": 100000}, output={"export": "none"})
    proc = start_cli("train", str(recipe))
    try:
        wait_for(lambda: (out / "checkpoints" / "checkpoint-2").is_dir(), proc, poll=0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("memtrain train: interrupted at step ")
    assert "the last complete checkpoint is " + str(out / "checkpoints" / "checkpoint-") in last
    assert last.endswith("resume with checkpoint.resume=latest")
    assert not (out / LOCK_NAME).exists()


def limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_during_a_checkpoint_or_the_export_is_one_clear_error(tmp_path, tiny_model, tiny_data):
    """Real write failures (RLIMIT_FSIZE below the weight files' size): the message names the file being
    written and the intact last checkpoint; the run resumes from it afterwards and ends as an uninterrupted one."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "full")
    assert main(["train", str(recipe)]) == 0
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"output.dir={out}", "train.max_steps=2", "output.export=none"]) == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    limit = limit_file_size((ckpt / "model.safetensors").stat().st_size // 2)

    proc = cli("train", str(recipe), f"output.dir={out}", "checkpoint.resume=latest", preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint checkpoint-4: writing " + str(out / "checkpoints" / ".checkpoint-4.tmp") in err
    assert f"the last complete checkpoint {ckpt} is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / LOCK_NAME).exists()

    assert main(["train", str(recipe), f"output.dir={out}", "checkpoint.resume=latest", "train.max_steps=4",
                 "output.export=none"]) == 0
    proc = cli("train", str(recipe), f"output.dir={out}", "checkpoint.resume=latest", preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "export: writing " + str(out / ".pipeline.tmp-") in err
    assert f"the last complete checkpoint {out / 'checkpoints' / 'checkpoint-4'} is intact" in err
    assert not (out / "pipeline").exists() and not list(out.glob(".pipeline*"))

    assert main(["train", str(recipe), f"output.dir={out}", "checkpoint.resume=latest"]) == 0
    assert_same_run(tmp_path / "full", out, 4)


@pytest.mark.slow
def test_a_full_disk_on_2_processes_stops_both(tmp_path, tiny_model, tiny_data):
    """Rank 0 fails writing the weights while rank 1's small RNG file fits: both stop with the message
    (none waits at a barrier), and the last checkpoint stays intact."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          train={"batch_size": 2, "max_steps": 2}, output={"export": "none"})
    torchrun(recipe, port=29644)
    ckpt = out / "checkpoints" / "checkpoint-2"
    env = dict(ENV, ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29645",
           "-m", "trainer.cli", "train", str(recipe), "checkpoint.resume=latest", "train.max_steps=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size((ckpt / "model.safetensors").stat().st_size // 2))
    assert proc.returncode != 0
    assert "memtrain train: error: checkpoint checkpoint-4: writing " in proc.stderr
    assert f"the last complete checkpoint {ckpt} is intact" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("damage", ["garbage-optimizer", "empty-weights"])
def test_a_damaged_checkpoint_file_is_one_clear_error(tmp_path, tiny_model, tiny_data, capsys, damage):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, output={"export": "none"},
                          checkpoint={"every_steps": 1}, train={"max_steps": 2})
    assert main(["train", str(recipe)]) == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    name = {"garbage-optimizer": "optimizer.bin", "empty-weights": "model.safetensors"}[damage]
    (ckpt / name).write_bytes(b"\x00garbage" * 100 if damage == "garbage-optimizer" else b"")
    capsys.readouterr()
    before = (out / "logs" / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), "checkpoint.resume=latest", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt / name) in err and "earlier checkpoint" in err and "new output.dir" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert (out / "logs" / "metrics.jsonl").read_text() == before
    # the earlier checkpoint resumes
    assert main(["train", str(recipe), f"checkpoint.resume={out / 'checkpoints' / 'checkpoint-1'}",
                 "train.max_steps=3"]) == 0
    assert metric_steps(out) == [1, 2, 3]


# ---------------------------------------------------------------- W&B


def test_wandb_dir_is_respected(tmp_path, tiny_model, tiny_data, monkeypatch):
    home = tmp_path / "wandb-home"
    home.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home))
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, train={"max_steps": 1},
                          log={"trackers": ["wandb"]}, output={"export": "none"})
    assert main(["train", str(recipe)]) == 0
    assert list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert not (out / "wandb").exists()


def test_ctrl_c_in_any_command_is_one_line_and_leaves_no_partial_output(tmp_path):
    out = tmp_path / "toy"
    proc = start_cli("toy-data", str(out), "--n-singletons", "1500", "--no-unique-captions")
    try:
        wait_for(lambda: any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob(".toy.tmp-*")), proc, poll=0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "memtrain toy-data: interrupted" and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())
