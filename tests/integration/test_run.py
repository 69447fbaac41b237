"""`trainsup run JOB.yaml`: one job supervised in the foreground, by the daemon's code, with
an exit code that says how the job ended. Real `trainsup run` subprocesses, real fake jobs
(tests/helpers/fakejob.py), real signals and a real control socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKEJOB, REPO, committed, read_records, scaled, wait_for

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED, EXIT_STOPPED = 0, 1, 2, 3, 4


class Run:
    """A `trainsup run` of one fake job in `root`."""

    def __init__(self, root: Path, name: str = "job", flags: str = "", extra: str = "",
                 env: dict | None = None):
        self.root, self.name = root, name
        self.rec = root / f"{name}.rec"
        self.ckpt = root / f"{name}-ckpt"
        cmd = [sys.executable, str(FAKEJOB), "--record", str(self.rec), *flags.split()]
        self.file = root / f"{name}.yaml"
        self.file.write_text(f"name: {name}\ncommand: {json.dumps(cmd)}\n"
                             f"env: {json.dumps({'PYTHONPATH': str(REPO), **(env or {})})}\n"
                             f"checkpoint:\n  dir: {self.ckpt}\n" + extra)
        self.state = root / ".trainsup" / name
        self.socket = self.state / "run.sock"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> Run:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("SLURM_JOB_ID", None)
        self.out = open(self.root / f"{self.name}.out", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "trainsup", "run", str(self.file), *args],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        return self

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(scaled(timeout))
        finally:
            self.out.close()

    def output(self) -> str:
        return (self.root / f"{self.name}.out").read_text(errors="replace")

    def records(self, event: str) -> list[dict]:
        return [r for r in read_records(self.rec) if r["event"] == event]

    def started(self, n: int = 1, timeout: float = 20.0) -> dict:
        return wait_for(lambda: len(self.records("start")) >= n and self.records("start")[n - 1],
                        timeout, f"start #{n} of {self.name}", proc=self.proc,
                        detail=lambda: self.output()[-1500:])

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))

    def history(self) -> list[dict]:
        import sqlite3
        # read-only: a read-write connect creates an empty state.db when the run has not yet
        # made its own, which the run then takes for a truncated database and moves aside
        conn = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            return [{"kind": k, **json.loads(d)} for k, d in
                    conn.execute("SELECT kind, data FROM events WHERE job=? ORDER BY id", (self.name,))]
        finally:
            conn.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(scaled(10))


@pytest.fixture
def runs(tmp_path):
    made: list[Run] = []

    def make(*a, **kw) -> Run:
        r = Run(tmp_path, *a, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.kill()
        for rec in r.records("start"):
            try:
                os.kill(rec["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_run_exits_0_when_the_job_finishes(runs):
    r = runs(flags="--exit 0 --after 0.5").start()
    assert r.wait() == EXIT_FINISHED, r.output()
    assert "attempt 1: exit 0" in r.output()          # the job's log is echoed on stdout
    assert [e["to"] for e in r.history() if e["kind"] == "state"][-1] == "finished"


def test_run_exits_1_when_restarts_are_exhausted(runs):
    r = runs(flags="--exit 3 --after 0.2",
             extra="restart:\n  max_restarts: 2\n  backoff: {initial: 0.1, max: 0.2}\n").start()
    assert r.wait() == EXIT_FAILED, r.output()
    # Restarted with backoff before giving up: three attempts in all.
    assert len(r.records("start")) == 3
    assert [e["to"] for e in r.history() if e["kind"] == "state"][-1] == "failed"


def test_run_sigterm_saves_confirms_stops_and_exits_3(runs):
    r = runs(flags="--catch-usr1").start()
    r.started()
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED, r.output()
    saved = r.records("saved")
    assert saved and saved[-1]["reason"] == "signal"
    assert committed(r.ckpt), "the emergency save must be a committed checkpoint"
    notice = [e for e in r.history() if e["kind"] == "notice" and e.get("outcome")][-1]
    assert notice["source"] == "sigterm" and notice["outcome"] == "saved"


def test_run_again_after_preemption_resumes_from_the_emergency_save(runs):
    r = runs(flags="--catch-usr1").start()
    r.started()
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED
    step = r.records("saved")[-1]["step"]
    r.start()
    second = r.started(2)
    assert second["resume"] and second["resumed_step"] == step and second["resume_ok"]
    assert second["reason"] == "preempt"
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED


def test_run_control_socket_status_checkpoint_and_preempt(runs):
    r = runs(flags="--catch-usr1").start()
    r.started()
    st = r.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["jobs"][0]["state"] == "running"
    ck = r.cli("checkpoint", "job", "--wait")
    assert ck.returncode == 0 and "is valid" in ck.stdout, ck.stderr
    pre = r.cli("preempt", "job")
    assert pre.returncode == 0 and "saved" in pre.stdout, pre.stderr
    assert r.wait() == EXIT_PREEMPTED
    # The job's environment names the socket, so `trainsup status` works from inside it.
    assert r.records("start")[0]["env"]["TRAINSUP_SOCKET"] == str(r.socket)


def test_run_stop_on_request_exits_4(runs):
    r = runs(flags="--catch-usr1").start()
    r.started()
    assert r.cli("stop", "job").returncode == 0
    assert r.wait() == EXIT_STOPPED


def test_run_invalid_job_file_is_one_line_and_exit_2(runs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncommand: [true]\nrestart:\n  max_restarts: -1\n")
    p = subprocess.run([sys.executable, "-m", "trainsup", "run", str(bad)], capture_output=True, text=True,
                       timeout=scaled(60), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == EXIT_USAGE
    assert f"{bad}:4: restart.max_restarts:" in p.stderr
    assert not (tmp_path / ".trainsup").exists()


def test_run_same_job_twice_is_refused_with_exit_2(runs):
    r = runs(flags="--catch-usr1").start()
    r.started()
    second = subprocess.run([sys.executable, "-m", "trainsup", "run", str(r.file)], capture_output=True,
                            text=True, timeout=scaled(60), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert second.returncode == EXIT_USAGE and "in use" in second.stderr, second.stderr
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED
    assert len(r.records("start")) == 1


def test_run_state_and_socket_do_not_collide_with_a_system_daemon(runs, tmp_path):
    r = runs(flags="--exit 0 --after 0.2")
    own = tmp_path / "elsewhere"
    r.start("--state", str(own))
    assert r.wait() == EXIT_FINISHED
    assert (own / "state.db").exists() and not r.state.exists()
    assert f"socket {own}/run.sock" in r.output()


def _committed_steps(r: Run) -> list[str]:
    return sorted(p.name for p in committed(r.ckpt))


@pytest.mark.parametrize("setting", ["rotate: false", "node_rank"])
def test_shared_checkpoint_dir_is_not_rotated_by_a_non_zero_node(runs, setting):
    # Rotation of a dir shared by the nodes of one job is done by one node only: this one
    # is told so (`checkpoint.rotate: false`), or its job env says NODE_RANK=1 (auto).
    extra = "  keep_last: 1\n" + ("  rotate: false\n" if setting == "rotate: false" else "")
    r = runs(flags="--every 0.2 --catch-usr1", extra=extra,
             env={"NODE_RANK": "1"} if setting == "node_rank" else None)
    r.start()
    wait_for(lambda: len(_committed_steps(r)) >= 4, 30, "4 checkpoints", detail=lambda: r.output()[-1500:])
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED
    assert len(_committed_steps(r)) >= 4
    assert not [e for e in r.history() if e["kind"] == "deleted"]


def test_checkpoint_dir_is_rotated_by_node_zero(runs):
    r = runs(flags="--every 0.2 --catch-usr1", extra="  keep_last: 1\n")
    r.start()
    wait_for(lambda: [e for e in r.history() if e["kind"] == "deleted"], 30,
             "a rotation", detail=lambda: r.output()[-1500:])
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED


def test_run_sigkilled_torchrun_agent_leaves_no_worker_and_the_job_restarts(runs, tmp_path):
    """torchrun's agent SIGKILLed alone orphans its worker, which keeps training (seen on
    multi-node runs). `trainsup run` is a subreaper and ends what the dead leader left."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("torch")
    train = REPO / "jobs" / "train_mlp.py"
    r = runs(name="tr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "--monitor-interval", "0.2", str(train), "--steps", "1000000", "--every", "0", "--log-every", "50",
           "--sleep-per-step", "0.01"]
    r.file.write_text(f"name: tr\ncommand: {json.dumps(cmd)}\nenv: {{PYTHONPATH: {json.dumps(str(REPO))}}}\n"
                      f"checkpoint: {{dir: {r.ckpt}}}\nrestart: {{backoff: {{initial: 0.2, max: 0.5}}}}\n")
    r.start()

    def worker():
        for p in psutil.Process(r.proc.pid).children(recursive=True):
            try:
                if str(train) in " ".join(p.cmdline()) and "LOCAL_RANK" in p.environ():
                    return p
            except psutil.NoSuchProcess:
                continue
        return None

    w = wait_for(worker, 120, "torchrun's worker", detail=lambda: r.output()[-1500:])
    agent = psutil.Process(w.ppid())
    assert "torch.distributed.run" in " ".join(agent.cmdline())
    agent.kill()
    wait_for(lambda: not w.is_running() or w.status() == psutil.STATUS_ZOMBIE, 15,
             "the orphaned worker to be ended")
    second = wait_for(lambda: (x := worker()) and x.pid != w.pid and x, 120, "the restarted job's worker")
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait(120) == EXIT_PREEMPTED
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE, "no worker outlives its job"
    launches = [e for e in r.history() if e["kind"] == "launch"]
    assert [e["reason"] for e in launches] == ["first", "crash"]


