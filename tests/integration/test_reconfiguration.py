"""Reconfiguration is serialized (issue 10): overlapping reloads, broken files on reload,
crash streaks that belong to an old spec, and tasks that must not die silently."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import wait_for


def _procs_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and st != b"Z" and b"pytest" not in cmd:
            out.append(int(pid))
    return out


def test_two_sighups_during_a_stop_flow_leave_one_process(daemon):
    # A changed job whose stop flow takes a while (the save takes 1 s), and two SIGHUPs
    # 0.3 s apart while it runs: the reloads must not interleave into two launches.
    marker = "--record"      # every fakejob argv has it; one job here, so it counts that job
    daemon.fakejob("twice", "--catch-usr1 --save-delay 1.0 --every 0.2")
    daemon.start()
    daemon.wait_ready("twice")
    wait_for(lambda: daemon.status("twice")["checkpoint"]["valid"] >= 1, 10, "a first checkpoint")
    daemon.fakejob("twice", "--catch-usr1 --save-delay 1.0 --every 0.2", extra="stop_timeout: 4s\n")
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)   # the gap that reproduces the defect: the second SIGHUP lands mid-flow
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_ready("twice", 2, timeout=30)
    # Settle window: a second copy would appear within a few launches' time.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert len(_procs_with(str(daemon.root / "twice.rec"))) <= 1, _procs_with(marker)
        time.sleep(0.1)
    launches = [e for e in daemon.history("twice") if e["kind"] == "launch"]
    assert [e["attempt"] for e in launches] == [1, 2], launches
    assert daemon.terminate() == 0
    assert _procs_with(str(daemon.root / "twice.rec")) == []


def test_reload_with_a_broken_file_leaves_the_running_job_alone(daemon):
    daemon.fakejob("steady", "--catch-usr1", ckpt=False)
    daemon.start()
    daemon.wait_ready("steady")
    pid = daemon.status("steady")["pid"]
    (daemon.jobs / "steady.yaml").write_text("name: steady\ncommand: [unterminated\n")
    r = daemon.cli("reload")
    assert "steady.yaml:" in r.stdout + r.stderr          # the error is named
    st = daemon.status("steady")
    assert st["state"] == "running" and st["pid"] == pid
    assert "steady.yaml:" in (st.get("config_error") or "")
    launches = [e for e in daemon.history("steady") if e["kind"] == "launch"]
    assert len(launches) == 1


def test_reload_with_a_fixed_file_forgets_the_old_crash_streak(daemon):
    # A job that crashes at once until its file is fixed: after the fix, the new spec
    # starts with a clean streak instead of being `failed` after one launch.
    daemon.fakejob("fixme", "--exit 3", ckpt=False,
                   extra="restart:\n  max_restarts: 3\n  backoff: {initial: 0.1s, max: 0.1s}\n")
    daemon.start()
    daemon.wait_state("fixme", "failed", timeout=20)
    daemon.fakejob("fixme", "--exit 3 --after 0.5", ckpt=False,
                   extra="restart:\n  max_restarts: 3\n  backoff: {initial: 0.1s, max: 0.1s}\n")
    assert daemon.cli("reload").returncode == 0
    before = len([e for e in daemon.history("fixme") if e["kind"] == "launch"])
    wait_for(lambda: len([e for e in daemon.history("fixme") if e["kind"] == "launch"]) >= before + 3,
             20, "three launches of the fixed spec")


def test_nul_in_a_manifest_file_name_neither_wedges_the_job_nor_kills_the_rescan(daemon):
    ck = daemon.root / "nul-ckpt"
    bad = ck / "step-00000005"
    bad.mkdir(parents=True)
    (bad / "MANIFEST.json").write_text(json.dumps(
        {"format": "trainsup-checkpoint/1", "step": 5, "files": {"a\u0000b": {"size": 1, "xxh3_128": "00"}}}))
    daemon.fakejob("nul", "--catch-usr1 --every 0.3")
    daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": "0.5"})
    daemon.wait_ready("nul")
    st = daemon.status("nul")
    assert st["state"] == "running" and st["pid"]
    # The scan still indexes the job's own saves, and the NUL entry got a verdict: invalid
    # (listed with a reason), then rotated away as an invalid entry older than the newest.
    wait_for(lambda: daemon.status("nul")["checkpoint"]["valid"] >= 2, 15, "new checkpoints indexed")
    rows = daemon.request("checkpoints", "nul")["result"]
    listed = [r for r in rows if r["path"].endswith("step-00000005")]
    deleted = [e for e in daemon.history("nul") if e["kind"] == "deleted" and e["path"].endswith("step-00000005")]
    assert (listed and listed[0]["valid"] is False and listed[0]["invalid_reason"]) or deleted
    assert "Traceback" not in daemon.log_text()
