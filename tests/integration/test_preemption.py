"""Every notice becomes "save, confirm, then stop" (SPEC section 7), end to end with the
real daemon and real job processes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import wait_for


def _events(d, job, kind=None):
    return [e for e in d.history(job) if kind is None or e["kind"] == kind]


def _provider_config(tmp_path, provider: str, srv) -> os.PathLike:
    """A daemon config polling `provider` at a loopback metadata server every 0.2 s."""
    cfg = tmp_path / "trainsup.yaml"
    cfg.write_text(f"preemption:\n  provider: {provider}\n  poll: 0.2s\n"
                   f"  metadata_url: http://127.0.0.1:{srv.server_address[1]}\n")
    return cfg


def _assert_saved_before_sigterm(d, job):
    """The confirmed checkpoint landed before the stop (SIGTERM) began."""
    ev = d.history(job)
    ck = [i for i, e in enumerate(ev) if e["kind"] == "checkpoint"]
    stopping = [i for i, e in enumerate(ev) if e["kind"] == "state" and e["to"] == "stopping"]
    assert ck and stopping and ck[-1] < stopping[-1], [(e["kind"], e.get("to")) for e in ev]
    return ev[ck[-1]]


def test_preempt_command_saves_confirms_stops_and_start_resumes_from_it(daemon):
    daemon.fakejob("p", "--catch-usr1")
    daemon.start()
    daemon.wait_ready("p")
    r = daemon.cli("preempt", "p")
    assert r.returncode == 0, r.stderr
    assert "saved at step" in r.stdout
    st = daemon.status("p")
    assert st["state"] == "preempted"
    ck = _assert_saved_before_sigterm(daemon, "p")
    assert daemon.status("p")["last_notice"]["outcome"] == "saved"
    r = daemon.cli("start", "p")
    assert r.returncode == 0, r.stderr
    rec = daemon.wait_ready("p", 2)
    assert rec["resume"] == ck["path"]
    assert rec["reason"] == "manual"


def test_job_ignoring_save_signal_is_stopped_after_grace_and_previous_checkpoint_kept(daemon):
    from trainsup.checkpoint import write_checkpoint
    prev = write_checkpoint(daemon.root / "deaf-ckpt", 7, {"state.json": b'{"step": 7}'})
    daemon.fakejob("deaf", "--usr1-no-save", extra="emergency_save: {grace: 1s}\nstop_timeout: 2s\n")
    daemon.start()
    assert daemon.wait_ready("deaf")["resume"] == str(prev)
    t0 = time.monotonic()
    r = daemon.request("preempt", "deaf")
    took = time.monotonic() - t0
    assert r["ok"], r
    assert r["result"]["outcome"] == "no save within 1s" or r["result"]["outcome"].startswith("exited"), r
    assert 0.9 <= took < 6
    st = daemon.status("deaf")
    assert st["state"] == "preempted"
    assert st["checkpoint"]["valid"] == 1 and st["checkpoint"]["latest"] == str(prev)
    assert any(r["event"] == "usr1-ignored" for r in daemon.records("deaf"))


def test_notice_during_a_save_leads_to_one_save(daemon):
    daemon.fakejob("slow", "--catch-usr1 --save-delay 1.0")
    daemon.start()
    daemon.wait_ready("slow")
    r = daemon.request("checkpoint", "slow")               # a save starts (takes 1 s)
    assert r["ok"], r
    wait_for(lambda: any(e["kind"] == "save-requested" for e in daemon.history("slow")), 5, "save request")
    r = daemon.request("preempt", "slow")                  # a notice while it runs
    assert r["ok"] and r["result"]["outcome"] == "saved", r
    saves = [x for x in daemon.records("slow") if x["event"] == "saved"]
    assert len(saves) == 1, saves


def test_two_preempt_commands_at_once_are_one_flow(daemon):
    daemon.fakejob("twice", "--catch-usr1 --save-delay 0.5")
    daemon.start()
    daemon.wait_ready("twice")
    results = []
    ts = [threading.Thread(target=lambda: results.append(daemon.request("preempt", "twice"))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert all(r["ok"] for r in results), results
    assert results[0]["result"] == results[1]["result"]   # the same flow answered both
    assert len([x for x in daemon.records("twice") if x["event"] == "saved"]) == 1
    assert len(_events(daemon, "twice", "notice")) == 1


def test_trigger_file_preempts_every_job(daemon, tmp_path):
    trigger = tmp_path / "preempt-now"
    cfg = tmp_path / "trainsup.yaml"
    cfg.write_text(f"preemption:\n  trigger_file: {trigger}\n")
    daemon.fakejob("t1", "--catch-usr1")
    daemon.fakejob("t2", "--catch-usr1")
    daemon.start("--config", str(cfg))
    daemon.wait_ready("t1")
    daemon.wait_ready("t2")
    trigger.write_text("")
    for name in ("t1", "t2"):
        daemon.wait_state(name, "preempted", timeout=20)
        _assert_saved_before_sigterm(daemon, name)
        assert daemon.status(name)["last_notice"]["source"] == "trigger-file"


class _FakeImds(BaseHTTPRequestHandler):
    action: dict | None = None

    def log_message(self, *a):
        pass

    def do_PUT(self):
        body = b"tok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != "tok":
            self.send_response(401)
            self.end_headers()
            return
        if self.path.endswith("spot/instance-action") and type(self).action:
            body = json.dumps(type(self).action).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_aws_spot_notice_preempts_with_its_deadline(daemon, tmp_path):
    handler = type("Imds", (_FakeImds,), {"action": None})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = _provider_config(tmp_path, "aws", srv)
        daemon.fakejob("spot", "--catch-usr1")
        daemon.start("--config", str(cfg))
        daemon.wait_ready("spot")
        deadline = time.time() + 120
        handler.action = {"action": "terminate",
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline))}
        st = daemon.wait_state("spot", "preempted", timeout=20)
        _assert_saved_before_sigterm(daemon, "spot")
        assert st["last_notice"]["source"] == "aws"
        assert abs(st["last_notice"]["deadline"] - int(deadline)) < 2
    finally:
        srv.shutdown()


def test_memory_growth_gets_save_signal_before_limit_and_stop_restarts_with_reason_oom(daemon):
    daemon.fakejob("hog", "--catch-usr1 --grow-mb-per-s 40",
                   extra="memory: {limit: 150MiB, save_at: 0.6, action: stop, interval: 0.1s}\n"
                         "restart: {backoff: {initial: 0}}\n")
    daemon.start()
    rec = daemon.wait_ready("hog")
    wait_for(lambda: len([r for r in daemon.records("hog") if r["event"] == "start"]) >= 2, 30, "an oom restart")
    first_pid = rec["pid"]
    saves = [r for r in daemon.records("hog") if r["event"] == "saved" and r["pid"] == first_pid]
    assert saves, "the job got the save signal and saved before being stopped"
    mem = _events(daemon, "hog", "memory")
    assert mem and mem[0]["action"] == "stop" and mem[0]["rss"] < 150 << 20
    second = [r for r in daemon.records("hog") if r["event"] == "start"][1]
    assert second["reason"] == "oom"
    assert second["resume"] == saves[-1]["path"]


def test_hang_is_saved_then_restarted_with_reason_hang(daemon):
    daemon.fakejob("stuck", "--catch-usr1 --heartbeat-for 0.5",
                   extra="hang: {timeout: 1s}\nemergency_save: {grace: 0.5s}\nstop_timeout: 1s\n"
                         "restart: {backoff: {initial: 0}}\n")
    daemon.start()
    daemon.wait_ready("stuck")
    rec2 = daemon.wait_ready("stuck", 2, timeout=30)
    assert rec2["reason"] == "hang"
    assert _events(daemon, "stuck", "hang")


def test_sigstopped_job_shows_as_stopped(daemon):
    daemon.fakejob("frozen", "--catch-usr1")
    daemon.start()
    rec = daemon.wait_ready("frozen")
    os.kill(rec["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: daemon.status("frozen")["state"] == "stopped", 5, "status to show stopped")
        assert daemon.status("frozen")["sigstopped"] is True
    finally:
        os.kill(rec["pid"], signal.SIGCONT)
    wait_for(lambda: daemon.status("frozen")["state"] == "running", 5, "status to show running again")


def test_checkpoint_every_and_daemon_sigusr1_ask_for_saves(daemon):
    daemon.fakejob("sched", "--catch-usr1", extra="schedule: {checkpoint_every: 0.3s}\n")
    daemon.start()
    daemon.wait_ready("sched")
    wait_for(lambda: len([r for r in daemon.records("sched") if r["event"] == "saved"]) >= 2, 10,
             "two scheduled saves")
    n = len([r for r in daemon.records("sched") if r["event"] == "saved"])
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: len([r for r in daemon.records("sched") if r["event"] == "saved"]) > n, 10,
             "a save after the daemon's SIGUSR1")


class _FakeMetadata(BaseHTTPRequestHandler):
    """GCP and Azure metadata shapes on one loopback server; tests flip `state`."""
    state: dict = {}

    def log_message(self, *a):
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        st = type(self).state
        if self.path.startswith("/computeMetadata/v1/instance/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._reply(403)
            key = self.path.split("/")[-1].split("?")[0]
            value = st.get(key, "FALSE" if key == "preempted" else "NONE")
            return self._reply(200, value.encode(), {"ETag": f"{key}-{value}"})
        if self.path.startswith("/metadata/scheduledevents"):
            if self.headers.get("Metadata") != "true":
                return self._reply(400)
            doc = {"DocumentIncarnation": len(st.get("events", [])), "Events": st.get("events", [])}
            return self._reply(200, json.dumps(doc).encode())
        return self._reply(404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        type(self).state.setdefault("acks", []).append(json.loads(self.rfile.read(n)))
        self._reply(200)


def _metadata_server():
    handler = type("Meta", (_FakeMetadata,), {"state": {}})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


def test_gcp_preemption_notice_preempts(daemon, tmp_path):
    srv, handler = _metadata_server()
    try:
        cfg = _provider_config(tmp_path, "gcp", srv)
        daemon.fakejob("gce", "--catch-usr1")
        daemon.start("--config", str(cfg))
        daemon.wait_ready("gce")
        handler.state["preempted"] = "TRUE"
        st = daemon.wait_state("gce", "preempted", timeout=20)
        _assert_saved_before_sigterm(daemon, "gce")
        assert st["last_notice"]["source"] == "gcp" and st["last_notice"]["outcome"] == "saved"
    finally:
        srv.shutdown()


def test_azure_preempt_event_preempts_then_is_acknowledged(daemon, tmp_path):
    srv, handler = _metadata_server()
    try:
        cfg = _provider_config(tmp_path, "azure", srv)
        daemon.fakejob("az", "--catch-usr1")
        daemon.start("--config", str(cfg))
        daemon.wait_ready("az")
        not_before = time.time() + 30
        handler.state["events"] = [{
            "EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
            "ResourceType": "VirtualMachine", "Resources": ["vm1"], "EventStatus": "Scheduled",
            "NotBefore": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(not_before)),
            "Description": "Spot eviction", "EventSource": "Platform", "DurationInSeconds": -1}]
        st = daemon.wait_state("az", "preempted", timeout=20)
        _assert_saved_before_sigterm(daemon, "az")
        assert abs(st["last_notice"]["deadline"] - int(not_before)) < 2
        # Acknowledged (StartRequests) only after the job saved and stopped.
        acks = wait_for(lambda: handler.state.get("acks"), 10, "the StartRequests acknowledgement")
        assert acks == [{"StartRequests": [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297"}]}]
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_preempt_cron_saves_and_stops(daemon):
    # Cron has minute resolution: this waits up to a minute, so it runs in `make chaos`.
    daemon.fakejob("nightly", "--catch-usr1", extra="schedule: {preempt_cron: \"* * * * *\"}\n")
    daemon.start()
    daemon.wait_ready("nightly")
    st = daemon.wait_state("nightly", "preempted", timeout=75)
    _assert_saved_before_sigterm(daemon, "nightly")
    assert st["last_notice"]["source"] == "cron"
