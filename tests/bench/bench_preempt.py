"""Lost work: training steps computed twice after random preemptions (`trainsup preempt`,
then `trainsup start`) and random SIGKILLs of jobs/train_mlp.py under a real daemon.

The peer, periodic-only, is a counterfactual from the same interruptions: a job without
emergency saves resumes from its last periodic checkpoint (the largest multiple of the
save interval not above the last step it finished), so it loses the steps since then.

    .venv/bin/python tests/bench/run_all.py --only preempt [--quick]
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from measure import NO_BACKOFF, PY, REPO, WORK_DIR, Section, Stat, job_yaml, poll, running_daemon, workdir

EVERY = 50            # periodic save interval, steps
ATTEMPT = re.compile(r"^\[trainsup\] attempt (\d+) \((\w+)\): pid (\d+)(?:, resuming from .*step-(\d+))?")
STEP = re.compile(r"^step (\d+) ")


@dataclass
class Attempt:
    number: int
    resumed: int
    last_step: int = 0
    steps: list[int] = field(default_factory=list)


def parse_log(text: str) -> list[Attempt]:
    out: list[Attempt] = []
    for line in text.splitlines():
        m = ATTEMPT.match(line)
        if m:
            out.append(Attempt(int(m.group(1)), int(m.group(4) or 0)))
            continue
        m = STEP.match(line)
        if m and out:
            out[-1].last_step = int(m.group(1))
    return out


def run(quick: bool = False, seed: int = 6) -> Section:
    sec = Section("preempt")
    per_kind = 2 if quick else 20
    rng = random.Random(seed)
    plan = ["preempt"] * per_kind + ["kill"] * per_kind
    rng.shuffle(plan)
    with workdir("preempt", WORK_DIR) as root:
        cmd = [PY, str(REPO / "jobs" / "train_mlp.py"), "--steps", "10000000", "--every", str(EVERY),
               "--sleep-per-step", "0.01", "--log-every", "1"]
        extra = NO_BACKOFF + "emergency_save:\n  grace: 30s\nstop_timeout: 10s\n"
        with running_daemon(root / "daemon") as d:
            d.write_job("mlp", job_yaml("mlp", cmd, workdir=root, ckpt_dir=root / "ck",
                                        env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, extra=extra))
            log = d.logs / "mlp.log"
            d.start()
            for i, kind in enumerate(plan):
                # The current attempt must be training before it is interrupted.
                poll(lambda: (a := parse_log(log.read_text())) and len(a) == i + 1 and a[-1].last_step > a[-1].resumed,
                     120, f"attempt {i + 1} to train")
                time.sleep(rng.uniform(0.2, 1.2))    # the random moment of the interruption
                if kind == "preempt":
                    r = d.request("preempt", "mlp")
                    assert r["ok"] and r["result"].get("outcome") == "saved", r
                    d.wait_state("mlp", "preempted")
                    assert d.request("start", "mlp")["ok"]
                else:
                    os.kill(d.status("mlp")["pid"], signal.SIGKILL)
                print(f"    {i + 1}/{len(plan)} {kind}", flush=True)
            poll(lambda: len(a := parse_log(log.read_text())) == len(plan) + 1 and a[-1].last_step > 0,
                 120, "the last attempt to train")
            attempts = parse_log(log.read_text())
    lost = {"preempt": [], "kill": []}
    periodic = {"preempt": [], "kill": []}
    for kind, before, after in zip(plan, attempts, attempts[1:]):
        lost[kind].append(float(before.last_step - after.resumed))
        periodic[kind].append(float(before.last_step - before.last_step // EVERY * EVERY))
    p, k = Stat("steps", lost["preempt"]), Stat("steps", lost["kill"])
    sec.add(f"steps recomputed after {per_kind} random preemptions (train_mlp)", p,
            "periodic-only saves, same moments", Stat("steps", periodic["preempt"]), compare="delta",
            latency=True, target="0", met=max(p.samples) == 0, note=f"max {max(p.samples):.0f}")
    sec.add(f"steps recomputed after {per_kind} random SIGKILLs (train_mlp)", k,
            "periodic-only saves, same moments", Stat("steps", periodic["kill"]), compare="delta",
            latency=True, target=f"<= {EVERY} (save interval)", met=max(k.samples) <= EVERY,
            note=f"max {max(k.samples):.0f}")
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
