"""The control verbs' handlers: what each request does to the daemon's jobs.

The control server frames, authorizes and dispatches; the daemon owns the jobs; this
module is the layer between them. Handlers run on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Optional

from . import __version__
from .control import Connection, Peer, RequestError
from .render import iso_utc
from .job import Job, State

if TYPE_CHECKING:
    from .daemon import Daemon


class Commands:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon

    def job(self, name: Optional[str]) -> Job:
        if not name:
            raise RequestError("this command needs a job name")
        job = self.d.jobs.get(name)
        if job is None:
            if name in self.d.invalid:
                raise RequestError(f"job {name} is invalid: {self.d.invalid[name].errors[0]}")
            raise RequestError(f"no such job: {name}")
        return job

    def status(self, name: Optional[str] = None) -> dict:
        d = self.d
        jobs = [j.status() for j in d.jobs.values() if name is None or j.name == name]
        for inv in d.invalid.values():
            if name is not None and inv.name != name:
                continue
            jobs.append({"name": inv.name, "state": "invalid", "pid": None, "attempt": 0, "restarts": 0,
                         "last_exit": None, "checkpoint": None, "memory": None,
                         "error": "; ".join(inv.errors), "source": str(inv.source)})
        if name is not None and not jobs:
            raise RequestError(f"no such job: {name}")
        jobs.sort(key=lambda j: j["name"])
        warnings = []
        if not d.spec.jobs_dir.is_dir():
            warnings.append(f"jobs dir {d.spec.jobs_dir} does not exist: no job files are read "
                            "(create it, or pass --jobs)")
        notices = [{"source": n.source, "kind": n.kind, "detail": n.detail, "deadline": n.deadline,
                    "deadline_iso": iso_utc(n.deadline) if n.deadline else None}
                   for n in d.notices_in_force()]
        return {"daemon": {"pid": os.getpid(), "version": __version__,
                           "uptime_s": round(time.monotonic() - d.started_mono, 1),
                           "rss": d.own_rss(), "socket": str(d.spec.socket),
                           "metrics": d.metrics_address(), "warnings": warnings, "notices": notices,
                           "sources": list(d.source_health.values())},
                "jobs": jobs}

    async def handle(self, req: dict, peer: Peer, conn: Connection) -> Any:
        cmd, name, args = req["cmd"], req["job"], req["args"]
        d = self.d
        if cmd == "ping":
            return {"pid": os.getpid(), "version": __version__}
        if cmd == "status":
            return self.status(name)
        if cmd == "reload":
            return await d.reload()
        if cmd == "preempt" and args.get("all"):
            grace = _float_arg(args, "grace")
            outs = await asyncio.gather(*(j.stop(save=True, final=State.PREEMPTED, grace=grace, source="preempt")
                                          for j in list(d.jobs.values()) if j.alive or j.state == State.BACKOFF))
            return {"jobs": len(outs), "outcomes": outs}
        job = self.job(name)
        if cmd == "start":
            if job.alive:
                raise RequestError(f"job {name} is already {job.state.value}")
            notice = d.active_preemption()
            if notice is not None and not args.get("force"):
                deadline = f", deadline {iso_utc(notice.deadline)}" if notice.deadline else ""
                raise RequestError(f"a {notice.source} {notice.kind} notice is in force{deadline}: "
                                   f"{name} would be stopped again (start --force to start anyway)")
            job.start(reason="manual")
            return job.status()
        if cmd in ("stop", "preempt"):
            grace = _float_arg(args, "grace")
            final = State.PREEMPTED if cmd == "preempt" else State.STOPPED
            if not job.active:
                raise RequestError(f"job {name} is not running (state {job.state.value})")
            return await job.stop(save=not args.get("no_save"), final=final, grace=grace, source=cmd)
        if cmd == "restart":
            if job.alive or job.busy:
                return await job.stop(save=not args.get("no_save"), then_restart="manual", source="restart")
            job.start(reason="manual")
            return job.status()
        if cmd == "checkpoint":
            return await self._checkpoint(job, args)
        if cmd == "checkpoints":
            return self._checkpoints(job)
        if cmd in ("pin", "unpin"):
            step = args.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise RequestError(f"{cmd}: step must be an integer")
            if cmd == "pin":
                if not any(i.step == step for i in job.checkpoints):
                    raise RequestError(f"job {name} has no checkpoint at step {step}")
                job.pin(step)
            else:
                job.unpin(step)
            await d.rotation.run()      # `checkpoints` shows the new verdicts at once
            return {"pinned": sorted(job.pinned)}
        if cmd == "history":
            n = args.get("n", 50)
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise RequestError("history: n must be a positive integer")
            return d.db.events(name, min(n, 10000))
        if cmd == "logs":
            n = args.get("n", 100)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise RequestError("logs: n must be a non-negative integer")
            text = job.log.tail(min(n, 100000))
            if not args.get("follow"):
                return {"text": text}
            return await self._follow(job, text, conn)
        raise RequestError(f"unknown command {cmd}")

    async def _checkpoint(self, job: Job, args: dict) -> dict:
        if not job.alive:
            raise RequestError(f"job {job.name} is not running (state {job.state.value})")
        sent, fut = job.request_save()
        if not sent:
            raise RequestError(f"no process of job {job.name} catches {job.spec.emergency_save.signal}")
        if not args.get("wait"):
            return {"signalled": sent}
        timeout = _float_arg(args, "timeout") or job.spec.emergency_save.grace
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"no new valid checkpoint of {job.name} within {timeout:g}s") from None
        latest = job.ckpts.latest_valid()
        return {"signalled": sent, "step": latest.step if latest else None,
                "path": str(latest.path) if latest else None}

    async def _follow(self, job: Job, text: str, conn: Connection) -> dict:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        job.log.followers.add(q)
        try:
            await conn.send({"ok": True, "result": {"text": text, "more": True}})
            while True:
                data = await q.get()
                await conn.send({"ok": True, "result": {"text": data.decode(errors="replace"), "more": True}})
        finally:
            job.log.followers.discard(q)

    def _checkpoints(self, job: Job) -> list:
        kept = job.ckpts.kept
        out = []
        for i in job.checkpoints:
            out.append({"path": str(i.path), "step": i.step, "bytes": i.bytes, "valid": i.valid,
                        "invalid_reason": i.invalid_reason, "kept": kept.get(str(i.path)), "reason": i.reason,
                        "format": i.format, "metrics": dict(i.metrics), "mtime": i.mtime})
        return out


def _float_arg(args: dict, key: str) -> Optional[float]:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
        raise RequestError(f"{key} must be a non-negative number of seconds")
    return float(v)
