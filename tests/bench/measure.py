"""What every bench section shares: result rows, statistics, the real daemon in a temp
dir, and polling with deadlines.

A Row puts our figure next to its peer (another tool, or the physical limit) measured in
the same run, so no number in the table is compared with one typed in by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tests" / "bench"
PY = sys.executable
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import DaemonProc, kill_if_job, read_records, wait_for  # noqa: E402,F401

# Big files go to the disk, not to a tmpfs /tmp, so fsync and cold reads mean something.
WORK_DIR = os.environ.get("TRAINSUP_BENCH_DIR", "/var/tmp")


@dataclass
class Stat:
    """A set of samples in one unit; `value` for a single figure (a throughput)."""
    unit: str
    samples: list[float] = field(default_factory=list)

    @classmethod
    def one(cls, value: float, unit: str) -> Stat:
        return cls(unit, [value])

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, max(0, round(0.95 * (len(s) - 1))))]

    def text(self, latency: bool) -> str:
        if latency and self.n > 1:
            return f"{fmt(self.median)} / {fmt(self.p95)} {self.unit} (n={self.n})"
        if self.n > 1:
            return f"{fmt(self.median)} {self.unit} (median, n={self.n})"
        return f"{fmt(self.median)} {self.unit}"

    def as_json(self) -> dict:
        out = {"unit": self.unit, "n": self.n, "median": self.median}
        if self.n > 1:
            out["p95"] = self.p95
            out["samples"] = self.samples
        return out


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


@dataclass
class Row:
    section: str
    what: str
    ours: Stat
    peer_label: str
    peer: Stat | None
    compare: str              # "delta" (ours - peer, same unit) or "ratio" (ours / peer)
    target: str = ""
    met: bool | None = None
    latency: bool = False     # show median / p95
    note: str = ""

    def comparison(self) -> str:
        if self.peer is None:
            return ""
        if self.compare == "delta":
            d50 = self.ours.median - self.peer.median
            if self.latency and self.ours.n > 1 and self.peer.n > 1:
                return f"{d50:+.2f} / {self.ours.p95 - self.peer.p95:+.2f} {self.ours.unit}"
            return f"{d50:+.3g} {self.ours.unit}"
        if self.peer.median == 0:
            return "n/a"
        return f"{self.ours.median / self.peer.median:.2f}x"

    def as_json(self) -> dict:
        return {"section": self.section, "what": self.what, "ours": self.ours.as_json(),
                "peer_label": self.peer_label, "peer": self.peer.as_json() if self.peer else None,
                "comparison": self.comparison(), "target": self.target, "met": self.met, "note": self.note}


@dataclass
class Section:
    """What one bench section hands back: its rows plus raw series for plots."""
    name: str
    rows: list[Row] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, what: str, ours: Stat, peer_label: str = "", peer: Stat | None = None,
            compare: str = "ratio", target: str = "", met: bool | None = None,
            latency: bool = False, note: str = "") -> Row:
        r = Row(self.name, what, ours, peer_label, peer, compare, target, met, latency, note)
        self.rows.append(r)
        print(f"  {what}: {ours.text(latency)}"
              + (f"  vs {peer_label} {peer.text(latency)}  [{r.comparison()}]" if peer else "")
              + (f"  target {target}: {'met' if met else 'MISSED'}" if met is not None else ""), flush=True)
        return r


def latencies_ms(starts: list[float], exits: list[float], n: int) -> list[float]:
    """Gap between the exit of attempt k and the start of attempt k+1, in ms."""
    return [(starts[k + 1] - exits[k]) * 1e3 for k in range(min(n, len(starts) - 1, len(exits)))]


def read_crash_record(path: Path) -> tuple[list[float], list[float]]:
    starts, exits = [], []
    try:
        for line in path.read_text().splitlines():
            kind, _, t = line.partition(" ")
            (starts if kind == "S" else exits).append(float(t))
    except FileNotFoundError:
        pass
    return starts, exits


def count_starts(path: Path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.startswith("S"))
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def workdir(prefix: str, base: str | None = None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"trainsup-bench-{prefix}-", dir=base) as d:
        yield Path(d)


@contextlib.contextmanager
def running_daemon(root: Path, *extra: str) -> Iterator[DaemonProc]:
    """A real `trainsup daemon` in `root`; on the way out it is stopped and every process
    it launched is ended, whatever happened."""
    d = DaemonProc(root)
    try:
        yield d
    finally:
        job_pids = _job_pids(d)
        try:
            d.terminate(timeout=60)
        except AssertionError:
            d.kill()
        finally:
            for pid in job_pids:
                kill_if_job(pid)
            if getattr(d, "out_f", None):
                d.out_f.close()


def _job_pids(d: DaemonProc) -> list[int]:
    if d.proc is None or d.proc.poll() is not None:
        return []
    import psutil
    try:
        return [p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)]
    except psutil.Error:
        return []


def end_process(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def job_yaml(name: str, command: list[str], *, workdir: Path, ckpt_dir: Path | None = None,
             env: dict | None = None, extra: str = "", autostart: bool = True) -> str:
    env = {"PYTHONPATH": str(REPO), **(env or {})}
    body = (f"name: {name}\ncommand: {json.dumps(command)}\nworkdir: {json.dumps(str(workdir))}\n"
            f"env: {json.dumps(env)}\nautostart: {'true' if autostart else 'false'}\n")
    if ckpt_dir is not None:
        body += f"checkpoint:\n  dir: {json.dumps(str(ckpt_dir))}\n  keep_last: 3\n"
    return body + extra


# Backoff 0 so that restart latency measures the machinery, not the configured delay.
NO_BACKOFF = """restart:
  policy: on-failure
  max_restarts: 100000
  window: 1h
  backoff: {initial: 0, max: 0, factor: 1.0}
  max_restarts_without_progress: 100000
  start_limit_interval: 0s
"""


def poll(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.01):
    return wait_for(pred, timeout, what, interval)
