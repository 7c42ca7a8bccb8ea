"""Run a training recipe in N local CPU processes (gloo), one thread each, from Python; check a launch.

`torch.distributed.run` starts the processes, meeting on 127.0.0.1 at a free port (not at the
machine's host name, which need not resolve: `--standalone` then waits forever); each runs
`memtrain train` on the recipe with the per-process batch set so that the global batch is the recipe's.
The loop makes N processes equal one process at the same global batch (docs/recipes.md, "Determinism"),
so this only spreads the same training over the machine's cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def launch_command(recipe_file: Path, processes: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "trainer.cli", "train", str(recipe_file), *overrides]


def launch_env(processes: int) -> dict[str, str]:
    """CPU processes with one thread each (unless OMP_NUM_THREADS says otherwise), importing this copy of
    trainer; gloo on the loopback interface (GLOO_SOCKET_IFNAME, unless set), as all processes are local."""
    package_root = str(Path(trainer.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=path)
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback
    return env


def run_launcher(cmd: list[str], env: dict[str, str], grace: float = 60.0) -> int:
    """Run the launcher `cmd` to its end; its exit code. Interrupted (Ctrl-C, or a signal to this process
    only), the launcher gets SIGTERM, which torchrun passes on to its workers, and `grace` seconds to stop
    them, so none is left training behind; then it is killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        return proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
        cmd = launch_command(recipe_file, processes, [f"train.batch_size={batch}"])
        returncode = run_launcher(cmd, launch_env(processes))
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
