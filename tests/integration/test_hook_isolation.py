"""Hooks as issue 20 and 24 found them: a daemon hook's `setsid` child outlived the hook's
timeout and the daemon; a `user:` job's own hooks ran as root with the daemon's whole
environment (NOTIFY_SOCKET, WATCHDOG_*); no TRAINSUP_EVENT/TRAINSUP_JOB; no `finished`."""

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import read_records, wait_for

# Writes one JSON line: who it runs as, its environment, its cgroup.
RECORD = ("import json, os, sys; ev = json.load(sys.stdin); "
          "cg = open('/proc/self/cgroup').read(); "
          "open(sys.argv[1], 'a').write(json.dumps({'event': ev['event'], 'uid': os.getuid(), "
          "'env': dict(os.environ), 'cgroup': cg}) + '\\n')")
# Leaves a `setsid` grandchild (its pid in argv[1]) and then hangs itself.
SETSID = ("import os, subprocess, sys, time; "
          "p = subprocess.Popen(['sleep', '600'], start_new_session=True); "
          "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(600)")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_daemon_hook_setsid_child_does_not_outlive_the_hooks_timeout(daemon):
    grandchild = daemon.root / "grandchild.pid"
    config = daemon.root / "trainsup.yaml"
    config.write_text("hooks:\n"
                      f"  - command: {json.dumps([sys.executable, '-c', SETSID, str(grandchild)])}\n"
                      "    on: [crash]\n    timeout: 1s\n")
    daemon.fakejob("crashy", "--catch-usr1", extra="restart: {backoff: {initial: 0.1s}}\n")
    daemon.start("--config", str(config))
    os.kill(daemon.wait_ready("crashy")["pid"], signal.SIGKILL)
    pid = wait_for(lambda: grandchild.exists() and grandchild.read_text() and int(grandchild.read_text()), 15,
                   "the hook's setsid grandchild")
    assert not _gone(pid)
    wait_for(lambda: _gone(pid), 15, f"the hook's setsid grandchild {pid} to be killed at the hook's timeout")
    assert "killed after" in daemon.log_text()


def test_daemon_hook_setsid_child_does_not_outlive_the_daemon(daemon):
    grandchild = daemon.root / "grandchild.pid"
    config = daemon.root / "trainsup.yaml"
    config.write_text("hooks:\n"
                      f"  - command: {json.dumps([sys.executable, '-c', SETSID, str(grandchild)])}\n"
                      "    on: [crash]\n    timeout: 10m\n")
    daemon.fakejob("crashy", "--catch-usr1", extra="restart: {max_restarts: 0}\n")
    daemon.start("--config", str(config))
    os.kill(daemon.wait_ready("crashy")["pid"], signal.SIGKILL)
    pid = wait_for(lambda: grandchild.exists() and grandchild.read_text() and int(grandchild.read_text()), 15,
                   "the hook's setsid grandchild")
    assert daemon.terminate() == 0
    wait_for(lambda: _gone(pid), 10, f"the hook's setsid grandchild {pid} to be gone with the daemon")


def test_hooks_get_a_clean_environment_event_and_job_in_their_own_cgroup(daemon):
    got = daemon.root / "hook.jsonl"
    config = daemon.root / "trainsup.yaml"
    config.write_text("hooks:\n"
                      f"  - command: {json.dumps([sys.executable, '-c', RECORD, str(got)])}\n"
                      "    on: [finished]\n")
    daemon.fakejob("short", "--exit 0 --after 0.2", extra="restart: {policy: on-failure}\n")
    daemon.start("--config", str(config), env={"NOTIFY_SOCKET": "/run/nowhere", "WATCHDOG_USEC": "1",
                                               "SECRET_OF_THE_DAEMON": "x"})
    rec = wait_for(lambda: read_records(got), 20, "the finished hook")[0]
    assert rec["event"] == "finished"
    env = rec["env"]
    assert env["TRAINSUP_EVENT"] == "finished" and env["TRAINSUP_JOB"] == "short"
    for leaked in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "SECRET_OF_THE_DAEMON", "PYTHONPATH"):
        assert leaked not in env, leaked
    assert {"PATH", "HOME", "USER"} <= set(env)
    if daemon.status("short")["containment"].startswith("cgroup"):
        assert "/.hook." in rec["cgroup"], rec["cgroup"]


def test_user_job_hooks_run_as_that_user_with_the_jobs_environment(daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a job as another user")
    # A dir `nobody` may write to, reachable by it (the test's tmp dir is root's 0700).
    base = Path(tempfile.mkdtemp(prefix="trainsup-hook-", dir="/tmp"))
    try:
        os.chmod(base, 0o777)
        got = base / "hook.jsonl"
        hook = json.dumps(["/usr/bin/python3", "-c", RECORD, str(got)])    # the venv's is under /root
        daemon.write_job("mine", f"name: mine\ncommand: [/bin/sh, -c, 'exit 3']\nworkdir: {base}\nuser: nobody\n"
                                 f"env: {{JOB_ONLY: yes-from-the-job}}\nrestart: {{max_restarts: 0}}\n"
                                 f"hooks:\n  - command: {hook}\n    on: [crash]\n")
        daemon.start(env={"NOTIFY_SOCKET": "/run/nowhere"})
        rec = wait_for(lambda: read_records(got), 20, "the job's own crash hook")[0]
        assert rec["uid"] == 65534, rec["uid"]
        env = rec["env"]
        assert env["JOB_ONLY"] == "yes-from-the-job" and env["USER"] == "nobody"
        assert env["TRAINSUP_EVENT"] == "crash" and env["TRAINSUP_JOB"] == "mine"
        assert "NOTIFY_SOCKET" not in env
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
