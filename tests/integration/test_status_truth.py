"""Issue 15, "status that lies or hides": one test per item, each against a real daemon,
checking what a user reads in `trainsup status` (and its exit code)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import FRAMEWORK_FIXTURES, wait_for


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_stopped_job_shows_no_stale_rss(daemon):
    daemon.fakejob("mem", "--catch-usr1")
    daemon.start()
    daemon.wait_ready("mem")
    wait_for(lambda: (daemon.status("mem")["memory"] or {}).get("rss"), 10, "an RSS sample")
    assert daemon.cli("stop", "mem").returncode == 0
    assert daemon.status("mem")["memory"]["rss"] is None
    r = daemon.cli("status")
    assert _row(r.stdout, "mem")[-1] == "-", r.stdout     # MEMORY column


def test_last_notice_expires(daemon):
    daemon.fakejob("pre", "--catch-usr1")
    daemon.start(env={"TRAINSUP_NOTICE_SHOWN_FOR": "2"})
    daemon.wait_ready("pre")
    assert daemon.cli("preempt", "pre").returncode == 0
    out = daemon.cli("status").stdout
    assert re.search(r"pre: last notice at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: preempt -> saved", out), out
    wait_for(lambda: "last notice" not in daemon.cli("status").stdout, 10, "the notice line to expire")
    assert daemon.status("pre")["last_notice"] is None


def test_manual_starts_are_not_restarts(daemon):
    daemon.fakejob("man", "--catch-usr1", extra="restart: {backoff: {initial: 0.1s}}\n")
    daemon.start()
    daemon.wait_ready("man")
    for n in (2, 3):
        assert daemon.cli("stop", "man", "--no-save").returncode == 0
        assert daemon.cli("start", "man").returncode == 0
        daemon.wait_ready("man", starts=n)
    assert daemon.status("man")["restarts"] == 0
    assert _row(daemon.cli("status").stdout, "man")[4] == "0"     # RESTARTS column
    os.kill(daemon.status("man")["pid"], signal.SIGKILL)
    daemon.wait_ready("man", starts=4)
    assert daemon.status("man")["restarts"] == 1


UNNUMBERED_JOB = """
import os, shutil, signal, sys, time
src, ckpt = sys.argv[1], os.environ["TRAINSUP_CHECKPOINT_DIR"]
def save(*_):
    shutil.copy(src, os.path.join(ckpt, ".tmp-final"))
    os.replace(os.path.join(ckpt, ".tmp-final"), os.path.join(ckpt, "latest.pt"))
signal.signal(signal.SIGUSR1, save)
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def _torch_fixture() -> Path:
    pts = sorted(FRAMEWORK_FIXTURES.rglob("*.pt"))
    assert pts, f"no torch checkpoint fixture in {FRAMEWORK_FIXTURES}"
    return pts[0]


