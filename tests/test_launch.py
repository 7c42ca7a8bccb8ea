"""Launching training over processes: `memtrain demo`'s CPU launcher, a launch accelerate cannot join
refused, and the shipped DeepSpeed ZeRO-2 config run for real (when deepspeed is installed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import SGD, assert_same_sgd_steps, optional_extra, write_recipe
from safetensors.torch import load_file

from trainer.cli import main
from trainer.config import load_recipe
from trainer.io import MemtrainError
from trainer.recipe import TrainRecipe
from trainer.tracking import read_jsonl
from trainer.training.launch import (
    free_port,
    process_envs,
    run_processes,
    train_command,
    train_on_cpu_processes,
)

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "logs" / "metrics.jsonl") if "loss" in r}


def test_two_cpu_processes_from_python_equal_one(tmp_path, tiny_model, tiny_data):
    """The same steps, gradient for gradient: the optimizer made plain SGD (conftest.SGD)."""
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "two",
                               train={"batch_size": 4, "max_steps": 3, **SGD}, checkpoint={"every_steps": 100})
    recipe = load_recipe(TrainRecipe, recipe_file)
    summary = train_on_cpu_processes(recipe, 2)
    assert summary["steps"] == 3 and summary["export"] == str(tmp_path / "two" / "pipeline")
    assert main(["train", str(recipe_file), f"output.dir={tmp_path / 'one'}"]) == 0
    assert_same_sgd_steps(tiny_model, tmp_path / "two" / "pipeline", tmp_path / "one" / "pipeline")
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert two.keys() == one.keys() == {1, 2, 3}
    assert all(abs(two[s] - one[s]) < 1e-5 * one[s] for s in one)
    assert summary["loss"] == two[3]

    with pytest.raises(MemtrainError, match="batch_size 4 cannot be split over 3 processes"):
        train_on_cpu_processes(recipe, 3)


def dns_query_name(packet: bytes) -> str:
    labels, i = [], 12  # the question's name follows the 12-byte header, as length-prefixed labels
    while packet[i]:
        labels.append(packet[i + 1:i + 1 + packet[i]].decode(errors="replace"))
        i += 1 + packet[i]
    return ".".join(labels)


@pytest.fixture
def silent_resolver(tmp_path):
    """A name server on 127.0.0.1:53 that records every query and answers none (a resolver that does not
    answer, as on machines without a network: each lookup waits for its timeout), and a resolv.conf
    naming it; skipped where this process cannot rename its host and bind port 53 (needs root)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-u", "-m", "hostname", "memtrain-no-such-host"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -u -m (root) to rename the host and replace resolv.conf")
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind(("127.0.0.1", 53))
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.1:53: {e}")
    queries: list[str] = []

    def record():
        while True:
            try:
                queries.append(dns_query_name(server.recvfrom(4096)[0]))
            except OSError:
                return

    threading.Thread(target=record, daemon=True).start()
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    yield conf, queries
    server.close()


