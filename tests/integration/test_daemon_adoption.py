"""A daemon crash, kill or re-exec costs no job anything (issue 21): real daemons, real
jobs under their shims, real SIGKILLs.

The jobs here are tests/helpers/fakejob.py: they record every start and every exit of
their own (with the code) in a file the test reads, so "the process was never stopped
or relaunched" is the job's own account, not the daemon's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, DaemonProc, _kill_recorded, wait_for
from trainsup.daemon.launch import cgroup, shim

needs_shim = pytest.mark.skipif(shim.why_unavailable() is not None, reason=f"no shim: {shim.why_unavailable()}")
pytestmark = needs_shim


def _history(d, job, kind=None):
    return [e for e in d.history(job) if kind is None or e["kind"] == kind]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _zombie_child(parent: int, pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.ppid() == parent and p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _steps(log: Path) -> list[int]:
    try:
        return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("step ")]
    except FileNotFoundError:
        return []


def test_a_job_keeps_running_and_logging_while_no_daemon_runs(daemon):
    """The job prints every 20 ms; with the daemon SIGKILLed its output keeps landing in
    its log (written by its shim), it never gets EPIPE, and the next daemon takes it over:
    same pid, same attempt, no save asked, and `logs -f` follows it again."""
    daemon.fakejob("talk", "--catch-usr1 --print-every 0.02")
    daemon.start()
    st = daemon.wait_state("talk", "running")
    daemon.wait_ready("talk")
    pid, log = st["pid"], daemon.logs / "talk.log"
    wait_for(lambda: len(_steps(log)) > 5, 10, "the job's output in its log")
    daemon.kill()
    during = _steps(log)[-1]
    wait_for(lambda: _steps(log)[-1] > during + 20, 10, "output written while no daemon runs")
    assert _alive(pid)
    daemon.start()
    st = daemon.wait_state("talk", "running")
    assert (st["pid"], st["attempt"], st["restarts"], st["adopted"]) == (pid, 1, 0, True)
    assert st["supervised_since"] > time.time() - 60
    adopted = _history(daemon, "talk", "adopted")
    assert len(adopted) == 1 and adopted[0]["found"] == "running" and adopted[0]["pid"] == pid
    assert adopted[0]["via"] == "restart" and adopted[0]["state_was"] == "running"
    assert [r["event"] for r in daemon.records("talk")] == ["start"]      # no save, no exit
    # A follower started now sees the job's new output (the file is followed, not a pipe).
    f = subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "logs", "talk",
                          "-f", "-n", "0"], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert f.stdout is not None
        line = f.stdout.readline().decode()
        assert line.startswith(("step ", "[trainsup]")), line
    finally:
        f.kill()
        f.wait()
    # A stop still saves and stops it, as for a job this daemon launched.
    r = daemon.request("stop", "talk")
    assert r["ok"] and r["result"]["outcome"] == "saved", r
    daemon.wait_state("talk", "stopped")
    assert not _alive(pid)


def test_an_exit_while_no_daemon_runs_is_recorded_with_its_code_and_time_then_handled(daemon):
    """The job crashes (exit 7) while no daemon runs: the next daemon records exit 7 at the
    time the job exited, and restarts it from its latest valid checkpoint, as if it had
    seen it. Another exits 0 meanwhile: finished."""
    daemon.fakejob("crash", "--every 0.2 --exit 7 --after 1.5",
                   extra="restart:\n  backoff: {initial: 0}\n  max_restarts_without_progress: 50\n")
    daemon.fakejob("done", "--exit 0 --after 1.5", extra="restart:\n  policy: on-failure\n")
    daemon.start()
    daemon.wait_ready("crash")
    daemon.wait_ready("done")
    daemon.kill()
    ex = wait_for(lambda: [r for r in daemon.records("crash") if r["event"] == "exit"], 15, "the crash, no daemon")
    wait_for(lambda: [r for r in daemon.records("done") if r["event"] == "exit"], 15, "the exit 0, no daemon")
    crashed_at = ex[0]["t"]
    saved = [r["path"] for r in daemon.records("crash") if r["event"] == "saved"]
    daemon.start()
    start = daemon.wait_ready("crash", 2)
    assert start["reason"] == "crash" and start["attempt"] == "2" and start["resume"] == saved[-1]
    exits = _history(daemon, "crash", "exit")
    assert [(e["attempt"], e["code"], e["while_no_daemon"]) for e in exits] == [(1, 7, True)]
    # The time is the shim's, taken when it reaped the job (just after the job's last record).
    assert crashed_at <= exits[0]["exited_at"] <= crashed_at + 1.0
    st = daemon.wait_state("done", "finished")
    assert st["last_exit"]["code"] == 0 and st["attempt"] == 1
    assert [(e["code"], e["while_no_daemon"]) for e in _history(daemon, "done", "exit")] == [(0, True)]


@pytest.mark.parametrize("point", ["launched", "spawn"])
def test_an_exit_while_no_daemon_runs_right_after_a_relaunch_is_recorded(daemon, point):
    """Found by the crash storm: the daemon relaunched a job (attempt 2 persisted as
    `starting`, or with its pid) and was killed at once; the attempt exited while no daemon
    ran. The next daemon left the job `pending` for good and never recorded that exit: its
    status file was taken for one the dead daemon had already decided."""
    daemon.fakejob("again", "--exit 3 --after 1.0", extra="restart:\n  backoff: {initial: 0}\n")
    once = daemon.root / "crashed-once"
    env = {"TRAINSUP_CRASH_AT": point, "TRAINSUP_CRASH_ONCE": str(once)}
    once.touch()                                # disarmed for the first launch
    daemon.start(env=env)
    daemon.wait_ready("again")
    once.unlink()                               # armed: the relaunch after attempt 1's exit dies here
    wait_for(lambda: daemon.proc.poll() is not None, 30, f"the daemon to die at {point} relaunching attempt 2")
    exits = wait_for(lambda: [r for r in daemon.records("again") if r["event"] == "exit"][1:], 30,
                     "attempt 2 to exit while no daemon runs")
    daemon.start(env=env)
    daemon.wait_ready("again", 3)
    got = [(e["attempt"], e["code"]) for e in _history(daemon, "again", "exit")]
    assert got[:2] == [(1, 3), (2, 3)], got
    assert _history(daemon, "again", "exit")[1].get("while_no_daemon") is True
    assert exits[0]["t"] <= _history(daemon, "again", "exit")[1]["exited_at"] <= exits[0]["t"] + 1.0


def test_a_job_of_another_state_dir_is_never_touched(tmp_path):
    """Two daemons on two state dirs, each with a job named `same`. Both SIGKILLed; one
    starts again: it takes over its own job only; the other's process sees no signal."""
    a, b = DaemonProc(tmp_path / "a"), DaemonProc(tmp_path / "b")
    try:
        for d in (a, b):
            d.fakejob("same", "--record-usr1 --catch-usr1")
            d.start()
            d.wait_ready("same")
        pid_b = b.status("same")["pid"]
        pid_a = a.status("same")["pid"]
        a.kill()
        b.kill()
        a.start()
        st = a.wait_state("same", "running")
        assert st["pid"] == pid_a and st["adopted"]
        assert _alive(pid_b), "the other state dir's job was ended"
        assert [r["event"] for r in b.records("same")] == ["start"], b.records("same")
        b.start()
        assert b.wait_state("same", "running")["pid"] == pid_b
    finally:
        for d in (a, b):
            try:
                d.terminate(30)
            finally:
                _kill_recorded(d.root)