def test_run_requeued_on_a_node_without_the_old_disk_resumes_from_the_store(runs, tmp_path):
    """README: `trainsup run` uses the same mirror as the daemon. A Slurm job preempted on
    one node uploads its emergency save before it exits 3; requeued onto a node without
    that node's disk (checkpoint and state dirs gone), it restores that save from the store
    before its first launch and resumes at its step. The store is file:// (fsspec's local
    filesystem, the same code path as s3:// past the URL)."""
    store = tmp_path / "store"
    r = runs(flags="--catch-usr1 --every 0.3",
             extra=f"  mirror:\n    url: file://{store}/{{job}}\n")
    r.start()
    r.started()
    wait_for(lambda: any(e["kind"] == "upload" for e in r.history()), 30, "a first upload")
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED, r.output()
    notice = [e for e in r.history() if e["kind"] == "notice" and e.get("outcome")][-1]
    assert notice["outcome"] == "saved" and notice["store"]["uploaded"] is True, notice
    saved_step = notice["step"]
    # the requeue lands on another node: nothing of the old one's disk is there
    shutil.rmtree(r.ckpt)
    shutil.rmtree(r.state)
    r.start()
    second = r.started(2)
    assert second["resume"] and second["resumed_step"] == saved_step and second["resume_ok"], second
    assert second["resume"].startswith(str(r.ckpt)), second
    (restored,) = [e for e in r.history() if e["kind"] == "restore"]
    assert restored["step"] == saved_step, restored
    r.proc.send_signal(signal.SIGTERM)
    assert r.wait() == EXIT_PREEMPTED, r.output()
