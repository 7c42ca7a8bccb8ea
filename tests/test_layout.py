"""The package layout: the layers import only downwards (docs/architecture.md), no private name crosses a
module, functions and modules stay short, production modules never load the toy world, and the CLI
refuses a broken verb."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import trainer
from trainer.cli import COMMANDS, build_parser

TOY_VERBS = ("demo", "compare", "toy_data")  # the toy world's own commands
PACKAGE = Path(trainer.__file__).parent

# The allowed order, lowest first (docs/architecture.md, "Layers"): a module may import its own layer and
# the layers below it, never one above.
LAYERS = [
    ("__init__", "io"),
    ("prompts", "tracking", "config"),
    ("data_shards",),
    ("data",),
    ("plots",),
    ("core",),
    ("measure",),
    ("mitigate",),
    ("recipe",),
    ("sample",),
    ("detect",),
    ("training",),
    ("edit",),
    ("report",),
    ("toy",),
    ("commands",),
    ("cli",),
]
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 400
# Named allowances ({path: reason} / {path:function: reason}); an entry that no longer needs its allowance fails too.
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def layer_of(module: str) -> int:
    """The layer of `trainer.X...` by its first part below `trainer`."""
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of the package."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def trainer_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import of a trainer module in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "trainer"]
    return found


def test_layers_import_only_downwards():
    files = source_files()
    assert {m.split(".")[1] for m in files if "." in m} <= {n for names in LAYERS for n in names}
    upward = []
    for module, path in files.items():
        for line, target, names in trainer_imports(path):
            for name in names or [""]:
                full = f"{target}.{name}" if f"{target}.{name}" in files else target
                if layer_of(full) > layer_of(module):
                    upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {full}")
    assert not upward, "imports up the layers (docs/architecture.md):\n" + "\n".join(upward)


def test_no_private_name_crosses_a_module():
    files = source_files()
    crossing = []
    for module, path in files.items():
        for line, target, names in trainer_imports(path):
            crossing += [f"{path.relative_to(PACKAGE)}:{line} imports {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__") and target != module]
    assert not crossing, "\n".join(crossing)


def test_functions_and_modules_are_short():
    long_functions, long_modules = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions[f"{rel}:{node.name}"] = lines
    assert set(long_modules) == set(LONG_MODULES), f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert set(long_functions) == set(LONG_FUNCTIONS), f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


# The toy world's own words: its prompt groups (trainer/label_groups.yaml holds them as data) and its quality
# feature's alignment key. `novel` and `heldout` also name production concepts (the monitor's novel prompts,
# held-out images), so they are not on the list.
TOY_WORDS = {"duplicated", "singleton", "toy_alignment", "pix8+palette"}


def test_no_toy_vocabulary_outside_toy():
    """No production module holds a toy word as a string value (a key, a group name; prose aside): the toy
    world comes in as data (label groups) or as an object passed in (its quality feature)."""
    found = []
    for module, path in source_files().items():
        if module.startswith("trainer.toy") or module == "trainer.cli" or module in {
                f"trainer.commands.{v}" for v in TOY_VERBS}:
            continue
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(PACKAGE)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and n.value in TOY_WORDS]
    assert not found, "toy vocabulary outside trainer/toy:\n" + "\n".join(found)


def test_an_upward_import_is_caught(tmp_path):
    """The layer check itself: a measure module importing from report is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from trainer.report.evaluate import evaluate_markdown\n")
    ((line, target, names),) = trainer_imports(bad)
    assert layer_of(f"{target}") > layer_of("trainer.measure.bad")


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
