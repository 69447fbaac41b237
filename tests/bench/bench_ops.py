"""Operability costs (issue 15), each figure next to its limit from the same run:

- `status` round trip with 200 jobs vs 10 jobs (limit: <= 1.5x): the request `trainsup status`
  makes for its table (the table view), over the socket, the reply decoded (JSON, and each
  row split into its fields); the full `status --json` round trip and the drawing of the
  table are shown beside it (no limit);
- a Prometheus scrape of `/metrics` with 200 jobs (limit: <= 50 ms) and what scraping
  every 15 s costs the daemon (limit: < 0.5% of a core);
- crash -> relaunch with a `crash` hook vs without (limit: median within +-0.5 ms).

    .venv/bin/python tests/bench/bench_ops.py [--quick] [--status-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
from measure import NO_BACKOFF, Stat, fmt, job_yaml, poll, running_daemon, workdir
from trainsup.cli.render import format_status
from trainsup.control.protocol import table_rows

SCRAPE_INTERVAL = 15.0


def round_trips(d, cmd: str, n: int, **args) -> list[float]:
    """Socket round trips, the reply decoded into what the table is drawn from: JSON
    (control.request decodes) and, for the table view, each row split into its fields."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = d.request(cmd, **args)
        if args.get("table"):
            table_rows(r["result"])
        out.append((time.perf_counter() - t) * 1e3)
        assert r["ok"], r
    return out


def idle_jobs(d, root: Path, n: int) -> None:
    for i in range(n):
        name = f"idle{i:03d}"
        d.write_job(name, job_yaml(name, ["sleep", "3600"], workdir=root, ckpt_dir=root / "ck" / name))


def all_running(d, n: int) -> bool:
    return sum(1 for j in d.request("status")["result"]["jobs"] if j["state"] == "running") == n


@contextmanager
def ops_daemon(root: Path, n: int):
    """A daemon with n idle jobs and metrics on, all running."""
    (root / "d").mkdir()
    config = root / "trainsup.yaml"
    config.write_text("metrics: {listen: '127.0.0.1:0'}\n")
    with running_daemon(root / "d") as d:
        idle_jobs(d, root, n)
        d.start("--config", str(config))
        poll(lambda: all_running(d, n), 180, f"{n} idle jobs running")
        round_trips(d, "status", 5, table=True)           # warm-up
        yield d


