"""Prometheus metrics (opt-in: `metrics.listen` in the daemon config).

The event loop owns every number here. It feeds `MetricsBook` the events it records and,
a moment after something changed, publishes an immutable `Snapshot`. The HTTP server
(prometheus_client's, on its own thread) reads only the newest snapshot: one attribute
read, never a job's live fields, so a scrape can neither race the loop nor slow it.
"""

from __future__ import annotations

import asyncio
import math
import platform
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from .. import __version__

if TYPE_CHECKING:
    from .job import Job

# A job's state is one sample, {state="<current>"} = 1 (not one per possible state: with
# 200 jobs that was 2200 samples, most of a scrape's cost). `trainsup_job_state{state="failed"}`
# still finds failed jobs; `count by (state) (trainsup_job_state)` counts them.
SAVE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STEPS_LOST_BUCKETS = (0, 1, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
PUBLISH_DELAY = 0.2           # coalesce a burst of events into one publish
LAG_PROBE_INTERVAL = 1.0


@dataclass(frozen=True)
class JobSample:
    """What a scrape shows about one job, copied on the loop."""
    name: str
    state: str
    attempt: int = 0
    exit_code: int | None = None        # the code, or 128 + signal number (shell style)
    exit_reason: str | None = None
    exit_at: float | None = None
    step: int | None = None             # newest valid checkpoint's step (None: unnumbered/none)
    ckpt_mtime: float | None = None     # its mtime: the age is computed at scrape time
    ckpt_bytes: int | None = None
    quota: int | None = None
    valid: int = 0
    invalid: int = 0
    has_checkpoints: bool = False
    mirror: tuple[int | None, int, bool] | None = None   # checkpoint.mirror: uploaded step, bytes pending, failing


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: tuple[int, ...] = ()           # per bucket (not cumulative), + the +Inf bucket
    total: float = 0.0

    def observe(self, value: float) -> Histogram:
        counts = list(self.counts or (0,) * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        return Histogram(self.buckets, tuple(counts), self.total + value)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            running += n
            out.append((floatToGoString(bound), running))
        return out


@dataclass(frozen=True)
class Snapshot:
    jobs: tuple[JobSample, ...] = ()
    restarts: Mapping[tuple[str, str], int] = field(default_factory=dict)          # (job, reason)
    notices: Mapping[tuple[str, str, str], int] = field(default_factory=dict)      # (job, source, outcome)
    saves: Mapping[str, Histogram] = field(default_factory=dict)
    steps_lost: Mapping[str, Histogram] = field(default_factory=dict)
    mirror_events: Mapping[tuple[str, str], int] = field(default_factory=dict)   # (job, event kind)
    lag_s: float = 0.0
    published_at: float = 0.0


def _exit_code(last_exit: dict | None) -> int | None:
    if not last_exit:
        return None
    if last_exit.get("code") is not None:
        return int(last_exit["code"])
    sig = last_exit.get("signal")
    if isinstance(sig, int):
        return 128 + sig
    if isinstance(sig, str):
        import signal as _signal
        try:
            return 128 + int(_signal.Signals[sig])
        except KeyError:
            return None
    return None


def sample_job(job: Job) -> JobSample:
    """Copy one job's exported numbers (on the loop)."""
    ck = job.spec.checkpoint
    ex = job.last_exit or {}
    latest = job.ckpts.latest_valid() if job.checkpoints else None
    state = "stopped" if job.sigstopped and job.child else job.state.value
    return JobSample(
        name=job.name, state=state, attempt=job.attempt,
        exit_code=_exit_code(job.last_exit), exit_reason=ex.get("reason"), exit_at=ex.get("at"),
        step=latest.step if latest else None, ckpt_mtime=latest.mtime if latest else None,
        ckpt_bytes=sum(i.bytes for i in job.checkpoints) if ck else None,
        quota=ck.quota if ck else None,
        valid=sum(1 for i in job.checkpoints if i.valid),
        invalid=sum(1 for i in job.checkpoints if not i.valid and not i.in_progress),
        has_checkpoints=ck is not None, mirror=_mirror_sample(job))


def _mirror_sample(job: Job) -> tuple[int | None, int, bool] | None:
    m = getattr(job, "mirror", None)
    if m is None:
        return None
    st = m.status()
    return st["uploaded_step"], int(st["bytes_pending"]), st["error"] is not None


class MetricsBook:
    """The loop's side: counters fed from events, job samples refreshed when dirty."""

    def __init__(self) -> None:
        self.snapshot = Snapshot(published_at=time.time())
        self._jobs: dict[str, JobSample] = {}
        self._restarts: dict[tuple[str, str], int] = {}
        self._notices: dict[tuple[str, str, str], int] = {}
        self._saves: dict[str, Histogram] = {}
        self._steps_lost: dict[str, Histogram] = {}
        self._mirror: dict[tuple[str, str], int] = {}
        self._dirty: set[str] = set()
        self._everything_dirty = True
        self._lag = 0.0

    # -- fed by the loop ---------------------------------------------------------------
    def on_event(self, job: str, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "launch":
            reason = data.get("reason")
            if reason and reason != "first":
                key = (job, str(reason))
                self._restarts[key] = self._restarts.get(key, 0) + 1
            lost = data.get("steps_lost")
            if isinstance(lost, int) and lost >= 0:
                self._steps_lost[job] = self._steps_lost.get(job, Histogram(STEPS_LOST_BUCKETS)).observe(lost)
        elif kind == "notice" and data.get("outcome"):
            seen = (job, str(data.get("source")), str(data["outcome"]))
            self._notices[seen] = self._notices.get(seen, 0) + 1
        elif kind == "notice" and job == "-" and data.get("kind") == "warning":
            seen = ("-", str(data.get("source")), "checkpoint requested")
            self._notices[seen] = self._notices.get(seen, 0) + 1
        elif kind in ("upload", "restore", "upload-failed", "restore-failed"):
            # the mirror: what reached the store, what came back, how often the store failed
            self._mirror[(job, kind)] = self._mirror.get((job, kind), 0) + 1
        elif kind == "checkpoint" and isinstance(data.get("took_s"), (int, float)):
            self._saves[job] = self._saves.get(job, Histogram(SAVE_BUCKETS)).observe(float(data["took_s"]))
        self._dirty.add(job)

    def mark(self, job: str | None = None) -> None:
        if job is None:
            self._everything_dirty = True
        else:
            self._dirty.add(job)

    @property
    def dirty(self) -> bool:
        return self._everything_dirty or bool(self._dirty)

    def set_lag(self, seconds: float) -> None:
        self._lag = seconds

    def publish(self, jobs: Mapping[str, Job], invalid: Iterable[str] = ()) -> Snapshot:
        """Re-sample the dirty jobs (all after a reload) and swap in a new snapshot."""
        names = set(jobs) if self._everything_dirty else self._dirty & set(jobs)
        for name in names:
            self._jobs[name] = sample_job(jobs[name])
        current = {**{n: s for n, s in self._jobs.items() if n in jobs},
                   **{n: JobSample(name=n, state="invalid") for n in invalid if n not in jobs}}
        self._jobs = {n: s for n, s in current.items() if n in jobs}
        self._dirty.clear()
        self._everything_dirty = False
        self.snapshot = Snapshot(
            jobs=tuple(sorted(current.values(), key=lambda s: s.name)),
            restarts=MappingProxyType(dict(self._restarts)),
            notices=MappingProxyType(dict(self._notices)),
            saves=MappingProxyType(dict(self._saves)),
            steps_lost=MappingProxyType(dict(self._steps_lost)),
            mirror_events=MappingProxyType(dict(self._mirror)),
            lag_s=self._lag, published_at=time.time())
        return self.snapshot


def _esc(value: object) -> str:
    # The text format's label escaping: backslash, double quote, newline.
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return floatToGoString(value)


class _Text:
    """Builds the Prometheus text exposition format (version 0.0.4) directly: the
    generic collector path of prometheus_client cost ~28 us per sample, 100 ms for 200
    jobs on a loaded machine; plain string building is a few us per sample."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, kind: str, doc: str) -> None:
        self.parts.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")

    def sample(self, name: str, labels: str, value: float) -> None:
        self.parts.append(f"{name}{{{labels}}} {_num(value)}\n" if labels else f"{name} {_num(value)}\n")

    def histograms(self, name: str, doc: str, per_job: Mapping[str, Histogram]) -> None:
        self.family(name, "histogram", doc)
        for job, h in sorted(per_job.items()):
            for le, n in h.cumulative():
                self.sample(f"{name}_bucket", f'job="{_esc(job)}",le="{le}"', n)
            self.sample(f"{name}_count", f'job="{_esc(job)}"', sum(h.counts))
            self.sample(f"{name}_sum", f'job="{_esc(job)}"', h.total)

    def bytes(self) -> bytes:
        return "".join(self.parts).encode()


def render(snap: Snapshot, started_wall: float, now: float | None = None) -> bytes:
    """The newest snapshot as a scrape body (runs on the HTTP thread; reads only `snap`)."""
    now = time.time() if now is None else now
    t = _Text()
    t.family("trainsup_build_info", "gauge", "trainsup version (value is 1)")
    t.sample("trainsup_build_info", f'version="{_esc(__version__)}",python="{platform.python_version()}"', 1)
    t.family("trainsup_daemon_start_time_seconds", "gauge", "when the daemon started (unix time)")
    t.sample("trainsup_daemon_start_time_seconds", "", started_wall)
    t.family("trainsup_event_loop_lag_seconds", "gauge", "how late the daemon's event loop ran a 1 s timer, last probe")
    t.sample("trainsup_event_loop_lag_seconds", "", snap.lag_s)
    t.family("trainsup_metrics_snapshot_age_seconds", "gauge", "seconds since the loop last published these numbers")
    t.sample("trainsup_metrics_snapshot_age_seconds", "", max(0.0, now - snap.published_at))

    families = {
        "state": ("trainsup_job_state", "the job's current state (always 1)"),
        "attempt": ("trainsup_job_attempt", "launches so far"),
        "code": ("trainsup_job_last_exit_code", "last exit: its code, or 128 + signal number"),
        "exit_at": ("trainsup_job_last_exit_timestamp_seconds", "when the last attempt ended"),
        "step": ("trainsup_job_checkpoint_step", "step of the newest valid checkpoint (absent when it has no step number)"),
        "age": ("trainsup_job_checkpoint_age_seconds", "age of the newest valid checkpoint"),
        "bytes": ("trainsup_job_checkpoint_bytes", "bytes in the job's checkpoint dir"),
        "quota": ("trainsup_job_checkpoint_quota_bytes", "the job's checkpoint quota"),
        "count": ("trainsup_job_checkpoints", "checkpoints by validity"),
        "m_step": ("trainsup_job_mirror_uploaded_step", "step of the newest checkpoint in the object store"),
        "m_pending": ("trainsup_job_mirror_pending_bytes", "bytes of valid checkpoints not yet in the object store"),
        "m_failing": ("trainsup_job_mirror_failing", "1 while uploads to the object store fail"),
    }
    rows: dict[str, list[str]] = {k: [] for k in families}
    for s in snap.jobs:
        job = f'job="{_esc(s.name)}"'
        rows["state"].append(f'{job},state="{s.state}"}} 1')
        if s.state == "invalid":
            continue
        rows["attempt"].append(f"{job}}} {s.attempt}")
        if s.exit_code is not None:
            rows["code"].append(f'{job},reason="{_esc(s.exit_reason or "")}"}} {s.exit_code}')
        if s.exit_at is not None:
            rows["exit_at"].append(f"{job}}} {_num(s.exit_at)}")
        if not s.has_checkpoints:
            continue
        if s.step is not None:
            rows["step"].append(f"{job}}} {s.step}")
        if s.ckpt_mtime is not None:
            rows["age"].append(f"{job}}} {_num(max(0.0, now - s.ckpt_mtime))}")
        rows["bytes"].append(f"{job}}} {s.ckpt_bytes or 0}")
        if s.quota:
            rows["quota"].append(f"{job}}} {s.quota}")
        rows["count"].append(f'{job},valid="true"}} {s.valid}')
        rows["count"].append(f'{job},valid="false"}} {s.invalid}')
        if s.mirror is not None:
            if s.mirror[0] is not None:
                rows["m_step"].append(f"{job}}} {s.mirror[0]}")
            rows["m_pending"].append(f"{job}}} {s.mirror[1]}")
            rows["m_failing"].append(f"{job}}} {int(s.mirror[2])}")
    for key, (name, doc) in families.items():
        t.family(name, "gauge", doc)
        t.parts.extend(f"{name}{{{row}\n" for row in rows[key])

    t.family("trainsup_job_restarts_total", "counter",
             "relaunches by reason (crash, oom, hang, preempt, manual) since the daemon started")
    for (job, reason), n in sorted(snap.restarts.items()):
        t.sample("trainsup_job_restarts_total", f'job="{_esc(job)}",reason="{_esc(reason)}"', n)
    t.family("trainsup_notices_total", "counter", "notices handled, by source and outcome")
    for (job, source, outcome), n in sorted(snap.notices.items()):
        t.sample("trainsup_notices_total", f'job="{_esc(job)}",source="{_esc(source)}",outcome="{_esc(outcome)}"', n)
    t.family("trainsup_job_mirror_events_total", "counter",
             "object store transfers: upload, restore, restore-failed; upload-failed counts the "
             "starts of a run of failures")
    for (job, kind), n in sorted(snap.mirror_events.items()):
        t.sample("trainsup_job_mirror_events_total", f'job="{_esc(job)}",event="{_esc(kind)}"', n)
    t.histograms("trainsup_job_save_duration_seconds", "requested save to valid checkpoint", snap.saves)
    t.histograms("trainsup_job_steps_lost", "steps redone after each interruption (jobs that report their step)",
                 snap.steps_lost)
    return t.bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "metrics are at /metrics")
            return
        body = render(self.server.book.snapshot, self.server.started_wall)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass                       # a scrape every 15 s is not news for the daemon log


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], book: MetricsBook, started_wall: float):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.book, self.started_wall = book, started_wall
        super().__init__(address, _Handler)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The HTTP endpoint (a threaded server whose handlers only render the newest
    snapshot) plus the loop-side publisher and lag probe."""

    def __init__(self, listen: str, book: MetricsBook, started_wall: float):
        self.listen = listen
        self.book = book
        self.started_wall = started_wall
        self._httpd: _MetricsHTTPServer | None = None
        self._publish_handle: asyncio.TimerHandle | None = None

    def scrape(self) -> bytes:
        return render(self.book.snapshot, self.started_wall)

    def start(self) -> None:
        host, port = split_listen(self.listen)
        self._httpd = _MetricsHTTPServer((host, port), self.book, self.started_wall)
        threading.Thread(target=self._httpd.serve_forever, name="trainsup-metrics", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1]) if self._httpd else 0

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._publish_handle is not None:
            self._publish_handle.cancel()

    def schedule_publish(self, loop: asyncio.AbstractEventLoop, publish) -> None:
        """Publish once, PUBLISH_DELAY from now, however many events arrive meanwhile."""
        if self._publish_handle is None:
            def run() -> None:
                self._publish_handle = None
                publish()
            self._publish_handle = loop.call_later(PUBLISH_DELAY, run)

    async def probe_lag(self, publish) -> None:
        """Measure how late a timer fires: the loop's responsiveness, as users feel it."""
        loop = asyncio.get_running_loop()
        probes = 0
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            self.book.set_lag(max(0.0, loop.time() - t0 - LAG_PROBE_INTERVAL))
            probes += 1
            if probes % 10 == 0:
                self.book.mark()
            # Periodic publish too: fields that change without an event (rotation
            # verdicts) and the lag itself stay at most a second stale.
            publish()
