"""Shared fixtures: a real `trainsup daemon` subprocess in a temporary tree, and polling
helpers (conditions with deadlines, never bare sleeps).

Every wait of the suite goes through one factor, TRAINSUP_TEST_TIMEOUT_SCALE (default 1):
`wait_for`'s deadlines, the daemon's start, control requests, CLI calls, `scaled()` for a
test's own subprocess timeouts, and pytest-timeout's per-test limit. The defaults pass on
two cores with two other CPU-bound processes running; a slower machine sets the factor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKEJOB = REPO / "tests" / "helpers" / "fakejob.py"
# Real checkpoints of six frameworks, written by tests/fixtures/make_framework_fixtures.py.
FRAMEWORK_FIXTURES = REPO / "tests" / "fixtures" / "frameworks"
sys.path.insert(0, str(REPO / "tests"))
# Nothing the suite starts reads the machine's daemon config: on a host running the service,
# /etc/trainsup/trainsup.yaml has production hooks and a metrics port (issue 24). DaemonProc
# also says so on its command line; this covers the CLI, `trainsup run` and the demo.
os.environ["TRAINSUP_CONFIG"] = "none"

TIMEOUT_SCALE = float(os.environ.get("TRAINSUP_TEST_TIMEOUT_SCALE") or 1.0)
# A condition wait returns as soon as its condition holds: its deadline only decides how
# long a failing test takes to say so. Deadlines of a few seconds failed under load (two
# cores, two CPU-bound neighbours: "timed out after 5s waiting for the save record"), so
# none is shorter than this. A wait whose length is itself the assertion is not a
# wait_for: it measures and asserts explicitly.
MIN_DEADLINE = 30.0


def scaled(seconds: float) -> float:
    """A test's own time limit (a subprocess timeout, a join) times the suite's factor."""
    return seconds * TIMEOUT_SCALE


def deadline_for(timeout: float) -> float:
    """The seconds a condition wait of `timeout` really allows (see MIN_DEADLINE)."""
    return max(timeout, MIN_DEADLINE) * TIMEOUT_SCALE


def pytest_collection_modifyitems(config, items):
    """pytest-timeout's per-test limit (the ini's, or a test's own marker) scaled too."""
    if TIMEOUT_SCALE == 1.0:
        return
    base = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else base
        if limit:
            item.add_marker(pytest.mark.timeout(limit * TIMEOUT_SCALE))


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.02,
             proc: subprocess.Popen | None = None, detail: Callable[[], str] | None = None):
    """Poll `pred` until it returns something truthy; fail with `what` after `timeout`
    (at least MIN_DEADLINE, times TRAINSUP_TEST_TIMEOUT_SCALE).

    With `proc`, fail as soon as that process has exited and `pred` still does not hold
    (no point waiting out the deadline); `detail()` is appended to the failure (a log tail)."""
    timeout = deadline_for(timeout)
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        exited = proc is not None and proc.poll() is not None
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # the condition may not be checkable yet
            last_exc = e
        extra = (f" (last error: {last_exc!r})" if last_exc else "") + (f":\n{detail()}" if detail else "")
        if exited:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}{extra}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


@contextmanager
def alice_and_bob(prefix: str) -> Iterator[dict[str, str]]:
    """Two real users, alice (in a new group) and bob (not), removed again with whatever
    they still run. Names carry the test process's pid: runs side by side never collide."""
    tag = f"{os.getpid() % 100000}"
    group, alice, bob = f"{prefix}g{tag}", f"{prefix}alice{tag}", f"{prefix}bob{tag}"
    subprocess.run(["groupadd", group], check=True)
    made = []
    try:
        for name in (alice, bob):
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True)
            made.append(name)
        subprocess.run(["usermod", "-a", "-G", group, alice], check=True)
        yield {"group": group, "alice": alice, "bob": bob}
    finally:
        for name in made:
            subprocess.run(["pkill", "-KILL", "-u", name], check=False)
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False)


def read_records(path: Path) -> list[dict]:
    try:
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    except FileNotFoundError:
        return []


def committed(ckpt_dir: Path) -> list[Path]:
    """Committed trainsup checkpoints (step-NNNNNNNN/ with a MANIFEST.json), oldest first,
    read straight off the disk (independent of the code under test)."""
    if not ckpt_dir.exists():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if re.fullmatch(r"step-\d{8}", p.name) and (p / "MANIFEST.json").exists())


def manifest(p: Path) -> dict:
    return json.loads((p / "MANIFEST.json").read_text())


