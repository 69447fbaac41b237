"""Long work on one job's files against another job's save confirmations, and its cancellation.

Jobs A1 and A2 each hold a committed checkpoint of one dense file that the daemon
validates at first scan; job B saves a 4 KiB checkpoint every 0.5 s. The disk is made slow
(TRAINSUP_TEST_SLOW_READ_BPS, 8 MiB/s: each byte a verdict reads waits as on such a disk;
the bytes are really read) so that a 192 MiB checkpoint stands for a 100 GiB one on a fast
disk: each validation holds a worker for about 24 s. Measured, each against its peer in
the same run:

- B's save landed -> indexed valid (the daemon's `checkpoint` event) while A1 and A2
  validate, against B's own saves before A1 and A2 came; with turns (this tree) and with
  TRAINSUP_POOL_SLICE_S=inf (no turns: how the pool worked before);
- A1's job file removed -> its validation cancelled (the log line), against the reload's
  own round trip and the read time of one 2 MiB chunk at that disk speed;
- SIGTERM -> exit while A2 validates, against SIGTERM -> exit of a daemon with B only.

    .venv/bin/python tests/bench/bench_long_work.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import PY, REPO, WORK_DIR, Section, Stat, job_yaml, poll, running_daemon, workdir  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "helpers"))
from dense_checkpoint import write_dense_checkpoint  # noqa: E402

SAVER = REPO / "tests" / "helpers" / "plain_saver.py"
BIG = 192 << 20
READ_BPS = 8 << 20
CHUNK = 2 << 20             # format._STREAM_CHUNK: one tick per chunk hashed
WINDOW_S = 8.0              # B's saves watched while A1 and A2 validate (with turns)


def b_job(root: Path, log: Path) -> str:
    return job_yaml("b", [PY, str(SAVER), "--every", "0.5", "--size", "4096", "--log", str(log)],
                    workdir=root, ckpt_dir=root / "b-ck", extra="stop_timeout: 5s\nemergency_save:\n  grace: 0s\n")


def a_job(root: Path, name: str) -> str:
    return job_yaml(name, [PY, "-c", "import time; time.sleep(3600)"], workdir=root,
                    ckpt_dir=root / f"{name}-ck", extra="stop_timeout: 5s\nemergency_save:\n  grace: 0s\n")


def indexed_at(d, job: str) -> dict[int, float]:
    return {e["step"]: e["at"] for e in d.history(job, 500) if e["kind"] == "checkpoint" and e.get("step") is not None}


def saves(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines()]
    except FileNotFoundError:
        return []


def latencies_ms(d, log: Path, lo: float, hi: float) -> list[float]:
    at = indexed_at(d, "b")
    return [(at[s["step"]] - s["landed"]) * 1e3 for s in saves(log) if lo <= s["landed"] < hi and s["step"] in at]


def one_run(root: Path, slice_s: str, sec: Section | None) -> tuple[list[float], list[float], dict]:
    """(B alone, B while A1 and A2 validate) latencies in ms, and the cancel figures."""
    for name in ("a1", "a2"):
        write_dense_checkpoint(root / f"{name}-ck", BIG, name.encode())
    log = root / "saves.jsonl"
    out: dict = {}
    with running_daemon(root / "d") as d:
        d.write_job("b", b_job(root, log))
        d.start(env={"TRAINSUP_TEST_SLOW_READ_BPS": str(READ_BPS), "TRAINSUP_POOL_SLICE_S": slice_s})
        d.wait_state("b", "running", timeout=30)
        t_alone = time.time()
        poll(lambda: len(latencies_ms(d, log, t_alone, float("inf"))) >= 12, 60, "B's saves alone")
        alone = latencies_ms(d, log, t_alone, float("inf"))[1:]
        d.write_job("a1", a_job(root, "a1"))
        d.write_job("a2", a_job(root, "a2"))
        assert d.request("reload", timeout=60)["ok"]
        t0 = time.time() + 0.5
        if slice_s == "inf":
            # B's saves wait for a validation to end: those landed before the first ends
            ends = poll(lambda: (x := [indexed_at(d, a).get(1) for a in ("a1", "a2")]) and any(x) and x,
                        120, "a validation to end")
            t_end = min(t for t in ends if t)
            poll(lambda: all(s["step"] in indexed_at(d, "b") for s in saves(log) if t0 <= s["landed"] < t_end),
                 60, "B's saves confirmed")
            return alone, latencies_ms(d, log, t0, t_end), out
        time.sleep(WINDOW_S)
        busy = not indexed_at(d, "a1") and not indexed_at(d, "a2")
        during = latencies_ms(d, log, t0, t0 + WINDOW_S - 1.0)
        assert busy, "a validation ended within the window: make BIG larger"
        # A1 removed: its validation cancelled
        (d.jobs / "a1.yaml").unlink()
        t = time.monotonic()
        assert d.request("reload", timeout=60)["ok"]
        out["reload_s"] = time.monotonic() - t
        poll(lambda: "job a1: checkpoint work cancelled" in d.log_text(), 30, "A1's validation cancelled")
        out["cancel_s"] = time.monotonic() - t
        assert not indexed_at(d, "a2"), "A2's validation ended: make BIG larger"
        t = time.monotonic()
        d.terminate(timeout=60)
        out["term_s"] = time.monotonic() - t
        out["busy_at_exit"] = "worker threads still busy" in d.log_text()
    return alone, during, out


def term_alone(root: Path) -> float:
    log = root / "saves.jsonl"
    with running_daemon(root / "d") as d:
        d.write_job("b", b_job(root, log))
        d.start()
        d.wait_state("b", "running", timeout=30)
        poll(lambda: len(saves(log)) >= 3, 30, "B saving")
        t = time.monotonic()
        d.terminate(timeout=60)
        return time.monotonic() - t


def run(quick: bool = False) -> Section:
    sec = Section("long work")
    with workdir("turns", WORK_DIR) as root:
        print("  with turns...", flush=True)
        (root / "on").mkdir()
        alone, during, out = one_run(root / "on", str(0.05), sec)
        print("  without turns (TRAINSUP_POOL_SLICE_S=inf)...", flush=True)
        (root / "off").mkdir()
        alone_off, during_off, _ = one_run(root / "off", "inf", sec)
        (root / "alone").mkdir()
        term_peer = term_alone(root / "alone")
    sec.add("B's 4 KiB save landed -> indexed, 2 other jobs validating 100 GiB-like ckpts (turns)",
            Stat("ms", during), "B's saves alone (same daemon, before)", Stat("ms", alone), compare="delta",
            latency=True, target="within the floor + 1 s", met=max(during) <= max(alone) + 1000)
    sec.add("the same without turns (TRAINSUP_POOL_SLICE_S=inf, the pool before)",
            Stat("ms", during_off), "B's saves alone (same daemon, before)", Stat("ms", alone_off),
            compare="delta", latency=True)
    sec.add("A1's job file removed -> its validation cancelled (log line)", Stat("s", [out["cancel_s"]]),
            "the reload's round trip", Stat("s", [out["reload_s"]]), compare="delta",
            note=f"one {CHUNK >> 20} MiB chunk at {READ_BPS >> 20} MiB/s reads in {CHUNK / READ_BPS:.2f} s")
    sec.add("SIGTERM -> exit while A2 validates", Stat("s", [out["term_s"]]),
            "SIGTERM -> exit, daemon with job B only", Stat("s", [term_peer]), compare="delta",
            target="no worker busy at exit", met=not out["busy_at_exit"])
    return sec


if __name__ == "__main__":
    run("--quick" in sys.argv)
