"""Long work on a job's files takes turns with other jobs' work, and stops when it is no
longer wanted.

Found: two manifests listing a huge file kept the daemon's only two pool threads hashing;
another user's save was not confirmed within 60 s (0.1 s before), and the daemon was
still alive 40 s after SIGTERM. Here the bytes are real (a dense file on disk, not holes)
and the disk is slow: TRAINSUP_TEST_SLOW_READ_BPS makes each byte a verdict reads take as
long as on an 8 MiB/s disk (budget.py), so two 384 MiB checkpoints stand for two 100 GiB
ones on a fast disk: each holds a worker for about 48 s.

Asserted, as their users would check:
- job B's 4 KiB saves, while jobs A1 and A2 validate, are listed valid by `trainsup
  checkpoints` within a few seconds over what the same saves took before A1 and A2
  came (the floor, measured in the same run), while both validations are still under way;
- A1's job file removed: its validation ends within seconds (the daemon's log says so);
- SIGTERM while A2's validation runs: the daemon ends within its jobs' stop timeout and
  leaves no checkpoint worker busy.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

from conftest import REPO, wait_for

sys.path.insert(0, str(REPO / "tests" / "helpers"))
from dense_checkpoint import write_dense_checkpoint  # noqa: E402

SAVER = REPO / "tests" / "helpers" / "plain_saver.py"
BIG = 384 << 20
READ_BPS = 8 << 20
STOP_TIMEOUT_S = 5


def _listed_valid(daemon, job: str) -> set[int]:
    r = daemon.request("checkpoints", job, timeout=30)
    if not r["ok"]:
        return set()
    return {c["step"] for c in r["result"] if c.get("valid") and c.get("step") is not None}


def _indexed(daemon, job: str) -> bool:
    return f"{job}: checkpoint step=1 " in daemon.log_text()


def _job(name: str, root: Path, command: str, extra: str = "") -> str:
    return (f"name: {name}\nworkdir: {root}\nstop_timeout: {STOP_TIMEOUT_S}s\ncommand: {command}\n"
            f"checkpoint:\n  dir: {root / (name + '-ck')}\n  keep_last: 1000\n{extra}"
            f"emergency_save:\n  grace: 0s\n")


def test_long_validations_take_turns_and_stop_when_no_longer_wanted(daemon):
    root = daemon.root
    for name in ("a1", "a2"):
        write_dense_checkpoint(root / f"{name}-ck", BIG, name.encode())
    log_b = root / "saves.jsonl"
    daemon.write_job("b", _job("b", root, json.dumps([sys.executable, str(SAVER), "--every", "0.5",
                                                       "--size", "4096", "--log", str(log_b)])))
    daemon.start(env={"TRAINSUP_TEST_SLOW_READ_BPS": str(READ_BPS)})
    daemon.wait_state("b", "running", timeout=30)

    seen: dict[int, float] = {}          # B's step -> when `checkpoints b` first listed it valid
    stop = threading.Event()

    def watch_b() -> None:
        while not stop.is_set():
            now = time.time()
            for step in _listed_valid(daemon, "b"):
                seen.setdefault(step, now)
            time.sleep(0.05)

    def saves() -> list[dict]:
        return [json.loads(line) for line in log_b.read_text().splitlines()]

    def latency(s: dict) -> float:
        return seen[s["step"]] - s["landed"] if s["step"] in seen else float("inf")

    tb = threading.Thread(target=watch_b, daemon=True)
    tb.start()
    try:
        # the floor: B's saves alone
        wait_for(lambda: len([s for s in saves() if s["step"] in seen]) >= 6, 60, "B's first saves confirmed")
        floor = max(latency(s) for s in saves()[1:6])

        sleeper = json.dumps([sys.executable, "-c", "import time; time.sleep(3600)"])
        daemon.write_job("a1", _job("a1", root, sleeper))
        daemon.write_job("a2", _job("a2", root, sleeper))
        assert daemon.request("reload", timeout=60)["ok"]
        wait_for(lambda: {"a1", "a2"} <= {j["name"] for j in daemon.request("status")["result"]["jobs"]},
                 30, "A1 and A2 loaded")
        from_ = time.time() + 1.0           # their first scans have begun by then
        wait_for(lambda: len([s for s in saves() if s["landed"] >= from_ and s["step"] in seen]) >= 10,
                 60, "ten of B's saves confirmed while A1 and A2 validate")
        watched = [s for s in saves() if s["landed"] >= from_ and s["step"] in seen][:10]
        # both validations still under way when the last of those was confirmed (the log
        # names each checkpoint once indexed; `checkpoints a1` would wait for the scan)
        assert not _indexed(daemon, "a1") and not _indexed(daemon, "a2"), \
            "a validation ended before ten of B's saves were confirmed during it (B waited for it?)"
        took = [round(latency(s), 2) for s in watched]
        assert max(took) <= floor + 5.0, \
            f"B's saves confirmed in {took} s while A1 and A2 validated (floor {floor:.2f} s)"
    finally:
        stop.set()
        tb.join(60)

    # A1 removed: its validation ends, and says so
    (daemon.jobs / "a1.yaml").unlink()
    t = time.monotonic()
    assert daemon.request("reload", timeout=60)["ok"]
    wait_for(lambda: "job a1: checkpoint work cancelled" in daemon.log_text(), 30,
             "A1's validation cancelled once its job was removed", detail=lambda: daemon.log_text()[-3000:])
    removed_s = time.monotonic() - t
    assert "job a2: checkpoint work cancelled" not in daemon.log_text()
    assert not _indexed(daemon, "a2"), "A2's validation ended before the stop: nothing was proved"

    # SIGTERM while A2 validates: the daemon ends, no worker left busy
    t = time.monotonic()
    assert daemon.terminate(timeout=60) == 0
    took_stop = time.monotonic() - t
    text = daemon.log_text()
    assert took_stop <= STOP_TIMEOUT_S + 5, f"the daemon took {took_stop:.1f}s to end on SIGTERM"
    assert re.search(r"job a2: checkpoint work cancelled after [\d.]+s \(the daemon stops\)", text), text[-3000:]
    assert "worker threads still busy" not in text, text[-3000:]
    print(f"floor {floor:.3f}s, with A1+A2 validating max {max(took):.3f}s; "
          f"removed->cancelled {removed_s:.2f}s; SIGTERM->exit {took_stop:.2f}s")