def test_the_processes_meet_without_looking_up_the_host_name(tmp_path, tiny_model, tiny_data, silent_resolver):
    """A machine whose host name is in no resolver and whose resolver does not answer (fresh CI machines,
    some containers): a launch that meets at the host name (`torchrun --standalone`) waits forever, and
    torchrun's agent looks it up several times, each lookup waiting for the DNS timeout."""
    conf, queries = silent_resolver
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out",
                          train={"batch_size": 4, "max_steps": 1}, checkpoint={"every_steps": 100},
                          output={"export": "none"})
    code = ("import json, sys; from trainer.config import load_recipe; from trainer.recipe import TrainRecipe; "
            "from trainer.training.launch import train_on_cpu_processes; "
            "print(json.dumps(train_on_cpu_processes(load_recipe(TrainRecipe, sys.argv[1]), 2)))")
    script = (f'mount --bind {conf} /etc/resolv.conf && hostname memtrain-no-such-host && '
              f'exec "$0" -c "{code}" "$1"')
    proc = subprocess.run(["unshare", "-u", "-m", "sh", "-c", script, sys.executable, str(recipe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["steps"] == 1
    assert not [name for name in queries if name.startswith("memtrain-no-such-host")], queries


def test_when_one_process_fails_the_others_are_stopped():
    """Rank 1 exits with 3 while rank 0 would run for ten minutes (as it would wait at its next collective):
    the launch returns 3 at once and stops rank 0."""
    cmd = [sys.executable, "-c", "import os, sys, time; rank = int(os.environ['RANK']); "
           "time.sleep(0.5) if rank else time.sleep(600); sys.exit(3)"]
    started = time.monotonic()
    assert run_processes(cmd, process_envs(2), grace=5) == 3
    assert time.monotonic() - started < 60


def test_no_ddp_wrapper_outlives_the_process_group(tmp_path, tiny_model, tiny_data):
    """When a process group is destroyed, no DDP wrapper is left: else its Reducer, holding the group's last
    reference, destroys the group later on Python's dealloc with the GIL held, which deadlocks against gloo's
    worker thread when that is still freeing the last collective's tensors (a training process hung at exit
    under load). Each of 2 processes checks it inside `destroy_process_group` and fails the run if not."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out",
                          train={"batch_size": 2, "max_steps": 2}, checkpoint={"every_steps": 2},
                          output={"export": "none"})
    code = ("import gc, sys, torch.distributed as dist; from torch.nn.parallel import DistributedDataParallel as DDP\n"
            "destroy = dist.destroy_process_group\n"
            "def checked(*args, **kwargs):\n"
            "    gc.collect()\n"
            "    alive = [o for o in gc.get_objects() if isinstance(o, DDP)]\n"
            "    if alive: sys.exit(f'{len(alive)} DDP wrapper(s) alive at destroy_process_group')\n"
            "    return destroy(*args, **kwargs)\n"
            "dist.destroy_process_group = checked\n"
            "from trainer.cli import main; sys.exit(main(['train', sys.argv[1]]))")
    assert run_processes([sys.executable, "-c", code, str(recipe)], process_envs(2)) == 0
    assert losses(tmp_path / "out").keys() == {1, 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_a_launch_whose_processes_would_each_train_alone_is_refused(tmp_path, tiny_model, tiny_data):
    """torchrun without ACCELERATE_USE_CPU on a machine without GPUs: accelerate gives each process a world
    of its own; both would train into one output dir."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    proc = subprocess.run(torchrun + train_command(recipe, [])[1:], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "launched as 2 processes, but accelerate set up 1" in proc.stderr
    assert "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not out.exists()


def deepspeed_config(tmp_path: Path) -> Path:
    """recipes/accelerate/deepspeed_zero2.yaml on this machine: 1 process (accelerate joins DeepSpeed
    processes on GPUs only), fp32 (the CPU has no bf16 DeepSpeed path to test against)."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    config.update(num_processes=1, mixed_precision="no")
    path = tmp_path / "deepspeed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@optional_extra("deepspeed")
def test_deepspeed_zero2_trains_checkpoints_resumes_and_exports(tmp_path, tiny_model, tiny_data):
    config = deepspeed_config(tmp_path)

    def launch(out: Path, *overrides: str) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
               "--main_process_port", "29641", "-m", "trainer.cli", "train", str(recipe), f"output.dir={out}", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "unused",
                          train={"batch_size": 2, "max_steps": 4}, checkpoint={"every_steps": 2})
    for out, *overrides in ((tmp_path / "whole", "train.ema=true"), (tmp_path / "resumed", "train.ema=true",
                            "train.max_steps=2"), (tmp_path / "resumed", "train.ema=true", "checkpoint.resume=latest")):
        proc = launch(out, *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]

    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()  # DeepSpeed's format
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    whole, resumed = load_file(str(tmp_path / "whole" / "pipeline" / UNET)), load_file(str(tmp_path / "resumed" / "pipeline" / UNET))
    assert all((whole[k] == resumed[k]).all() for k in whole)

    proc = launch(tmp_path / "both", "model.train_text_encoder=true")
    assert proc.returncode != 0 and "error: model.train_text_encoder:" in proc.stderr
    assert not (tmp_path / "both").exists()


def test_an_fsdp_or_deepspeed_config_that_is_not_in_effect_is_a_warning(monkeypatch, tmp_path, tiny_model, tiny_data):
    """accelerate turns an FSDP config on CPUs into DDP (or a lone process) without a word."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainer.training.launch import check_launch

    recipe = load_recipe(TrainRecipe, write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "o"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    try:
        accelerator = Accelerator(cpu=True)
        with pytest.warns(UserWarning, match="asks for FSDP, but this run is NO"):
            check_launch(accelerator, recipe)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(MemtrainError, match="launched as 2 processes, but accelerate set up 1"):
            check_launch(accelerator, recipe)
    finally:
        AcceleratorState._reset_state()


def test_train_help_says_how_to_train_on_several_processes_and_that_the_batch_is_per_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for fragment in ("`train.batch_size` is per process", "train.batch_size x processes x "
                     "train.gradient_accumulation_steps", "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2",
                     "accelerate launch", "allow_changes"):
        assert fragment in out, fragment


@pytest.mark.slow
def test_an_interrupt_to_the_parent_alone_stops_the_training_processes(tmp_path, tiny_model, tiny_data):
    """SIGINT to the process that launched the 2 training processes (as `memtrain demo` does), not to its
    process group: the workers stop too, none is left training behind it."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out",
                          train={"batch_size": 4, "max_steps": 100000}, checkpoint={"every_steps": 100000})
    script = ("import sys; from trainer.config import load_recipe; from trainer.recipe import TrainRecipe; "
              "from trainer.training.launch import train_on_cpu_processes; "
              "train_on_cpu_processes(load_recipe(TrainRecipe, sys.argv[1]), 2)")
    log = open(tmp_path / "stderr.txt", "w")  # not a pipe: the workers write to it too, and nobody reads a pipe
    parent = subprocess.Popen([sys.executable, "-c", script, str(recipe)], cwd=ROOT, stderr=log,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers = []
    deadline = time.time() + 300
    while len(workers) < 2 and time.time() < deadline:  # the two workers, running the training
        assert parent.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                   if "trainer.cli" in " ".join(p.cmdline())]
        time.sleep(0.5)
    assert len(workers) == 2
    while not (tmp_path / "out" / "logs" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)  # they are training
    descendants = psutil.Process(parent.pid).children(recursive=True)
    parent.send_signal(signal.SIGINT)
    assert parent.wait(timeout=120) != 0
    gone, alive = psutil.wait_procs(descendants, timeout=60)
    log.close()
    for p in alive:  # left behind: stop them before failing
        p.kill()
    assert not alive, [p.cmdline() for p in alive]
