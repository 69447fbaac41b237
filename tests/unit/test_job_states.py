"""Job's state machine with a fake host, a fake child and a fake clock (issue 10): the
transition table, restart decisions and the stop escalation, with no processes.

What is faked and why: this is the unit test of Job's policy — which transitions it makes
and in what order it signals — so the child is an object whose pidfd is a pipe the test
makes readable to "exit" it, the host records events, and the monotonic clock is a number
the test moves. Real processes, signals and cgroups are the integration tests' business
(tests/integration, tests/faults)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from trainsup import config
from trainsup.daemon import job as jobmod
from trainsup.daemon.checkpoints import JobCheckpoints
from trainsup.daemon.job import _ALLOWED, Job, State, TransitionError
from trainsup.daemon.launch import process
from trainsup.spec import DaemonSpec

S = State


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePopen:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rc = 0

    def wait(self) -> int:
        return self.rc


class FakeChild:
    """The parts of process.Child a Job uses. `exit(rc)` makes its pidfd readable."""
    next_pid = 4_000_000       # above pid_max: never a real process

    def __init__(self, clock: FakeClock, obeys: set[int]) -> None:
        FakeChild.next_pid += 1
        self.popen = FakePopen(FakeChild.next_pid)
        self.pidfd, self._w = os.pipe()
        self.started_mono = clock()
        self.started_wall = 0.0
        self.create_time = 0.0
        self.known: dict[int, float] = {}
        self.cgroup = None
        self.shim_pid = None         # launched without a shim (process.Child.shim_pid)
        self.adopted = False
        self.containment = process.PROCESS_GROUP
        self.signals: list[int] = []
        self.obeys = obeys          # signals that make it exit

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit(self, rc: int) -> None:
        self.popen.rc = rc
        if self._w >= 0:
            os.write(self._w, b"x")
            os.close(self._w)
            self._w = -1

    def send(self, signum: int) -> bool:
        self.signals.append(signum)
        return True

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)
        if signum in self.obeys:
            self.exit(-signum)

    def refresh_tree(self) -> list:
        return []

    def live_descendants(self) -> list:
        return []

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class FakeHost:
    def __init__(self, loop: asyncio.AbstractEventLoop, heartbeat_dir: Path) -> None:
        self.loop = loop
        self.heartbeat_dir = heartbeat_dir
        self.events: list[tuple[str, dict]] = []
        self.saved: dict = {}
        self.containment = None

    def record_event(self, job: str, kind: str, data: dict) -> None:
        self.events.append((kind, data))

    def save_job(self, job: str, data: dict) -> None:
        self.saved = data

    def flush(self) -> None:
        pass

    def state_changed(self, job: Job) -> None:
        pass

    def emergency_save_started(self, grace: float) -> None:
        pass

    def leader_pids(self) -> list[int]:
        return []

    def transitions(self) -> list[tuple[str, str]]:
        return [(d["from"], d["to"]) for k, d in self.events if k == "state"]


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    # Save-signal delivery and leftover sweeps read /proc: the fake child has no entry.
    monkeypatch.setattr(jobmod.process, "deliver_save_signal", lambda child, signum: [child.pid])
    monkeypatch.setattr(jobmod.process, "kill_leftovers", lambda child, *a: 0)
    monkeypatch.setattr(jobmod.process, "kill_orphans", lambda *a: 0)
    monkeypatch.setattr(jobmod.process, "prepare_heartbeat", lambda *a, **k: None)
    loop = asyncio.new_event_loop()
    yield tmp_path, loop
    loop.close()


def make_job(tmp_path: Path, loop, yaml_extra: str = "", obeys=(signal.SIGTERM,)):
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / "j.yaml").write_text(f"name: j\ncommand: [\"true\"]\nworkdir: {tmp_path}\n{yaml_extra}")
    specs, invalid = config.load_jobs_dir(jobs, is_root=os.geteuid() == 0)
    assert not invalid, invalid
    settings = DaemonSpec(jobs_dir=jobs, state_dir=tmp_path / "state", socket=tmp_path / "s",
                          log_dir=tmp_path / "logs")
    host = FakeHost(loop, tmp_path / "hb")
    clock = FakeClock()
    children: list[FakeChild] = []

    def spawn(*_a, **_k):
        c = FakeChild(clock, set(obeys))
        children.append(c)
        return c

    ckpts = JobCheckpoints("j", None, loop, None, None, on_index=lambda i, e: None, on_scanned=lambda: None)
    job = Job(specs[0], host, settings, ckpts, {}, spawn=spawn, clock=clock)
    return job, host, clock, children


def run_until(loop, pred, timeout: float = 2.0) -> None:
    async def wait() -> None:
        deadline = loop.time() + timeout
        while not pred():
            assert loop.time() < deadline, "condition not reached"
            await asyncio.sleep(0.001)
    loop.run_until_complete(wait())


def test_transition_table_refuses_what_it_does_not_list(world):
    tmp, loop = world
    job, host, _, _ = make_job(tmp, loop)
    for target, allowed in _ALLOWED.items():
        for source in State:
            if source == target:
                continue
            job.state = source
            if source in allowed:
                job._set(target)
                assert job.state == target
            else:
                with pytest.raises(TransitionError):
                    job._set(target)


def test_launch_runs_then_a_crash_backs_off_and_relaunches(world):
    tmp, loop = world
    job, host, clock, kids = make_job(
        tmp, loop, "restart:\n  backoff: {initial: 0.01s, max: 0.01s}\n")
    job.autostart()
    assert job.state == S.RUNNING and len(kids) == 1
    clock.now += 5
    kids[0].exit(1)
    run_until(loop, lambda: len(kids) == 2 and job.state == S.RUNNING)
    assert host.transitions() == [("pending", "starting"), ("starting", "running"),
                                  ("running", "backoff"), ("backoff", "starting"),
                                  ("starting", "running")]
    assert job.restarts == 1 and job.restart_reason == "crash"


def test_exit_zero_under_on_failure_is_finished(world):
    tmp, loop = world
    job, host, clock, kids = make_job(tmp, loop)
    job.autostart()
    kids[0].exit(0)
    run_until(loop, lambda: job.state == S.FINISHED)
    assert len(kids) == 1


def test_crash_streak_without_progress_ends_failed(world):
    tmp, loop = world
    job, host, clock, kids = make_job(
        tmp, loop, "restart:\n  max_restarts_without_progress: 2\n  backoff: {initial: 0.001s, max: 0.001s}\n")
    job.autostart()
    for n in range(1, 4):
        run_until(loop, lambda: len(kids) == n and job.state == S.RUNNING or job.state == S.FAILED)
        if job.state == S.FAILED:
            break
        clock.now += 10
        kids[-1].exit(2)
    run_until(loop, lambda: job.state == S.FAILED)
    assert len(kids) == 2 and "progress" in (job.error or ""), job.error   # 2 crashes in a row


def test_stop_escalates_term_then_kill_after_stop_timeout(world):
    tmp, loop = world
    # A child that ignores SIGTERM: the stop flow must go on to SIGKILL after stop_timeout.
    job, host, clock, kids = make_job(tmp, loop, "stop_timeout: 0.05s\n", obeys={signal.SIGKILL})
    job.autostart()
    out = loop.run_until_complete(job.stop(save=False, final=S.STOPPED))
    assert kids[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert out["killed"] is True and job.state == S.STOPPED
    assert ("running", "stopping") in host.transitions() and ("stopping", "stopped") in host.transitions()


def test_stop_that_obeys_term_never_kills(world):
    tmp, loop = world
    job, host, clock, kids = make_job(tmp, loop, "stop_timeout: 5s\n")
    job.autostart()
    out = loop.run_until_complete(job.stop(save=False, final=S.PREEMPTED))
    assert kids[0].signals == [signal.SIGTERM] and not out.get("killed")
    assert job.state == S.PREEMPTED


def test_a_retired_job_never_launches_again(world):
    tmp, loop = world
    job, host, clock, kids = make_job(tmp, loop, "restart:\n  backoff: {initial: 0.01s, max: 0.01s}\n")
    job.autostart()
    job.retire()
    clock.now += 5
    kids[0].exit(1)
    loop.run_until_complete(asyncio.sleep(0.05))
    job.start()
    assert len(kids) == 1


@pytest.mark.parametrize("persisted, expected", [
    ("finished", S.FINISHED), ("failed", S.FAILED), ("stopped", S.STOPPED),
    ("preempted", S.RUNNING), ("backoff", S.RUNNING), ("running", S.RUNNING), (None, S.RUNNING),
])
def test_autostart_from_every_state_the_db_can_hold(world, persisted, expected):
    """Found the first time a daemon was restarted after a job had finished: the restore
    of `finished` raised TransitionError (pending -> finished) and the daemon exited 1."""
    tmp, loop = world
    job, host, _, kids = make_job(tmp, loop)
    job._load_persisted({"state": persisted} if persisted else {})
    job.autostart()
    assert job.state == expected
    assert len(kids) == (1 if expected == S.RUNNING else 0)
