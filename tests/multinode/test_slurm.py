"""`trainsup run` inside real Slurm allocations: a slurmctld and two slurmd "nodes" started by
the fixture (slurm_cluster.py), jobs submitted with `trainsup slurm submit`, a 2-rank torch
job (jobs/train_mlp.py, gloo, CPU) launched by trainsup with srun, one task per rank.

Run with `make test-multinode` (root; installs the Debian packages when missing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import ClusterUnavailable, SlurmCluster, free_ports  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "train_mlp.py"
TRAINSUP = [sys.executable, "-m", "trainsup"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs slurmd as root: run as root")
    # Backfill every 2 s instead of 30: a requeued job starts within seconds of its
    # StartTime, so the tests' deadlines can be short without racing Slurm's cadence.
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), bf_interval=2)
    try:
        c.start()
    except ClusterUnavailable as e:
        c.stop()
        pytest.skip(f"no test Slurm cluster here: {e}")
    yield c
    c.stop()


def mlp_job(d: Path, name: str, steps: int, *, every: int = 50, sleep: float = 0.05,
            slurm: str = "", extra: str = "", final: bool = True) -> Path:
    cmd = [sys.executable, str(TRAIN), "--steps", str(steps), "--every", str(every), "--sleep-per-step",
           str(sleep), "--sync-every", "1", "--log-every", "20"]
    if final:
        cmd += ["--final-out", str(d / f"{name}-final.pt")]
    f = d / f"{name}.yaml"
    f.write_text(f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {d}\n"
                 f"env: {{PYTHONPATH: {json.dumps(str(REPO))}, GLOO_SOCKET_IFNAME: lo}}\n"
                 f"checkpoint: {{dir: {d / (name + '-ckpt')}}}\n"
                 "emergency_save: {grace: 10}\n"
                 "restart: {backoff: {initial: 0.5, max: 1}}\n"
                 f"slurm:\n  nodes: 2\n  ntasks_per_node: 1\n  signal_margin: 20\n{slurm}" + extra)
    return f


class Submitted:
    def __init__(self, cluster: SlurmCluster, job_file: Path, *sbatch: str):
        self.c, self.file = cluster, job_file
        self.name = job_file.stem
        self.state = job_file.parent / ".trainsup" / self.name
        self.ckpt = job_file.parent / f"{self.name}-ckpt"
        p = self.trainsup("slurm", "submit", str(job_file), *(["--", *sbatch] if sbatch else []))
        assert p.returncode == 0, p.stderr
        self.id = (self.state / "slurm-job-id").read_text().strip()

    def trainsup(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*TRAINSUP, *args], capture_output=True, text=True, timeout=timeout,
                              env=dict(self.c.env, PYTHONPATH=str(REPO)))

    def output(self) -> str:
        f = self.state / f"slurm-{self.id}.out"
        return f.read_text(errors="replace") if f.exists() else ""

    def wait_training(self, timeout: float = 90) -> None:
        """Until rank 0 logged a step: both ranks have their signal handlers by then (a
        USR1 before the helper installed its handler would kill a rank)."""
        self.c.wait(lambda: "step 20 " in self.output(), timeout,
                    f"training to start (output: {self.output()[-2500:]})", 0.3)

    def info(self) -> dict:
        return self.c.job(self.id)

    def wait_state(self, *states: str, timeout: float = 120) -> dict:
        return self.c.wait(lambda: (i := self.info()).get("JobState") in states and i, timeout,
                           f"job {self.id} in {states} (now {self.info().get('JobState')}; "
                           f"output: {self.output()[-2500:]})", 0.3)

    def checkpoints(self) -> list[Path]:
        if not self.ckpt.exists():
            return []
        return sorted(p for p in self.ckpt.iterdir() if p.name.startswith("step-") and (p / "MANIFEST.json").exists())

    def wait_checkpoint(self, min_step: int = 1, timeout: float = 120) -> Path:
        return self.c.wait(lambda: next((p for p in reversed(self.checkpoints())
                                         if int(p.name.split("-")[1]) >= min_step), None), timeout,
                           f"a checkpoint at step >= {min_step} (output: {self.output()[-2500:]})", 0.2)

    def events(self, kind: str) -> list[dict]:
        import sqlite3
        conn = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            return [{"at": at, **json.loads(d)} for at, d in
                    conn.execute("SELECT at, data FROM events WHERE job=? AND kind=? ORDER BY id", (self.name, kind))]
        finally:
            conn.close()

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of this job's ranks (they run under slurmstepd, not under trainsup)."""
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(TRAIN) not in " ".join(p.info["cmdline"] or []):
                    continue
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if env.get("SLURM_JOB_ID") == self.id and "RANK" in env:
                out[int(env["RANK"])] = p.pid
        return out

    def cancel(self) -> None:
        self.c.run("scancel", self.id, check=False)


