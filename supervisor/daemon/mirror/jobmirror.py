"""One job's mirror, on the daemon's loop: what job.py calls and what status shows.

    on_index(infos)          the index changed: what to upload next (policy.uploads_wanted)
    unuploaded               names rotation keeps while the quota allows (RotationFacts)
    before_launch()          the lease, then a restore when the store is newer (awaited
                             before TRAINSUP_RESUME_FROM is chosen)
    emergency(at)            a preemption: the next save goes to the store first
    wait_uploaded(deadline)  the preemption's outcome: did the save reach the store, when
    job_idle()               the job ended: the last uploads, then the lease is released
    status() / warnings()    newest uploaded step, bytes pending, lag, store errors, lease

Every store call runs on the mirror's threads (transfer.py); this object only decides and
keeps counts. A failing store never stops training: uploads back off and retry, status
says why, and rotation keeps what is not in the store while the quota allows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from ...checkpoint import objectstore
from ...checkpoint.objectstore import Store, StoreError
from ...config.schema import plain_options
from ...spec import CheckpointSpec, MirrorSpec
from ..rowgen import RowFields
from . import layout, lease, policy, restore, upload
from .transfer import QueueFull, Transfers

log = logging.getLogger("trainsup.mirror")

BACKOFF_FIRST_S = 1.0       # after the first store error; doubles with each one after
BACKOFF_MAX_S = 60.0
RESTORE_TRIES = 3
# How long a launch waits for the store's listing: a machine with its own valid checkpoint
# trains from it rather than wait; a fresh one waits longer (the store may hold hours of work).
LIST_WAIT_LOCAL_S = 10.0
LIST_WAIT_FRESH_S = 30.0


def holder_id(state_dir: Path) -> str:
    """Who holds a lease: this machine and this daemon's state dir (a restarted daemon on
    the same machine and state dir recognises its own lease)."""
    return f"{socket.gethostname()}:{state_dir}"


class JobMirror(RowFields):
    ROW_FIELDS: ClassVar[frozenset[str]] = frozenset({"error", "uploaded_key", "waiting_for", "restoring",
                                                      "pending_keys"})

    def __init__(self, job: str, ck: CheckpointSpec, transfers: Transfers, ckpts: Any,
                 record: Callable[..., None], note: Callable[[str], None], state_dir: Path,
                 on_lease_lost: Callable[[str], None]) -> None:
        assert ck.mirror is not None
        self.job = job
        self.ck = ck
        self.spec: MirrorSpec = ck.mirror
        self.url = self.spec.location(job)
        self.transfers = transfers
        self.ckpts = ckpts
        self.record = record
        self.note = note
        self.loop = transfers.loop
        self.me = holder_id(state_dir)
        self.journal_dir = state_dir / "mirror" / job
        self.on_lease_lost = on_lease_lost
        self.store: Store | None = None
        self.remote: dict[str, layout.RemoteEntry] = {}
        self.remote_listed = False
        self.pending: list[policy.Candidate] = []
        self.pending_keys: tuple[str, ...] = ()
        self.infos_by_key: dict[str, Any] = {}
        self.inflight: dict[str, upload.Progress] = {}
        self.uploaded_key: str | None = None
        self.uploaded_at: float | None = None
        self.last_upload_s: float | None = None
        self.error: str | None = None
        self.error_since: float | None = None
        self._fails = 0
        self._retry: asyncio.TimerHandle | None = None
        self._first_seen: dict[str, float] = {}      # key -> wall time first seen valid locally
        self.emergency_at: float | None = None
        self.priority: str | None = None
        self._upload_waiters: list[tuple[str, asyncio.Future]] = []
        # the lease
        self.lease_gen: int | None = None
        self._renewals = 0
        self._renew: asyncio.TimerHandle | None = None
        self.waiting_for: str | None = None
        self._release_task: asyncio.Task | None = None
        self.restoring: upload.Progress | None = None
        self.restore_checked = False
        self._adopt_task: asyncio.Task | None = None
        self.closed = False

    # -- the store, off the loop ------------------------------------------------------------
    async def _run(self, fn: Callable[[], Any], urgent: bool = False) -> Any:
        def call() -> Any:
            if self.store is None:
                # imports fsspec: here; the session the load's probe opened when there is one
                self.store = objectstore.open_store(self.url, plain_options(self.spec.options))
            return fn()
        return await self.transfers.run(self.job, call, urgent=urgent)

    async def sync_remote(self) -> None:
        """List the store's complete checkpoints (commit objects) and read new ones."""
        def work() -> dict[str, layout.RemoteEntry]:
            assert self.store is not None
            found: dict[str, layout.RemoteEntry] = {}
            for e in self.store.listdir(layout.COMMITS):
                key = layout.key_of_commit_name(e.name)
                if key is None:
                    continue
                if key in self.remote:
                    found[key] = self.remote[key]
                    continue
                # not a job path: an object in the store
                data = self.store.read_bytes(layout.commit_rel(key), layout.MAX_COMMIT_BYTES)
                entry = layout.parse_commit(key, data) if data is not None else None
                if entry is not None:
                    found[key] = entry
            return found
        self.remote = await self._run(work)
        self.remote_listed = True

    # -- uploads ----------------------------------------------------------------------------
    @property
    def unuploaded(self) -> frozenset[str]:
        return frozenset(c.name for c in self.pending)

    def keep_remote(self) -> int:
        return self.spec.keep_last or self.ck.keep_last

    def on_index(self, infos: list) -> None:
        if self.closed:
            return
        now = time.time()
        cands: list[policy.Candidate] = []
        by_key: dict[str, Any] = {}
        for i in infos:
            if (not i.valid or i.in_progress or not i.managed or i.unknown or i.alias_of
                    or str(i.path).startswith(str(self.ck.dir) + "/.")):
                continue
            key = layout.entry_key(_rel(self.ck.dir, i.path), i.step, i.mtime)
            by_key[key] = i
            cands.append(policy.Candidate(key, i.name, i.step, i.bytes))
            self._first_seen.setdefault(key, now)
        self.infos_by_key = by_key
        if self.emergency_at is not None:
            fresh = [c for c in cands if by_key[c.key].mtime >= self.emergency_at - 1.0]
            if fresh:
                self.priority = fresh[-1].key
        self._replan(cands)

    def _replan(self, cands: list[policy.Candidate] | None = None) -> None:
        if cands is None:
            cands = [policy.Candidate(k, i.name, i.step, i.bytes) for k, i in self.infos_by_key.items()]
        if not self.remote_listed:
            # Until the store was listed, everything is "not uploaded" (rotation keeps it).
            self.pending = [c for c in cands]
        else:
            self.pending = policy.uploads_wanted(cands, set(self.remote), self.keep_remote(), self.priority)
        self.pending_keys = tuple(c.key for c in self.pending)
        self._kick()

    def _kick(self) -> None:
        if self.closed or (self._retry is not None and self.priority is None):
            return              # backing off; a preemption's save does not wait for the retry
        if self.spec.lease and self.lease_gen is None:
            return              # only the lease holder writes to the store
        if not self.remote_listed:
            if "list" not in self.inflight:
                self.inflight["list"] = upload.Progress()
                task = self.loop.create_task(self._list_then_kick())
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            return
        for c in self.pending:
            if c.key in self.inflight:
                continue
            urgent = c.key == self.priority
            if self._retry is not None and not urgent:
                break
            # one ordinary upload at a time per job (in order); the emergency one beside it
            if not urgent and any(k != self.priority for k in self.inflight):
                break
            self._start_upload(c, urgent)
            if not urgent:
                break

    async def _list_then_kick(self) -> None:
        try:
            await self.sync_remote()
            self._ok()
        except (StoreError, OSError) as e:
            self._failed(e, "listing the store")
        except QueueFull:
            pass
        finally:
            self.inflight.pop("list", None)
        if self.remote_listed:
            self._replan()

    def _start_upload(self, c: policy.Candidate, urgent: bool) -> None:
        info = self.infos_by_key.get(c.key)
        handle = getattr(self.ckpts.custody, "handle", None)
        if info is None or handle is None:
            return
        prog = upload.Progress()
        self.inflight[c.key] = prog
        rel = _rel(self.ck.dir, info.path)
        members = tuple(info.members)
        resume = _rel(self.ck.dir, info.resume_path)
        gen = self.lease_gen
        t0 = time.monotonic()

        def may_commit() -> bool:
            # On the mirror thread, just before the commit object: the lease is read from
            # the store, not only from memory, so a machine whose renewals failed while
            # another took the job over never commits over the new holder's checkpoints.
            if not self.spec.lease:
                return True
            if gen is None or self.lease_gen != gen:
                return False
            assert self.store is not None
            view = lease.read_newest(self.store)
            return view is not None and view.generation == gen and view.holder == self.me

        def work() -> layout.RemoteEntry:
            assert self.store is not None
            return upload.upload_entry(
                self.store, handle, name=info.name, rel=rel, members=members, key=c.key, step=info.step,
                created=info.mtime, reason=info.reason, resume=resume, holder=self.me,
                # the emergency save of a preemption goes at full speed: the machine is leaving
                rate=None if urgent else self.spec.max_rate, progress=prog, journal_dir=self.journal_dir, may_commit=may_commit)

        try:
            fut = self._run(work, urgent=urgent)
        except QueueFull:
            self.inflight.pop(c.key, None)
            return
        task = self.loop.create_task(fut)
        task.add_done_callback(lambda t: self._upload_done(c, t, t0))

    def _upload_done(self, c: policy.Candidate, task: asyncio.Task, t0: float) -> None:
        prog = self.inflight.pop(c.key, None)
        if task.cancelled() or self.closed:
            return
        e = task.exception()
        if e is not None:
            if isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and c.key not in self.infos_by_key):
                # rotated away (the quota needed the room) before it could be uploaded
                self.record("upload-skipped", key=c.key, step=c.step, why=str(e)[:200])
                self._replan()
                return
            self._failed(e, f"uploading {c.name}")
            return
        entry: layout.RemoteEntry = task.result()
        took = time.monotonic() - t0
        self.remote[entry.key] = entry
        if self.uploaded_key is None or entry.key >= self.uploaded_key:
            self.uploaded_key, self.uploaded_at = entry.key, time.time()
        self.last_upload_s = took
        self._ok()
        self.record("upload", step=entry.step, key=entry.key, bytes=entry.bytes, took_s=round(took, 3),
                    url=self.url, **({"emergency": True} if c.key == self.priority else {}),
                    **({"resumed_bytes": prog.resumed} if prog is not None and prog.resumed else {}))
        if c.key == self.priority:
            self.priority = None
        for key, fut in self._upload_waiters:
            if key == entry.key and not fut.done():
                fut.set_result(entry)
        self._upload_waiters = [(k, f) for k, f in self._upload_waiters if not f.done()]
        self._replan()
        self._retention()

    def _ok(self) -> None:
        if self.error is not None:
            self.record("mirror-recovered", url=self.url, failed_for_s=round(time.time() - (self.error_since or 0), 1))
        self.error, self.error_since, self._fails = None, None, 0

    def _failed(self, e: BaseException, what: str) -> None:
        msg = str(e) if isinstance(e, StoreError) else f"{what}: {e}"
        if getattr(e, "kind", "") == "lost":
            self.record("upload-not-committed", why=msg)
        first = self.error is None
        self.error = " ".join(msg.split())[:300]
        if first:
            self.error_since = time.time()
            self.record("upload-failed", url=self.url, error=self.error)
            self.note(f"mirror: {self.error}; training goes on, checkpoints stay local until the store works")
        self._fails += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self._fails - 1, 8))
        if self._retry is None:
            def again() -> None:
                self._retry = None
                self._kick()
            self._retry = self.loop.call_later(delay, again)

    def _retention(self) -> None:
        doomed = policy.remote_doomed(list(self.remote), self.keep_remote())
        if not doomed:
            return
        for k in doomed:
            self.remote.pop(k, None)

        def work() -> None:
            assert self.store is not None
            for k in doomed:
                self.store.remove(layout.commit_rel(k))      # incomplete first: never restored
                self.store.remove_tree(layout.data_rel(k))
        task = self.loop.create_task(self._run(work))

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                self.record("remote-deleted", keys=doomed)
        task.add_done_callback(done)

    # -- preemption ------------------------------------------------------------------------
    def emergency(self, at: float) -> None:
        """A preemption notice: the next checkpoint goes to the store ahead of anything."""
        self.emergency_at = at
        if self.infos_by_key:
            self.on_index(list(self.infos_by_key.values()))

    async def wait_uploaded(self, deadline_wall: float) -> dict:
        """Whether the newest local checkpoint reached the store by the deadline, and how long
        after the notice. The local copy stays either way."""
        t0 = self.emergency_at or time.time()
        self.emergency_at = None
        if self.spec.lease and self.lease_gen is None:
            return {"uploaded": False, "why": "this machine does not hold the lease"}
        newest = max(self.infos_by_key, default=None)
        if newest is None:
            return {"uploaded": False, "why": "no checkpoint to upload"}
        if newest in self.remote:
            return {"uploaded": True, "key": newest, "upload_s": round(self._uploaded_wall(newest) - t0, 3)}
        self._replan()
        if newest not in self.pending_keys and newest not in self.inflight:
            # The store holds something newer (this run restarted from less): never uploaded,
            # so nothing to wait for.
            best = self.remote.get(max(self.remote, default=""))
            return {"uploaded": False, "key": newest,
                    "why": f"the store holds a newer checkpoint (step {best.step if best else '?'}); "
                           "the local copy stays"}
        fut = self.loop.create_future()
        self._upload_waiters.append((newest, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline_wall - time.time()))
        except asyncio.TimeoutError:
            return {"uploaded": False, "key": newest, "why": "not in the store by the deadline"
                    + (f" ({self.error})" if self.error else "") + "; the local copy stays"}
        return {"uploaded": True, "key": newest, "upload_s": round(time.time() - t0, 3)}

    def _uploaded_wall(self, key: str) -> float:
        e = self.remote.get(key)
        return e.uploaded if e is not None else time.time()

    # -- launch: the lease, then a restore ------------------------------------------------
    def needs_prelaunch(self) -> bool:
        return (self.spec.lease and self.lease_gen is None) or not self.restore_checked

    async def before_launch(self, adopting: bool = False) -> str | None:
        """Awaited before the job's index refresh and spawn. Returns the path restored into
        the checkpoint dir, or None. Cancelled with the launch (a stop meanwhile)."""
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        if self.spec.lease:
            await self._acquire_lease(adopting)
            if self.lease_gen is None:
                return None         # taken over while no daemon ran here: the job stops
        restored = None
        if not self.restore_checked and self.spec.restore == "auto":
            restored = await self._maybe_restore()
        self.restore_checked = True
        self._kick()
        return restored

    def adopted(self) -> None:
        """A restarted daemon took over the still-running job: it trains from what it has
        (no restore); the lease, held under this machine's holder id, is taken again before
        anything is committed."""
        self.restore_checked = True
        if self._adopt_task is None or self._adopt_task.done():
            self._adopt_task = self.loop.create_task(self.before_launch(adopting=True))
            self._adopt_task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _acquire_lease(self, adopting: bool = False) -> None:
        """Until this machine holds the lease. adopting: the job is already running here (a
        restarted daemon took it over): another machine's lease means that machine took the
        job over while no daemon ran here, so it is lost, never waited for (two trainers)."""
        clock = policy.ExpiryClock()
        poll = max(0.5, min(5.0, self.spec.lease_ttl / 4))
        while self.lease_gen is None:
            try:
                view = await self._run(lambda: lease.read_newest(self.store), urgent=True)  # type: ignore[arg-type]
                ident = None if view is None else (view.generation, view.holder, view.renewals, view.released)
                d = policy.lease_decision(self.me, view, clock.observe(ident, time.monotonic()), self.spec.lease_ttl)
                if d.action == "take":
                    gen, ttl = d.generation, self.spec.lease_ttl
                    if await self._run(lambda: lease.take(self.store, gen, self.me, ttl), urgent=True):  # type: ignore[arg-type]  # noqa: B023
                        self.lease_gen, self._renewals = d.generation, 0
                        self.waiting_for = None
                        self.record("lease", action="taken", generation=d.generation, url=self.url,
                                    **({"expired_holder": d.holder} if d.holder else {}))
                        self.note(f"mirror: lease taken (generation {d.generation})"
                                  + (f" over from {d.holder}, expired" if d.holder else ""))
                        self._schedule_renew()
                        return
                    continue        # another machine created it first: read again
                if adopting:
                    self.record("lease", action="lost", generation=d.generation, holder=d.holder, url=self.url)
                    self.on_lease_lost(f"the lease on {self.url} is held by {d.holder}, "
                                       "who took the job over while no daemon ran here")
                    return
                if d.holder != self.waiting_for:
                    self.waiting_for = d.holder
                    self.record("lease", action="waiting", holder=d.holder, generation=d.generation, url=self.url)
                    self.note(f"mirror: waiting for the lease on {self.url}: held by {d.holder}")
                self._ok()
            except StoreError as e:
                # Never read as "the other machine is gone": only an unchanged lease is,
                # watched for a whole ttl after the store answers again.
                clock.store_failed()
                self._failed(e, "reading the lease")
            await asyncio.sleep(poll)

    def _schedule_renew(self) -> None:
        if self._renew is not None:
            self._renew.cancel()
        self._renew = self.loop.call_later(self.spec.lease_ttl / 3, self._renew_now)

    def _renew_now(self) -> None:
        self._renew = None
        gen = self.lease_gen
        if gen is None or self.closed:
            return
        self._renewals += 1
        n, ttl = self._renewals, self.spec.lease_ttl

        def work() -> policy.LeaseDecision:
            assert self.store is not None
            view = lease.read_newest(self.store)
            d = policy.lease_decision(self.me, view, 0.0, ttl, mine=gen)
            if d.action == "hold":
                lease.renew(self.store, gen, self.me, n, ttl)
                if n == 1:
                    lease.prune(self.store, gen)
            return d

        task = self.loop.create_task(self._run(work, urgent=True))

        def done(t: asyncio.Task) -> None:
            if t.cancelled() or self.closed or self.lease_gen != gen:
                return
            e = t.exception()
            if e is not None:
                self._failed(e, "renewing the lease")
            elif t.result().action in ("lost", "take", "wait"):
                holder = t.result().holder
                self.lease_gen = None
                self.record("lease", action="lost", generation=gen, holder=holder, url=self.url)
                self.on_lease_lost(f"the lease on {self.url} was taken over by {holder}")
                return
            self._schedule_renew()
        task.add_done_callback(done)

    async def _maybe_restore(self) -> str | None:
        # A machine with a valid checkpoint of its own does not wait out a failing store
        # before training; a fresh one tries a little longer (the store may hold hours of work).
        # What this machine has decides how long the store is waited for: known once its
        # dir was scanned (found: with the first scans in the background, a machine with a
        # valid checkpoint took itself for a fresh one and waited 90 s for a stalled store)
        await self.ckpts.first_scan()
        has_local = self.ckpts.latest_valid() is not None
        tries = 1 if has_local else RESTORE_TRIES
        for attempt in range(tries):
            try:
                # bounded: a stalled store (no answer, no error) never holds the launch
                try:
                    await asyncio.wait_for(self.sync_remote(), LIST_WAIT_LOCAL_S if has_local else LIST_WAIT_FRESH_S)
                except asyncio.TimeoutError:
                    raise StoreError("transient", "listing the store: no answer within "
                                     f"{LIST_WAIT_LOCAL_S if has_local else LIST_WAIT_FRESH_S:g}s") from None
                break
            except StoreError as e:
                self._failed(e, "listing the store")
                if attempt == tries - 1:
                    self.record("restore-failed", url=self.url, error=str(e))
                    return None
                await asyncio.sleep(2.0 * (attempt + 1))
        await self.ckpts.refresh()
        latest = self.ckpts.latest_valid()
        local = policy.LocalNewest(latest.step, latest.mtime) if latest is not None else None
        key = policy.restore_choice(local, [(k, e.step, e.created) for k, e in self.remote.items()],
                                    self.spec.restore)
        if key is None:
            return None
        entry = self.remote[key]
        if self.ckpts.custody is None or self.ckpts.ensure_dir() is not None or self.ckpts.custody.handle is None:
            self.record("restore-failed", key=key, error="checkpoint dir not held")
            return None
        handle = self.ckpts.custody.handle
        prog = upload.Progress()
        self.restoring = prog
        self.note(f"mirror: restoring step {entry.step} ({entry.bytes} bytes) from {self.url}")
        t0 = time.monotonic()
        try:
            for attempt in range(RESTORE_TRIES):
                try:
                    rel = await self._run(lambda: restore.restore_entry(
                        self.store, handle, entry, self.ck.format, self.spec.parallel, prog))  # type: ignore[arg-type]
                    break
                except StoreError as e:
                    if e.kind == "full" or attempt == RESTORE_TRIES - 1:
                        raise
                    await asyncio.sleep(2.0 * (attempt + 1))
        except asyncio.CancelledError:
            prog.cancelled.set()
            raise
        except (StoreError, OSError, ValueError) as e:
            msg = " ".join(str(e).split())[:300]
            self.record("restore-failed", key=key, step=entry.step, error=msg)
            self.note(f"mirror: restore of step {entry.step} failed: {msg}; launching from the local dir")
            self.error, self.error_since = f"restore failed: {msg}", time.time()
            return None
        finally:
            self.restoring = None
        took = time.monotonic() - t0
        self.uploaded_key = max(self.uploaded_key or key, key)
        path = str(self.ck.dir / rel)
        self.record("restore", key=key, step=entry.step, bytes=entry.bytes, took_s=round(took, 3), path=path,
                    url=self.url, uploaded_by=entry.holder)
        self.note(f"mirror: restored step {entry.step} in {took:.1f}s: {path}")
        await self.ckpts.refresh(for_launch=True)
        return path

    # -- the end of a run -----------------------------------------------------------------
    def job_idle(self) -> None:
        """The job stopped, finished or failed: let the last uploads finish (bounded), then
        hand the lease back so another machine need not wait for it to expire."""
        if self.lease_gen is None or self._release_task is not None:
            return
        self._release_task = self.loop.create_task(self._drain_then_release(self.spec.lease_ttl * 2))

    async def _drain_then_release(self, bound: float) -> None:
        end = time.monotonic() + bound
        while (self.pending or self.inflight) and time.monotonic() < end and self.error is None:
            await asyncio.sleep(0.2)
        await self.release()

    async def release(self) -> None:
        gen = self.lease_gen
        if gen is None:
            return
        if self._renew is not None:
            self._renew.cancel()
            self._renew = None
        self.lease_gen = None
        n, ttl = self._renewals + 1, self.spec.lease_ttl
        try:
            await asyncio.wait_for(self._run(lambda: lease.release(self.store, gen, self.me, n, ttl),  # type: ignore[arg-type]
                                             urgent=True), 10.0)
            self.record("lease", action="released", generation=gen, url=self.url)
        except (StoreError, asyncio.TimeoutError, OSError) as e:
            self.record("lease", action="release-failed", generation=gen, error=str(e)[:200])

    async def close(self) -> None:
        """Daemon shutdown: release the lease (bounded), stop."""
        if self._release_task is not None and not self._release_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._release_task), 15.0)
            except (asyncio.TimeoutError, Exception):
                pass
        await self.release()
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        for p in self.inflight.values():
            p.cancelled.set()

    # -- views ---------------------------------------------------------------------------
    def mirrored(self, info: Any) -> str | None:
        """`trainsup checkpoints`: yes (in the store), uploading, pending, or None."""
        if not info.valid or info.in_progress:
            return None
        key = layout.entry_key(_rel(self.ck.dir, info.path), info.step, info.mtime)
        if key in self.remote:
            return "yes"
        if key in self.inflight:
            return "uploading"
        if key in self.pending_keys:
            return "pending"
        return None

    def status(self) -> dict:
        now = time.time()
        newest = self.remote.get(self.uploaded_key) if self.uploaded_key else None
        pending_bytes = sum(c.bytes for c in self.pending) - sum(p.done for k, p in self.inflight.items()
                                                                if k in self.pending_keys)
        lag = max((now - self._first_seen.get(c.key, now) for c in self.pending), default=0.0)
        out: dict[str, Any] = {
            "url": self.url,
            "uploaded_step": newest.step if newest else None,
            "uploaded_key": self.uploaded_key,
            "uploaded_at": self.uploaded_at,
            "pending": len(self.pending), "bytes_pending": max(0, pending_bytes),
            "lag_s": round(lag, 1),
            "error": self.error, "error_since": self.error_since,
            "lease": None if not self.spec.lease else {
                "held": self.lease_gen is not None, "generation": self.lease_gen,
                "waiting_for": self.waiting_for},
        }
        if self.restoring is not None:
            out["restoring"] = {"bytes": self.restoring.total, "done": self.restoring.done}
        return out

    def warnings(self) -> list[str]:
        w = []
        if self.error:
            since = time.strftime("%H:%M:%SZ", time.gmtime(self.error_since or time.time()))
            w.append(f"mirror: store failing since {since}: {self.error} (training goes on; "
                     f"{len(self.pending)} checkpoint(s) kept locally until uploaded)")
        if self.waiting_for:
            w.append(f"mirror: waiting for the lease on {self.url}: held by {self.waiting_for}")
        if self.restoring is not None:
            w.append(f"mirror: restoring from {self.url}: {self.restoring.done}/{self.restoring.total} bytes")
        return w


def _rel(base: Path, path: Any) -> str:
    return os.path.relpath(str(path), str(base))
