"""Prometheus metrics (opt-in: `metrics.listen` in the daemon config), by Prometheus'
conventions: the job label is `name` (a scrape target's own label is `job`), every counter
of every job starts at 0, every state is a 0/1 series, label values come from bounded
sets (free text would make a series per distinct text), and the daemon's own process_*.

The event loop owns every number here. It feeds `MetricsBook` the events it records and,
a moment after something changed, publishes an immutable `Snapshot`. The endpoint
(metrics_http.py, on its own threads) reads only the newest snapshot: one attribute read,
never a job's live fields, so a scrape can neither race the loop nor slow it.
"""

from __future__ import annotations

import asyncio
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from prometheus_client.utils import floatToGoString

from .. import __version__
from .goodput import ALL as GOODPUT_PARTS
from .goodput import Goodput
from .metrics_http import BindError, Endpoint, MetricsUnavailable

if TYPE_CHECKING:
    from .job import Job

# Every state a job can be in, each exported 0/1 (node_exporter's systemd collector does
# the same): `trainsup_job_state{state="failed"} == 1` finds failed jobs, and a state that
# ended reads 0 instead of vanishing (a vanished series cannot fire `== 0`).
STATES = ("pending", "starting", "running", "saving", "stopping", "backoff", "stopped",
          "preempted", "finished", "failed", "invalid")