def kill_if_job(pid: int) -> None:
    """SIGKILL pid only if it still carries a trainsup job's environment (never a stranger)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if b"TRAINSUP_JOB=" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


class DaemonProc:
    """A real daemon subprocess with its own jobs dir, state dir, logs and socket."""

    def __init__(self, root: Path):
        self.root = root
        self.jobs = root / "jobs"
        self.state = root / "state"
        self.logs = root / "logs"
        self.socket = root / "trainsup.sock"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.output = root / "daemon.out"

    def write_job(self, name: str, body: str) -> Path:
        path = self.jobs / f"{name}.yaml"
        path.write_text(body)
        return path

    def fakejob(self, name: str, flags: str = "", extra: str = "", ckpt: bool = True) -> Path:
        """A job running tests/helpers/fakejob.py with `flags`, recording to <root>/<name>.rec."""
        cmd = [sys.executable, str(FAKEJOB), "--record", str(self.root / f"{name}.rec"), *flags.split()]
        body = f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {self.root}\n"
        body += f"env: {{PYTHONPATH: {json.dumps(str(REPO))}}}\n"
        if ckpt:
            body += f"checkpoint:\n  dir: {self.root / (name + '-ckpt')}\n"
        return self.write_job(name, body + extra)

    def wait_ready(self, name: str, starts: int = 1, timeout: float = 15.0) -> dict:
        """Wait until the fake job's `starts`-th launch has its signal handlers installed."""
        recs = wait_for(lambda: len(s := [r for r in self.records(name) if r["event"] == "start"]) >= starts and s,
                        timeout, f"fake job {name} start #{starts}")
        return recs[starts - 1]

    def records(self, name: str) -> list[dict]:
        return read_records(self.root / f"{name}.rec")

    def start(self, *extra: str, wait: bool = True, env: dict | None = None,
              prefix: list[str] | None = None) -> DaemonProc:
        # Every test daemon names its config: its own file, or none at all.
        config = () if "--config" in extra else ("--config", "none")
        cmd = [*(prefix or []), sys.executable, "-m", "trainsup", "--socket", str(self.socket), "daemon",
               "--jobs", str(self.jobs), "--state", str(self.state), "--log-dir", str(self.logs), *config, *extra]
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        e["PYTHONPATH"] = str(REPO)
        e.update(env or {})
        self.out_f = open(self.output, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.out_f, stderr=subprocess.STDOUT, env=e, cwd=self.root)
        if wait:
            wait_for(lambda: self._ping(), 20, f"daemon to answer on its socket (log: {self.log_text()[-2000:]})")
        return self

    def _ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
        try:
            return self.request("ping")["ok"]
        except Exception:
            return False

    def log_text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, job: str | None = None, timeout: float = 60.0, **args) -> dict:
        from trainsup.control.client import request
        return request(self.socket, cmd, job, args or None, timeout=scaled(timeout))

    def status(self, job: str) -> dict:
        r = self.request("status", job)
        assert r["ok"], r
        return r["result"]["jobs"][0]

    def wait_state(self, job: str, *states: str, timeout: float = 15.0) -> dict:
        return wait_for(lambda: (s := self.status(job))["state"] in states and s, timeout,
                        f"job {job} to reach {states}")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        e = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=scaled(timeout), env=e)

    def history(self, job: str, n: int = 500) -> list[dict]:
        r = self.request("history", job, n=n)
        assert r["ok"], r
        return r["result"]

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        timeout = scaled(timeout)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _kill_recorded(root: Path) -> None:
    """Leave nothing behind: end every process a test's fake jobs recorded."""
    for rec in root.glob("*.rec*"):
        pids = []
        if rec.suffix in (".child", ".grandchild"):
            try:
                pids.append(int(rec.read_text()))
            except ValueError:
                pass
        else:
            pids += [r["pid"] for r in read_records(rec) if "pid" in r]
        for pid in pids:
            kill_if_job(pid)


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path)
    yield d
    try:
        d.terminate(timeout=30)
    except AssertionError:
        pass
    finally:
        _kill_recorded(tmp_path)
        _kill_launched_under(tmp_path)
        if getattr(d, "out_f", None):
            d.out_f.close()


def _kill_launched_under(root: Path) -> None:
    """Jobs outlive a killed daemon by design (their shims keep them): whatever still runs
    with this test's dir on its command line (shims, jobs, a daemon) is ended, so a test
    that fails mid-way leaves no job training on the machine for good."""
    needle = str(root).encode()
    me = os.getpid()
    for _ in range(3):
        found = []
        for pid_s in os.listdir("/proc"):
            if not pid_s.isdigit() or int(pid_s) == me:
                continue
            try:
                with open(f"/proc/{pid_s}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(pid_s))
            except OSError:
                continue
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not found:
            return