def status_interleaved(small, big, rounds: int, block: int = 1) -> dict:
    """Status round trips against both daemons in alternating blocks of `block`: the
    machine's drift (another process, a /proc sampling pass) hits both alike. What
    `trainsup status` asks for its table (the table view) and what `status --json` asks
    for (every documented field); then the table drawn from each view."""
    out: dict = {k: [] for k in ("status10", "status200", "json10", "json200", "render10", "render200")}
    for _ in range(max(1, rounds // block)):
        for d, tag in ((small, "10"), (big, "200")):
            out["status" + tag] += round_trips(d, "status", block, table=True)
        for d, tag in ((big, "200"), (small, "10")):
            out["json" + tag] += round_trips(d, "status", block)
    for d, tag in ((small, "10"), (big, "200")):
        view = d.request("status", table=True)["result"]
        for _ in range(rounds):      # drawing the table, the rest of what `trainsup status` does
            t = time.perf_counter()
            format_status(view)
            out["render" + tag].append((time.perf_counter() - t) * 1e3)
    return out


def scrape(d, rounds: int) -> dict:
    """Scrape times, and the daemon's CPU per scrape (its CPU over back-to-back scrapes,
    less its idle rate)."""
    out: dict = {}
    url = f"http://{d.request('status')['result']['daemon']['metrics']}/metrics"
    proc = psutil.Process(d.proc.pid)
    time.sleep(2.0)           # the publish after start has happened: measure steady state
    c0, t0 = proc.cpu_times(), time.monotonic()
    time.sleep(3.0)           # the idle window itself, not a wait for a condition
    c1, t1 = proc.cpu_times(), time.monotonic()
    idle_rate = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
    scrapes, body = [], b""
    c0, t0 = proc.cpu_times(), time.monotonic()
    for _ in range(rounds):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
        scrapes.append((time.perf_counter() - t) * 1e3)
    c1, t1 = proc.cpu_times(), time.monotonic()
    busy = (c1.user + c1.system - c0.user - c0.system) - idle_rate * (t1 - t0)
    out["scrape"] = scrapes
    out["scrape_cpu_s"] = max(0.0, busy) / rounds
    out["idle_core_pct"] = 100 * idle_rate
    out["samples"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return out


def relaunch_with_and_without_hooks(root: Path, crashes: int, blocks: int) -> tuple[list[float], list[float]]:
    """Two crash-looping jobs in one daemon (backoff 0), one with a `crash` hook; they run
    in alternating blocks so both see the same machine. The daemon's own figure: the
    launch event's since_exit_ms (exit noticed -> next exec)."""
    hook = root / "hook.sh"
    hook.write_text("#!/bin/sh\ncat > /dev/null\n")
    hook.chmod(0o755)
    (root / "d").mkdir()
    with running_daemon(root / "d") as d:
        for name, extra in (("plain", ""), ("hooked", f"hooks: [{{command: [{json.dumps(str(hook))}], on: [crash]}}]\n")):
            # Each attempt lives 0.2 s: a hook fired by one crash has run (50 ms after it)
            # before the next crash, as it would in any real crash loop with backoff.
            d.write_job(name, job_yaml(name, ["sh", "-c", "sleep 0.2; exit 1"], workdir=root, ckpt_dir=root / f"ck-{name}",
                                       extra=NO_BACKOFF + extra, autostart=False))
        d.start()
        # Files written just before the start are read once they settle: wait for both.
        poll(lambda: all(d.request("status", n)["ok"] for n in ("plain", "hooked")), 30, "both jobs loaded")
        for _ in range(blocks):
            for name in ("plain", "hooked"):
                before = d.status(name)["attempt"]
                assert d.request("start", name)["ok"]
                poll(lambda: d.status(name)["attempt"] >= before + crashes, 120, f"{name}: {crashes} relaunches")
                r = d.request("stop", name, no_save=True)
                assert r["ok"], r
        got = {}
        for name in ("plain", "hooked"):
            got[name] = [e["since_exit_ms"] for e in d.history(name, 100000)
                         if e["kind"] == "launch" and e.get("reason") == "crash" and "since_exit_ms" in e]
    return got["plain"], got["hooked"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--status-only", action="store_true", help="only the status round trip")
    args = ap.parse_args()
    rounds = 20 if args.quick else 200
    rows = []
    with workdir("ops-10") as r10, workdir("ops-200") as r200:
        with ops_daemon(r10, 10) as d10, ops_daemon(r200, 200) as d200:
            st = status_interleaved(d10, d200, rounds)
            big = {} if args.status_only else scrape(d200, rounds)
    small = {"status": st["status10"], "status_json": st["json10"], "render": st["render10"]}
    big.update(status=st["status200"], status_json=st["json200"], render=st["render200"])
    s10, s200 = Stat("ms", small["status"]), Stat("ms", big["status"])
    ratio = s200.median / s10.median
    rows.append(("`trainsup status` round trip (table view, decoded), 200 jobs", f"{fmt(s200.median)} ms",
                 f"10 jobs: {fmt(s10.median)} ms", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5))
    j10, j200 = Stat("ms", small["status_json"]), Stat("ms", big["status_json"])
    rows.append(("`status --json` round trip (full shape), 200 jobs", f"{fmt(j200.median)} ms",
                 f"10 jobs: {fmt(j10.median)} ms", f"{j200.median / j10.median:.2f}x", "(none)", True))
    r10, r200 = Stat("ms", small["render"]), Stat("ms", big["render"])
    rows.append(("  the table drawn from it (format_status), 200 jobs", f"{fmt(r200.median)} ms",
                 f"10 jobs: {fmt(r10.median)} ms", f"{r200.median / r10.median:.2f}x", "(none)", True))
    if args.status_only:
        return _print(rows)
    sc = Stat("ms", big["scrape"])
    rows.append((f"metrics scrape, 200 jobs ({big['samples']} samples)", f"{fmt(sc.median)} ms",
                 f"p95 {fmt(sc.p95)} ms", "", "<= 50 ms", sc.median <= 50))
    pct = 100 * big["scrape_cpu_s"] / SCRAPE_INTERVAL
    rows.append(("daemon CPU per 15 s scrape, 200 jobs", f"{pct:.3f}% of a core",
                 f"{fmt(big['scrape_cpu_s'] * 1e3)} ms CPU per scrape; idle {max(0.0, big['idle_core_pct']):.2f}%",
                 "", "< 0.5%", pct < 0.5))
    with workdir("ops-hooks") as rh:
        # Short alternating blocks: the shared machine's drift hits both alike.
        plain, hooked = relaunch_with_and_without_hooks(rh, 10, 4 if args.quick else 12)
    p, h = Stat("ms", plain), Stat("ms", hooked)
    delta = h.median - p.median
    rows.append(("crash -> relaunch with a crash hook", f"{fmt(h.median)} ms (n={h.n})",
                 f"no hook: {fmt(p.median)} ms (n={p.n})", f"{delta:+.3f} ms", "+-0.5 ms", abs(delta) <= 0.5))
    return _print(rows)


def _print(rows: list) -> int:
    header = ("what", "ours", "peer (same run)", "vs", "limit", "met")
    table = [header] + [(a, b, c, d, e, "yes" if ok else "NO") for a, b, c, d, e, ok in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
