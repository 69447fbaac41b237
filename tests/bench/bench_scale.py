"""Scale: 10 / 100 / 200 idle jobs under one daemon (vs supervisord 4 with the same
programs): daemon CPU and RSS idle and under churn, the control socket's `status` round
trip vs `ping`, restart latency under that load vs the bare Popen loop under the same
load, and the rotation decision over 10,000 checkpoints.

    .venv/bin/python tests/bench/run_all.py --only scale [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import bench_checkpoint
import bench_restart
import psutil
from measure import (
    NO_BACKOFF,
    Section,
    Stat,
    count_starts,
    end_process,
    job_yaml,
    latencies_ms,
    poll,
    read_crash_record,
    running_daemon,
    workdir,
)


def cpu_and_rss(pid: int, window: float) -> tuple[float, float]:
    """% of one core used by `pid` (all its threads) over `window` s, and its RSS in MB."""
    p = psutil.Process(pid)
    c0, t0 = p.cpu_times(), time.monotonic()
    time.sleep(window)      # the measurement window itself, not a wait for a condition
    c1, t1 = p.cpu_times(), time.monotonic()
    busy = (c1.user - c0.user) + (c1.system - c0.system)
    return 100 * busy / (t1 - t0), p.memory_info().rss / 1e6


def round_trips(d, cmd: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = d.request(cmd)
        out.append((time.perf_counter() - t) * 1e3)
        assert r["ok"], r
    return out


def all_running(d, n: int) -> bool:
    jobs = d.request("status")["result"]["jobs"]
    return sum(1 for j in jobs if j["name"].startswith("idle") and j["state"] == "running") == n


def trainsup_scale(sec: Section, root: Path, n: int, window: float, churn: bool, crashes: int) -> dict:
    out = {}
    with running_daemon(root) as d:
        for i in range(n):
            d.write_job(f"idle{i:03d}", job_yaml(f"idle{i:03d}", ["sleep", "3600"], workdir=root,
                                                  ckpt_dir=root / "ck" / f"idle{i:03d}"))
        rec = root / "crash.rec"
        d.write_job("crash", job_yaml("crash", bench_restart.child_argv(rec, crashes), workdir=root,
                                      extra=NO_BACKOFF, autostart=False))
        d.start()
        poll(lambda: all_running(d, n), 120, f"{n} idle jobs running")
        pid = d.proc.pid
        out["idle"] = cpu_and_rss(pid, window)
        out["status"] = round_trips(d, "status", 30)
        out["ping"] = round_trips(d, "ping", 30)
        if churn:
            # Two jobs that crash every 0.1 s with no backoff: restarts never stop.
            for c in range(2):
                d.write_job(f"churn{c}", job_yaml(f"churn{c}", ["sh", "-c", "sleep 0.1; exit 1"], workdir=root,
                                                  extra=NO_BACKOFF))
            assert d.request("reload")["ok"]
            poll(lambda: d.status("churn0")["restarts"] >= 5, 30, "churn jobs restarting")
            out["churn"] = cpu_and_rss(pid, window)
            out["status_churn"] = round_trips(d, "status", 30)
            out["ping_churn"] = round_trips(d, "ping", 30)
            out["floor_churn"] = bench_restart.popen_loop(root, crashes)
            assert d.request("start", "crash")["ok"]
            poll(lambda: count_starts(rec) >= crashes + 1, 120, "crash job restarts under load")
            out["restart_churn"] = latencies_ms(*read_crash_record(rec), crashes)
    return out


def supervisord_idle(exe: Path, root: Path, n: int, window: float) -> tuple[float, float]:
    conf = bench_restart.supervisord_conf(root, {f"idle{i:03d}": "sleep 3600" for i in range(n)})
    p = bench_restart.start_supervisord(exe, conf)
    try:
        poll(lambda: sum(1 for c in psutil.Process(p.pid).children() if c.name() == "sleep") == n, 120,
             f"supervisord: {n} programs running")
        return cpu_and_rss(p.pid, window)
    finally:
        end_process(p)
        poll(lambda: p.poll() is not None, 30, "supervisord to exit")


def run(quick: bool = False) -> Section:
    sec = Section("scale")
    sizes = [10, 50] if quick else [10, 100, 200]
    window = 2.0 if quick else 5.0
    crashes = 10 if quick else 30
    target_n = sizes[1]
    exe = bench_restart.ensure_supervisord()
    with workdir("scale") as root:
        for n in sizes:
            print(f"  {n} idle jobs...", flush=True)
            r = trainsup_scale(sec, root / f"t{n}", n, window, churn=(n == target_n), crashes=crashes)
            (root / f"s{n}").mkdir()
            sd = supervisord_idle(exe, root / f"s{n}", n, window) if exe else None
            cpu, rss = r["idle"]
            tgt = n == 100
            sec.add(f"daemon CPU, {n} idle jobs", Stat.one(cpu, "% of a core"),
                    "supervisord 4, same programs" if sd else "", Stat.one(sd[0], "% of a core") if sd else None,
                    target="< 1%" if tgt else "", met=(cpu < 1.0) if tgt else None)
            sec.add(f"daemon RSS, {n} idle jobs", Stat.one(rss, "MB"),
                    "supervisord 4, same programs" if sd else "", Stat.one(sd[1], "MB") if sd else None,
                    target="< 80 MB" if tgt else "", met=(rss < 80) if tgt else None)
            sec.add(f"`status` round trip, {n} jobs", Stat("ms", r["status"]), "`ping` round trip (socket floor)",
                    Stat("ms", r["ping"]), compare="delta", latency=True)
            if "churn" in r:
                sec.add(f"daemon CPU, {n} idle + 2 jobs crashing every 0.1 s", Stat.one(r["churn"][0], "% of a core"))
                sec.add(f"`status` round trip under churn, {n} jobs", Stat("ms", r["status_churn"]),
                        "`ping` round trip under churn", Stat("ms", r["ping_churn"]), compare="delta", latency=True)
                sec.add(f"crash -> relaunch under load ({n} idle + churn)", Stat("ms", r["restart_churn"]),
                        "bare Popen loop under the same load", Stat("ms", r["floor_churn"]), compare="delta",
                        latency=True)
                sec.series["restart_trainsup_under_load"] = r["restart_churn"]
    bench_checkpoint.bench_rotation(sec)
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
