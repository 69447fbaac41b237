"""A preemption's upload does not wait out the backoff of an earlier store error.

Found: after one failed listing or upload the mirror retried only when its backoff timer
fired, and an emergency save that came meanwhile waited for it too (up to a minute), past a
spot VM's two minutes' notice once the save itself took a while. The job's mirror
(daemon/mirror/jobmirror.py) on a real event loop, with its own threads, a real checkpoint
dir and a memory:// store behind a fault-injecting wrapper (the same one as the lease tests):
the store fails, the mirror backs off for ten minutes here, the store comes back, the
emergency save arrives and must be in the store within seconds."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest

pytest.importorskip("fsspec")

from trainsup.checkpoint import index as ckpt_index  # noqa: E402
from trainsup.checkpoint import write_checkpoint  # noqa: E402
from trainsup.checkpoint.dirhandle import DirHandle  # noqa: E402
from trainsup.checkpoint.objectstore import Store  # noqa: E402
from trainsup.daemon.mirror import jobmirror  # noqa: E402
from trainsup.daemon.mirror.jobmirror import JobMirror  # noqa: E402
from trainsup.daemon.mirror.transfer import Transfers  # noqa: E402
from trainsup.spec import CheckpointSpec, MirrorSpec  # noqa: E402

from tests.conftest import deadline_for  # noqa: E402
from tests.unit.test_mirror_lease import FaultyFS, Outage  # noqa: E402

BACKOFF_S = 600.0


async def _until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + deadline_for(timeout)
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_for(timeout):g}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_a_preemptions_upload_does_not_wait_out_the_backoff_of_an_earlier_store_error(tmp_path, monkeypatch):
    monkeypatch.setattr(jobmirror, "BACKOFF_FIRST_S", BACKOFF_S)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(ckpt, 1, {"state.json": b'{"step": 1}'})

    async def scenario() -> None:
        url = f"memory://backoff-{uuid.uuid4().hex}/job"
        spec = CheckpointSpec(dir=ckpt, mirror=MirrorSpec(url=url, restore="never", lease=False))
        transfers = Transfers(asyncio.get_running_loop())
        held = DirHandle.open(ckpt)
        events: list[tuple[str, dict]] = []
        m = JobMirror("job", spec, transfers, SimpleNamespace(custody=SimpleNamespace(handle=held)),
                      lambda kind, **kw: events.append((kind, kw)), lambda line: None, tmp_path / "state",
                      lambda why: None)
        outage = Outage()
        m.store = Store(url)
        m.store.fs = FaultyFS(m.store.fs, outage)
        try:
            outage.on.set()
            m.on_index(ckpt_index.scan(held, "trainsup"))
            await _until(lambda: m.error is not None and m._retry is not None, 30, "the store error and backoff")
            assert [k for k, _ in events] == ["upload-failed"], events
            backoff_ends = time.monotonic() + BACKOFF_S * 0.9
            outage.on.clear()                       # the store answers again; the mirror waits its backoff

            # the preemption: its notice, then the job's emergency save, then the index sees it
            notice = time.time()
            m.emergency(notice)
            write_checkpoint(ckpt, 2, {"state.json": b'{"step": 2}'}, reason="signal")
            m.on_index(ckpt_index.scan(held, "trainsup"))
            outcome = await asyncio.wait_for(m.wait_uploaded(time.time() + deadline_for(30)), deadline_for(30) + 5)

            assert outcome["uploaded"] is True, (outcome, events)
            assert time.monotonic() < backoff_ends
            ups = [kw for k, kw in events if k == "upload"]
            assert ups and ups[0]["step"] == 2 and ups[0].get("emergency"), events
            assert m._retry is not None             # the backoff was still running: not what sent it
        finally:
            m.closed = True
            if m._retry is not None:
                m._retry.cancel()
            transfers.close()
            held.close()

    asyncio.run(scenario())
