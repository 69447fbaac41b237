"""A real Prometheus server (Debian's `prometheus` package) scrapes a real daemon with three
jobs; PromQL through its HTTP API must answer what happened: two crashes of one job, a
job that failed, checkpoints of a third."""

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest
from conftest import scaled, wait_for

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the `prometheus` binary is absent: apt-get install -y prometheus (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    def __init__(self, root, target: str):
        self.port = _free_port()
        cfg = root / "prometheus.yml"
        cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                       "scrape_configs:\n"
                       "  - job_name: trainsup\n"
                       # No honor_labels: the trainsup job is `name`, so `job` stays the target's.
                       f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        try:
            return b"Ready" in _get(f"http://127.0.0.1:{self.port}/-/ready")
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": promql})
        reply = json.loads(_get(f"http://127.0.0.1:{self.port}/api/v1/query?{q}"))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, promql: str):
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(scaled(30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path):
    started = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target))
        return started[-1]
    yield start
    for p in started:
        p.close()


def test_prometheus_counts_two_crashes_of_a_job_among_three(daemon, prometheus_for):
    config = daemon.root / "trainsup.yaml"
    config.write_text("metrics:\n  listen: 127.0.0.1:0\n")
    daemon.fakejob("steady", "--catch-usr1 --every 0.3")
    daemon.fakejob("killed", "--catch-usr1", extra="restart: {backoff: {initial: 0.1s}}\n")
    daemon.fakejob("failing", "--exit 3 --after 0.2", extra="restart: {max_restarts: 1, backoff: {initial: 0.1s}}\n")
    daemon.start("--config", str(config))
    listen = daemon.request("status")["result"]["daemon"]["metrics"]
    assert listen.startswith("127.0.0.1:") and not listen.endswith(":0"), listen

    for n in (1, 2):
        pid = daemon.wait_ready("killed", starts=n)["pid"]
        daemon.wait_state("killed", "running")
        import os
        import signal
        os.kill(pid, signal.SIGKILL)
    daemon.wait_ready("killed", starts=3)
    daemon.wait_state("failing", "failed", timeout=20)

    prom = prometheus_for(listen)
    wait_for(lambda: prom.value('up{job="trainsup"}') == 1, 30, "prometheus to scrape the daemon")
    wait_for(lambda: prom.value('trainsup_job_restarts_total{name="killed",reason="crash"}') == 2, 30,
             "trainsup_job_restarts_total of job killed to read 2 "
             f"(prometheus has {prom.query('trainsup_job_restarts_total')})")
    assert prom.value('sum by (name) (trainsup_job_restarts_total{name="killed"})') == 2
    assert prom.value('trainsup_job_restarts_total{name="failing",reason="crash"}') == 1
    # Every counter of every job exists from the first scrape, at 0: increase() sees the first crash.
    assert prom.value('sum(trainsup_job_restarts_total{name="steady"})') == 0
    assert len(prom.query('trainsup_job_restarts_total{name="steady"}')) == 5
    failed = prom.query('trainsup_job_state{state="failed"} == 1')
    assert [(r["metric"]["name"], r["metric"]["job"]) for r in failed] == [("failing", "trainsup")]
    assert prom.value('count(trainsup_job_state{state="running"} == 1)') == 2
    assert prom.value('count(trainsup_job_state{name="steady"})') == 11          # every state, 0 or 1
    assert prom.value('trainsup_job_last_exit_code{name="failing"}') == 3
    assert prom.value('trainsup_job_last_exit_reason{name="failing",reason="exit"}') == 1
    wait_for(lambda: (prom.value('trainsup_job_checkpoint_step{name="steady"}') or 0) > 0, 30,
             "the steady job's checkpoint step")
    wait_for(lambda: (prom.value('trainsup_job_memory_rss_bytes{name="steady"}') or 0) > 0, 30,
             "the steady job's memory")
    assert prom.value('trainsup_job_uptime_seconds{name="steady"}') > 0
    assert prom.value('trainsup_build_info') == 1
    assert prom.value('trainsup_event_loop_lag_seconds') < 0.5
    assert prom.value('process_resident_memory_bytes{job="trainsup"}') > 0
