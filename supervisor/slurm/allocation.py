"""What `trainsup run` does inside a Slurm allocation: read the allocation, launch the
job's ranks with srun (one task per rank), ask scontrol what ended a step, requeue.

Inside an allocation (SLURM_JOB_ID set) `trainsup run` is the batch step and launches the
job's command with srun, one task per rank (never torchrun: its agents die of USR1 and,
under proctrack/linuxproc, their workers escape Slurm and keep training). Notices:

- USR1 to the batch step (`--signal=B:USR1@<grace + margin>`, the time-limit warning):
  save signal to every rank (srun forwards it), wait for the confirmed checkpoint, stop the
  step, `scontrol requeue` and `scontrol update StartTime=now` (else the requeued job waits
  ~121 s in BeginTime), exit 3.
- Partition preemption: Slurm signals the tasks (CONT+TERM; the batch step may not hear
  of it); the ranks save and exit. When the step ends (or TERM comes) trainsup asks
  scontrol; for a preemption it requeues the job itself once the save is confirmed (what
  Slurm does after GraceTime, without the wait); if that fails, or for a cancel or the
  time limit, it stays alive until Slurm ends the job (one that exits during GraceTime
  ends FAILED and is never requeued).
- A rank that dies ends the step (`srun --kill-on-bad-exit=1`); the restart policy starts
  the step again inside the same allocation; restarts exhausted: exit 1, no requeue.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from ..spec import JobSpec, SlurmSpec

SCONTROL_TIMEOUT = 30.0
JOB_ID_FILE = "slurm-job-id"
REQUEUE_LEAD = 2          # seconds: see Allocation.requeue_now


class SlurmError(Exception):
    """One line: what Slurm said, or why it could not be asked."""


def run_slurm_command(argv: Sequence[str], timeout: float = SCONTROL_TIMEOUT) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm host?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)}: no answer in {timeout:g}s") from None
    if p.returncode != 0:
        raise SlurmError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip() or f'exit {p.returncode}'}")
    return p.stdout


def parse_fields(line: str) -> dict[str, str]:
    """`scontrol show -o` output: Key=Value pairs separated by spaces."""
    out = {}
    for part in line.split():
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The Slurm allocation `trainsup run` runs in, from the batch step's environment."""
    job_id: str
    nodes: int
    ntasks_per_node: int
    master_addr: str
    srun_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, job: JobSpec, env: dict | None = None) -> Allocation:
        env = dict(os.environ if env is None else env)
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id:
            raise SlurmError("Slurm mode needs SLURM_JOB_ID (run inside an allocation)")
        spec = job.slurm or SlurmSpec()
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or spec.nodes)
        per_node = spec.ntasks_per_node if job.slurm else int(
            (env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0])
        first = run_slurm_command(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")]).split()
        if not first:
            raise SlurmError("SLURM_JOB_NODELIST names no node")
        node = parse_fields(run_slurm_command(["scontrol", "show", "node", "-o", first[0]]))
        return cls(job_id=job_id, nodes=nodes, ntasks_per_node=per_node,
                   master_addr=node.get("NodeAddr") or first[0], srun_args=spec.srun_args)

    def wrap(self, job: JobSpec) -> JobSpec:
        """The job as the batch step runs it: srun, one task per rank, each task execs the
        job's command with env:// set from Slurm (trainsup.slurm.task)."""
        n = self.nodes * self.ntasks_per_node
        command = (sys.executable, "-m", "trainsup.slurm.step", "srun", "--kill-on-bad-exit=1", f"--nodes={self.nodes}", f"--ntasks={n}",
                   f"--ntasks-per-node={self.ntasks_per_node}", "--export=ALL", *self.srun_args,
                   sys.executable, "-m", "trainsup.slurm.task", "--", *job.command)
        env = dict(job.env)
        env.setdefault("MASTER_ADDR", self.master_addr)
        return dataclasses.replace(job, command=command, env=tuple(env.items()))

    def ended_by_slurm(self) -> str | None:
        """Why Slurm is ending this job ("preempt", "cancel", "timeout"), or None while it
        runs on normally (a step that ended on its own: the restart policy decides)."""
        f = parse_fields(run_slurm_command(["scontrol", "show", "job", "-o", self.job_id]))
        if f.get("PreemptTime") not in (None, "", "None"):
            return "preempt"
        state = f.get("JobState", "")
        return {"PREEMPTED": "preempt", "CANCELLED": "cancel", "TIMEOUT": "timeout"}.get(state)

    def requeue_now(self, lead: int = REQUEUE_LEAD) -> float:
        """Requeue this job so that it starts again at once; returns the seconds it took.

        A requeued job's BeginTime is set ~121 s ahead (the credential lifetime) when the
        requeue completes, which is after this batch step has exited, and only if its
        BeginTime is not already in the future. So StartTime is set `lead` seconds ahead
        right after the requeue: late enough to be in the future when the requeue
        completes, so Slurm keeps it. Not yet solved: when Slurm's own
        preemption requeue is already under way, the update is accepted and ignored (no
        "setting begin" in slurmctld's log), the read-back still shows a StartTime near
        now, and the job waits the ~121 s BeginTime. An exact read-back does not work
        either: a job still running shows its real start, not the BeginTime asked for."""
        t0 = time.monotonic()
        run_slurm_command(["scontrol", "requeue", self.job_id])
        deadline = time.monotonic() + 10
        while True:
            try:
                run_slurm_command(["scontrol", "update", f"JobId={self.job_id}", f"StartTime=now+{lead}"])
                # Seen once in the bench: an update accepted but not applied while the
                # requeue was under way. Read it back; do it again until it holds.
                if self._start_time_set(lead):
                    break
            except SlurmError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise SlurmError(f"job {self.job_id}: StartTime did not take; it may wait ~121 s")
            time.sleep(0.1)
        return time.monotonic() - t0

    def _start_time_set(self, lead: int) -> bool:
        f = parse_fields(run_slurm_command(["scontrol", "show", "job", "-o", self.job_id]))
        try:
            start = time.mktime(time.strptime(f.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return False
        return time.time() - 1 <= start <= time.time() + lead + 1
