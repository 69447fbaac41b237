"""Cloud notice providers against a fake metadata service on 127.0.0.1.

The fake serves the real response shapes of AWS IMDSv2, the GCE metadata server (with
wait_for_change long polls and ETags) and Azure Scheduled Events, and injects faults:
HTTP errors, bad JSON, dropped connections and answers slower than the client's timeout.
Nothing here may reach a real metadata address: every request is checked for loopback.
"""

from __future__ import annotations

import json
import logging
import socket
import statistics
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import deadline_for
from conftest import wait_for as _wait_for
from trainsup.daemon.notices import cloud
from trainsup.daemon.notices.cloud import AwsImds, AzureScheduledEvents, CloudPoller, GcpMetadata, MetadataError


def wait_for(cond, timeout=5.0, what="condition"):
    return _wait_for(cond, timeout, what, interval=0.005)


class FakeMetadata:
    """State of the fake service; tests change it, the handler reads it under `cond`."""

    def __init__(self):
        self.cond = threading.Condition()
        self.closing = False
        self.fault = None            # None | "HTTP 503" | "bad JSON" | "slow" | "drop"
        self.slow_for = 1.0
        self.requests: list[tuple[str, str]] = []
        self.token_puts = 0
        self.tokens: set[str] = set()
        self.aws_action = None       # dict served at spot/instance-action, or 404
        self.aws_rebalance = None
        self.gcp = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.gcp_version = {"preempted": 1, "maintenance-event": 1}
        self.gcp_served: dict[str, str] = {}
        self.gcp_ignores_wait = False
        self.azure_events: list[dict] = []
        self.azure_incarnation = 1
        self.azure_acks: list[dict] = []
        self.vm_name = "trainer-0"

    def set_gcp(self, key, value):
        with self.cond:
            self.gcp[key] = value
            self.gcp_version[key] += 1
            self.cond.notify_all()

    def set_azure(self, events):
        with self.cond:
            self.azure_events = events
            self.azure_incarnation += 1

    def count(self, prefix):
        with self.cond:
            return sum(1 for _, p in self.requests if p.startswith(prefix))


class Handler(BaseHTTPRequestHandler):
    fake: FakeMetadata

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", ctype="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def faulted(self) -> bool:
        fault = self.fake.fault
        if fault is None:
            return False
        if fault == "slow":
            # The injected fault: an answer that comes after the client gave up.
            time.sleep(self.fake.slow_for)
            return False
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return True
        if fault.startswith("HTTP "):
            self.send(int(fault.split()[1]), "internal error")
            return True
        if fault == "bad JSON":
            self.send(200, "{not json", "application/json")
            return True
        raise AssertionError(fault)

    def record(self):
        with self.fake.cond:
            self.fake.requests.append((self.command, self.path))

    def do_PUT(self):
        self.record()
        if self.faulted():
            return
        if self.path == "/latest/api/token":
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.send(400, "missing ttl")
            with self.fake.cond:
                self.fake.token_puts += 1
                token = f"tok-{self.fake.token_puts}"
                self.fake.tokens.add(token)
            return self.send(200, token)
        self.send(404, "not found")

    def do_GET(self):
        self.record()
        if self.faulted():
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path.startswith("/latest/"):
            return self.aws(url.path)
        if url.path.startswith("/computeMetadata/v1/instance/"):
            return self.gcp(url.path.rsplit("/", 1)[1], query)
        if url.path == "/metadata/scheduledevents":
            if self.headers.get("Metadata") != "true":
                return self.send(400, '{"error": "Bad request. Required metadata header not specified"}')
            with self.fake.cond:
                doc = {"DocumentIncarnation": self.fake.azure_incarnation,
                       "Events": list(self.fake.azure_events)}
            return self.send(200, json.dumps(doc), "application/json")
        if url.path == "/metadata/instance/compute/name":
            return self.send(200, self.fake.vm_name)
        self.send(404, "not found")

    def aws(self, path):
        if self.headers.get("X-aws-ec2-metadata-token") not in self.fake.tokens:
            return self.send(401, "")
        doc = {"/latest/meta-data/spot/instance-action": self.fake.aws_action,
               "/latest/meta-data/events/recommendations/rebalance": self.fake.aws_rebalance
               }.get(path)
        if doc is None:
            return self.send(404, "<?xml version=\"1.0\"?><title>404 - Not Found</title>",
                             "text/html")
        self.send(200, json.dumps(doc), "text/plain")

    def gcp(self, key, query):
        fake = self.fake
        if self.headers.get("Metadata-Flavor") != "Google":
            return self.send(403, "Missing Metadata-Flavor:Google header.")
        if key not in fake.gcp:
            return self.send(404, "not found")
        with fake.cond:
            if query.get("wait_for_change") == ["true"] and not fake.gcp_ignores_wait:
                timeout = float(query.get("timeout_sec", ["60"])[0])
                last = query.get("last_etag", [None])[0]
                start_version = fake.gcp_version[key]
                if last is None or last == f"{key}-{start_version}":
                    fake.cond.wait_for(
                        lambda: fake.closing or fake.gcp_version[key] != start_version,
                        timeout)
            value, etag = fake.gcp[key], f"{key}-{fake.gcp_version[key]}"
            fake.gcp_served[key] = value
        self.send(200, value, "application/text", [("ETag", etag)])

    def do_POST(self):
        self.record()
        if self.faulted():
            return
        if urllib.parse.urlsplit(self.path).path == "/metadata/scheduledevents":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with self.fake.cond:
                self.fake.azure_acks.append(body)
            return self.send(200, "")
        self.send(404, "not found")


