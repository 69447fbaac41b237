"""`trainsup slurm submit|status`: the batch script that runs `trainsup run` inside the
allocation (slurm/allocation.py says what it does there), and a job's state from a login
node."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..slurm.allocation import JOB_ID_FILE, SlurmError, parse_fields, run_slurm_command
from ..spec import JobSpec, SlurmSpec

# -- trainsup slurm submit -----------------------------------------------------------------

def sbatch_time(seconds: float) -> str:
    """sbatch --time in whole minutes (Slurm's granularity), rounded up."""
    return str(max(1, math.ceil(seconds / 60)))


class BatchScriptError(ValueError):
    """A value cannot be written into the batch script safely: one line, exit 2."""


def _one_line(what: str, value: object) -> str:
    """`value` as text, refused when it holds a line break or another control character:
    a newline in a workdir ended the `#SBATCH` line and put a shell command of the user's
    choosing into the batch script."""
    text = str(value)
    bad = next((c for c in text if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise BatchScriptError(f"{what} {text!r} holds a control character ({bad!r}); it cannot "
                               "go into a Slurm batch script")
    return text


def sbatch_value(what: str, value: object) -> str:
    """One `#SBATCH` option value, double-quoted the way sbatch reads these lines: quotes
    group words (a space in a path split `--chdir`), a backslash escapes the next
    character, an unquoted `#` starts a comment."""
    text = _one_line(what, value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def batch_script(job: JobSpec, state_dir: Path, python: str = sys.executable) -> str:
    """The batch script; raises BatchScriptError for a value it cannot hold safely."""
    spec = job.slurm or SlurmSpec()
    warn = int(math.ceil(job.emergency_save.grace + spec.signal_margin))
    # `%` is sbatch's filename pattern character: the state dir's own are literal.
    output = str(state_dir).replace("%", "%%") + "/slurm-%j.out"
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={sbatch_value('job name', job.name)}",
             f"#SBATCH --nodes={spec.nodes}",
             f"#SBATCH --ntasks-per-node={spec.ntasks_per_node}",
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{warn}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={sbatch_value('state dir', output)}",
             f"#SBATCH --chdir={sbatch_value('workdir', job.workdir)}"]
    if spec.time is not None:
        lines.append(f"#SBATCH --time={sbatch_time(spec.time)}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={sbatch_value('slurm.partition', spec.partition)}")
    # Each is an #SBATCH line of the user's own words ("--gres=gpu:8"): as written, on one line.
    lines += [f"#SBATCH {_one_line('slurm.sbatch_args entry', a)}" for a in spec.sbatch_args]
    lines += ["# Ignored until trainsup's first line catches them (Slurm may send the time-limit",
              "# USR1 up to 60 s early: even now); exec: no shell is left to die of a signal.",
              "trap '' USR1 TERM",
              f"exec {shlex.quote(_one_line('python', python))} -m trainsup run --slurm on --state "
              f"{shlex.quote(_one_line('state dir', state_dir))} {shlex.quote(_one_line('job file', job.source))}",
              ""]
    return "\n".join(lines)


def submit(job: JobSpec, state_dir: Path, extra: Sequence[str] = ()) -> str:
    """Write the batch script into the state dir, sbatch it; returns the job id."""
    text = batch_script(job, state_dir)      # refused before anything is written
    state_dir.mkdir(parents=True, exist_ok=True)
    script = state_dir / "slurm-batch.sh"
    script.write_text(text)
    script.chmod(0o755)
    out = run_slurm_command(["sbatch", "--parsable", *extra, str(script)]).strip()
    job_id = out.split(";")[0]
    (state_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return job_id


# -- trainsup slurm status -----------------------------------------------------------------

def slurm_job(job_id: str) -> dict:
    """State, reason and restart count from scontrol (sacct when the job has left squeue)."""
    try:
        f = parse_fields(run_slurm_command(["scontrol", "show", "job", "-o", job_id]))
        return {"state": f.get("JobState"), "reason": f.get("Reason"),
                "restarts": int(f.get("Restarts", "0") or 0), "nodes": f.get("NodeList"),
                "time_left": None if f.get("TimeLimit") in (None, "UNLIMITED") else f.get("TimeLimit")}
    except SlurmError as e:
        try:
            line = run_slurm_command(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,Reason"]).strip()
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
                    out[kind] = {**json.loads(row[1]), "at": row[0]}
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as e:
        out["error"] = f"{db}: {e}"
    return out


def newest_checkpoint(job: JobSpec) -> dict | None:
    from ..checkpoint import CheckpointDirError, latest_valid, scan
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
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(notice.get("noticed_at") or notice["at"]))
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
    from .. import config
    from ..config.files import default_state_dir
    from ..spec import InvalidJob
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
    except BatchScriptError as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return 2
    except (SlurmError, OSError) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0
