"""Slurm: `trainsup slurm submit|status`, and what `trainsup run` does inside an allocation.

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

import argparse
import dataclasses
import json
import math
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .spec import JobSpec, SlurmSpec

SCONTROL_TIMEOUT = 30.0
JOB_ID_FILE = "slurm-job-id"
REQUEUE_LEAD = 2          # seconds: see Allocation.requeue_now


class SlurmError(Exception):
    """One line: what Slurm said, or why it could not be asked."""


def _run(argv: Sequence[str], timeout: float = SCONTROL_TIMEOUT) -> str:
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
    def from_env(cls, job: JobSpec, env: Optional[dict] = None) -> "Allocation":
        env = dict(os.environ if env is None else env)
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id:
            raise SlurmError("Slurm mode needs SLURM_JOB_ID (run inside an allocation)")
        spec = job.slurm or SlurmSpec()
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or spec.nodes)
        per_node = spec.ntasks_per_node if job.slurm else int(
            (env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0])
        first = _run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")]).split()
        if not first:
            raise SlurmError("SLURM_JOB_NODELIST names no node")
        node = parse_fields(_run(["scontrol", "show", "node", "-o", first[0]]))
        return cls(job_id=job_id, nodes=nodes, ntasks_per_node=per_node,
                   master_addr=node.get("NodeAddr") or first[0], srun_args=spec.srun_args)

    def wrap(self, job: JobSpec) -> JobSpec:
        """The job as the batch step runs it: srun, one task per rank, each task execs the
        job's command with env:// set from Slurm (trainsup.slurmtask)."""
        n = self.nodes * self.ntasks_per_node
        command = (sys.executable, "-m", "trainsup.slurmstep", "srun", "--kill-on-bad-exit=1", f"--nodes={self.nodes}", f"--ntasks={n}",
                   f"--ntasks-per-node={self.ntasks_per_node}", "--export=ALL", *self.srun_args,
                   sys.executable, "-m", "trainsup.slurmtask", "--", *job.command)
        env = dict(job.env)
        env.setdefault("MASTER_ADDR", self.master_addr)
        return dataclasses.replace(job, command=command, env=tuple(env.items()))

    def ended_by_slurm(self) -> Optional[str]:
        """Why Slurm is ending this job ("preempt", "cancel", "timeout"), or None while it
        runs on normally (a step that ended on its own: the restart policy decides)."""
        f = parse_fields(_run(["scontrol", "show", "job", "-o", self.job_id]))
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
        completes, so Slurm keeps it. Not yet solved (issue 14): when Slurm's own
        preemption requeue is already under way, the update is accepted and ignored (no
        "setting begin" in slurmctld's log), the read-back still shows a StartTime near
        now, and the job waits the ~121 s BeginTime. An exact read-back does not work
        either: a job still running shows its real start, not the BeginTime asked for."""
        t0 = time.monotonic()
        _run(["scontrol", "requeue", self.job_id])
        deadline = time.monotonic() + 10
        while True:
            try:
                _run(["scontrol", "update", f"JobId={self.job_id}", f"StartTime=now+{lead}"])
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
        f = parse_fields(_run(["scontrol", "show", "job", "-o", self.job_id]))
        try:
            start = time.mktime(time.strptime(f.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return False
        return time.time() - 1 <= start <= time.time() + lead + 1


# -- trainsup slurm submit -----------------------------------------------------------------

def sbatch_time(seconds: float) -> str:
    """sbatch --time in whole minutes (Slurm's granularity), rounded up."""
    return str(max(1, math.ceil(seconds / 60)))


def batch_script(job: JobSpec, state_dir: Path, python: str = sys.executable) -> str:
    spec = job.slurm or SlurmSpec()
    warn = int(math.ceil(job.emergency_save.grace + spec.signal_margin))
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job.name}",
             f"#SBATCH --nodes={spec.nodes}",
             f"#SBATCH --ntasks-per-node={spec.ntasks_per_node}",
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{warn}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={state_dir}/slurm-%j.out",
             f"#SBATCH --chdir={job.workdir}"]
    if spec.time is not None:
        lines.append(f"#SBATCH --time={sbatch_time(spec.time)}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    lines += [f"#SBATCH {a}" for a in spec.sbatch_args]
    lines += ["# Ignored until trainsup's first line catches them (Slurm may send the time-limit",
              "# USR1 up to 60 s early: even now); exec: no shell is left to die of a signal.",
              "trap '' USR1 TERM",
              f"exec {shlex.quote(python)} -m trainsup run --slurm on --state {shlex.quote(str(state_dir))} "
              f"{shlex.quote(str(job.source))}", ""]
    return "\n".join(lines)


def submit(job: JobSpec, state_dir: Path, extra: Sequence[str] = ()) -> str:
    """Write the batch script into the state dir, sbatch it; returns the job id."""
    state_dir.mkdir(parents=True, exist_ok=True)
    script = state_dir / "slurm-batch.sh"
    script.write_text(batch_script(job, state_dir))
    script.chmod(0o755)
    out = _run(["sbatch", "--parsable", *extra, str(script)]).strip()
    job_id = out.split(";")[0]
    (state_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return job_id


# -- trainsup slurm status -----------------------------------------------------------------

def slurm_job(job_id: str) -> dict:
    """State, reason and restart count from scontrol (sacct when the job has left squeue)."""
    try:
        f = parse_fields(_run(["scontrol", "show", "job", "-o", job_id]))
        return {"state": f.get("JobState"), "reason": f.get("Reason"),
                "restarts": int(f.get("Restarts", "0") or 0), "nodes": f.get("NodeList"),
                "time_left": None if f.get("TimeLimit") in (None, "UNLIMITED") else f.get("TimeLimit")}
    except SlurmError as e:
        try:
            line = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,Reason"]).strip()
            state, _, reason = line.partition("|")
            return {"state": state or None, "reason": reason or None, "restarts": None}
        except SlurmError:
            return {"state": None, "error": str(e)}


def last_events(state_dir: Path, job: str) -> dict:
    """The newest notice and requeue recorded by `trainsup run`, read-only."""
    db = state_dir / "state.db"
    out: dict = {}
    if not db.exists():
        return out
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            for kind in ("notice", "slurm-requeue", "exit"):
                row = conn.execute("SELECT at, data FROM events WHERE job=? AND kind=? ORDER BY id DESC LIMIT 1",
                                   (job, kind)).fetchone()
                if row:
                    out[kind] = {"at": row[0], **json.loads(row[1])}
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as e:
        out["error"] = f"{db}: {e}"
    return out


def newest_checkpoint(job: JobSpec) -> Optional[dict]:
    from .checkpoint import CheckpointDirError, latest_valid, scan
    if job.checkpoint is None:
        return None
    try:
        infos = scan(job.checkpoint.dir, job.checkpoint.format)
    except CheckpointDirError as e:
        return {"error": str(e)}
    latest = latest_valid(infos)
    return {"step": latest.step, "path": str(latest.path), "age_s": round(time.time() - latest.mtime, 1)} \
        if latest else {"step": None}


def status(job: JobSpec, state_dir: Path) -> dict:
    id_file = state_dir / JOB_ID_FILE
    job_id = id_file.read_text().strip() if id_file.exists() else None
    return {"job": job.name, "slurm_job_id": job_id, "slurm": slurm_job(job_id) if job_id else None,
            "checkpoint": newest_checkpoint(job), "events": last_events(state_dir, job.name)}


def format_status(st: dict) -> str:
    s = st.get("slurm") or {}
    ck = st.get("checkpoint") or {}
    ev = st.get("events") or {}
    lines = [f"job {st['job']}: Slurm job {st.get('slurm_job_id') or '-'}: {s.get('state') or 'unknown'}"
             + (f" ({s['reason']})" if s.get("reason") and s.get("reason") != "None" else "")
             + (f", restarts {s['restarts']}" if s.get("restarts") is not None else "")]
    if s.get("error"):
        lines.append(f"  slurm: {s['error']}")
    if ck.get("step") is not None:
        lines.append(f"  newest valid checkpoint: step {ck['step']} ({ck['path']}, {ck['age_s']:.0f}s old)")
    else:
        lines.append(f"  newest valid checkpoint: {ck.get('error') or 'none'}")
    notice = ev.get("notice")
    if notice:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(notice["at"]))
        lines.append(f"  last notice: {notice.get('source')} at {at}Z"
                     + (f" -> {notice['outcome']}" if notice.get("outcome") else ""))
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------

def add_subcommand(sub) -> None:
    p = sub.add_parser("slurm", help="submit a job to Slurm, or see it from a login node",
                       description="Run a job YAML on Slurm: `submit` writes the batch script (requeue, "
                       "USR1 before the time limit, append-mode output) and sbatches it; `status` shows "
                       "it from a login node.")
    ss = p.add_subparsers(dest="slurm_cmd", metavar="ACTION", required=True,
                          help="submit or status")
    s = ss.add_parser("submit", help="write the batch script and sbatch it")
    s.add_argument("job_file", type=Path, metavar="JOB.yaml", help="the job file (with its slurm: keys)")
    s.add_argument("--state", type=Path, dest="state_dir",
                   help="trainsup run's state dir on the shared filesystem (default: .trainsup/<job>)")
    s.add_argument("sbatch_args", nargs=argparse.REMAINDER, help="-- then extra sbatch arguments")
    t = ss.add_parser("status", help="Slurm state, restarts, newest valid checkpoint, last notice")
    t.add_argument("job_file", type=Path, metavar="JOB.yaml", help="the job file that was submitted")
    t.add_argument("--state", type=Path, dest="state_dir", help="the state dir given to submit, if any")
    t.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from . import config
    from .run import default_state_dir
    from .spec import InvalidJob
    job = config.load_job_file(args.job_file, is_root=os.geteuid() == 0)
    if isinstance(job, InvalidJob):
        for line in job.errors:
            print(line, file=sys.stderr)
        return 2
    state_dir = Path(os.path.abspath(args.state_dir)) if args.state_dir else default_state_dir(job)
    try:
        if args.slurm_cmd == "submit":
            extra = list(args.sbatch_args)
            if extra[:1] == ["--"]:
                extra = extra[1:]
            job_id = submit(job, state_dir, extra)
            print(f"{job.name}: submitted Slurm job {job_id} (output {state_dir}/slurm-{job_id}.out)")
            return 0
        st = status(job, state_dir)
    except (SlurmError, OSError) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0
