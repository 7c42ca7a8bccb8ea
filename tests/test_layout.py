"""The package layout: production modules never load the toy world, and the CLI refuses a broken verb."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import trainer
from trainer.cli import COMMANDS, build_parser

TOY_VERBS = ("demo", "compare", "toy_data")  # the toy world's own commands


def production_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer.")]
    return [n for n in names if not n.startswith("trainer.toy") and n != "trainer.cli"
            and n not in {f"trainer.commands.{v}" for v in TOY_VERBS}]


def test_production_modules_do_not_import_the_toy_world():
    modules = production_modules()
    assert len(modules) > 30
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('trainer.toy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_verb_registers_and_every_module_imports():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "evaluate", "generate", "dedup", "recipes", "demo"}
    assert len(sub.choices) == len(COMMANDS)
    for name in [m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer.")]:
        importlib.import_module(name)


def test_a_verb_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr("trainer.cli.COMMANDS", [*COMMANDS, "no_such_verb"])
    try:
        build_parser()
    except ModuleNotFoundError as e:
        assert "no_such_verb" in str(e)
    else:
        raise AssertionError("a verb whose module is missing must not be dropped silently")


def test_readme_python_api_imports_resolve():
    """Every import line of the README's Python API block names a real module and name."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert len(imports) >= 6
    exec("\n".join(imports), {})