def test_a_process_posing_as_a_shim_is_not_taken_over(daemon):
    """Process-group containment (no cgroup to vouch for a launch): a process of another
    user named exactly like this state dir's shim of `pg.1` is not taken for the job; the
    job's real shim, killed with its job while no daemon ran, left no status: the launch is
    `lost` and the job starts again. The impostor sees no signal."""
    env = {"TRAINSUP_CONTAINMENT": "process-group"}
    daemon.fakejob("pg", "--catch-usr1")
    daemon.start(env=env)
    st = daemon.wait_state("pg", "running")
    daemon.wait_ready("pg")
    shim_pid = psutil.Process(st["pid"]).ppid()
    marker = shim.tree_marker(cgroup.tree_name(daemon.state), "pg.1")
    assert shim.cmdline(shim_pid)[:2] == [b"trainsup-shim", marker.encode()]
    daemon.kill()
    os.kill(st["pid"], signal.SIGKILL)
    os.kill(shim_pid, signal.SIGKILL)
    wait_for(lambda: not _alive(shim_pid), 5, "the shim gone")
    # The real shim binary, run as `nobody`, with this launch's marker and a job of its own.
    imp = subprocess.Popen([b"trainsup-shim", marker.encode(), b"/nonexistent/status", b"/dev/null", b"1000000",
                            b"0", b"/", b"-1", b"-1", b"-", b"1", b"/bin/sleep", b"--", b"sleep", b"600"],
                           executable=str(shim.SHIM), user=65534, group=65534, stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert imp.stdout is not None
        report = imp.stdout.read(16)            # its start report: the job (a sleep) runs
        sleeper = int.from_bytes(report[12:16], "little")
        assert len(report) == 16 and _alive(sleeper)
        assert shim.scan_shims(cgroup.tree_name(daemon.state)) == {}       # not the daemon's user
        daemon.start(env=env)
        start = daemon.wait_ready("pg", 2)
        assert start["attempt"] == "2" and start["reason"] == "crash"
        assert [e["kind"] for e in _history(daemon, "pg") if e["kind"] in ("lost", "adopted")] == ["lost"]
        assert imp.poll() is None and _alive(sleeper), "the impostor or its job was signalled"
    finally:
        os.killpg(imp.pid, signal.SIGKILL)
        imp.wait()


def test_a_stop_cut_short_by_a_daemon_crash_is_finished_by_the_next_daemon(daemon):
    """`trainsup stop` on a job whose save takes 3 s; the daemon is SIGKILLed while it
    waits for the save. The next daemon carries on the stop: the job ends `stopped`."""
    daemon.fakejob("slow", "--catch-usr1 --save-delay 3", extra="stop_timeout: 5s\n")
    daemon.start()
    daemon.wait_ready("slow")
    pid = daemon.status("slow")["pid"]
    stopper = subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "stop", "slow"],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: daemon.status("slow")["state"] == "saving", 10, "the stop's save under way")
        daemon.kill()
    finally:
        stopper.wait(30)
    daemon.start()
    st = daemon.wait_state("slow", "stopped", timeout=30)
    assert not _alive(pid) and st["attempt"] == 1
    assert any(r["event"] == "saved" for r in daemon.records("slow"))
    assert _history(daemon, "slow", "adopted")[0]["state_was"] == "saving"


