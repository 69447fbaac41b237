"""The build fails when checkpoint/ or daemon/ opens a path another way than through
checkpoint/jobfile.py (the held dir fd, RESOLVE_BENEATH, O_NONBLOCK, regular files only,
capped reads) and the bounded walks of checkpoint/walk.py.

Found: each blocking open of a job's file was a new way for one job to freeze the daemon
for all (a FIFO for HF's trainer_state.json on the loop; a FIFO named like TF's state file
inside the rotation pass). A rule checked by hand is forgotten by the next change, so every
call below that opens, lists or walks a path must be in the modules that implement the
rule, or say on its line (or the line above) why it is not a job's path:

    # not a job path: <why>    the daemon's own files (/proc, state dir, logs, cgroupfs)
    # held dir fd: <why>       a listing relative to a dir fd the daemon holds for the job
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = [REPO / "supervisor" / "checkpoint", REPO / "supervisor" / "daemon"]
# the modules that are the one way (they implement the rule)
RULE = {REPO / "supervisor" / "checkpoint" / n for n in ("jobfile.py", "walk.py", "dirhandle.py")}
MARKERS = ("# not a job path:", "# held dir fd:")

OS_CALLS = {"open", "scandir", "listdir", "walk", "fwalk"}
PATH_METHODS = {"read_bytes", "read_text", "write_bytes", "write_text", "rglob", "glob", "iterdir"}
MODULE_CALLS = {("io", "open"), ("zipfile", "ZipFile"), ("shutil", "rmtree"), ("shutil", "copytree"),
                ("builtins", "open")}


def _opens(node: ast.Call) -> str | None:
    f = node.func
    if isinstance(f, ast.Name) and f.id == "open":
        return "open()"
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name):
            if f.value.id == "os" and f.attr in OS_CALLS:
                return f"os.{f.attr}()"
            if (f.value.id, f.attr) in MODULE_CALLS:
                if f.attr == "ZipFile" and node.args and _is_fdopen(node.args[0]):
                    return None         # a zip read from an fd jobfile opened
                return f"{f.value.id}.{f.attr}()"
        if f.attr in PATH_METHODS:
            return f".{f.attr}()"
    return None


def _is_fdopen(arg: ast.expr) -> bool:
    return (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
            and arg.func.attr == "fdopen" and isinstance(arg.func.value, ast.Name) and arg.func.value.id == "os")


def _marked(lines: list[str], node: ast.Call) -> bool:
    lo = max(node.lineno - 2, 0)
    hi = (node.end_lineno or node.lineno)
    for line in lines[lo:hi]:
        for m in MARKERS:
            i = line.find(m)
            if i >= 0 and line[i + len(m):].strip():      # a reason, not just the marker
                return True
    return False


def offending(roots: list[Path] = ROOTS) -> list[str]:
    out = []
    for root in roots:
        for py in sorted(root.rglob("*.py")):
            if py in RULE:
                continue
            text = py.read_text()
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and (what := _opens(node)) and not _marked(lines, node):
                    out.append(f"{py.relative_to(root.parent)}:{node.lineno}: {what} outside checkpoint/jobfile.py "
                               f"(open a job's file through jobfile, walk through walk.py, or say why "
                               f"it is not a job path: {MARKERS[0]} ...)")
    return out


def test_checkpoint_and_daemon_open_job_paths_only_through_jobfile():
    bad = offending()
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_plain_open(tmp_path):
    """The check can fail: a blocking open added to a module is reported."""
    mod = tmp_path / "checkpoint"
    mod.mkdir()
    (mod / "x.py").write_text("import os\n\ndef f(p):\n    return open(p).read()\n\n"
                              "def g(p):\n    return os.open(p, os.O_RDONLY)  # not a job path: the daemon's own\n"
                              "\ndef h(p):\n    return p.read_text()  # not a job path:\n")
    bad = offending([mod])
    assert sorted(int(b.split(": ")[0].rsplit(":", 1)[1]) for b in bad) == [4, 10], bad
