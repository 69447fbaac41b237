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
    cmd = [sys.executable, str(SCRIPTS / script), *args]   # an absolute `script` stays as it is
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
    return [int(s) for s in re.findall(r"^step (\d+)\b", job_log(daemon, name), re.M)]


def last_step(daemon, name: str) -> int:
    s = steps_logged(daemon, name)
    return s[-1] if s else 0


def wait_steps(daemon, name: str, n: int, timeout: float = 120.0) -> int:
    """Wait until the job logged `n` more steps than it had (or reached step n the first time)."""
    return wait_for(lambda: (s := last_step(daemon, name)) >= n and s, timeout,
                    f"{name} to reach step {n} (log tail: {job_log(daemon, name)[-1500:]})", interval=0.05)


def resumed_lines(daemon, name: str) -> list[str]:
    # Our scripts say "resuming from PATH"; jobs/train_mlp.py "resumed from step N (PATH)".
    return [a or b for a, b in re.findall(r"^(?:resuming from (\S+)|resumed from step \d+ \((\S+)\))",
                                          job_log(daemon, name), re.M)]


def exits(daemon, name: str) -> list[dict]:
    return [e for e in daemon.history(name) if e["kind"] == "exit"]


def saves_of(daemon, name: str) -> list[dict]:
    return [e for e in daemon.history(name) if e["kind"] == "checkpoint"]


# ------------------------------------------------------------------------------------
# The scenario every integration goes through under a real daemon
# ------------------------------------------------------------------------------------

def steps_since_resume(daemon, name: str) -> list[int]:
    """Steps logged after the last "resuming from" line."""
    text = job_log(daemon, name)
    marks = list(re.finditer(r"^(?:resuming from |resumed from step )", text, re.M))
    if not marks:
        return []
    return [int(s) for s in re.findall(r"^step (\d+)\b", text[marks[-1].end():], re.M)]


def saves_logged(daemon, name: str) -> list[int]:
    """Steps of the saves the script announced ("saving step N", printed before each save)."""
    return [int(s) for s in re.findall(r"^saving step (\d+)\s*$", job_log(daemon, name), re.M)]


def scenario(daemon, name: str, list_ckpts, *, startup: float = 180.0) -> None:
    """checkpoint --wait -> SIGKILL mid-run -> resume from the newest valid -> preempt (one
    save, no step lost, exit 0) -> start resumes with the same step.

    list_ckpts(dir) -> {path: step} of the complete checkpoints in the job's dir."""
    import os
    import signal

    ckpt = daemon.root / f"{name}-ckpt"
    daemon.start()
    wait_steps(daemon, name, 10, timeout=startup)

    before = list_ckpts(ckpt)
    r = daemon.cli("checkpoint", name, "--wait", "--timeout", "60s", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    now = list_ckpts(ckpt)
    new = {p: s for p, s in now.items() if p not in before or before[p] != s}
    assert new, f"checkpoint --wait returned but no new checkpoint is on disk: {now}"
    assert any(str(p) in r.stdout for p in new), (r.stdout, new)

    # SIGKILL mid-run: the relaunch resumes from the newest valid checkpoint, at its step
    newest_path, newest_step = max(list_ckpts(ckpt).items(), key=lambda kv: kv[1])
    n_resumes = len(resumed_lines(daemon, name))
    os.kill(daemon.status(name)["pid"], signal.SIGKILL)
    wait_for(lambda: len(resumed_lines(daemon, name)) > n_resumes, startup, f"{name} to resume after SIGKILL")
    assert resumed_lines(daemon, name)[-1] == str(newest_path)
    wait_for(lambda: len(steps_since_resume(daemon, name)) > 3, startup, f"{name} to train after the resume")
    assert steps_since_resume(daemon, name)[0] == newest_step + 1, "the resumed run did not continue at the saved step"

    # preempt: exactly one save, at the step the job reached; the job exits 0 by itself
    before = list_ckpts(ckpt)
    n_saves = len(saves_logged(daemon, name))
    r = daemon.cli("preempt", name, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state(name, "preempted", timeout=60)
    after = list_ckpts(ckpt)
    new = {p: s for p, s in after.items() if p not in before or before[p] != s}
    assert len(new) == 1, f"expected exactly one new checkpoint, got {new}"
    if saves_logged(daemon, name) or n_saves:
        assert len(saves_logged(daemon, name)) == n_saves + 1, "the job saved more than once"
    (saved_path, saved_step), = new.items()
    assert saved_step == last_step(daemon, name), f"steps lost: saved {saved_step}, reached {last_step(daemon, name)}"
    ex = exits(daemon, name)[-1]
    assert ex["code"] == 0, f"the job did not exit 0 after its preempt save: {ex}"

    # start: the framework's own resume call picks up the same step
    n_resumes = len(resumed_lines(daemon, name))
    assert daemon.cli("start", name).returncode == 0
    wait_for(lambda: len(resumed_lines(daemon, name)) > n_resumes, startup, f"{name} to resume after start")
    assert resumed_lines(daemon, name)[-1] == str(saved_path)
    wait_for(lambda: steps_since_resume(daemon, name), startup, f"{name} to train after start")
    assert steps_since_resume(daemon, name)[0] == saved_step + 1
    daemon.cli("stop", name, "--no-save")


def bit_exact_after_preemptions(daemon, tmp_path, name: str, script: str, args: list[str],
                                n: int = 3, startup: float = 180.0) -> None:
    """The final weights after `n` preemptions equal an uninterrupted run's, bit for bit."""
    import os
    import subprocess

    import torch

    ref = tmp_path / "ref-final.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRAINSUP_CHECKPOINT_DIR=str(tmp_path / "ref-ckpt"))
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *args, "--final-out", str(ref)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    out = tmp_path / "final.pt"
    write_job(daemon, name, script, *args, "--final-out", str(out))
    daemon.start()
    for i in range(n):
        wait_steps(daemon, name, last_step(daemon, name) + 5, timeout=startup)
        r = daemon.cli("preempt", name, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        daemon.wait_state(name, "preempted", timeout=60)
        assert daemon.cli("start", name).returncode == 0
        wait_for(lambda: len(resumed_lines(daemon, name)) > i, startup, f"resume #{i + 1}")
    daemon.wait_state(name, "finished", timeout=600)
    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after {n} preemptions: {diff}"


def need_daemon_format(fmt: str) -> None:
    """Skip when this daemon has no `fmt` checkpoint format (it comes with the formats
    issue, #12): without it `checkpoint --wait` can never confirm."""
    from trainsup.checkpoint import formats

    if fmt not in formats.CHOICES:
        pytest.skip(f"this daemon has no {fmt!r} checkpoint format (formats issue #12 not merged)",
                    allow_module_level=True)