def manifest_files(ckpt: Path) -> set[str]:
    return set(json.loads((ckpt / "MANIFEST.json").read_text())["files"])


def test_slurm_save_signal_commits_one_checkpoint_with_both_ranks_files(cluster, tmp_path):
    job = Submitted(cluster, mlp_job(tmp_path, "usr1", 100000, every=0))
    try:
        job.wait_state("RUNNING")
        job.wait_training()
        # Slurm's own way: USR1 to the step's tasks (both nodes) -> one agreed checkpoint.
        cluster.run("scancel", "--signal=USR1", job.id)
        first = job.wait_checkpoint()
        assert {"rank-00000.pt", "rank-00001.pt", "state.pt"} <= manifest_files(first)
        # trainsup's way (the control socket of `trainsup run`): the save signal reaches
        # srun through the step leader and srun forwards it to every rank.
        ck = job.trainsup("--socket", str(job.state / "run.sock"), "checkpoint", "usr1", "--wait")
        assert ck.returncode == 0, ck.stderr
        assert len(job.checkpoints()) == 2
        second = job.checkpoints()[-1]
        assert {"rank-00000.pt", "rank-00001.pt"} <= manifest_files(second)
        st = job.trainsup("slurm", "status", str(job.file))
        assert st.returncode == 0 and "RUNNING" in st.stdout and f"step {second.name.split('-')[1].lstrip('0')}" \
            in st.stdout, st.stdout + st.stderr
    finally:
        job.cancel()
        job.wait_state("CANCELLED", "COMPLETED", "FAILED", timeout=60)


def test_slurm_time_limit_warning_saves_requeues_and_resumes(cluster, tmp_path):
    # --time=1 and --signal=B:USR1@30 (grace 10 + margin 20): USR1 to `trainsup run` ~30 s
    # before the limit.
    job = Submitted(cluster, mlp_job(tmp_path, "tlimit", 100000, every=0, slurm="  time: 1m\n"))
    script = (job.state / "slurm-batch.sh").read_text()
    assert "#SBATCH --signal=B:USR1@30" in script and "#SBATCH --time=1" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    try:
        job.wait_state("RUNNING")
        # Slurm may send the warning up to 60 s early: with a 1-minute limit, even at once
        # (then there is nothing to save yet, and the job is requeued all the same).
        saved = job.wait_checkpoint(timeout=150)       # nothing else saves: every=0
        ck = cluster.wait(lambda: [e for e in job.events("checkpoint") if e["path"] == str(saved)], 30,
                          "the checkpoint's event")[0]
        cluster.wait(lambda: [e for e in job.events("slurm-requeue") if e["at"] >= ck["at"]], 30,
                     f"the requeue after the save ({job.output()[-3000:]})")
        cluster.wait(lambda: int(job.info().get("Restarts", "0")) >= 1, 30, "Slurm's restart count")
        job.wait_state("RUNNING", timeout=45)           # StartTime set: no ~121 s BeginTime
        step = int(saved.name.split("-")[1])
        cluster.wait(lambda: f"resumed from step {step}" in job.output(), 60, "the resumed run")
        launches = job.events("launch")
        assert launches[-1]["reason"] == "preempt" and launches[-1]["resume_from"] == str(saved)
        assert "starting fresh" in job.output()     # --open-mode=append: run 1's output kept
    finally:
        job.cancel()
        job.wait_state("CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", timeout=60)


