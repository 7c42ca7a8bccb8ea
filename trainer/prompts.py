"""Prompt files: plain text (one prompt a line) or JSONL rows with `text` (or `prompt`, or `caption`), and
the roles a labelled prompt plays in `memtrain evaluate` (memorized label, training member, its image)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from trainer.io import MemtrainError

DEFAULT_LABEL_GROUPS = Path(str(resources.files("trainer") / "label_groups.yaml"))


@dataclass(frozen=True)
class LabelGroups:
    """Which `group` values of a labelled prompt file play which role (data: `trainer/label_groups.yaml`, or a
    file of the same keys): label 1 / label 0 in the trigger scenario, training member / non-member."""

    memorized: tuple[str, ...]
    not_memorized: tuple[str, ...]
    members: tuple[str, ...]
    non_members: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path | None = None, key: str = "--label-groups") -> LabelGroups:
        """The groups of a YAML file (default: the packaged one); a MemtrainError names `key` (the flag or recipe
        key that gave the file) and a missing or bad key."""
        path = Path(path) if path is not None else DEFAULT_LABEL_GROUPS
        where = f"{key} {path}"
        try:
            data = yaml.safe_load(read_text_file(path, "label-groups file"))
        except yaml.YAMLError as e:
            raise MemtrainError(f"{where}: not valid YAML ({e})") from None
        keys = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(keys):
            raise MemtrainError(f"{where}: needs exactly the keys {', '.join(keys)} (lists of group names)")
        for key in keys:
            if not isinstance(data[key], list) or not all(isinstance(g, str) for g in data[key]):
                raise MemtrainError(f"{where}: `{key}` must be a list of group names, got {data[key]!r}")
        return cls(**{k: tuple(data[k]) for k in keys})

    def label(self, group: str | None) -> int | None:
        return 1 if group in self.memorized else 0 if group in self.not_memorized else None

    def member(self, group: str | None) -> int | None:
        return 1 if group in self.members else 0 if group in self.non_members else None

    def mapping(self) -> str:
        """The report's one-line statement of the roles."""
        def names(groups):
            return "/".join(groups) or "(none)"
        return (f"label 1 (memorized) = `label: 1` or group {names(self.memorized)}; label 0 (not memorized) = "
                f"`label: 0` or group {names(self.not_memorized)}; membership: members = `member: 1` or group "
                f"{names(self.members)} with a file_name, non-members = `member: 0` or group "
                f"{names(self.non_members)}; other rows are not scored in the trigger scenario")


@dataclass
class PromptRow:
    """One prompt of the prompt file and its roles."""

    text: str
    line: int
    label: int | None = None  # 1 memorized, 0 not; None: not in the trigger scenario's AUROC
    group: str | None = None
    file_name: str | None = None  # the row's image, relative to --data
    member: int | None = None  # 1 training member, 0 non-member; None: not in the membership scenario


