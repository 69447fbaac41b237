"""Daemon core end to end: real daemon, real job processes, real signals."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
from conftest import REPO, scaled, wait_for


def _launches(d, job):
    return [e for e in d.history(job) if e["kind"] == "launch"]


def test_crash_restarts_with_growing_backoff_then_reset(daemon):
    # Crashes right away; backoff 0.2s doubling. Then a checkpoint (progress) resets it.
    daemon.fakejob("crashy", "--exit 3 --after 0",
                   extra="restart:\n  max_restarts: 50\n  max_restarts_without_progress: 50\n"
                         "  backoff: {initial: 0.2s, max: 5s, factor: 2}\n")
    daemon.start()
    wait_for(lambda: len(_launches(daemon, "crashy")) >= 4, 20, "4 launches")
    ev = [e for e in daemon.history("crashy") if e["kind"] == "state" and e["to"] == "backoff"]
    delays = [e["delay"] for e in ev[:3]]
    assert delays == [0.2, 0.4, 0.8], delays
    st = daemon.status("crashy")
    assert st["last_exit"]["reason"] == "exit 3"
    assert st["restarts"] >= 3


def test_backoff_resets_after_progress(daemon):
    # Each attempt writes one checkpoint then crashes: progress resets the backoff, so the
    # delay stays at the initial value instead of growing.
    daemon.fakejob("progressing", "--every 0.05 --exit 1 --after 0.3",
                   extra="restart:\n  max_restarts: 50\n  backoff: {initial: 0.3s, max: 10s, factor: 4}\n")
    daemon.start()
    wait_for(lambda: len(_launches(daemon, "progressing")) >= 3, 30, "3 launches")
    delays = [e["delay"] for e in daemon.history("progressing") if e["kind"] == "state" and e["to"] == "backoff"]
    assert delays[:2] == [0.3, 0.3], delays


def test_crash_loop_ends_failed_without_spinning(daemon):
    daemon.fakejob("loop", "--exit 1 --after 0", ckpt=False,
                   extra="restart:\n  max_restarts: 3\n  window: 1h\n  backoff: {initial: 0.05s, factor: 1}\n")
    daemon.start()
    st = daemon.wait_state("loop", "failed", timeout=20)
    assert "max_restarts 3" in st["error"]
    assert len(_launches(daemon, "loop")) == 4      # first + 3 restarts
    # No spin: the daemon is idle once the job failed.
    p = psutil.Process(daemon.proc.pid)
    p.cpu_percent(None)
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 1.0, 3, "a one-second settle window")
    assert p.cpu_percent(None) < 20.0
    r = daemon.cli("status")
    assert r.returncode == 3, r
    assert "failed" in r.stdout


def test_no_progress_limit_fails_the_job(daemon):
    daemon.fakejob("noprog", "--exit 1 --after 0",
                   extra="restart:\n  max_restarts: 100\n  max_restarts_without_progress: 2\n  backoff: {initial: 0}\n")
    daemon.start()
    st = daemon.wait_state("noprog", "failed", timeout=20)
    assert "without a new valid checkpoint" in st["error"]


def test_exit_zero_is_finished_and_policy_never(daemon):
    daemon.fakejob("done", "--exit 0 --after 0", ckpt=False)
    daemon.fakejob("once", "--exit 5 --after 0", ckpt=False, extra="restart:\n  policy: never\n")
    daemon.start()
    daemon.wait_state("done", "finished")
    st = daemon.wait_state("once", "failed")
    assert st["last_exit"]["code"] == 5
    time.sleep(0)  # no settle needed: a finished job has exactly one launch recorded
    assert len(_launches(daemon, "done")) == 1
    assert len(_launches(daemon, "once")) == 1


def test_job_ignoring_sigterm_is_killed_after_stop_timeout(daemon):
    daemon.fakejob("stubborn", "--ignore-term", ckpt=False, extra="stop_timeout: 0.5s\n")
    daemon.start()
    st = daemon.wait_state("stubborn", "running")
    wait_for(lambda: daemon.records("stubborn"), 10, "the job to install its handlers")
    t0 = time.monotonic()
    r = daemon.request("stop", "stubborn", no_save=True)
    took = time.monotonic() - t0
    assert r["ok"], r
    assert r["result"].get("killed") is True
    assert 0.4 <= took < 5.0
    assert not psutil.pid_exists(st["pid"]) or psutil.Process(st["pid"]).status() == psutil.STATUS_ZOMBIE
    assert daemon.status("stubborn")["state"] == "stopped"


def test_spawned_child_survives_save_signal_and_setsid_grandchild_is_gone_after_stop(daemon):
    daemon.fakejob("tree", "--catch-usr1 --spawn-child --setsid-grandchild", extra="stop_timeout: 2s\n")
    daemon.start()
    daemon.wait_state("tree", "running")
    daemon.wait_ready("tree")
    child_f = daemon.root / "tree.rec.child"
    gc_f = daemon.root / "tree.rec.grandchild"
    wait_for(lambda: child_f.exists() and gc_f.exists() and child_f.read_text() and gc_f.read_text(), 20,
             "multiprocessing child and setsid grandchild to start")
    child_pid, gc_pid = int(child_f.read_text()), int(gc_f.read_text())
    r = daemon.request("checkpoint", "tree", wait=True, timeout=10)
    assert r["ok"], r
    # The spawn child does not catch SIGUSR1 (default action: die); it must be alive.
    assert psutil.Process(child_pid).is_running()
    assert psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
    assert r["result"]["signalled"] == [daemon.status("tree")["pid"]]
    r = daemon.request("stop", "tree")
    assert r["ok"], r
    for pid in (child_pid, gc_pid):
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 5, f"pid {pid} to be gone after stop")


def test_second_daemon_on_same_state_dir_exits_2(daemon):
    daemon.start()
    d2 = subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(daemon.root / "other.sock"),
                         "daemon", "--jobs", str(daemon.jobs), "--state", str(daemon.state),
                         "--log-dir", str(daemon.logs), "--config", "none"], capture_output=True, text=True, timeout=scaled(30),
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert d2.returncode == 2, d2
    assert f"pid {daemon.proc.pid}" in d2.stderr
    assert len(d2.stderr.strip().splitlines()) == 1


def test_daemon_sigkill_then_restart_keeps_history_and_counters(daemon):
    daemon.fakejob("keep", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.start()
    st = daemon.wait_state("keep", "running")
    daemon.wait_ready("keep")
    old_pid = st["pid"]
    assert daemon.request("restart", "keep")["ok"]
    st = daemon.wait_state("keep", "running")
    daemon.wait_ready("keep", 2)
    # A restart a user asked for is not one the supervisor made (issue 15): not counted.
    assert st["attempt"] == 2 and st["restarts"] == 0
    job_pid = st["pid"]
    daemon.kill()
    daemon.start()
    st = daemon.wait_state("keep", "running")
    # Issue 21 changed this on purpose: the dead daemon's job process is taken over by
    # the next daemon (same pid, same attempt, no restart counted), not stopped and
    # relaunched; history and counters are kept as before.
    assert st["pid"] == job_pid and psutil.Process(job_pid).status() != psutil.STATUS_ZOMBIE
    assert st["attempt"] == 2 and st["restarts"] == 0 and st["adopted"] is True
    kinds = [e["kind"] for e in daemon.history("keep")]
    assert kinds.count("launch") == 2 and kinds.count("adopted") == 1
    assert old_pid != job_pid
    # Nothing was asked of it: no save signal, no second start.
    assert [r["event"] for r in daemon.records("keep") if r["pid"] == job_pid] == ["start"]


def test_daemon_sigterm_saves_every_job_then_exits_0(daemon):
    daemon.fakejob("a", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.fakejob("b", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.start()
    daemon.wait_state("a", "running")
    daemon.wait_ready("a")
    daemon.wait_state("b", "running")
    daemon.wait_ready("b")
    assert daemon.terminate() == 0
    for name in ("a", "b"):
        saved = [r for r in daemon.records(name) if r["event"] == "saved"]
        assert len(saved) == 1 and saved[0]["reason"] == "signal", daemon.records(name)


def test_job_environment_is_clean_and_complete(daemon, monkeypatch):
    daemon.fakejob("envjob", "--catch-usr1")
    daemon.start(env={"LD_PRELOAD": "", "SECRET_TOKEN": "x", "LC_ALL": "C.UTF-8"})
    daemon.wait_state("envjob", "running")
    env = wait_for(lambda: daemon.records("envjob") and daemon.records("envjob")[0]["env"], 10, "job start record")
    assert env["TRAINSUP_JOB"] == "envjob"
    assert env["TRAINSUP_ATTEMPT"] == "1"
    assert env["TRAINSUP_RESTART_REASON"] == "first"
    assert env["TRAINSUP_RESUME_FROM"] == ""
    assert env["TRAINSUP_SAVE_SIGNAL"] == "SIGUSR1"
    assert env["TRAINSUP_CHECKPOINT_DIR"] == str(daemon.root / "envjob-ckpt")
    assert env["TRAINSUP_HEARTBEAT_FILE"]
    assert env["LC_ALL"] == "C.UTF-8"
    assert "SECRET_TOKEN" not in env and "LD_PRELOAD" not in env
    assert env["HOME"] and env["USER"]


def test_resume_from_latest_checkpoint_after_crash(daemon):
    daemon.fakejob("resumer", "--every 0.1 --exit 7 --after 0.5",
                   extra="restart:\n  backoff: {initial: 0}\n  max_restarts_without_progress: 50\n")
    daemon.start()
    wait_for(lambda: len([r for r in daemon.records("resumer") if r["event"] == "start"]) >= 2, 20, "a relaunch")
    starts = [r for r in daemon.records("resumer") if r["event"] == "start"]
    saved_before = [r for r in daemon.records("resumer") if r["event"] == "saved" and r["t"] < starts[1]["t"]]
    assert starts[1]["reason"] == "crash"
    assert starts[1]["attempt"] == "2"
    assert starts[1]["resume"] == saved_before[-1]["path"]


def test_a_crashed_leaders_setsid_descendant_is_killed_before_the_relaunch(daemon):
    daemon.fakejob("leaky", "--setsid-grandchild --exit 1 --after 0.5", ckpt=False,
                   extra="restart: {backoff: {initial: 0.5s}}\n")
    daemon.start()
    gc_f = daemon.root / "leaky.rec.grandchild"
    gc_pid = int(wait_for(lambda: gc_f.exists() and gc_f.read_text(), 10, "the setsid grandchild"))
    daemon.wait_ready("leaky", 2, timeout=20)
    assert not psutil.pid_exists(gc_pid) or psutil.Process(gc_pid).status() == psutil.STATUS_ZOMBIE
    exits = [e for e in daemon.history("leaky") if e["kind"] == "exit"]
    assert exits[0]["reason"] == "exit 1"


def test_daemon_starts_again_with_jobs_in_every_state(daemon):
    """Found the first time a daemon was restarted after a job had finished: restoring
    `finished` (or `failed`) raised `pending -> finished is not allowed` and the daemon
    exited 1, so no job on the machine was supervised again. Every state the state DB can
    hold, then a daemon crash and a start: each job kept or resumed as the README says."""
    no_backoff = "restart:\n  backoff: {initial: 0}\n"
    daemon.fakejob("fin", "--exit 0 --after 0")
    daemon.fakejob("fail", "--exit 3 --after 0", extra="restart:\n  policy: never\n")
    daemon.fakejob("stopped", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.fakejob("preempted", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.fakejob("backoff", "--every 0.1 --exit 5 --after 0.3",
                   extra="restart:\n  backoff: {initial: 1h, max: 1h}\n")
    daemon.fakejob("running", "--catch-usr1", extra=no_backoff)
    daemon.start()
    daemon.wait_state("fin", "finished")
    daemon.wait_state("fail", "failed")
    for name in ("stopped", "preempted", "running"):
        daemon.wait_state(name, "running")
        daemon.wait_ready(name)
    assert daemon.request("stop", "stopped")["ok"]
    assert daemon.request("preempt", "preempted")["ok"]
    daemon.wait_state("stopped", "stopped")
    daemon.wait_state("preempted", "preempted")
    daemon.wait_state("backoff", "backoff", timeout=20)
    saved = [r["path"] for r in daemon.records("preempted") if r["event"] == "saved"]
    assert saved, daemon.records("preempted")

    daemon.kill()
    daemon.start()
    assert daemon.wait_state("fin", "finished")["last_exit"]["code"] == 0
    assert daemon.wait_state("fail", "failed")["last_exit"]["code"] == 3
    daemon.wait_state("stopped", "stopped")
    # A preempted job starts again at daemon start, resuming from its emergency save.
    daemon.wait_state("preempted", "running")
    start = daemon.wait_ready("preempted", 2)
    assert start["resume"] == saved[-1] and start["reason"] == "preempt"
    # A job the daemon left in backoff (a crash) runs again; so does a running one.
    daemon.wait_state("backoff", "running")
    daemon.wait_state("running", "running")
    assert daemon.proc.poll() is None

    # Re-adding a finished job on reload is not a failed request either.
    src = daemon.jobs / "fin.yaml"
    body = src.read_text()
    src.unlink()
    assert daemon.request("reload")["ok"]
    src.write_text(body)
    r = daemon.request("reload")
    assert r["ok"] and r["result"]["added"] == ["fin"], r
    daemon.wait_state("fin", "finished")
