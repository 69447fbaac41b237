"""The job's lease in the store (daemon/mirror/lease.py, jobmirror.py): create-if-absent is
exclusive, a store outage is never read as the holder being gone, an expired lease is taken
over, and the old holder learns it lost the job (fencing).

The store here is fsspec's memory:// (one process, two "machines": two JobMirror objects
with their own holder ids) behind a fault-injecting wrapper: the issue's prescription for
the lease's fencing, since the GCS emulator does not enforce create-if-absent. The same
lease code runs against moto (S3 If-None-Match) in tests/integration/test_mirror_s3.py."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fsspec")

from trainsup.checkpoint.objectstore import Store  # noqa: E402
from trainsup.daemon.mirror import lease  # noqa: E402
from trainsup.daemon.mirror.jobmirror import JobMirror  # noqa: E402
from trainsup.daemon.mirror.transfer import Transfers  # noqa: E402
from trainsup.spec import CheckpointSpec, MirrorSpec  # noqa: E402

TTL = 3.0       # the waiter polls every ttl/4, the holder renews every ttl/3


class Outage:
    """Every store call fails (a reset connection) while set: the network, not an answer."""

    FAULTED = frozenset({"ls", "cat_file", "pipe_file", "info", "rm_file", "rm", "open"})

    def __init__(self) -> None:
        self.on = threading.Event()


class FaultyFS:
    def __init__(self, fs, outage: Outage) -> None:
        self._fs, self._outage = fs, outage

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in Outage.FAULTED:
            return attr

        def call(*a, **k):
            if self._outage.on.is_set():
                raise ConnectionResetError(104, "Connection reset by peer")
            return attr(*a, **k)
        return call


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_two_machines_racing_for_a_generation_exactly_one_wins(tmp_path, scheme):
    url = f"memory://lease-{uuid.uuid4().hex}/job" if scheme == "memory" else f"file://{tmp_path}/store/job"
    stores = [Store(url) for _ in range(8)]
    won: list[int] = []
    go = threading.Barrier(len(stores))

    def race(i: int) -> None:
        go.wait()
        if lease.take(stores[i], 1, f"machine-{i}", TTL):
            won.append(i)
    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1, won
    view = lease.read_newest(stores[0])
    assert view is not None and view.generation == 1 and view.holder == f"machine-{won[0]}"


def _mirror(name: str, url: str, transfers: Transfers, outage: Outage, state: Path, lost: list) -> JobMirror:
    spec = CheckpointSpec(dir=state / "ckpt", mirror=MirrorSpec(url=url, restore="never", lease=True, lease_ttl=TTL))
    events: list = []
    m = JobMirror("job", spec, transfers, SimpleNamespace(custody=None, latest_valid=lambda: None),
                  lambda kind, **kw: events.append((kind, kw)), lambda line: None, state / name, lost.append)
    m.events = events          # type: ignore[attr-defined]
    m.store = Store(url)
    m.store.fs = FaultyFS(m.store.fs, outage)
    return m


async def _until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def test_an_outage_is_never_read_as_expiry_and_an_expired_holder_is_fenced(tmp_path):
    async def scenario() -> None:
        url = f"memory://lease-{uuid.uuid4().hex}/job"
        transfers = Transfers(asyncio.get_running_loop())
        out_a, out_c, lost_a, lost_c = Outage(), Outage(), [], []
        a = _mirror("a", url, transfers, out_a, tmp_path, lost_a)
        c = _mirror("c", url, transfers, out_c, tmp_path, lost_c)
        try:
            await a.before_launch()
            assert a.lease_gen == 1
            waiting = asyncio.ensure_future(c.before_launch())
            await _until(lambda: c.waiting_for == a.me, 10, "C to wait, naming A")
            # The store is unreachable for longer than the ttl, for both machines: A cannot
            # renew, C cannot read. It answers C again a little before A (C reads the
            # unchanged object before A's next renewal lands): C must watch a whole ttl
            # more, and A's renewal shows A is alive.
            out_a.on.set()
            out_c.on.set()
            await asyncio.sleep(1.5 * TTL)
            out_c.on.clear()
            await asyncio.sleep(0.3 * TTL)
            out_a.on.clear()
            await asyncio.sleep(2 * TTL)
            assert not waiting.done() and c.lease_gen is None, c.events          # type: ignore[attr-defined]
            assert a.lease_gen == 1 and not lost_a
            assert any(k == "upload-failed" for k, _ in c.events)                # type: ignore[attr-defined]
            # A's machine dies (no renewals): C takes the lease over once it is seen unchanged a ttl
            a.closed = True
            if a._renew is not None:
                a._renew.cancel()
            await asyncio.wait_for(waiting, 10 * TTL)
            assert c.lease_gen == 2
            taken = [kw for k, kw in c.events if k == "lease" and kw["action"] == "taken"]  # type: ignore[attr-defined]
            assert taken and taken[-1]["expired_holder"] == a.me, taken
            # A comes back: its next renewal finds generation 2 and stops the job (fencing)
            a.closed = False
            a._renew_now()
            await _until(lambda: bool(lost_a), 10, "A to learn it lost the lease")
            assert c.me in lost_a[0] and a.lease_gen is None
            assert not lease.take(a.store, 2, a.me, TTL)          # generation 2 is C's, atomically
            assert not lost_c and c.lease_gen == 2
        finally:
            for m in (a, c):
                m.closed = True
                for h in (m._renew, m._retry):
                    if h is not None:
                        h.cancel()
            transfers.close()

    asyncio.run(scenario())


def test_a_file_store_makes_the_dirs_an_object_store_does_not_have(tmp_path):
    """Found through `trainsup run` with `url: file://...`: every upload failed, "not
    found", because a local filesystem needs the object's parent dirs and an object store
    has none. Small objects, streamed ones and the listing all work below a fresh root."""
    store = Store(f"file://{tmp_path}/store/job")
    store.write_bytes("commits/000001.json", b"{}")
    with store.open_write("data/000001/step-1/part.bin", 1 << 20) as f:
        f.write(b"x" * 10)
    assert store.read_bytes("commits/000001.json", 10) == b"{}"
    assert (tmp_path / "store/job/data/000001/step-1/part.bin").read_bytes() == b"x" * 10
    assert [e.name for e in store.listdir("commits")] == ["000001.json"]