def test_reexec_keeps_every_job_and_the_pid(daemon):
    daemon.fakejob("one", "--catch-usr1 --print-every 0.05")
    daemon.fakejob("two", "--catch-usr1")
    daemon.start()
    pids = {n: daemon.wait_state(n, "running")["pid"] for n in ("one", "two")}
    daemon.wait_ready("one")
    before = daemon.proc.pid
    r = daemon.cli("reexec")
    assert r.returncode == 0, r.stderr
    assert f"daemon pid {before}:" in r.stdout and "2 running jobs kept" in r.stdout, r.stdout
    assert daemon.proc.poll() is None and daemon.request("ping")["result"]["pid"] == before
    for n, pid in pids.items():
        st = daemon.status(n)
        assert (st["pid"], st["attempt"], st["adopted"]) == (pid, 1, True)
        (ad,) = _history(daemon, n, "adopted")
        assert ad["via"] == "re-exec"
    # The shims are still the daemon's children (a re-exec keeps its pid): a job that ends
    # now is reaped and handled as before.
    shim_pid = psutil.Process(pids["two"]).ppid()
    assert psutil.Process(shim_pid).ppid() == before
    os.kill(pids["two"], signal.SIGKILL)
    daemon.wait_ready("two", 2)
    (ex,) = _history(daemon, "two", "exit")
    assert ex["signal"] == "SIGKILL" and "while_no_daemon" not in ex
    wait_for(lambda: not _alive(shim_pid) and not _zombie_child(before, shim_pid), 5, "the shim reaped")


def test_reexec_that_cannot_start_the_new_program_leaves_the_old_one_serving(daemon):
    """The installed version cannot start (here: its config no longer parses): one line
    saying why, the same daemon serving, the jobs untouched."""
    conf = daemon.root / "trainsup.yaml"
    conf.write_text("log_backups: 3\n")
    daemon.fakejob("keep", "--catch-usr1")
    daemon.start("--config", str(conf))
    pid = daemon.wait_state("keep", "running")["pid"]
    conf.write_text("log_backups: [not, a, number]\n")
    r = daemon.cli("reexec")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot start" in r.stderr and "still serving trainsup" in r.stderr, r.stderr
    st = daemon.status("keep")
    assert st["pid"] == pid and not st["adopted"] and daemon.proc.poll() is None


def test_reexec_is_refused_while_a_job_is_being_saved(daemon):
    daemon.fakejob("slow", "--catch-usr1 --save-delay 2", extra="stop_timeout: 5s\n")
    daemon.start()
    daemon.wait_ready("slow")
    stopper = subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "stop", "slow"],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: daemon.status("slow")["state"] == "saving", 10, "the save under way")
        r = daemon.cli("reexec")
        assert r.returncode == 1 and "slow is being saved or stopped" in r.stderr, r.stderr
    finally:
        stopper.wait(30)
    daemon.wait_state("slow", "stopped")


def test_status_marks_a_job_taken_over(daemon):
    daemon.fakejob("mark", "--catch-usr1")
    daemon.fakejob("fresh", "--catch-usr1", extra="autostart: false\n")
    daemon.start()
    daemon.wait_state("mark", "running")
    r = daemon.cli("status")
    assert "*" not in r.stdout and "taken over" not in r.stdout, r.stdout
    daemon.kill()
    daemon.start()
    daemon.wait_state("mark", "running")
    assert daemon.request("start", "fresh")["ok"]
    daemon.wait_state("fresh", "running")
    r = daemon.cli("status")
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]
            if line and not line.startswith((" ", "*"))}
    assert rows["mark"][2].endswith("*") and not rows["fresh"][2].endswith("*"), r.stdout
    assert any(line.startswith("* taken over from an earlier daemon") for line in r.stdout.splitlines()), r.stdout
    full = json.loads(daemon.cli("status", "--json").stdout)
    by = {j["name"]: j for j in full["jobs"]}
    assert by["mark"]["adopted"] is True and by["fresh"]["adopted"] is False
    assert by["fresh"]["supervised_since"] >= by["mark"]["supervised_since"]
