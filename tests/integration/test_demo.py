"""`trainsup demo --quick` end to end: a real daemon, the example torch job, real signals.
The demo checks its own story; this test re-reads the numbers it prints and checks them
again, and that nothing (processes, temporary dir) is left behind."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import scaled

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("torch", reason="the demo's example job needs torch (trainsup[torch])")


def _number(pattern: str, text: str) -> int:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"demo output lacks {pattern!r}:\n{text}"
    return int(m.group(1))


@pytest.mark.timeout(240)
def test_quick_demo_survives_preemption_and_crash_within_quota(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "trainsup", "demo", "--quick"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=scaled(200))
    out = r.stdout
    assert r.returncode == 0, f"demo failed ({r.returncode}):\n{out}\n{r.stderr}"

    saved = _number(r"preempt: saved step (\d+) in [\d.]+s", out)
    resumed = _number(r"start: resumed from step (\d+) ", out)
    preempted_at = _number(r"job preempted at step (\d+);", out)
    # It resumed from the newest checkpoint the preemption left, with nothing lost.
    assert saved <= resumed == preempted_at
    assert re.search(rf"^  preempt\s+{resumed}\s+{resumed}\s+0\s+[\d.]+s$", out, re.MULTILINE), out

    interval = _number(r"save interval (\d+) steps", out)
    crashes = re.findall(r"^  SIGKILL\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+s$", out, re.MULTILINE)
    assert crashes, out
    for last, res, lost in crashes:
        assert int(last) - int(res) == int(lost) and 0 <= int(lost) <= interval, (last, res, lost)
    assert "restarted the job (reason crash" in out
    assert _number(r"survived 1 preemption\(s\) and (\d+) crash\(es\)", out) == len(crashes) >= 1

    kept = _number(r"checkpoints: (\d+) bytes kept", out)
    quota = _number(r"bytes kept, quota (\d+) bytes", out)
    assert 0 < kept <= quota
    assert _number(r"(\d+) deleted by rotation", out) >= 1
    assert "final weights identical to an uninterrupted run" in out
    # Goodput, from the daemon's status: the parts it names add up to the wall time.
    m = re.search(r"^  goodput (\d+)%: ([\d.]+)s of ([\d.]+)s since the first launch", out, re.MULTILINE)
    assert m and 0 < int(m.group(1)) < 100 and float(m.group(2)) < float(m.group(3)), out
    # It ends by drawing the run, outside the current dir (`make demo` runs in the checkout).
    if importlib.util.find_spec("matplotlib") is not None:
        drawn = re.search(r"the run's timeline \(`trainsup plot mlp-demo -o (\S+)`\): (\S+)$", out, re.MULTILINE)
        assert drawn, out
        picture = Path(drawn.group(2))
        try:
            assert picture.parent != tmp_path and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            picture.unlink(missing_ok=True)
    assert list(tmp_path.iterdir()) == [], "the demo left files in its current dir"

    # Nothing left behind: the demo's dir is gone and no process still uses it.
    root = re.search(r"^  in (\S+) \(removed at the end\)$", out, re.MULTILINE).group(1)
    assert not Path(root).exists()
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        text = " ".join(p.info["cmdline"] or []) + " ".join(f"{k}={v}" for k, v in (p.info["environ"] or {}).items())
        if root in text:
            left.append((p.info["pid"], p.info["cmdline"]))
    assert not left, left
