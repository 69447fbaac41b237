"""Know before it matters (issue 13): status warns when no process of a job with a
checkpoint dir catches the save signal; preempt/stop says what is lost and exits 1."""

from __future__ import annotations

import json
import re
import sys

from conftest import wait_for
from fw import REPO


def _job(daemon, name: str, code: str) -> None:
    daemon.write_job(name, f"name: {name}\ncommand: {json.dumps([sys.executable, '-c', code])}\n"
                           f"workdir: {daemon.root}\nenv: {json.dumps({'PYTHONPATH': str(REPO)})}\n"
                           f"checkpoint:\n  dir: {daemon.root / (name + '-ckpt')}\n")


DEAF = "import time\nwhile True: time.sleep(0.05)\n"
LISTENING = "import time, trainsup\nwhile True:\n    trainsup.save_requested(); time.sleep(0.05)\n"


def test_status_warns_when_nothing_catches_the_save_signal_and_preempt_says_what_is_lost(daemon):
    _job(daemon, "deaf", DEAF)
    _job(daemon, "listening", LISTENING)
    daemon.start(env={"TRAINSUP_TEST_CATCH_GRACE": "1"})
    daemon.wait_state("deaf", "running")
    w = wait_for(lambda: daemon.status("deaf")["warnings"], 20, "the warning")
    assert w == ["no process catches SIGUSR1: emergency saves impossible (see README 'Integrations')"]
    r = daemon.cli("status")
    assert "deaf: warning: no process catches SIGUSR1" in r.stdout
    assert daemon.status("listening")["warnings"] == []

    r = daemon.cli("preempt", "deaf", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "deaf: no valid checkpoint: all work of this run is lost" in r.stderr
    assert daemon.status("deaf")["state"] == "preempted"      # the preemption still happened

    r = daemon.cli("stop", "listening", "--no-save", timeout=60)
    assert r.returncode == 0, r.stderr


def test_stop_of_a_deaf_job_names_the_last_checkpoint_it_falls_back_to(daemon):
    _job(daemon, "deaf2", DEAF)
    ckpt = daemon.root / "deaf2-ckpt"
    ckpt.mkdir()
    from trainsup.checkpoint import write_checkpoint

    write_checkpoint(ckpt, 4100, {"state.bin": b"x" * 10})
    daemon.start()
    daemon.wait_state("deaf2", "running")
    r = daemon.cli("stop", "deaf2", timeout=60)
    assert r.returncode == 1
    assert re.search(r"deaf2: work since the last checkpoint is lost \(last checkpoint \d+s ago, step 4100\)",
                     r.stderr), r.stderr
