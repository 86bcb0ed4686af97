"""The dependency rules of the code base, read from every module's imports (including modules named
as strings for importlib): services/common imports no service; no service imports another; a
service reaches the others only through gRPC. What is above the services (the command line, the
serve supervisor, bench/, tests/) may import anything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("face", "voice", "mfa")
MODULE_STRING = re.compile(r"^services\.(face|voice|mfa|cli|serve|admin)(\.|:|$)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import, relative imports resolved, plus every string
    constant that names a services module (what importlib.import_module would load)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.append((node.lineno, node.value.split(":")[0]))
        elif isinstance(node, ast.JoinedStr):  # f"services.{name}.server": an import chosen at run time
            head = "".join(v.value for v in node.values[:1] if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if head.startswith("services.") and len(node.values) > 1:
                found.append((node.lineno, head + "*"))
    return found


def owner(module: str) -> str | None:
    """Which layer a module belongs to: "common", a service name, or None (above them)."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in (*SERVICES, "common") else None


def violations() -> list[str]:
    out = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "api/v1" in path.as_posix():
            continue  # generated stubs
        layer = owner(module_name(path))
        if layer is None:
            continue
        for line, target in imports_of(path):
            if not target.startswith("services."):
                continue
            dep = owner(target.rstrip("*"))
            if target.endswith("*") or dep is None:
                # a run-time choice of module or a module above the services (cli, serve, admin)
                if not target.startswith("services.common."):
                    out.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target}")
                continue
            if layer == "common" and dep != "common":
                out.append(f"{path.relative_to(ROOT)}:{line}: common imports {target}")
            elif layer in SERVICES and dep in SERVICES and dep != layer:
                out.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target}")
    return out


def test_common_imports_no_service_and_no_service_imports_another():
    found = violations()
    assert not found, "dependency rules broken:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from services.face import pipeline\n", "common imports services.face"),
    ("import importlib\nimportlib.import_module('services.voice.server')\n", "common imports services.voice.server"),
    ("X = {'a': 'services.mfa.factors:make'}\n", "common imports services.mfa.factors"),
    ("import importlib\nname = 'x'\nimportlib.import_module(f'services.{name}.server')\n", "imports services.*"),
])
def test_the_rule_reader_catches_each_kind_of_import(tmp_path, monkeypatch, source, expected):
    """The check can fail: a planted module in common with each kind of upward import is reported."""
    planted = ROOT / "services" / "common" / "_planted_for_architecture_test.py"
    planted.write_text(source)
    try:
        assert any(expected in v for v in violations())
    finally:
        planted.unlink()


def test_relative_imports_are_resolved():
    source = ROOT / "services" / "mfa" / "factors" / "base.py"
    targets = {t for _, t in imports_of(source)}
    assert "services.mfa.clients" in targets


def mfa_reaches_in(root: Path = ROOT / "services" / "mfa") -> list[str]:
    """Imports of another module's private names, and imports of the MFA's own modules from inside a
    function: push/flow.py took ``_sets`` from the orchestrator that way, to dodge the circular
    import its module level would be (the shared rendering is services/mfa/render.py)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, ast.ImportFrom)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private:
                out.append(f"{where}: imports the private {', '.join(private)}")
            if id(node) in inner and (node.level or (node.module or "").startswith("services.mfa")):
                out.append(f"{where}: imports {'.' * node.level}{node.module or ''} inside a function")
    return out


def test_no_mfa_module_reaches_into_another(tmp_path):
    found = mfa_reaches_in()
    assert not found, "\n".join(found)
    planted = tmp_path / "planted.py"  # the check can fail
    planted.write_text("def f():\n    from ..service import _sets\n    return _sets\n")
    assert len(mfa_reaches_in(tmp_path)) == 2
