"""Resume: SIGKILL of a training job -> the first training step of its new process, under
a real daemon, vs the floor of any resume: a bare `python` + `import torch` + `torch.load`
of the same checkpoint file.

    .venv/bin/python tests/bench/run_all.py --only resume [--quick]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from measure import (
    BENCH,
    NO_BACKOFF,
    PY,
    REPO,
    WORK_DIR,
    Section,
    Stat,
    job_yaml,
    poll,
    read_records,
    running_daemon,
    workdir,
)

JOB = BENCH / "resume_job.py"
MIB = 64


def bare_load(path: Path) -> float:
    """Spawn -> after torch.load of `path`, in ms."""
    code = ("import sys, time, torch; torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
            "print(repr(time.time()))")
    t0 = time.time()
    out = subprocess.run([PY, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    return (float(out.stdout.strip()) - t0) * 1e3


def run(quick: bool = False) -> Section:
    sec = Section("resume")
    reps = 2 if quick else 5
    ours, to_exec, floor = [], [], []
    with workdir("resume", WORK_DIR) as root:
        rec = root / "resume.rec"
        ck = root / "ck"
        with running_daemon(root / "daemon") as d:
            d.write_job("resume", job_yaml("resume", [PY, str(JOB), str(rec), str(MIB), "20"], workdir=root,
                                           ckpt_dir=ck, env={"OMP_NUM_THREADS": "1"}, extra=NO_BACKOFF))
            d.start()
            poll(lambda: (d.status("resume")["checkpoint"] or {}).get("step"), 60, "a first valid checkpoint")
            for k in range(reps):
                # Kill only a process that has reached its first step (it has a record).
                pid = poll(lambda: (p := d.status("resume")["pid"]) and read_records(rec)
                           and read_records(rec)[-1]["pid"] == p and p, 60, "the job stepping")
                n = len(read_records(rec))
                t_kill = time.time()
                os.kill(pid, signal.SIGKILL)
                r = poll(lambda: read_records(rec)[n:] or None, 60, f"first step after kill #{k + 1}")[0]
                assert r["resumed"] > 0, f"attempt did not resume: {r}"
                ours.append((r["first_step"] - t_kill) * 1e3)
                to_exec.append((r["exec"] - t_kill) * 1e3)
            state = Path(d.status("resume")["checkpoint"]["latest"]) / "state.pt"
            size = state.stat().st_size
            for _ in range(reps):
                floor.append(bare_load(state))
    peer = Stat("ms", floor)
    sec.add(f"SIGKILL -> first step of the new process ({size / 2**20:.0f} MiB state)", Stat("ms", ours),
            "python + import torch + torch.load, same file", peer, latency=True)
    sec.add("  of which SIGKILL -> exec of the new process", Stat("ms", to_exec), "", None, latency=True)
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
