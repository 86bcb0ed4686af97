"""Reads a policy file and reports every problem with its line, column and field path.

The YAML is composed into nodes first (they carry their position in the file), then validated
with the pydantic schema; each validation error's location is walked back through the nodes to
the line at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from .schema import REMOVED_KEYS, Policy


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based
    column: int  # 1-based
    field: str  # dotted path, e.g. "actions.login.required"
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.field or '<document>'}: {self.message}"


class PolicyError(ValueError):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid policy\n" + "\n".join(f"  {p}" for p in problems))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _duplicates(node: yaml.Node, path: str, out: list[Problem]) -> None:
    """PyYAML keeps the last of two equal keys without a word; a policy must not."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            where = f"{path}.{name}" if path else name
            if name in seen:
                out.append(Problem(*_mark(key), where, "duplicate key"))
            seen.add(name)
            _duplicates(value, where, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{path}.{i}", out)


def _locate(root: yaml.Node, loc: tuple, at_key: bool) -> tuple[int, int]:
    """The deepest node on ``loc`` that exists in the file (for a missing key: its parent);
    with ``at_key``, the key itself rather than its value (an unknown key)."""
    node, key_node = root, None
    for part in loc:
        found = None
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            found = (None, node.value[part])
        if found is None:
            return _mark(node)
        key_node, node = found
    return _mark(key_node if at_key and key_node is not None else node)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise PolicyError(source, [Problem(line, col, "", f"YAML syntax: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, [Problem(0, 0, "", f"YAML: {exc}")]) from None
    if root is None or not isinstance(data, dict):
        raise PolicyError(source, [Problem(1, 1, "", "the policy must be a YAML mapping")])
    problems: list[Problem] = []
    _duplicates(root, "", problems)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            # pydantic names union/tagged members in the location; they are not keys in the file
            loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("function-", "list["))))
            line, col = _locate(root, loc, err["type"] == "extra_forbidden")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                removed = REMOVED_KEYS.get(str(loc[-1])) if loc else None
                msg = f"no longer a policy key: {removed}" if removed else "unknown key"
            problems.append(Problem(line, col, ".".join(str(p) for p in loc), msg))
        policy = None
    if problems:
        problems.sort(key=lambda p: (p.line, p.column))
        raise PolicyError(source, problems)
    assert policy is not None
    return policy


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), [Problem(0, 0, "", f"cannot read: {exc}")]) from None
    return parse_policy(text, str(path))
