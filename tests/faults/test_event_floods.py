"""The loop that answers `status` is never made to wait by a burst of work elsewhere (issue 11).

Found by the deletion benchmark (`status` during the deletion of a 10 GiB checkpoint of
20,000 files): one round trip took 1.55 s. Profiled (py-spy on the daemon): watchdog walks
a directory moved into a recursively watched dir and reports each of its files, and every
report became a callback on the loop and a scan task (20,000 of each, 0.1-0.6 s per burst).
A commit of the state database also ran on the loop; a commit waits for a disk that is
busy, or for another process that holds the database (a backup, `sqlite3` by hand).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import scaled, wait_for
from trainsup.checkpoint import MemoryVerdictCache, write_checkpoint
from trainsup.control.client import request
from trainsup.daemon.checkpoints import JobCheckpoints
from trainsup.spec import CheckpointSpec


def test_a_many_file_entry_moved_in_costs_a_few_scans_not_one_per_file(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    write_checkpoint(ck, 1, {"w": b"1"})
    stage = tmp_path / "stage" / "step-00000002"
    stage.mkdir(parents=True)
    for i in range(5000):
        (stage / f"s{i:05d}").write_bytes(b"x")
    scans = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2) as pool:
            jc = JobCheckpoints("flood", CheckpointSpec(dir=ck), loop, pool, MemoryVerdictCache(),
                                on_index=lambda infos, err: scans.append(len(infos)), on_scanned=lambda: None)
            calls = []
            real_refresh = jc.refresh

            def counted(*a, **k):           # every scan task the loop is given
                calls.append(1)
                return real_refresh(*a, **k)
            jc.refresh = counted
            jc.watch()
            try:
                await jc.refresh()
                before = len(calls)
                os.rename(stage, ck / "step-00000002")
                # watchdog reports the 5,000 files inside the moved dir, one by one
                deadline = time.monotonic() + scaled(30)
                while not any(i.name == "step-00000002" for i in jc.infos) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)      # let every report of the burst arrive
                while jc._running:
                    await asyncio.sleep(0.05)
                return len(calls) - before
            finally:
                jc.close()

    n = asyncio.run(main())
    assert any(s == 2 for s in scans), "the moved-in entry was never indexed"
    # before: one callback and one refresh per reported file (thousands, mostly coalesced
    # inside refresh, but each one a task and a wake-up on the loop)
    assert 1 <= n <= 20, f"{n} scan tasks for one entry moved in"


def test_status_answers_and_nothing_is_lost_while_another_process_holds_the_state_db(daemon):
    daemon.fakejob("held", flags="--every 1")
    daemon.start()
    daemon.wait_ready("held")
    db = daemon.state / "state.db"
    # another process takes the write lock and keeps it for 4 s (longer than SQLite's
    # busy timeout of 2 s)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(4); c.execute('COMMIT')\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        out = daemon.cli("stop", "--no-save", "held")      # records events: a commit is due
        took_stop = time.monotonic() - t
        assert out.returncode == 0, out.stderr
        rtts = []
        while holder.poll() is None:
            t = time.monotonic()
            assert request(daemon.socket, "status", None, None, timeout=10)["ok"]
            rtts.append(time.monotonic() - t)
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert rtts, "the holder let go before status was asked"
    # before: each commit on the loop waited out the 2 s busy timeout, then dropped its records
    assert max(rtts) < 1.0, f"status waited {max(rtts):.2f}s for the held database"
    assert took_stop < 1.5, f"stop waited {took_stop:.2f}s for the held database"
    # the records waited and were written once the holder let go: history shows the stop
    wait_for(lambda: any(e["kind"] == "state" and e.get("to") == "stopped" for e in daemon.history("held")),
             10, "the stop in history")
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def test_a_scan_on_the_loop_never_walks_a_many_file_entry(tmp_path, monkeypatch):
    """Found with py-spy in the same benchmark: a dir of few entries is re-scanned on the
    loop (every verdict cached: stat calls only), judged cheap by how long its last scan
    took; the first scan after a 20,000-file entry landed walked it there, 330 ms. Now an
    inline scan gives up past 256 files and the scan runs on the pool."""
    import threading

    from trainsup.checkpoint import validate

    ck = tmp_path / "ck"
    ck.mkdir()
    write_checkpoint(ck, 1, {"w": b"1"})
    walked: list[tuple[str, str, int]] = []
    real = validate.fingerprint

    def spy(path, limit=None):
        try:
            return real(path) if limit is None else real(path, limit)
        finally:
            if path.endswith("step-00000002"):
                walked.append((threading.current_thread().name, path, limit or 0))
    monkeypatch.setattr(validate, "fingerprint", spy)
    stage = tmp_path / "stage" / "step-00000002"
    stage.mkdir(parents=True)
    for i in range(3000):
        (stage / f"s{i:05d}").write_bytes(b"x")

    async def main() -> list:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
            jc = JobCheckpoints("big", CheckpointSpec(dir=ck), loop, pool, MemoryVerdictCache(),
                                on_index=lambda infos, err: None, on_scanned=lambda: None)
            try:
                await jc.refresh()
                await jc.refresh()           # cached and quick: the next one may run inline
                os.rename(stage, ck / "step-00000002")
                await jc.refresh()
                return jc.infos
            finally:
                jc.close()

    infos = asyncio.run(main())
    assert any(i.name == "step-00000002" for i in infos), "the new entry was not indexed"
    full = [w for w in walked if w[0] == threading.main_thread().name and not w[2]]
    assert not full, f"walked in full on the loop's thread: {full}"
    assert any(w[0].startswith("pool") for w in walked), walked


def test_the_pool_threads_keep_the_daemons_priority(daemon):
    """Found: the pool's threads ran at nice 10 so that a woken loop would preempt them. On
    a loaded machine (two CPU hogs beside the hostile-neighbour test) a worker holding the
    GIL waited behind every other process for the CPU while the loop waited for the GIL:
    `status` p99 340 ms against a floor of 6 ms; at the daemon's own priority, with the
    100,000-name dir no longer listed at every scan, 11-14 ms. Every thread of the daemon
    runs at its priority (tests/faults/test_hostile_neighbour.py measures the p99)."""
    daemon.fakejob("nice", flags="--every 1")
    daemon.start()
    daemon.wait_ready("nice")
    assert daemon.proc is not None

    def threads() -> dict[str, int]:
        out = {}
        for tid in os.listdir(f"/proc/{daemon.proc.pid}/task"):
            try:
                with open(f"/proc/{daemon.proc.pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except FileNotFoundError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out[f"{name}/{tid}"] = int(stat[stat.rindex(")") + 2:].split()[16])    # field 19: nice
        return out
    # the job's checkpoints are scanned on the pool: its two threads exist by its first
    # scan (with the loop, the state writer and the inotify reader: 5 threads at least)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = wait_for(lambda: (t := threads()) and len(t) >= 5 and t, 20, "the daemon's threads")
    assert set(seen.values()) == {base}, seen


def test_a_dir_that_changes_during_every_scan_never_holds_a_refresh(tmp_path):
    """Found by the daemon crash storm: at start the daemon awaits one refresh of every
    job's dir before it launches anything. A job taken over (still running) saved into its
    dir faster than the loaded daemon scanned it, each scan ended with "changed meanwhile,
    once more", the refresh never returned, and jobs that were not running were never
    launched. Here every scan sees a real new save land while it runs (the watcher's event
    delivered as it would be): a caller waits for one scan, the rest follows in the
    background until the dir is quiet."""
    ck = tmp_path / "ck"
    ck.mkdir()
    saves = []

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2) as pool:
            jc: JobCheckpoints

            def on_index(infos, err) -> None:
                if len(saves) < 40:              # the job saves again while each scan runs
                    saves.append(write_checkpoint(ck, len(saves) + 1, {"w": b"x"}))
                    jc.changed()

            jc = JobCheckpoints("busy", CheckpointSpec(dir=ck), loop, pool, MemoryVerdictCache(),
                                on_index=on_index, on_scanned=lambda: None)
            try:
                await asyncio.wait_for(jc.refresh(), scaled(10))
                returned_after = len(saves)
                # the background scans catch up with every save once the job stops saving
                await asyncio.wait_for(_until(lambda: len(saves) == 40 and len(jc.infos) == 40), scaled(30))
                return returned_after, len(jc.infos)
            finally:
                jc.close()

    returned_after, indexed = asyncio.run(main())
    assert returned_after < 40, "refresh() waited for the dir to stop changing"
    assert indexed == 40


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.01)
