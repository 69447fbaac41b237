"""The installed console script, including the supervisord import-name clash (SPEC 1)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "trainsup"


@pytest.mark.skipif(not SCRIPT.exists(), reason="trainsup console script not installed in this environment")
def test_wrong_supervisor_package_gets_a_clear_message(tmp_path):
    fake = tmp_path / "supervisor"
    fake.mkdir()
    (fake / "__init__.py").write_text("# supervisord's package stands here\n")
    r = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=30,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.startswith("trainsup: the Python package 'supervisor' imported from")
    assert "own virtualenv or with pipx" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not SCRIPT.exists(), reason="trainsup console script not installed in this environment")
def test_console_script_runs_the_cli():
    r = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("trainsup ")
