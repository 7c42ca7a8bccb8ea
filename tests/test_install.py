"""A non-editable install (a built wheel) carries the recipes and the toy base: run it from outside the source tree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel of this checkout installed (without dependencies) into a fresh directory; the environment
    runs `memtrain` from it with the current interpreter's dependencies, in a directory outside the source."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("memtrain-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
                    str(wheel)], check=True, cwd=tmp)
    env = dict(os.environ, PYTHONPATH=str(tmp / "site"))
    return {"env": env, "cwd": tmp, "site": tmp / "site"}


def memtrain(installed, *args) -> subprocess.CompletedProcess:
    code = "import sys; from trainer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=installed["env"], cwd=installed["cwd"],
                          capture_output=True, text=True)


def test_wheel_lists_and_reads_builtin_recipes(installed):
    probe = subprocess.run([sys.executable, "-c", "import trainer; print(trainer.__file__)"], env=installed["env"],
                           cwd=installed["cwd"], capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(installed["site"]))  # not the source tree
    listed = memtrain(installed, "recipes")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"sd15-lora", "sd15-full", "sd21-lora", "toy", "toy-mitigated"} <= set(names)
    helped = memtrain(installed, "train", "sd15-lora", "--help")
    assert helped.returncode == 0 and "recipe keys" in helped.stdout
    printed = memtrain(installed, "train", "sd15-lora", "model.pretrained=/models/sd15", "--print-recipe")
    assert printed.returncode == 0, printed.stderr
    assert "rank: 16" in printed.stdout and "/models/sd15" in printed.stdout
    missing = memtrain(installed, "train", "sd99-lora")
    assert missing.returncode == 2 and "sd15-lora" in missing.stderr  # the error lists the built-in names


@pytest.mark.slow
def test_wheel_runs_the_demo(installed):
    run = memtrain(installed, "demo", "--out", "demo", "-n", "1", "train.max_steps=20", "log.progress=false")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (installed["cwd"] / "demo" / "report.md").exists()
