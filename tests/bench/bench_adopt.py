"""Daemon SIGKILL -> a new daemon serving with every job taken over (issue 21), against
the same daemon with TRAINSUP_SHIM=off: jobs launched as its own children, so a new
daemon stops each one and relaunches it from its last checkpoint (trainsup's behaviour
before the shim). Same jobs, same machine, same run. And what the shim costs per job.

Jobs: tests/helpers/fakejob.py stepping every 50 ms, a checkpoint every 100 steps (5 s),
each process writing its step count to a file named after its pid. Steps lost by a
relaunch = the last step the killed process wrote - the step its successor resumed at;
a job taken over loses none by construction (the same process goes on), and this is
checked: the same pid, still stepping.

Shim memory: of the 200 shims running, VmRSS (resident, shared pages counted whole),
PSS (shared pages divided among the processes that map them) and USS (private pages:
what one more job adds), from /proc/PID/smaps_rollup; next to the job's own Python
interpreter, what a Python parent per job would have cost at least.

    .venv/bin/python tests/bench/run_all.py --only adopt [--quick]
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

from measure import PY, REPO, Section, Stat, poll, read_records, running_daemon, workdir

FAKEJOB = REPO / "tests" / "helpers" / "fakejob.py"
TARGET_S = 1.0


def _yaml(root: Path, name: str) -> str:
    cmd = [PY, str(FAKEJOB), "--record", str(root / f"{name}.rec"), "--catch-usr1", "--step-time", "0.05",
           "--save-every-steps", "100", "--progress", str(root / f"{name}.{{pid}}.step")]
    return (f"name: {name}\ncommand: {cmd!r}\nworkdir: {root}\nenv: {{PYTHONPATH: {str(REPO)!r}}}\n"
            f"checkpoint:\n  dir: {root / (name + '-ck')}\n  keep_last: 2\n")


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["VmRSS"] = int(line.split()[1])
    out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _step(root: Path, name: str, pid: int) -> int:
    try:
        return int((root / f"{name}.{pid}.step").read_text() or 0)
    except (OSError, ValueError):
        return 0


def one_run(root: Path, n: int, shim: bool) -> dict:
    env = {} if shim else {"TRAINSUP_SHIM": "off"}
    names = [f"job{i:03d}" for i in range(n)]
    with running_daemon(root / "daemon") as d:
        for name in names:
            d.write_job(name, _yaml(root, name))
        d.start(env=env)

        def all_running() -> dict | None:
            r = d.request("status", timeout=30)
            jobs = {j["name"]: j for j in r["result"]["jobs"]} if r.get("ok") else {}
            ok = len(jobs) == n and all(j["state"] == "running" and (j["checkpoint"] or {}).get("step")
                                        for j in jobs.values())
            return jobs if ok else None
        before = poll(all_running, 600, f"{n} jobs running, each with a checkpoint", 0.5)
        pids = {name: j["pid"] for name, j in before.items()}
        mem = []
        if shim:
            for pid in pids.values():
                mem.append((_rollup(_parent(pid)), _rollup(pid)))
        d.kill()
        t0, t0_wall = time.monotonic(), time.time()
        d.start(wait=False, env=env)
        poll(lambda: d._ping(), 60, "the new daemon answering", 0.002)
        serving = time.monotonic() - t0

        def settled() -> dict | None:
            r = d.request("status", timeout=30)
            jobs = {j["name"]: j for j in r["result"]["jobs"]} if r.get("ok") else {}
            if len(jobs) != n or any(j["state"] != "running" for j in jobs.values()):
                return None
            if shim:
                return jobs if all(j["adopted"] and j["pid"] == pids[m] for m, j in jobs.items()) else None
            return jobs if all(j["pid"] != pids[m] for m, j in jobs.items()) else None
        # Polled slowly: a `status` of 200 jobs every few ms took the very loop it measured.
        # When each job was taken over (relaunched) is in its own history, stamped then.
        after = poll(settled, 600, "every job taken over" if shim else "every job relaunched", 0.25)
        kind = "adopted" if shim else "launch"
        took = max(max(e["at"] for e in d.history(name, n=20) if e["kind"] == kind and e["at"] >= t0_wall)
                   for name in names) - t0_wall
        lost = []
        for name in names:
            if shim:
                s0 = _step(root, name, pids[name])
                poll(lambda: _step(root, name, pids[name]) > s0, 30, f"{name} still stepping", 0.05)
                lost.append(0)
            else:
                # `running` comes before the relaunched process has written its start record
                new_pid = after[name]["pid"]
                (start,) = poll(lambda: [r for r in read_records(root / f"{name}.rec")  # noqa: B023
                                         if r["event"] == "start" and r["pid"] == new_pid], 60,  # noqa: B023
                                f"{name}'s relaunch to start", 0.05)
                resumed = start["resumed_step"]
                lost.append(max(0, _step(root, name, pids[name]) - resumed))
        return {"serving": serving, "took": took, "lost": lost, "mem": mem}


def run(quick: bool = False) -> Section:
    sec = Section("adopt")
    n = 30 if quick else 200
    with workdir("adopt") as root:
        print(f"  {n} jobs under shims: SIGKILL the daemon, start it again...", flush=True)
        (root / "shim").mkdir()
        ours = one_run(root / "shim", n, shim=True)
        print(f"  {n} jobs without shims (TRAINSUP_SHIM=off), the same...", flush=True)
        (root / "bare").mkdir()
        bare = one_run(root / "bare", n, shim=False)
    sec.add(f"daemon SIGKILL -> new daemon answering ({n} jobs)", Stat.one(ours["serving"], "s"),
            "the same, jobs without shims", Stat.one(bare["serving"], "s"), compare="ratio")
    sec.add(f"daemon SIGKILL -> all {n} jobs taken over (same processes)", Stat.one(ours["took"], "s"),
            f"all {n} stopped and relaunched from their last checkpoint (no shims)", Stat.one(bare["took"], "s"),
            compare="ratio", target=f"<= {TARGET_S:g} s", met=ours["took"] <= TARGET_S)
    sec.add("steps lost per job by that daemon SIGKILL", Stat("steps", ours["lost"]),
            "relaunched from the last checkpoint (every 100 steps)", Stat("steps", bare["lost"]),
            compare="delta", latency=True, target="0", met=max(ours["lost"]) == 0)
    if ours["mem"]:
        for key, label in (("VmRSS", "RSS"), ("Pss", "PSS"), ("USS", "USS (private)")):
            shim_kb = [m[0][key] / 1024 for m in ours["mem"]]
            py_kb = [m[1][key] / 1024 for m in ours["mem"]]
            sec.add(f"trainsup-shim memory per job, {label} ({n} running)", Stat("MB", shim_kb),
                    "the job's own Python interpreter (a Python parent would cost at least this)",
                    Stat("MB", py_kb), compare="ratio", latency=True,
                    target="<= 1 MB" if key == "VmRSS" else "", met=max(shim_kb) <= 1.0 if key == "VmRSS" else None)
        sec.notes.append(f"shims: {len(ours['mem'])}, PSS total {sum(m[0]['Pss'] for m in ours['mem']) / 1024:.1f} MB "
                         f"(median {statistics.median(m[0]['Pss'] for m in ours['mem'])} kB)")
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run("--quick" in sys.argv)