@pytest.fixture
def fake():
    state = FakeMetadata()
    handler = type("BoundHandler", (Handler,), {"fake": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    with state.cond:
        state.closing = True
        state.fault = None
        state.cond.notify_all()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fails any request that would leave the machine (a default base, say)."""
    real = cloud._request

    def guarded(method, url, headers, **kw):
        host = urllib.parse.urlsplit(url).hostname
        assert host == "127.0.0.1", f"test tried to reach {url}"
        return real(method, url, headers, **kw)

    monkeypatch.setattr(cloud, "_request", guarded)


class Recorder:
    def __init__(self):
        self.notices = []
        self.cond = threading.Condition()

    def __call__(self, notice):
        with self.cond:
            self.notices.append((time.monotonic(), notice))
            self.cond.notify_all()

    def wait(self, n, timeout=5.0):
        with self.cond:
            timeout = deadline_for(timeout)
            ok = self.cond.wait_for(lambda: len(self.notices) >= n, timeout)
        assert ok, f"expected {n} notices within {timeout}s, got {self.notices}"
        return self.notices[n - 1]


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()       # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


# --- AWS -------------------------------------------------------------------------------

def test_aws_nothing_pending_then_action_and_rebalance(fake):
    aws = AwsImds(fake.url, timeout=1.0)
    assert aws.poll_once() == []
    fake.aws_action = {"action": "terminate", "time": "2026-11-25T17:00:00Z"}
    fake.aws_rebalance = {"noticeTime": "2026-11-25T16:50:00Z"}
    action, rebalance = aws.poll_once()
    assert (action.source, action.kind) == ("aws", "preempt")
    assert action.deadline == datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc).timestamp()
    assert "terminate" in action.detail
    assert (rebalance.kind, rebalance.deadline) == ("warning", None)
    assert fake.token_puts == 1, "the IMDSv2 token is reused between polls"


def test_aws_refreshes_a_rejected_token_once(fake):
    aws = AwsImds(fake.url, timeout=1.0)
    aws.poll_once()
    fake.tokens.clear()                    # IMDS forgot our token: GETs now answer 401
    fake.aws_action = {"action": "stop", "time": "2026-11-25T17:00:00Z"}
    assert [n.kind for n in aws.poll_once()] == ["preempt"]
    assert fake.token_puts == 2


def test_aws_without_token_is_refused_by_the_fake(fake):
    # Guards the fake itself: a client that skipped IMDSv2 would be caught.
    status, _, _ = cloud._request("GET", fake.url + AwsImds.ACTION, {}, timeout=1.0)
    assert status == 401


@pytest.mark.parametrize("fault,kind", [("HTTP 503", "HTTP 503"), ("bad JSON", "bad JSON"),
                                        ("slow", "timeout"), ("drop", "broken response")])
def test_aws_faults_raise_metadata_errors(fake, fault, kind):
    aws = AwsImds(fake.url, timeout=0.3)
    aws.poll_once()                        # token in hand; the fault hits the GET
    fake.aws_action = {"action": "terminate", "time": "2026-11-25T17:00:00Z"}
    fake.fault, fake.slow_for = fault, 1.0
    with pytest.raises(MetadataError) as err:
        aws.poll_once()
    assert err.value.kind == kind
    assert fake.url in str(err.value)


def test_connection_refused_is_a_metadata_error():
    for provider in (AwsImds(closed_port_url()), GcpMetadata(closed_port_url()),
                     AzureScheduledEvents(closed_port_url())):
        with pytest.raises(MetadataError) as err:
            provider.poll_once()
        assert err.value.kind == "connection refused"


# --- GCP -------------------------------------------------------------------------------

def test_gcp_poll_once_reads_both_keys(fake):
    gcp = GcpMetadata(fake.url, timeout=1.0, clock=lambda: 1000.0)
    assert gcp.poll_once() == []
    fake.set_gcp("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
    assert [(n.kind, n.deadline) for n in gcp.poll_once()] == [("warning", None)]
    fake.set_gcp("preempted", "TRUE")
    fake.set_gcp("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
    assert [(n.kind, n.deadline) for n in gcp.poll_once()] == [("preempt", 1030.0),
                                                               ("maintenance", 1030.0)]


def test_gcp_long_poll_notices_a_change_without_polling(fake):
    rec = Recorder()
    # poll=30: were it polling plainly, the change below would wait 30 s.
    poller = CloudPoller("gcp", rec, poll=30.0, metadata_url=fake.url, timeout=1.0,
                         long_poll=20)
    poller.start()
    try:
        wait_for(lambda: fake.count("/computeMetadata/v1/instance/preempted?wait_for_change")
                 >= 1, what="a long poll on preempted")
        t0 = time.monotonic()
        fake.set_gcp("preempted", "TRUE")
        t1, notice = rec.wait(1)
        assert (notice.source, notice.kind) == ("gcp", "preempt")
        assert t1 - t0 < 1.0
    finally:
        poller.stop()


def test_gcp_falls_back_to_plain_polls_when_wait_is_ignored(fake):
    fake.gcp_ignores_wait = True
    rec = Recorder()
    poller = CloudPoller("gcp", rec, poll=0.2, metadata_url=fake.url, timeout=1.0,
                         long_poll=20)
    poller.start()
    try:
        time.sleep(0.5)   # settle window: an answered-at-once long poll must not spin
        assert fake.count("/computeMetadata/v1/instance/preempted") <= 6
        fake.set_gcp("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        assert rec.wait(1)[1].kind == "maintenance"
    finally:
        poller.stop()


# --- Azure -----------------------------------------------------------------------------

def azure_event(event_id, kind="Preempt", not_before="Mon, 19 Sep 2016 18:29:47 GMT",
                resources=("trainer-0",), status="Scheduled"):
    return {"EventId": event_id, "EventType": kind, "ResourceType": "VirtualMachine",
            "Resources": list(resources), "EventStatus": status, "NotBefore": not_before,
            "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}


def test_azure_events_for_this_vm_and_acknowledge(fake):
    az = AzureScheduledEvents(fake.url, timeout=1.0)
    assert az.poll_once() == []
    fake.set_azure([azure_event("A-1"), azure_event("B-2", "Reboot", resources=["other-vm"]),
                    azure_event("C-3", "Freeze")])
    notices = az.poll_once()
    assert [(n.kind, n.event_id) for n in notices] == [("preempt", "A-1"), ("warning", "C-3")]
    assert notices[0].deadline == 1474309787.0      # Mon, 19 Sep 2016 18:29:47 GMT
    az.acknowledge(notices[0])
    assert fake.azure_acks == [{"StartRequests": [{"EventId": "A-1"}]}]


def test_azure_faults(fake):
    az = AzureScheduledEvents(fake.url, timeout=0.3)
    for fault, kind in [("HTTP 500", "HTTP 500"), ("bad JSON", "bad JSON"), ("slow", "timeout")]:
        fake.fault = fault
        with pytest.raises(MetadataError) as err:
            az.poll_once()
        assert err.value.kind == kind


# --- the poller ------------------------------------------------------------------------

def test_poller_survives_errors_logs_once_and_reports_each_notice_once(fake, caplog):
    caplog.set_level(logging.INFO, logger="trainsup.notices.cloud")
    rec = Recorder()
    poller = CloudPoller("azure", rec, poll=0.05, metadata_url=fake.url, timeout=1.0)
    poller.start()
    try:
        wait_for(lambda: fake.count("/metadata/scheduledevents") >= 1, what="a good poll")
        fake.fault = "HTTP 503"
        n = fake.count("/metadata/scheduledevents")
        wait_for(lambda: fake.count("/metadata/scheduledevents") >= n + 5, what="failing polls")
        fake.fault = "bad JSON"
        n = fake.count("/metadata/scheduledevents")
        wait_for(lambda: fake.count("/metadata/scheduledevents") >= n + 5, what="bad JSON polls")
        fake.fault = None
        fake.set_azure([azure_event("E-9")])
        rec.wait(1)
        n = fake.count("/metadata/scheduledevents")
        wait_for(lambda: fake.count("/metadata/scheduledevents") >= n + 5, what="more polls")
        assert len(rec.notices) == 1, "a pending notice is reported once, not every poll"
        fake.set_azure([azure_event("E-9"), azure_event("E-10", "Terminate")])
        assert rec.wait(2)[1].event_id == "E-10"
    finally:
        poller.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings          # one per kind of error, not one per poll
    assert "HTTP 503" in warnings[0] and "not JSON" in warnings[1]
    assert fake.url in warnings[0]
    assert any("answering again" in r.getMessage() for r in caplog.records)


def test_no_callback_after_stop(fake):
    rec = Recorder()
    poller = CloudPoller("aws", rec, poll=0.05, metadata_url=fake.url, timeout=1.0)
    poller.start()
    wait_for(lambda: fake.count("/latest/meta-data/spot") >= 2, what="two polls")
    poller.stop()
    fake.aws_action = {"action": "terminate", "time": "2026-11-25T17:00:00Z"}
    n = fake.count("/latest/")
    time.sleep(0.3)   # settle window: nothing may poll or call back after stop()
    assert fake.count("/latest/") == n and rec.notices == []


def test_default_bases_are_the_real_services_but_unused_here():
    # Checked as values only; the loopback guard fails any test that would use them.
    assert AwsImds().base == "http://169.254.169.254"
    assert GcpMetadata().base == "http://metadata.google.internal"
    assert AzureScheduledEvents().base == "http://169.254.169.254"


# --- latency: notice appears on the service -> on_notice called -----------------------

def _measure(fake, provider, make_notice_appear, prepare=lambda i: None, rounds=10):
    rec = Recorder()
    poller = CloudPoller(provider, rec, poll=0.2, metadata_url=fake.url, timeout=1.0,
                         long_poll=20)
    poller.start()
    lat = []
    try:
        time.sleep(0.25)   # let the first polls settle; rounds start at random phases
        for i in range(rounds):
            prepare(i)
            t0 = time.monotonic()
            make_notice_appear(i)
            t1, _ = rec.wait(len(lat) + 1, timeout=3.0)
            lat.append(t1 - t0)
            time.sleep(0.03 * (i % 7))     # spread the phase against the poll interval
    finally:
        poller.stop()
    return statistics.median(lat), max(lat)


def test_notice_latency_at_poll_0_2s(fake):
    def aws(i):
        fake.aws_action = {"action": "terminate", "time": f"2026-11-25T17:00:{i:02d}Z"}

    def azure(i):
        fake.set_azure([azure_event(f"L-{i}")])

    def gcp_clear(i):
        # The poller must have seen the preemption go away, or TRUE again is no news.
        fake.set_gcp("preempted", "FALSE")
        wait_for(lambda: fake.gcp_served.get("preempted") == "FALSE", what="FALSE served")

    def gcp(i):
        fake.set_gcp("preempted", "TRUE")

    results = {}
    for name, appear, prepare in (("aws", aws, None), ("azure", azure, None),
                                  ("gcp", gcp, gcp_clear)):
        results[name] = _measure(fake, name, appear, prepare or (lambda i: None))
    print("\nnotice latency at poll=0.2s (median, max):",
          {k: (round(m * 1000, 1), round(x * 1000, 1)) for k, (m, x) in results.items()}, "ms")
    for name, (median, worst) in results.items():
        assert median < 0.3, (name, median)
        assert worst < 0.6, (name, worst)
    assert results["gcp"][0] < 0.05     # long poll: no interval to wait out
