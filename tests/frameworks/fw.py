"""Framework integrations under a real daemon (run by `make test-frameworks` in .venv-fw).

Each test module skips, with the reason, when its framework is not importable here.
Jobs run the scripts in tests/frameworks/scripts/ with this interpreter; their stdout
("step N", "resuming from ...", "finished step N weights H") is read from the daemon's
job log, and checkpoints are read straight off the disk.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, wait_for  # tests/conftest.py: its daemon fixture applies here too

SCRIPTS = Path(__file__).parent / "scripts"


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not importable in {sys.executable}: run `make test-frameworks` "
                    f"(it builds .venv-fw with the pinned frameworks)", allow_module_level=True)


def write_job(daemon, name: str, script: str, *args: str, fmt: str = "auto", extra: str = "",
              env: dict | None = None) -> Path:
    """A job running scripts/<script> with this interpreter; returns its checkpoint dir."""
    ckpt = daemon.root / f"{name}-ckpt"
    cmd = [sys.executable, str(SCRIPTS / script), *args]
    e = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
         "TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", **(env or {})}
    body = (f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
            f"env: {json.dumps(e)}\nstop_timeout: 60s\n"
            f"checkpoint:\n  dir: {ckpt}\n  format: {fmt}\n  keep_last: 100\n"
            f"emergency_save:\n  grace: 120s\n"
            f"restart:\n  backoff: {{initial: 0}}\n  max_restarts_without_progress: 20\n" + extra)
    daemon.write_job(name, body)
    return ckpt


def job_log(daemon, name: str) -> str:
    try:
        return (daemon.logs / f"{name}.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def steps_logged(daemon, name: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+)\s*$", job_log(daemon, name), re.M)]


def last_step(daemon, name: str) -> int:
    s = steps_logged(daemon, name)
    return s[-1] if s else 0


def wait_steps(daemon, name: str, n: int, timeout: float = 120.0) -> int:
    """Wait until the job logged `n` more steps than it had (or reached step n the first time)."""
    return wait_for(lambda: (s := last_step(daemon, name)) >= n and s, timeout,
                    f"{name} to reach step {n} (log tail: {job_log(daemon, name)[-1500:]})", interval=0.05)


def resumed_lines(daemon, name: str) -> list[str]:
    return re.findall(r"^resuming from (\S+)", job_log(daemon, name), re.M)


def exits(daemon, name: str) -> list[dict]:
    return [e for e in daemon.history(name) if e["kind"] == "exit"]


def saves_of(daemon, name: str) -> list[dict]:
    return [e for e in daemon.history(name) if e["kind"] == "checkpoint"]