def _binary(row: dict, key: str, where: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    if type(value) is int and value in (0, 1):  # not true/false, "1" or 1.0: a typo there would flip a class
        return value
    raise MemtrainError(f"{where}: `{key}` must be 0 or 1 (an integer), got {json.dumps(value)}; write "
                        f"`\"{key}\": 1` or `\"{key}\": 0`")


def read_labelled_prompts(path: str | Path, groups: LabelGroups | None = None) -> list[PromptRow]:
    """The rows of a prompt file (plain text or JSONL), with their label, group, image and member role
    (`groups`: the roles of the group names; default the packaged `label_groups.yaml`).

    Errors (`MemtrainError`, naming the file and line): missing or empty file, malformed JSON, a
    row without a `text`/`prompt` string, a label or member that is not 0/1, a `member` row
    without `file_name`.
    """
    path = Path(path)
    groups = groups or LabelGroups.load()
    rows = read_prompts(path)  # missing / empty file, bad JSON, missing text: errors naming file and line
    lines = [i for i, line in enumerate(read_text_file(path, "prompt file").splitlines(), 1) if line.strip()]  # as read_prompts
    out = []
    for row, line in zip(rows, lines, strict=True):
        where = f"{path}, line {line}"
        group = row.get("group")
        if group is not None and not isinstance(group, str):
            raise MemtrainError(f"{where}: `group` must be a string, got {group!r}")
        file_name = row.get("file_name")
        if file_name is not None and (not isinstance(file_name, str) or not file_name.strip()):
            raise MemtrainError(f"{where}: `file_name` must be a non-empty path string, got {file_name!r}")
        label = _binary(row, "label", where) if "label" in row else groups.label(group)
        if "member" in row:
            member = _binary(row, "member", where)
            if member is not None and file_name is None:
                raise MemtrainError(f"{where}: a `member` row needs the `file_name` of its image")
        else:
            member = groups.member(group) if file_name else None
        out.append(PromptRow(row["text"], line, label, group, file_name, member))
    return out


def check_labels(rows: Sequence[PromptRow], source: str | Path, groups: LabelGroups | None = None) -> bool:
    """True when the prompts carry labels of both classes; a MemtrainError naming the file when one class is
    missing. A file whose only labels are 0 (known non-memorized prompts) beside unlabelled prompts to judge
    is unlabelled (False): the label-0 prompts then calibrate the detectors' thresholds."""
    labels = [r.label for r in rows if r.label is not None]
    if not labels:
        return False
    if not any(labels) and any(r.label is None and r.member is None for r in rows):
        return False
    groups = groups or LabelGroups.load()
    missing = f"negatives (label 0 / group {'/'.join(groups.not_memorized)})" if all(labels) else (
        f"positives (label 1 / group {'/'.join(groups.memorized)})" if not any(labels) else None)
    if missing:
        raise MemtrainError(
            f"{source}: the labelled prompts have no {missing}; AUROC and TPR at 1% FPR need memorized and "
            "non-memorized prompts (or pass a plain prompt list for scores only)"
        )
    return True


def group_name(row: PromptRow) -> str:
    """The row's group, else its label's name (memorized / not memorized / unlabelled)."""
    if row.group:
        return row.group
    return {1: "memorized", 0: "not memorized"}.get(row.label, "unlabelled")


TEXT_KEYS = ("text", "prompt", "caption")


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); one MemtrainError for a missing, directory or binary file."""
    if not path.exists():
        raise MemtrainError(f"{what} {path} does not exist")
    if path.is_dir():
        raise MemtrainError(f"{what} {path} is a directory; pass a text or JSONL file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemtrainError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_prompts(path: str | Path) -> list[dict]:
    """Plain text (one prompt a line) or JSONL rows with `text` (or `prompt`, or `caption` as in Wen et al.'s
    published `sdv1_500_memorized.jsonl`) and optional labels."""
    path = Path(path)
    rows = []
    for i, line in enumerate(read_text_file(path, "prompt file").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MemtrainError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
            text = next((row[k] for k in TEXT_KEYS if k in row), None) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise MemtrainError(f"{path}, line {i}: needs a non-empty `text` (or `prompt`, `caption`) string")
            rows.append(dict(row, text=text))
        else:
            rows.append({"text": line.strip()})
    if not rows:
        raise MemtrainError(f"prompt file {path} has no prompts")
    return rows


def rows_from_lists(memorized: str | Path, not_memorized: str | Path | None = None) -> list[PromptRow]:
    """Labelled rows from two prompt lists (plain text or JSONL): label 1 for `memorized`, 0 for the other."""
    rows = [PromptRow(r["text"], i, 1) for i, r in enumerate(read_prompts(memorized), 1)]
    if not_memorized is not None:
        rows += [PromptRow(r["text"], i, 0) for i, r in enumerate(read_prompts(not_memorized), 1)]
    return rows