def _reference(d: Path, steps: int) -> subprocess.Popen:
    """The uninterrupted 2-rank run, same args, launched by hand (env://)."""
    port = free_ports(1)[0]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", TRAINSUP_CHECKPOINT_DIR=str(d / "ref-ckpt"))
        for k in [k for k in env if k.startswith(("SLURM_", "TRAINSUP_RESUME"))]:
            env.pop(k)
        cmd = [sys.executable, str(TRAIN), "--steps", str(steps), "--every", "50", "--sleep-per-step", "0",
               "--sync-every", "1", "--log-every", "0", "--final-out", str(d / "ref-final.pt")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def test_slurm_partition_preemption_saves_requeues_resumes_bit_identical(cluster, tmp_path):
    torch = pytest.importorskip("torch")
    steps = 300
    ref = _reference(tmp_path, steps)
    job = Submitted(cluster, mlp_job(tmp_path, "preempt", steps))
    try:
        job.wait_state("RUNNING")
        job.wait_checkpoint(100)
        t0 = time.monotonic()
        high = cluster.run("sbatch", "--parsable", "-p", "high", "-N2", "--exclusive",
                           "-o", str(tmp_path / "high-%j.out"), "--wrap", "sleep 2").strip()
        notice = cluster.wait(lambda: [e for e in job.events("notice") if e.get("outcome")], 40,
                              f"the preemption's notice (output: {job.output()[-2500:]})")[-1]
        assert notice["source"] in ("slurm-preempt", "slurm-term") and notice["step"], notice
        assert time.monotonic() - t0 < 20, "saved within GraceTime (20 s)"
        cluster.wait(lambda: job.info().get("Restarts") == "1", 60, "the requeue")
        cluster.wait(lambda: cluster.job(high).get("JobState") == "COMPLETED", 60, "the preempting job")
        # Usually running again within seconds (StartTime set). When Slurm's own preemption
        # requeue wins the race, it ignores our StartTime and the job waits its ~121 s
        # BeginTime (issue 14, open; the bench measures it): correctness is checked anyway.
        job.wait_state("COMPLETED", timeout=300)
        assert f"resumed from step {notice['step']}" in job.output()
        for p in ref:
            assert p.wait(120) == 0
        mine = torch.load(tmp_path / "preempt-final.pt", weights_only=True)
        theirs = torch.load(tmp_path / "ref-final.pt", weights_only=True)
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), f"{k} differs from the uninterrupted run"
    finally:
        job.cancel()
        for p in ref:
            if p.poll() is None:
                p.kill()


def test_slurm_rank_sigkilled_restarts_the_step_in_place(cluster, tmp_path):
    job = Submitted(cluster, mlp_job(tmp_path, "crash", 260))
    try:
        job.wait_state("RUNNING")
        job.wait_checkpoint(50)
        ranks = cluster.wait(lambda: len(r := job.rank_pids()) == 2 and r, 30, "two ranks")
        os.kill(ranks[1], signal.SIGKILL)
        launch = cluster.wait(lambda: [e for e in job.events("launch") if e["attempt"] == 2], 60,
                              f"attempt 2 (output: {job.output()[-2500:]})")[0]
        assert launch["reason"] == "crash" and launch["resume_from"]
        done = job.wait_state("COMPLETED", timeout=120)
        assert done["Restarts"] == "0", "the step restarted inside the allocation, not a requeue"
        assert (tmp_path / "crash-final.pt").exists()
        assert not job.rank_pids(), "no rank outlives the job"
    finally:
        job.cancel()


def test_slurm_restarts_exhausted_exit_nonzero_no_requeue(cluster, tmp_path):
    f = tmp_path / "dies.yaml"
    f.write_text(f"name: dies\ncommand: [{json.dumps(sys.executable)}, -c, 'import sys; sys.exit(7)']\n"
                 f"workdir: {tmp_path}\nrestart: {{max_restarts: 1, backoff: {{initial: 0.2, max: 0.2}}}}\n"
                 "slurm: {nodes: 2}\n")
    job = Submitted(cluster, f)
    done = job.wait_state("FAILED", "COMPLETED", timeout=90)
    assert done["JobState"] == "FAILED" and done["ExitCode"] == "1:0", done
    assert done["Restarts"] == "0"
    assert len(job.events("launch")) == 2


def test_slurm_submit_paths_with_a_space_stay_one_sbatch_value(cluster, tmp_path):
    """Found: `#SBATCH --chdir=<workdir>` unquoted: sbatch split a workdir with a space at
    it (and so the output path of a state dir with one). Submitted for real: the batch step
    runs in that very dir and its output lands in the state dir."""
    d = tmp_path / "my run"
    d.mkdir()
    f = d / "spaced.yaml"
    f.write_text(f"name: spaced\ncommand: [{json.dumps(sys.executable)}, -c, \"open('ran', 'w').write('yes')\"]\n"
                 f"workdir: {json.dumps(str(d))}\nrestart: {{policy: never}}\n"
                 "slurm:\n  nodes: 1\n  ntasks_per_node: 1\n")
    job = Submitted(cluster, f)
    shown = cluster.run("scontrol", "show", "job", "-o", job.id)
    assert f"WorkDir={d} " in shown and f"StdOut={job.state}/slurm-{job.id}.out" in shown, shown
    job.wait_state("COMPLETED", timeout=120)
    assert (d / "ran").read_text() == "yes"
    assert (job.state / f"slurm-{job.id}.out").exists(), list(job.state.iterdir())
    script = (job.state / "slurm-batch.sh").read_text()
    assert f'#SBATCH --chdir="{d}"' in script, script
