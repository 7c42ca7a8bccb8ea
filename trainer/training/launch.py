"""Run a training recipe in N local CPU processes (gloo), one thread each, from Python; check a launch.

The processes are started here, each with the environment torchrun would give it (rank, world size, the
rendezvous at 127.0.0.1 on a free port), and each runs `memtrain train` on the recipe with the per-process
batch set so that the global batch is the recipe's. Not torchrun itself: its agent looks the machine's host
name up several times, and where that name is in no resolver (fresh CI machines, some containers) every
lookup waits for the DNS timeout, minutes in all. The loop makes N processes equal one process at the same
global batch (docs/recipes.md, "Determinism"), so this only spreads the same training over the machine's cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

import trainer
from trainer.config import dump_recipe
from trainer.io import MemtrainError
from trainer.recipe import TrainRecipe
from trainer.tracking import read_jsonl


def per_process_batch(recipe: TrainRecipe, processes: int) -> int:
    batch = recipe.train.batch_size
    if processes < 1 or batch % processes:
        raise MemtrainError(f"train.batch_size {batch} cannot be split over {processes} processes; "
                            "use a process count that divides it")
    return batch // processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(recipe_file: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", str(recipe_file), *overrides]


def process_envs(processes: int) -> list[dict[str, str]]:
    """The environment of each of `processes` local CPU processes, as torchrun would set it: rank, world, and
    the rendezvous at 127.0.0.1 on a free port; one thread each (unless OMP_NUM_THREADS says otherwise), this
    copy of trainer imported, gloo on the loopback interface (GLOO_SOCKET_IFNAME, unless set)."""
    package_root = str(Path(trainer.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    common = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                  PYTHONPATH=path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback and "GLOO_SOCKET_IFNAME" not in common:
        common["GLOO_SOCKET_IFNAME"] = loopback
    return [dict(common, RANK=str(rank), LOCAL_RANK=str(rank)) for rank in range(processes)]


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process still running, `grace` seconds to end, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_processes(cmd: list[str], envs: list[dict[str, str]], grace: float = 60.0) -> int:
    """Run `cmd` once per environment in `envs`, to the end of all; the first nonzero exit code, or 0. When one
    process fails, the others are stopped (they would wait forever at their next collective); interrupted
    (Ctrl-C, or a signal to this process only), all are stopped, so none is left training behind."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for env in envs]
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None or all(code == 0 for code in codes):
                stop(procs, grace)
                return failed or 0
            time.sleep(0.2)
    except BaseException:
        stop(procs, grace)
        raise


def train_on_cpu_processes(recipe: TrainRecipe, processes: int) -> dict:
    """Train `recipe` (its batch_size is the global batch) in `processes` gloo processes; return the
    summary of `train` (steps, last logged loss, export path, output dir)."""
    recipe.validate()
    batch = per_process_batch(recipe, processes)
    out = Path(recipe.output.dir)
    with tempfile.TemporaryDirectory(prefix="memtrain_launch_") as tmp:
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(dump_recipe(recipe))
        cmd = train_command(recipe_file, [f"train.batch_size={batch}"])
        returncode = run_processes(cmd, process_envs(processes))
    if returncode != 0:
        raise MemtrainError(f"training in {processes} processes failed (exit code {returncode}); "
                            "the first error is printed above")
    logged = read_jsonl(out / "logs" / "metrics.jsonl")
    last = next((row for row in reversed(logged) if "loss" in row), {})
    export = out / recipe.export if recipe.export != "none" else None
    return {"steps": last.get("step"), "loss": last.get("loss"), "export": str(export) if export else None,
            "output_dir": str(out)}


def check_precision(recipe: TrainRecipe, on_cpu: bool) -> None:
    """Refuse fp16 on a CPU (accelerate has no fp16 autocast there); checked before the Accelerator is made too."""
    if recipe.train.mixed_precision == "fp16" and on_cpu:
        raise MemtrainError("recipe: `train.mixed_precision=fp16` needs a GPU: accelerate has no fp16 autocast on the "
                            "CPU, so this run would train in fp32 while its recipe says fp16; use bf16 (which runs on "
                            "the CPU) or no")


def check_launch(accelerator: Accelerator, recipe: TrainRecipe) -> None:
    """Refuse a launch whose processes would each train alone into one output dir: accelerate gives every
    process a world of its own when the launcher's backend does not exist here (torchrun on a machine
    without GPUs, FSDP with use_cpu); what DeepSpeed cannot train; fp16 on a CPU (no autocast there)."""
    check_precision(recipe, accelerator.device.type == "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise MemtrainError(
            f"launched as {launched} processes, but accelerate set up {accelerator.num_processes} (distributed type "
            f"{accelerator.distributed_type.value}), so each would train alone; on CPUs set ACCELERATE_USE_CPU=1 "
            "(DDP over gloo; accelerate runs FSDP and DeepSpeed across processes on GPUs only)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and recipe.model.train_text_encoder:
        raise MemtrainError("model.train_text_encoder: accelerate's DeepSpeed path trains one model (the UNet); "
                            "set model.train_text_encoder=false, or use DDP")
    for kind, env in ((DistributedType.FSDP, "ACCELERATE_USE_FSDP"), (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != kind:
            warnings.warn(f"the accelerate config asks for {kind.value}, but this run is "
                          f"{accelerator.distributed_type.value} (accelerate runs {kind.value} on GPUs only)", stacklevel=2)