def test_unnumbered_newest_checkpoint_is_shown_by_name_and_age(daemon):
    script = daemon.root / "unnumbered.py"
    script.write_text(UNNUMBERED_JOB)
    ready = daemon.root / "ready"
    daemon.write_job("tor", f"name: tor\ncommand: {json.dumps([sys.executable, str(script), str(_torch_fixture()), str(ready)])}\n"
                     f"checkpoint: {{dir: {daemon.root / 'tor-ckpt'}, format: torch}}\n")
    daemon.start()
    wait_for(ready.exists, 15, "the job to be ready")
    r = daemon.cli("checkpoint", "tor", "--wait", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert "step None" not in r.stdout
    assert r.stdout.startswith("tor: checkpoint latest.pt is valid: "), r.stdout
    row = " ".join(_row(daemon.cli("status").stdout, "tor"))
    assert re.search(r"latest\.pt, \d+s ago", row), row


def test_refused_save_request_starts_no_save_timer(daemon):
    # The job writes checkpoints on its own every 1.5 s but does not catch SIGUSR1.
    daemon.fakejob("deaf", "--every 1.5", extra="emergency_save: {grace: 1s}\n")
    daemon.start()
    daemon.wait_ready("deaf")
    r = daemon.cli("checkpoint", "deaf")
    assert r.returncode == 1 and "catches SIGUSR1" in r.stderr
    before = len([e for e in daemon.history("deaf") if e["kind"] == "checkpoint"])
    wait_for(lambda: len([e for e in daemon.history("deaf") if e["kind"] == "checkpoint"]) >= before + 2, 15,
             "two periodic checkpoints after the refused request")
    assert all("took_s" not in e for e in daemon.history("deaf") if e["kind"] == "checkpoint")
    st = daemon.status("deaf")
    assert not any("slow saves" in w for w in st["warnings"]), st["warnings"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_metadata_is_shown_in_status(daemon):
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"preemption: {{provider: aws, poll: 0.2s, metadata_url: 'http://127.0.0.1:{_closed_port()}'}}\n")
    daemon.start("--config", str(config))
    src = wait_for(lambda: next((s for s in daemon.request("status")["result"]["daemon"]["sources"]
                                 if not s["ok"]), None), 10, "the aws source to report its health")
    assert src["source"] == "aws" and "metadata unreachable" in src["error"]
    out = daemon.cli("status").stdout
    assert re.search(r"^aws: metadata unreachable \(connection refused\) since \d{4}-\d\d-\d\dT[\d:]+Z$",
                     out, re.MULTILINE), out


class _Imds(BaseHTTPRequestHandler):
    action: dict | None = None

    def log_message(self, *a):
        pass

    def do_PUT(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"token")

    def do_GET(self):
        if self.path.endswith("/spot/instance-action") and _Imds.action is not None:
            body = json.dumps(_Imds.action).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def imds():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    _Imds.action = None
    server.shutdown()
    server.server_close()


def test_active_notice_logged_once_with_iso_deadline_and_start_refused_unless_forced(daemon, imds):
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"preemption: {{provider: aws, poll: 0.1s, metadata_url: 'http://127.0.0.1:{imds.server_address[1]}'}}\n")
    daemon.fakejob("spot", "--catch-usr1")
    daemon.start("--config", str(config))
    daemon.wait_ready("spot")
    deadline = time.time() + 300
    iso = datetime.fromtimestamp(int(deadline), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    _Imds.action = {"action": "terminate", "time": iso}
    daemon.wait_state("spot", "preempted", timeout=20)
    time.sleep(1.0)     # a settle window: ten more polls see the same notice
    lines = [l for l in daemon.log_text().splitlines() if "notice from aws" in l]
    assert len(lines) == 1, lines
    assert f"(deadline {iso})" in lines[0]
    out = daemon.cli("status").stdout
    assert f"notice in force: aws preempt, deadline {iso}" in out, out
    r = daemon.cli("start", "spot")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"trainsup: a aws preempt notice is in force, deadline {iso}: spot would be "
                                "stopped again (start --force to start anyway)")
    assert daemon.status("spot")["state"] == "preempted"
    assert daemon.cli("start", "spot", "--force").returncode == 0
    daemon.wait_ready("spot", starts=2)


def test_status_exits_3_for_a_crash_loop_in_backoff(daemon):
    daemon.fakejob("loop", "--exit 1 --after 0", extra="restart: {backoff: {initial: 0.5s, max: 60s, factor: 10}}\n")
    daemon.start()
    st = daemon.wait_state("loop", "backoff", timeout=20)
    if st["crashes_in_a_row"] < 2:
        st = wait_for(lambda: (s := daemon.status("loop"))["crashes_in_a_row"] >= 2 and s, 20, "two crashes in a row")
    assert st["state"] == "backoff"      # now waiting 5 s: long enough to check
    r = daemon.cli("status")
    assert r.returncode == 3, r.stdout


def test_one_crash_in_backoff_is_not_an_alarm(daemon):
    daemon.fakejob("once", "--exit 1 --after 0", extra="restart: {backoff: {initial: 30s}}\n")
    daemon.start()
    st = daemon.wait_state("once", "backoff", timeout=20)
    assert st["crashes_in_a_row"] == 1
    assert daemon.cli("status").returncode == 0


def test_missing_jobs_dir_is_a_warning_in_status(daemon):
    shutil.rmtree(daemon.jobs)
    daemon.start()
    st = daemon.request("status")["result"]["daemon"]
    assert st["warnings"] == [f"jobs dir {daemon.jobs} does not exist: no job files are read "
                              "(create it, or pass --jobs)"]
    assert daemon.cli("status").stdout.startswith(f"warning: jobs dir {daemon.jobs} does not exist")


def test_reload_names_what_changed_and_fails_on_an_invalid_file(daemon):
    daemon.fakejob("keep", "--catch-usr1")
    daemon.fakejob("gone", "--catch-usr1")
    daemon.start()
    daemon.wait_ready("keep")
    (daemon.jobs / "gone.yaml").unlink()
    daemon.fakejob("new", "--catch-usr1")
    daemon.write_job("broken", "name: broken\ncommand: [true]\nbogus: 1\n")
    t0 = time.monotonic()
    r = daemon.cli("reload")
    # Regression: the removed job's watch was closed before its emergency save, so the
    # save was never seen and reload waited out the whole grace (120 s).
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines() == ["added: new", "removed: gone", "changed: none", "invalid: broken"]
    assert "broken.yaml:3: bogus: unknown key" in r.stderr
    (daemon.jobs / "broken.yaml").unlink()
    r = daemon.cli("reload")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "invalid: none"
