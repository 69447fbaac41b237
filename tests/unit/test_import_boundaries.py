"""The house is arranged by the process that runs the code, and imports only go down:
in-job code never reaches the daemon or the CLI, the CLI's `status` loads no server and no
asyncio, the daemon never loads torch, and no two rooms import each other (type-only
imports aside). Checked from the source (every import, lazy ones included) and in fresh
interpreters (what really gets loaded)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from conftest import REPO

SRC = REPO / "supervisor"
IN_JOB = ("__init__", "training", "emergency", "contract", "integrations", "checkpoint")
FORBIDDEN_IN_JOB = ("daemon", "cli", "control.server")


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def _imports(path: Path, with_type_only: bool = True) -> set[str]:
    """Every trainsup module `path` imports (relative to the package), lazy ones included."""
    tree = ast.parse(path.read_text())
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
    type_only: set[int] = set()
    if not with_type_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only |= {id(n) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "trainsup" or node.module.startswith("trainsup.")):
                target = node.module[len("trainsup."):] if node.module != "trainsup" else ""
            else:
                continue
            for a in node.names:
                full = f"{target}.{a.name}" if target else a.name
                out.add(full if (SRC / full.replace(".", "/")).with_suffix(".py").exists()
                        or (SRC / full.replace(".", "/") / "__init__.py").exists() else (target or "__init__"))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("trainsup."):
                    out.add(a.name[len("trainsup."):])
    return out


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _room(mod: str) -> str:
    return mod.split(".")[0]


def test_in_job_code_never_imports_the_daemon_or_the_cli():
    for path in _sources():
        mod = _module(path)
        if _room(mod) not in IN_JOB:
            continue
        for dep in _imports(path):
            assert not any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN_IN_JOB), \
                f"{path.relative_to(REPO)} (in-job) imports trainsup.{dep}"


def test_no_two_rooms_import_each_other_and_the_house_stays_small():
    graph: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        room = _room(_module(path))
        for dep in _imports(path, with_type_only=False):
            if _room(dep) != room:
                graph[room].add(_room(dep))
    rooms = {_room(_module(p)) for p in _sources()}
    assert len(rooms) <= 18, sorted(rooms)
    # floors: a room's floor is one above the highest floor it imports; a cycle never settles
    floor: dict[str, int] = {}

    def of(room: str, seen: tuple[str, ...] = ()) -> int:
        assert room not in seen, f"import cycle between rooms: {' -> '.join(seen + (room,))}"
        if room not in floor:
            floor[room] = 1 + max((of(d, seen + (room,)) for d in graph[room]), default=-1)
        return floor[room]

    for r in rooms:
        of(r)
    assert max(floor.values()) + 1 <= 8, floor


def _loaded_after(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_trainsup_status_loads_no_asyncio_and_no_server(tmp_path):
    mods = _loaded_after(
        "from trainsup.cli.main import main\n"
        f"rc = main(['--socket', {str(tmp_path / 'nobody.sock')!r}, 'status'])\n"
        "assert rc == 4, rc")
    assert "asyncio" not in mods
    assert not [m for m in mods if m.startswith(("trainsup.control.server", "trainsup.daemon"))]


def test_the_daemon_never_imports_torch():
    daemon_modules = sorted("trainsup." + _module(p) for p in _sources() if _room(_module(p)) == "daemon")
    mods = _loaded_after("\n".join(f"import {m}" for m in daemon_modules))
    assert "torch" not in mods and not [m for m in mods if m.startswith("torch.")]


def test_pyproject_lists_every_package_of_the_tree():
    listed = set(re.findall(r'"(trainsup(?:\.[a-z_]+)*)"', (REPO / "pyproject.toml").read_text().split("packages = [")[1]
                            .split("]")[0]))
    tree = {"trainsup" + ("." + ".".join(p.parent.relative_to(SRC).parts) if p.parent != SRC else "")
            for p in SRC.rglob("__init__.py") if "__pycache__" not in p.parts}
    assert listed == tree
