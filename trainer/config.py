"""Recipes: YAML files mapped onto typed dataclasses, with `key.sub=value` command-line overrides.

Unknown keys fail with the close matches (`train.lerning_rate` -> did you mean `train.learning_rate`?),
wrong types fail naming the key and the expected type. Nothing else in the package reads YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trainer.io import MemtrainError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except MemtrainError as e:
                errors.append(str(e))
        raise MemtrainError(errors[-1])
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise MemtrainError(f"{where}: `{key}` must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise MemtrainError(f"{where}: `{key}` must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MemtrainError(f"{where}: `{key}` must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key, where=where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    raise MemtrainError(f"{where}: `{key}` must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Any, prefix: str = "", where: str = "recipe") -> T:
    """Build dataclass `cls` from a nested mapping, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MemtrainError(f"{where}: `{prefix or 'recipe'}` must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=3, cutoff=0.6)
            dotted = [f"`{prefix}.{c}`" if prefix else f"`{c}`" for c in close]
            hint = f"; did you mean {' or '.join(dotted)}?" if close else ""
            valid = ", ".join(fields)
            raise MemtrainError(f"{where}: unknown key `{key}`{hint} (valid keys here: {valid})")
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MemtrainError(f"override `{dotted}`: `{part}` is not a section")
    node[parts[-1]] = value


EXTENDS = "extends"  # top-level recipe key: a recipe file (relative to this one) whose keys this one overrides


def _merge(base: dict, over: dict) -> dict:
    """Deep merge of two recipe trees into a new tree: mappings merge key by key (and are copied, so
    no mapping of the result is shared with `over`), anything else in `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            out[key] = _merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep only the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key}` is given twice; merge the two", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML tree of recipe `path`, with `extends: OTHER.yaml` resolved (OTHER is read first, relative
    to `path`'s directory, and `path`'s keys override it; chains are allowed, cycles fail)."""
    path = Path(path)
    if not path.exists():
        raise MemtrainError(f"recipe {path} does not exist")
    if path.is_dir():
        raise MemtrainError(f"recipe {path} is a directory; pass a recipe YAML file")
    if path.resolve() in _seen:
        raise MemtrainError(f"recipe {path}: `{EXTENDS}` forms a cycle ({' -> '.join(map(str, _seen))})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemtrainError(f"recipe {path} is not UTF-8 text (byte {e.start}); pass a recipe YAML file") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.reader.ReaderError as e:  # a control character: the file is not a text recipe
        line = text[: e.position].count("\n") + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise MemtrainError(f"{path}, line {line}: not valid YAML: character {char!r} is not allowed in "
                            "a text file; pass a recipe YAML file") from None
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        raise MemtrainError(f"{where}: not valid YAML: {problem or str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise MemtrainError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop(EXTENDS, None)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent:
        raise MemtrainError(f"{path}: `{EXTENDS}` must be a recipe file name, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        problem = "is a directory" if parent_path.is_dir() else "does not exist"
        raise MemtrainError(f"{path}: `{EXTENDS}: {parent}`: {parent_path} {problem}; name a recipe YAML file")
    return _merge(read_recipe_tree(parent_path, (*_seen, path.resolve())), tree)


OVERRIDES = "command line"  # where override errors point


def _field_type(cls: type, dotted: str) -> Any:
    """The declared type of dotted key `dotted` of dataclass `cls`; None when there is no such key."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _takes_strings(tp: Any) -> bool:
    """True when a field of type `tp` holds a string (str, a Literal of strings, or either of them | None)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    return all(a is str or (typing.get_origin(a) is typing.Literal and all(isinstance(v, str) for v in
                                                                              typing.get_args(a))) for a in args)


def parse_override(item: str, cls: type | None = None) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value). The value is read as YAML, except for a string field of `cls`, which
    gets the raw text (`train.mixed_precision=no` is "no", not YAML's false; null / ~ / nothing is None)."""
    if "=" not in item:
        raise MemtrainError(f"{OVERRIDES}: override `{item}` must look like key.sub=value (e.g. train.max_steps=100)")
    key, raw = (part.strip() for part in item.split("=", 1))
    tp = _field_type(cls, key) if cls is not None else None
    if raw in ("", "~", "null", "Null", "NULL"):  # YAML's nulls
        return key, None
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if tp is not None and _takes_strings(tp) and not quoted:
        return key, raw
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MemtrainError(f"{OVERRIDES}: override `{item}` is not a valid value ({problem}); quote it or fix "
                            "the brackets, e.g. train.max_steps=100 or log.trackers=[wandb]") from None


def apply_overrides(tree: dict, overrides: list[str] = (), cls: type | None = None) -> dict:
    """`key.sub=value` command-line overrides applied to a copy of `tree` (values typed by `parse_override`).
    With `cls`, each override is checked on its own first, so a bad key or value names the command line."""
    tree = _merge({}, tree)
    for item in overrides:
        key, value = parse_override(item, cls)
        if cls is not None:
            alone: dict = {}
            _set_path(alone, key, value)
            from_dict(cls, alone, where=OVERRIDES)
        _set_path(tree, key, value)
    return tree


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with the package (`recipes/` in the source tree), by name (file stem)."""
    root = Path(str(resources.files("trainer.recipes")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe file: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a built-in recipe (`sd15-lora`, `toy`, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = builtin_recipes()
    name = path.name.removesuffix(".yaml")
    if name in builtin and path.parent == Path("."):
        return builtin[name]
    raise MemtrainError(f"recipe {name_or_path}: no such file and no built-in recipe of that name; "
                        f"built-in: {', '.join(builtin)} (`memtrain recipes` lists them)")


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read YAML recipe `path` or built-in recipe name (or start from defaults; `extends:` resolved),
    apply `key.sub=value` overrides, build the typed recipe."""
    tree = read_recipe_tree(resolve_recipe(path)) if path is not None else {}
    where = str(path) if path is not None else OVERRIDES
    return from_dict(cls, apply_overrides(tree, overrides, cls), where=where)


def dump_recipe(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def describe_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a recipe dataclass with its type and default, for `--help`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe_keys(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {default!r}  ({_type_name(tp)})")
    return lines