# Bounded label values: free text in a label makes one series per distinct text.
RESTART_REASONS = ("crash", "oom", "hang", "preempt", "manual")
EXIT_REASONS = ("exit", "signal", "oom")
SAVE_OUTCOMES = ("saved", "failed")
SAVE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STEPS_LOST_BUCKETS = (0, 1, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
PUBLISH_DELAY = 0.2           # coalesce a burst of events into one publish
LAG_PROBE_INTERVAL = 1.0
# Largest integer a Prometheus sample holds exactly; a job's own step beyond it is clamped
# (a value Prometheus cannot parse fails the whole scrape, every job's numbers with it).
MAX_SAMPLE = float(2 ** 53)


def exit_reason(reason: str | None) -> str | None:
    """The bounded enum of a free-text exit reason ("exit 3", "signal SIGKILL", "oom-killed")."""
    if not reason:
        return None
    if reason.startswith("oom"):
        return "oom"
    if reason.startswith("signal"):
        return "signal"
    return "exit"


def save_outcome(outcome: str | None) -> str | None:
    """A stop flow's outcome as the save counter's label: saved, failed, or None (no save
    was asked for: the job was not running)."""
    if not outcome or outcome == "not running":
        return None
    return "saved" if outcome == "saved" else "failed"


@dataclass(frozen=True)
class JobSample:
    """What a scrape shows about one job, copied on the loop."""
    name: str
    state: str
    attempt: int = 0
    exit_code: int | None = None        # the code, or 128 + signal number (shell style)
    exit_reason: str | None = None      # EXIT_REASONS
    exit_at: float | None = None
    started_at: float | None = None     # the running attempt's start (unix time)
    rss: int | None = None
    mem_limit: int | None = None
    step: int | None = None             # newest valid checkpoint's step (None: unnumbered/none)
    ckpt_mtime: float | None = None     # its mtime: the age is computed at scrape time
    ckpt_bytes: int | None = None
    save_interval: float | None = None  # schedule.checkpoint_every
    quota: int | None = None
    over_quota: bool = False
    valid: int = 0
    invalid: int = 0
    has_checkpoints: bool = False
    config_error: bool = False
    goodput: Goodput | None = None      # as of the sample; render advances it to the scrape
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
        for bound, n in zip((*self.buckets, math.inf), self.counts or (0,) * (len(self.buckets) + 1)):
            running += n
            out.append((floatToGoString(bound), running))
        return out


@dataclass(frozen=True)
class Snapshot:
    jobs: tuple[JobSample, ...] = ()
    restarts: Mapping[tuple[str, str], int] = field(default_factory=dict)          # (job, reason)
    saves: Mapping[tuple[str, str], int] = field(default_factory=dict)             # (job, outcome)
    notices: Mapping[str, int] = field(default_factory=dict)                       # machine-wide, by source
    save_seconds: Mapping[str, Histogram] = field(default_factory=dict)
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
            return 128 + int(_signal.Signals[sig if sig.startswith("SIG") else "SIG" + sig])
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
        exit_code=_exit_code(job.last_exit), exit_reason=exit_reason(ex.get("reason")), exit_at=ex.get("at"),
        started_at=job.child.started_wall if job.child else None,
        rss=job.memory_rss if job.child else None, mem_limit=job.spec.memory.limit,
        step=latest.step if latest else None, ckpt_mtime=latest.mtime if latest else None,
        ckpt_bytes=sum(i.bytes for i in job.checkpoints) if ck else None,
        save_interval=job.spec.schedule.checkpoint_every,
        quota=ck.quota if ck else None, over_quota=bool(ck and job.ckpts.over_quota),
        valid=sum(1 for i in job.checkpoints if i.valid),
        invalid=sum(1 for i in job.checkpoints if not i.valid and not i.in_progress),
        has_checkpoints=ck is not None, config_error=bool(job.config_error),
        goodput=job.goodput.at(time.time(), job.state.value), mirror=_mirror_sample(job))


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
        self._saves: dict[tuple[str, str], int] = {}
        self._notices: dict[str, int] = {}
        self._save_seconds: dict[str, Histogram] = {}
        self._steps_lost: dict[str, Histogram] = {}
        self._mirror: dict[tuple[str, str], int] = {}
        self._dirty: set[str] = set()
        self._everything_dirty = True
        self._lag = 0.0

    # -- fed by the loop ---------------------------------------------------------------
    def on_event(self, job: str, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "launch":
            reason = data.get("reason")
            if reason in RESTART_REASONS:
                key = (job, str(reason))
                self._restarts[key] = self._restarts.get(key, 0) + 1
            lost = data.get("steps_lost")
            if isinstance(lost, int) and lost >= 0:
                self._steps_lost[job] = self._steps_lost.get(job, Histogram(STEPS_LOST_BUCKETS)).observe(lost)
        elif kind == "notice" and job == "-":
            source = _label(data.get("source"))
            self._notices[source] = self._notices.get(source, 0) + 1
        elif kind == "notice" and "stop_s" in data and (outcome := save_outcome(data.get("outcome"))):
            # A stop flow's record (stop, preempt, restart, a notice): did the save it asked for land?
            self._saves[(job, outcome)] = self._saves.get((job, outcome), 0) + 1
        elif kind in MIRROR_EVENTS:
            # the mirror: what reached the store, what came back, how often the store failed
            self._mirror[(job, kind)] = self._mirror.get((job, kind), 0) + 1
        elif kind == "checkpoint" and isinstance(data.get("took_s"), (int, float)):
            self._save_seconds[job] = self._save_seconds.get(job, Histogram(SAVE_BUCKETS)).observe(
                float(data["took_s"]))
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
        self._jobs = {n: s for n, s in self._jobs.items() if n in jobs}
        return self.publish_samples(self._jobs, invalid)

    def publish_samples(self, samples: Mapping[str, JobSample], invalid: Iterable[str] = ()) -> Snapshot:
        """Swap in a snapshot of these job samples (publish(), and tests without a daemon)."""
        current = {**samples, **{n: JobSample(name=n, state="invalid") for n in invalid if n not in samples}}
        self._dirty.clear()
        self._everything_dirty = False
        self.snapshot = Snapshot(
            jobs=tuple(sorted(current.values(), key=lambda s: s.name)),
            restarts=MappingProxyType(dict(self._restarts)),
            saves=MappingProxyType(dict(self._saves)),
            notices=MappingProxyType(dict(self._notices)),
            save_seconds=MappingProxyType(dict(self._save_seconds)),
            steps_lost=MappingProxyType(dict(self._steps_lost)),
            mirror_events=MappingProxyType(dict(self._mirror)),
            lag_s=self._lag, published_at=time.time())
        return self.snapshot


def _label(value: object) -> str:
    """A label value from a name the code chose (a notice source): printable ASCII only."""
    text = str(value)[:64]
    return "".join(c if c.isascii() and c.isprintable() else "_" for c in text) or "_"


def _esc(value: object) -> str:
    # The text format's label escaping: backslash, double quote, newline. Job names are
    # checked when their file loads; anything else is made printable first.
    text = str(value)
    if not (text.isascii() and text.isprintable()):
        text = "".join(c if c.isprintable() else "_" for c in text)
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _num(value: float) -> str:
    return floatToGoString(MAX_SAMPLE if value > MAX_SAMPLE else -MAX_SAMPLE if value < -MAX_SAMPLE else value)


# name: (type, help). The order here is the order of the exposition.
FAMILIES: dict[str, tuple[str, str]] = {
    "trainsup_job_state": ("gauge", "1 for the job's current state, 0 for every other state"),
    "trainsup_job_config_error": ("gauge", "1 while the job's file is broken and the job runs as it was loaded"),
    "trainsup_job_attempt": ("gauge", "launches of the job so far (kept across daemon restarts)"),
    "trainsup_job_start_time_seconds": ("gauge", "when the running attempt started (unix time; absent when not running)"),
    "trainsup_job_uptime_seconds": ("gauge", "seconds the running attempt has run (absent when not running)"),
    "trainsup_job_memory_rss_bytes": ("gauge", "resident memory of the running attempt (its cgroup or process tree)"),
    "trainsup_job_memory_limit_bytes": ("gauge", "the job's memory.limit (absent when none)"),
    "trainsup_job_last_exit_code": ("gauge", "the last attempt's exit code, or 128 + signal number"),
    "trainsup_job_last_exit_reason": ("gauge", "1 for how the last attempt ended: exit, signal or oom"),
    "trainsup_job_last_exit_timestamp_seconds": ("gauge", "when the last attempt ended (unix time)"),
    "trainsup_job_checkpoint_step": ("gauge", "step of the newest valid checkpoint (absent when it has no step number)"),
    "trainsup_job_checkpoint_timestamp_seconds": ("gauge", "mtime of the newest valid checkpoint (unix time)"),
    "trainsup_job_checkpoint_age_seconds": ("gauge", "age of the newest valid checkpoint"),
    "trainsup_job_save_interval_seconds": ("gauge", "the job's schedule.checkpoint_every (absent when none)"),
    "trainsup_job_checkpoint_bytes": ("gauge", "bytes in the job's checkpoint dir"),
    "trainsup_job_checkpoint_quota_bytes": ("gauge", "the job's checkpoint quota (absent when none)"),
    "trainsup_job_over_quota": ("gauge", "1 while the job's checkpoints exceed its quota and rotation cannot fix it"),
    "trainsup_job_checkpoints": ("gauge", "checkpoints in the job's dir, by validity"),
    "trainsup_job_restarts_total": ("counter", "relaunches by reason (crash, oom, hang, preempt, manual) since the daemon started"),
    "trainsup_job_saves_total": ("counter", "saves the daemon asked for to stop a job, by outcome (saved, failed)"),
    "trainsup_job_goodput_ratio": ("gauge", "productive training time over wall time since the job's first launch"),
    "trainsup_job_goodput_seconds": ("gauge", "wall time since the job's first launch by part: productive, recomputed, "
                                              "resume, restart, backoff, save_emergency, save_periodic, queue"),
    "trainsup_job_mirror_uploaded_step": ("gauge", "step of the newest checkpoint in the object store (checkpoint.mirror)"),
    "trainsup_job_mirror_pending_bytes": ("gauge", "bytes of valid checkpoints not yet in the object store"),
    "trainsup_job_mirror_failing": ("gauge", "1 while transfers to the object store fail"),
    "trainsup_job_mirror_events_total": ("counter", "object store transfers by event: upload, restore, restore-failed; "
                                                    "upload-failed counts the starts of a run of failures"),
}
MIRROR_EVENTS = ("upload", "restore", "upload-failed", "restore-failed")


def _job_rows(s: JobSample, snap: Snapshot, now: float, out: dict[str, list[str]]) -> None:
    job = f'name="{_esc(s.name)}"'
    out["trainsup_job_state"].extend(f'{job},state="{st}"}} {1 if st == s.state else 0}' for st in STATES)
    if s.state == "invalid":
        return
    out["trainsup_job_config_error"].append(f"{job}}} {int(s.config_error)}")
    out["trainsup_job_attempt"].append(f"{job}}} {s.attempt}")
    if s.started_at is not None:
        out["trainsup_job_start_time_seconds"].append(f"{job}}} {_num(s.started_at)}")
        out["trainsup_job_uptime_seconds"].append(f"{job}}} {_num(max(0.0, now - s.started_at))}")
    if s.rss is not None:
        out["trainsup_job_memory_rss_bytes"].append(f"{job}}} {s.rss}")
    if s.mem_limit:
        out["trainsup_job_memory_limit_bytes"].append(f"{job}}} {s.mem_limit}")
    if s.exit_code is not None:
        out["trainsup_job_last_exit_code"].append(f"{job}}} {s.exit_code}")
    if s.exit_reason is not None:
        out["trainsup_job_last_exit_reason"].extend(
            f'{job},reason="{r}"}} {1 if r == s.exit_reason else 0}' for r in EXIT_REASONS)
    if s.exit_at is not None:
        out["trainsup_job_last_exit_timestamp_seconds"].append(f"{job}}} {_num(s.exit_at)}")
    out["trainsup_job_restarts_total"].extend(
        f'{job},reason="{r}"}} {snap.restarts.get((s.name, r), 0)}' for r in RESTART_REASONS)
    if s.goodput is not None and s.goodput.since is not None:
        # advanced from the sample to the scrape; the parts sum to the wall time
        g = s.goodput.advanced(now)
        if g.ratio is not None:
            out["trainsup_job_goodput_ratio"].append(f"{job}}} {_num(g.ratio)}")
        out["trainsup_job_goodput_seconds"].extend(
            f'{job},part="{p}"}} {_num(g.seconds.get(p, 0.0))}' for p in GOODPUT_PARTS)
    if not s.has_checkpoints:
        return
    out["trainsup_job_saves_total"].extend(
        f'{job},outcome="{o}"}} {snap.saves.get((s.name, o), 0)}' for o in SAVE_OUTCOMES)
    if s.step is not None:
        out["trainsup_job_checkpoint_step"].append(f"{job}}} {_num(s.step)}")
    if s.ckpt_mtime is not None:
        out["trainsup_job_checkpoint_timestamp_seconds"].append(f"{job}}} {_num(s.ckpt_mtime)}")
        out["trainsup_job_checkpoint_age_seconds"].append(f"{job}}} {_num(max(0.0, now - s.ckpt_mtime))}")
    if s.save_interval:
        out["trainsup_job_save_interval_seconds"].append(f"{job}}} {_num(s.save_interval)}")
    out["trainsup_job_checkpoint_bytes"].append(f"{job}}} {s.ckpt_bytes or 0}")
    if s.quota:
        out["trainsup_job_checkpoint_quota_bytes"].append(f"{job}}} {s.quota}")
    out["trainsup_job_over_quota"].append(f"{job}}} {int(s.over_quota)}")
    out["trainsup_job_checkpoints"].append(f'{job},valid="true"}} {s.valid}')
    out["trainsup_job_checkpoints"].append(f'{job},valid="false"}} {s.invalid}')
    if s.mirror is not None:
        if s.mirror[0] is not None:
            out["trainsup_job_mirror_uploaded_step"].append(f"{job}}} {s.mirror[0]}")
        out["trainsup_job_mirror_pending_bytes"].append(f"{job}}} {s.mirror[1]}")
        out["trainsup_job_mirror_failing"].append(f"{job}}} {int(s.mirror[2])}")
        out["trainsup_job_mirror_events_total"].extend(
            f'{job},event="{e}"}} {snap.mirror_events.get((s.name, e), 0)}' for e in MIRROR_EVENTS)


def _histograms(parts: list[str], name: str, doc: str, per_job: Mapping[str, Histogram],
                jobs: Iterable[str], buckets: tuple[float, ...]) -> None:
    parts.append(f"# HELP {name} {doc}\n# TYPE {name} histogram\n")
    for job in jobs:
        h = per_job.get(job) or Histogram(buckets)       # every job's at 0 from the start
        label = f'name="{_esc(job)}"'
        for le, n in h.cumulative():
            parts.append(f'{name}_bucket{{{label},le="{le}"}} {n}\n')
        parts.append(f"{name}_sum{{{label}}} {_num(h.total)}\n")
        parts.append(f"{name}_count{{{label}}} {sum(h.counts)}\n")


def _process_metrics() -> str:
    """The process_* family (CPU, memory, fds, start time) of the daemon itself, as every
    Prometheus client library exports it."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    return generate_latest(reg).decode()


def render(snap: Snapshot, started_wall: float, now: float | None = None) -> bytes:
    """The newest snapshot as a scrape body (runs on the HTTP thread; reads only `snap`)."""
    now = time.time() if now is None else now
    parts: list[str] = []

    def one(name: str, kind: str, doc: str, labels: str, value: float) -> None:
        parts.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        parts.append(f"{name}{{{labels}}} {_num(value)}\n" if labels else f"{name} {_num(value)}\n")

    one("trainsup_build_info", "gauge", "trainsup version (value is 1)",
        f'version="{_esc(__version__)}",python="{platform.python_version()}"', 1)
    one("trainsup_daemon_start_time_seconds", "gauge", "when the daemon started (unix time)", "", started_wall)
    one("trainsup_event_loop_lag_seconds", "gauge", "how late the daemon's event loop ran a 1 s timer, last probe",
        "", snap.lag_s)
    one("trainsup_metrics_snapshot_age_seconds", "gauge", "seconds since the loop last published these numbers",
        "", max(0.0, now - snap.published_at))
    parts.append("# HELP trainsup_invalid_job_files job files the daemon could not load (see `trainsup status`)\n"
                 "# TYPE trainsup_invalid_job_files gauge\n"
                 f"trainsup_invalid_job_files {sum(1 for s in snap.jobs if s.state == 'invalid')}\n")
    parts.append("# HELP trainsup_notices_total machine-wide notices received (trigger file, cloud metadata), by source\n"
                 "# TYPE trainsup_notices_total counter\n")
    parts.extend(f'trainsup_notices_total{{source="{_esc(src)}"}} {n}\n' for src, n in sorted(snap.notices.items()))

    rows: dict[str, list[str]] = {name: [] for name in FAMILIES}
    for s in snap.jobs:
        _job_rows(s, snap, now, rows)
    for name, (kind, doc) in FAMILIES.items():
        parts.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        parts.extend(f"{name}{{{row}\n" for row in rows[name])
    with_ckpt = [s.name for s in snap.jobs if s.has_checkpoints]
    running = [s.name for s in snap.jobs if s.state != "invalid"]
    _histograms(parts, "trainsup_job_save_duration_seconds", "requested save to valid checkpoint",
                snap.save_seconds, with_ckpt, SAVE_BUCKETS)
    _histograms(parts, "trainsup_job_steps_lost", "steps redone after each interruption (jobs that report their step)",
                snap.steps_lost, running, STEPS_LOST_BUCKETS)
    parts.append(_process_metrics())
    return "".join(parts).encode()


class MetricsServer:
    """The endpoint (metrics_http.Endpoint: bounded, TCP or Unix socket; it only renders
    the newest snapshot) plus the loop-side publisher and lag probe."""

    def __init__(self, listen: str, book: MetricsBook, started_wall: float, *, gid: int | None = None):
        self.listen = listen
        self.book = book
        self.started_wall = started_wall
        self.gid = gid
        self.endpoint: Endpoint | None = None
        self._publish_handle: asyncio.TimerHandle | None = None

    def scrape(self) -> bytes:
        return render(self.book.snapshot, self.started_wall)

    def start(self) -> None:
        """Raises MetricsUnavailable (one line) when it cannot listen."""
        try:
            self.endpoint = Endpoint(self.listen, self.scrape, gid=self.gid)
        except (BindError, OSError) as e:
            raise MetricsUnavailable(f"metrics: {e}") from None
        self.endpoint.start()

    @property
    def address(self) -> str | None:
        return self.endpoint.address if self.endpoint is not None else None

    @property
    def port(self) -> int:
        return self.endpoint.port if self.endpoint is not None else 0

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self._publish_handle is not None:
            self._publish_handle.cancel()

    def schedule_publish(self, loop: asyncio.AbstractEventLoop, publish: Callable[[], None]) -> None:
        """Publish once, PUBLISH_DELAY from now, however many events arrive meanwhile."""
        if self._publish_handle is None:
            def run() -> None:
                self._publish_handle = None
                publish()
            self._publish_handle = loop.call_later(PUBLISH_DELAY, run)

    async def probe_lag(self, publish: Callable[[], None]) -> None:
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
