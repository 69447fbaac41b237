"""History and goodput a person can trust, against a real daemon: the step an attempt
reached when it ended (the job's own reports at that moment), records in time order,
`plot JOB` from the whole history, each relaunch's first step, and goodput in `status`
(JSON and the GOODPUT column) adding up to the wall time since the first launch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, scaled, wait_for

TRAIN_MLP = REPO / "jobs" / "train_mlp.py"


def _events(daemon, job: str, kind: str | None = None) -> list[dict]:
    return [e for e in daemon.history(job, n=10000) if kind is None or e["kind"] == kind]


def _mlp_job(daemon, name: str, *args: str) -> None:
    cmd = [sys.executable, str(TRAIN_MLP), "--steps", "100000", "--every", "0", "--log-every", "1", *args]
    daemon.write_job(name, f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
                           f"env: {{PYTHONPATH: {json.dumps(str(REPO))}, OMP_NUM_THREADS: '1', PYTHONUNBUFFERED: '1'}}\n"
                           f"stop_timeout: 30s\ncheckpoint:\n  dir: {daemon.root / (name + '-ckpt')}\n"
                           f"  format: trainsup\nemergency_save:\n  grace: 60s\n"
                           f"restart:\n  backoff: {{initial: 0.1s}}\n")


def _logged_steps(daemon, job: str) -> list[int]:
    text = daemon.request("logs", job, n=100000)["result"]["text"]
    return [int(m) for m in re.findall(r"^step (\d+) ", text, re.M)]


def test_last_step_at_exit_is_the_step_the_job_reached_not_a_second_old(daemon):
    """Found as `exit ... last_step=136` right after a save at step 187: the helper wrote
    the heartbeat once a second and the daemon read it at exit. A job doing hundreds of
    steps a second is preempted (save, then its own exit) and then SIGKILLed mid-run."""
    pytest.importorskip("torch")
    _mlp_job(daemon, "fast", "--sleep-per-step", "0.002")
    daemon.start()
    wait_for(lambda: len(_logged_steps(daemon, "fast")) > 300, 120, "the job training fast")
    r = daemon.request("preempt", "fast", timeout=120)
    assert r["ok"] and r["result"]["outcome"] == "saved", r
    daemon.wait_state("fast", "preempted", timeout=60)
    (exit1,) = _events(daemon, "fast", "exit")
    newest = max(e["step"] for e in _events(daemon, "fast", "checkpoint"))
    # It saved for the preemption, then stopped: the step it ended at is the saved one.
    assert exit1["last_step"] == newest == _logged_steps(daemon, "fast")[-1], (exit1, newest)

    assert daemon.cli("start", "fast").returncode == 0
    wait_for(lambda: len(_events(daemon, "fast", "first-step")) >= 2, 120, "the second attempt training")
    before = len(_logged_steps(daemon, "fast"))
    wait_for(lambda: len(_logged_steps(daemon, "fast")) > before + 200, 120, "more steps")
    pid = daemon.status("fast")["pid"]
    os.kill(pid, signal.SIGKILL)
    exit2 = wait_for(lambda: [e for e in _events(daemon, "fast", "exit") if e["attempt"] == 2], 60, "the exit")[0]
    last = _logged_steps(daemon, "fast")[-1]
    # "step N" is printed just before the helper records step N: N or N - 1, never older.
    assert last - 1 <= exit2["last_step"] <= last, (exit2, last)
    launch3 = wait_for(lambda: [e for e in _events(daemon, "fast", "launch") if e["attempt"] == 3], 60, "relaunch")[0]
    assert launch3["steps_lost"] == exit2["last_step"] - launch3["resume_step"]


def test_notice_records_print_in_time_order(daemon):
    """A notice's record carried the time the notice came as its own time, so it printed
    before the records of the flow it started (history, the plot, steps lost)."""
    daemon.fakejob("pre", "--catch-usr1 --save-delay 0.5")
    daemon.start()
    daemon.wait_ready("pre")
    r = daemon.cli("preempt", "pre")
    assert r.returncode == 0, r.stderr
    history = _events(daemon, "pre")
    ats = [e["at"] for e in history]
    assert ats == sorted(ats), [(e["kind"], e["at"]) for e in history]
    notice = next(e for e in history if e["kind"] == "notice")
    saving = next(e for e in history if e["kind"] == "state" and e["to"] == "saving")
    assert notice["noticed_at"] <= saving["at"] <= notice["at"]
    # The text view too, and when the notice came reads as a time.
    text = daemon.cli("history", "pre", "-n", "100").stdout.splitlines()
    stamps = [line.split("Z")[0] for line in text]
    assert stamps == sorted(stamps), text
    assert re.search(r" notice .*noticed_at=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "\n".join(text)), text


def test_plot_job_reads_the_whole_history_and_history_all_feeds_plot(daemon, tmp_path):
    """`history --json` prints the newest 50 events: `plot --history` drew an empty picture
    from it. `plot JOB` asks for everything; `history --all --json` gives everything."""
    pytest.importorskip("matplotlib")
    daemon.fakejob("busy", "--catch-usr1 --every 0.05 --progress heartbeat")
    daemon.start()
    daemon.wait_ready("busy")
    wait_for(lambda: len(_events(daemon, "busy")) > 80, 60, "more than 80 events")
    assert len(json.loads(daemon.cli("history", "busy", "--json").stdout)["events"]) == 50
    everything = json.loads(daemon.cli("history", "busy", "--all", "--json").stdout)
    assert everything["events"][0]["kind"] == "state" and everything["events"][0]["to"] == "starting"
    saved = tmp_path / "h.json"
    saved.write_text(json.dumps(everything))           # as `history --all --json > h.json` saves it
    rc = tmp_path / "matplotlibrc"
    rc.write_text("svg.fonttype: none\n")          # the title stays text in the SVG
    env = dict(os.environ, PYTHONPATH=str(REPO), MATPLOTLIBRC=str(rc))
    titles = []
    for how in (["busy"], ["busy", "--history", str(saved)]):
        out = tmp_path / f"{len(titles)}.svg"
        r = subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "plot",
                            *how, "-o", str(out)], capture_output=True, text=True, timeout=scaled(120), env=env)
        assert r.returncode == 0, r.stderr
        titles.append(re.search(r"busy: (\d+) attempts?", out.read_text()).group(0))
        assert "mid-run" not in out.read_text()
    assert titles == ["busy: 1 attempt", "busy: 1 attempt"]


def test_relaunch_first_step_and_goodput_in_status(daemon):
    daemon.fakejob("gp", "--catch-usr1 --every 0.3 --progress heartbeat",
                   extra="restart: {backoff: {initial: 0.5s}}\n")
    daemon.start()
    first = daemon.wait_ready("gp")
    wait_for(lambda: (daemon.status("gp")["checkpoint"] or {}).get("step"), 30, "a checkpoint")
    wait_for(lambda: [e for e in _events(daemon, "gp", "checkpoint")], 30, "a checkpoint event")
    os.kill(first["pid"], signal.SIGKILL)
    daemon.wait_ready("gp", starts=2)
    steps = wait_for(lambda: len(s := _events(daemon, "gp", "first-step")) >= 2 and s, 30, "two first steps")
    assert [e["attempt"] for e in steps] == [1, 2] and all(e["after_s"] >= 0 for e in steps)
    launch2 = next(e for e in _events(daemon, "gp", "launch") if e["attempt"] == 2)
    assert steps[1]["step"] >= launch2["resume_step"] + 1            # the first step after the resume

    g = daemon.status("gp")["goodput"]
    assert set(g) == {"ratio", "wall_s", "productive_s", "lost_s", "since"}
    assert set(g["lost_s"]) == {"recomputed", "resume", "restart", "backoff", "save_emergency", "save_periodic",
                                "queue"}
    assert g["productive_s"] + sum(g["lost_s"].values()) == pytest.approx(g["wall_s"], abs=0.01)
    assert g["since"] == pytest.approx(_events(daemon, "gp")[0]["at"], abs=0.01)
    assert g["lost_s"]["backoff"] >= 0.4                             # the 0.5 s backoff
    assert g["lost_s"]["resume"] > 0 and g["lost_s"]["recomputed"] > 0  # the SIGKILL cost both
    assert g["lost_s"]["save_periodic"] > 0                          # the manifest timed each save
    assert 0 < g["ratio"] < 1
    row = next(line for line in daemon.cli("status").stdout.splitlines() if line.startswith("gp "))
    assert re.search(r"\s\d{1,3}%\s", row), row
    # Stopped: the clock stops with it.
    assert daemon.cli("stop", "gp").returncode == 0
    wall = daemon.status("gp")["goodput"]["wall_s"]
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 1.0, 3, "a one-second settle window")
    assert daemon.status("gp")["goodput"]["wall_s"] == wall
