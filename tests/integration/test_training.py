"""The in-job helper and the example jobs, run for real: subprocesses of jobs/*.py with the
TRAINSUP_* environment of SPEC section 4, real signals, files polled with deadlines.
No daemon: the test plays its part (sends the signals, picks TRAINSUP_RESUME_FROM)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import committed, manifest, scaled  # noqa: F401 (test_training_dist imports them from here)
from conftest import wait_for as _wait_for

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
DEADLINE = 60.0


# ---------------------------------------------------------------- harness (also used by
# test_training_dist.py)

def wait_for(cond, timeout=DEADLINE, what="condition", proc=None, log=None):
    return _wait_for(cond, timeout, what, interval=0.01, proc=proc, detail=lambda: tail(log))


def tail(log, n=25):
    if log is None or not Path(log).exists():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])



def job_env(tmp: Path, ckpt_dir: Path, attempt: int, resume: Path | None, **extra) -> dict:
    env = {k: os.environ[k] for k in ("PATH", "LANG", "HOME", "TZ") if k in os.environ}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        TRAINSUP_JOB="test", TRAINSUP_CHECKPOINT_DIR=str(ckpt_dir),
        TRAINSUP_RESUME_FROM=str(resume) if resume else "", TRAINSUP_ATTEMPT=str(attempt),
        TRAINSUP_RESTART_REASON="first" if attempt == 1 else "crash",
        TRAINSUP_SAVE_SIGNAL="SIGUSR1", TRAINSUP_HEARTBEAT_FILE=str(tmp / "heartbeat"),
    )
    env.update(extra)
    return env


class Job:
    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path):
        self.log = log
        self._f = open(log, "wb")
        # Own session: a SIGKILL of the job can take its DataLoader workers with it.
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._f,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def steps_seen(self) -> int:
        m = re.findall(r"^step (\d+) ", self.log.read_text(errors="replace"), re.M)
        return int(m[-1]) if m else 0

    def wait_step(self, n: int) -> int:
        return wait_for(lambda: (s := self.steps_seen()) >= n and s, what=f"step {n}",
                        proc=self.proc, log=self.log)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(scaled(10))

    def wait(self, timeout=DEADLINE) -> int:
        timeout = scaled(timeout)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"job did not exit within {timeout}s:\n{tail(self.log)}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_all()
        self._f.close()


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for j in started:
        j.close()


def assert_same_state(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ after resume: {diff}"


MLP = [sys.executable, str(JOBS / "train_mlp.py")]
STEPS = 240


# ---------------------------------------------------------------- tests

def test_resume_after_three_interruptions_is_bit_exact(tmp_path, jobs):
    """SIGUSR1-then-SIGTERM preemptions and a SIGKILL at seeded random steps; each
    relaunch resumes from the newest committed checkpoint; final weights equal the
    uninterrupted run's (dropout, AdamW, StepLR, shuffling sampler, mid-epoch resumes,
    DataLoader with and without workers, sync and async saves)."""
    rng = random.Random(20261122)
    common = ["--steps", str(STEPS), "--every", "40", "--log-every", "1", "--sleep-per-step", "0.004"]

    ref = Job(MLP + common + ["--final-out", str(tmp_path / "ref.pt")],
              job_env(tmp_path, tmp_path / "ref-ckpt", 1, None), tmp_path / "ref.log", tmp_path)
    jobs.append(ref)
    assert ref.wait() == 0, tail(ref.log)

    ckpt = tmp_path / "ckpt"
    plan = [("preempt", 0, []), ("kill", 2, ["--async-save"]), ("preempt", 2, ["--async-save"])]
    resume = None
    lo = 5
    for attempt, (how, workers, more) in enumerate(plan, start=1):
        target = rng.randrange(lo, lo + 50)
        j = Job(MLP + common + ["--num-workers", str(workers)] + more,
                job_env(tmp_path, ckpt, attempt, resume), tmp_path / f"a{attempt}.log", tmp_path)
        jobs.append(j)
        if resume is not None:
            wait_for(lambda: "resumed from step" in j.log.read_text(), what="resume line", proc=j.proc, log=j.log)
        before = {p.name for p in committed(ckpt)}
        seen = j.wait_step(target)
        if how == "preempt":
            j.signal(signal.SIGUSR1)
            sent = j.steps_seen()
            new = wait_for(lambda: [p for p in committed(ckpt) if p.name not in before
                                    and manifest(p)["reason"] == "signal"],
                           what="signal checkpoint", proc=j.proc, log=j.log)
            m = manifest(new[0])
            # Committed at the step boundary right after the signal. "step N" is printed
            # before ckpt.step(N) looks at the signal flag, so the save may be at N itself;
            # "soon" counts from the last step printed once the signal was sent.
            assert seen <= m["step"] <= sent + 25, (seen, sent, m)
            j.signal(signal.SIGTERM)
            assert j.wait() == 0, tail(j.log)
            last = committed(ckpt)[-1]
            assert manifest(last)["reason"] == "preempt"
            assert "saved for preemption" in j.log.read_text()
        else:
            j.kill_all()
            assert j.proc.returncode == -signal.SIGKILL
        resume = committed(ckpt)[-1]
        lo = manifest(resume)["step"] + 5

    final = Job(MLP + common + ["--final-out", str(tmp_path / "final.pt")],
                job_env(tmp_path, ckpt, len(plan) + 1, resume), tmp_path / "final.log", tmp_path)
    jobs.append(final)
    assert final.wait() == 0, tail(final.log)
    assert f"resumed from step {manifest(resume)['step']}" in final.log.read_text()
    assert_same_state(tmp_path / "ref.pt", tmp_path / "final.pt")
    assert (tmp_path / "heartbeat").read_text().strip().isdigit()   # the step: for steps lost


def test_signals_during_a_save_make_one_save_then_sigterm_stops(tmp_path, jobs):
    ckpt = tmp_path / "ckpt"
    gate = tmp_path / "gate"
    gate.mkdir()
    j = Job(MLP + ["--steps", "100000", "--every", "0", "--log-every", "1", "--sleep-per-step", "0.002"],
            job_env(tmp_path, ckpt, 1, None, TRAINSUP_TEST_SAVE_GATE=str(gate)),
            tmp_path / "job.log", tmp_path)
    jobs.append(j)
    j.wait_step(10)
    j.signal(signal.SIGUSR1)
    wait_for(lambda: (gate / "saving").exists(), what="save in progress", proc=j.proc, log=j.log)
    j.signal(signal.SIGUSR1)       # both arrive while the save is held mid-commit
    j.signal(signal.SIGUSR1)
    (gate / "release").touch()
    first = wait_for(lambda: committed(ckpt), what="first checkpoint", proc=j.proc, log=j.log)
    assert manifest(first[0])["reason"] == "signal"
    # Must not happen: a second save for the signals that arrived during the first. Settle
    # over 50 further steps (each is a step boundary where it would have been taken).
    s0 = j.steps_seen()
    j.wait_step(s0 + 50)
    assert len(committed(ckpt)) == 1, [p.name for p in committed(ckpt)]

    j.signal(signal.SIGTERM)
    assert j.wait() == 0, tail(j.log)
    cps = committed(ckpt)
    assert len(cps) == 2 and manifest(cps[-1])["reason"] == "preempt"
    assert "saved for preemption" in j.log.read_text()
    assert not list((ckpt / ".trainsup-tmp").iterdir())


PLAIN = [sys.executable, str(JOBS / "train_plain.py")]


def test_plain_example_resumes_exactly(tmp_path, jobs):
    args = ["--steps", "150", "--every", "0", "--log-every", "1", "--sleep-per-step", "0.004"]
    ref = Job(PLAIN + args + ["--final-out", str(tmp_path / "ref.pt")],
              job_env(tmp_path, tmp_path / "ref-ckpt", 1, None), tmp_path / "ref.log", tmp_path)
    jobs.append(ref)
    ckpt = tmp_path / "ckpt"
    j = Job(PLAIN + args, job_env(tmp_path, ckpt, 1, None), tmp_path / "a1.log", tmp_path)
    jobs.append(j)
    seen = j.wait_step(37)
    j.signal(signal.SIGUSR1)
    sent = j.steps_seen()
    files = wait_for(lambda: sorted(ckpt.glob("model-*.pt")), what="model-*.pt", proc=j.proc, log=j.log)
    # The step is printed before the loop looks at the signal flag: the save may be at `seen`.
    assert seen <= int(files[0].stem.split("-")[1]) <= sent + 25
    j.signal(signal.SIGTERM)
    assert j.wait() == 0, tail(j.log)
    latest = sorted(ckpt.glob("model-*.pt"))[-1]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")], "temp file left behind"
    assert ref.wait() == 0, tail(ref.log)

    r = Job(PLAIN + args + ["--final-out", str(tmp_path / "final.pt")],
            job_env(tmp_path, ckpt, 2, latest), tmp_path / "a2.log", tmp_path)
    jobs.append(r)
    assert r.wait() == 0, tail(r.log)
    step = torch.load(latest, weights_only=True)["step"]
    assert f"resumed from step {step}" in r.log.read_text()
    assert_same_state(tmp_path / "ref.pt", tmp_path / "final.pt")


# ---------------------------------------------------------------- in-process (no launch)

def test_failed_save_logs_one_line_and_training_goes_on(tmp_path, capfd):
    from trainsup.training import Checkpointer

    blocker = tmp_path / "ckpt"
    blocker.write_text("a file where the checkpoint dir should be")  # makes every save fail
    model = torch.nn.Linear(2, 2)
    ck = Checkpointer(model=model, dir=blocker, every_steps=2, install_signals=False)
    try:
        assert ck.step(1) is None
        assert ck.step(2) is None                   # due, fails, does not raise
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "step 2" in err[0] and "failed" in err[0], err
        blocker.unlink()
        assert ck.step(3) is None                   # not due: no retry storm
        assert ck.step(4) == blocker / "step-00000004"   # the next due point retries
        assert manifest(blocker / "step-00000004")["reason"] == "periodic"
    finally:
        ck.close()


def test_save_signal_handler_chains_to_the_previous_one(tmp_path):
    from trainsup.training import Checkpointer

    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        ck = Checkpointer(model=torch.nn.Linear(2, 2), dir=tmp_path / "ck")
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: seen, timeout=5, what="previous handler called")
        path = ck.step(7, metrics={"loss": torch.tensor(0.25)})
        assert path is not None and manifest(path)["reason"] == "signal"
        assert manifest(path)["metrics"] == {"loss": 0.25}
        assert ck.step(8) is None                   # the request was served once
        ck.close()
        assert signal.getsignal(signal.SIGUSR1) is not ck._on_save_signal
    finally:
        signal.signal(signal.SIGUSR1, old)
