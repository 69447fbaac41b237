"""The control verbs' handlers: what each request does to the daemon's jobs.

The control server frames, authorizes and dispatches; the daemon owns the jobs; this
module is the layer between them. Handlers run on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..contract import iso_utc
from ..control.protocol import Encoded, table_row
from ..control.server import Connection, Peer, RequestError
from ..control.verbs import VERBS
from .job import PROC_MAX_AGE, Job, State
from .rowgen import any_change

# More than the state db keeps of one job (state.py trims to 5,000 events): `history --all`
# and `plot JOB` get all of it.
MAX_HISTORY = 10000

if TYPE_CHECKING:
    from .loop import Daemon


@dataclass(frozen=True)
class Request:
    job: str | None
    args: dict
    targets: tuple[str, ...]        # resolved and authorised by the control server
    conn: Connection


class Commands:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self._sampling: asyncio.Future | None = None
        self._table: tuple[Any, bytes] = (None, b"")      # (what it depends on, the joined rows)
        self._sample_next = float("-inf")       # monotonic: when some job's sample ages out
        self._sample_gens: tuple[int, ...] = ()

    def job(self, name: str | None) -> Job:
        if not name:
            raise RequestError("this command needs a job name")
        job = self.d.jobs.get(name)
        if job is None:
            if name in self.d.invalid:
                raise RequestError(f"job {name} is invalid: {self.d.invalid[name].errors[0]}")
            raise self.no_such_job(name)
        return job

    def no_such_job(self, name: str) -> RequestError:
        import difflib  # only for a typo: not imported by every daemon
        close = difflib.get_close_matches(name, list(self.d.jobs) + list(self.d.invalid), n=1, cutoff=0.6)
        return RequestError(f"no such job: {name}" + (f" (did you mean {close[0]}?)" if close else ""))

    def status(self, name: str | None = None) -> dict:
        jobs = [j.status() for j in self.d.jobs.values() if name is None or j.name == name]
        jobs += self._invalid_rows(name)
        if name is not None and not jobs:
            raise self.no_such_job(name)
        jobs.sort(key=lambda j: j["name"])
        return {"daemon": self._daemon_status(), "jobs": jobs}

    def status_table(self, name: str | None = None) -> Encoded:
        """What the `status` table needs, as one encoded reply (render.TABLE_FIELDS): each
        job's row is kept encoded and re-encoded only when it changes, and the joined reply
        is kept while nothing changed, so the reply at 200 jobs costs little more than at 10."""
        d = self.d
        # Kept while no row can have changed (rowgen.py): one count for every job's rows,
        # the set of jobs, the invalid files, and the second (what depends on time alone).
        key = (name, int(time.monotonic() / PROC_MAX_AGE), any_change(), len(d.jobs), tuple(d.invalid.items()))
        if key == self._table[0]:
            joined = self._table[1]
        else:
            rows = [(n, j.status_row()) for n, j in d.jobs.items() if name is None or n == name]
            rows += [(inv.name, (json.dumps(table_row(name=inv.name, state="invalid")).encode(),
                                 json.dumps({"error": inv.errors[0] if inv.errors else "invalid",
                                             "more_errors": max(0, len(inv.errors) - 1),
                                             "source": str(inv.source)}).encode()))
                     for inv in self.d.invalid.values() if name is None or inv.name == name]
            if name is not None and not rows:
                raise self.no_such_job(name)
            rows.sort(key=lambda r: r[0])
            joined = (b'"rows": [' + b",".join(r for _, (r, _) in rows) + b'], "notes": {'
                      + b",".join(json.dumps(n).encode() + b":" + note for n, (_, note) in rows if note) + b"}")
            self._table = (key, joined)
        return Encoded(b'{"daemon": ' + json.dumps(self._daemon_status()).encode() + b", " + joined + b"}")

    def _invalid_rows(self, name: str | None) -> list[dict]:
        return [{"name": inv.name, "state": "invalid", "pid": None, "attempt": 0, "restarts": 0,
                 "last_exit": None, "checkpoint": None, "memory": None,
                 "error": "; ".join(inv.errors), "errors": list(inv.errors), "source": str(inv.source)}
                for inv in self.d.invalid.values() if name is None or inv.name == name]

    def _daemon_status(self) -> dict:
        d = self.d
        warnings = []
        if not d.spec.jobs_dir.is_dir():
            warnings.append(f"jobs dir {d.spec.jobs_dir} does not exist: no job files are read "
                            "(create it, or pass --jobs)")
        if d.metrics_error:
            warnings.append(f"{d.metrics_error}: running without metrics (metrics.required: false)")
        notices = [{"source": n.source, "kind": n.kind, "detail": n.detail, "deadline": n.deadline,
                    "deadline_iso": iso_utc(n.deadline) if n.deadline else None}
                   for n in d.notices_in_force()]
        return {"pid": os.getpid(), "version": __version__,
                "uptime_s": round(time.monotonic() - d.started_mono, 1),
                "rss": d.own_rss(), "socket": str(d.spec.socket), "config": d.config_file,
                "metrics": d.metrics_address(), "metrics_error": d.metrics_error,
                "warnings": warnings, "notices": notices,
                "sources": list(d.source_health.values())}

    async def handle(self, req: dict, peer: Peer, conn: Connection) -> Any:
        """Dispatch by the verb registry: verb `x` is served by `do_x`. `req["targets"]`
        holds the jobs the request was authorised for; handlers act on those only."""
        await self.d.loaded.wait()
        verb = VERBS.get(req["cmd"])
        handler = getattr(self, verb.handler, None) if verb is not None else None
        if handler is None:
            raise RequestError(f"unknown command {req['cmd']}")
        return await handler(Request(req["job"], req["args"], req.get("targets") or (), conn))

    async def do_ping(self, r: Request) -> Any:
        return {"pid": os.getpid(), "version": __version__}

    async def fresh_proc_samples(self) -> None:
        """Bring every running job's /proc sample (stop state, RSS, save-signal handler) to
        within PROC_MAX_AGE, reading /proc in a thread: at 200 jobs those reads take tens of
        milliseconds, which the loop (and every other request) must not wait through. A
        request waits for the read only for a job never sampled in its current attempt;
        otherwise it is served the last sample while the next one is read."""
        d = self.d
        now = time.monotonic()
        gens = (any_change(), len(d.jobs))     # a new attempt moves its job's count
        if now < self._sample_next and gens == self._sample_gens:
            return
        due = [j for j in d.jobs.values() if j.proc_sample_due(now)]
        if not due:
            self._sample_gens, self._sample_next = gens, self._next_sample_due()
            return
        if self._sampling is None or self._sampling.done():
            fut = d.loop.run_in_executor(None, lambda: [(j, j.read_proc()) for j in due])
            fut.add_done_callback(lambda f: self._apply_samples(f, now))
            self._sampling = fut
        if any(j.never_sampled() for j in due):
            await asyncio.shield(self._sampling)

    def _apply_samples(self, fut: asyncio.Future, at: float) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for job, sample in fut.result():
            if sample is not None:
                job.apply_proc(sample, at)
        self._sample_gens = (any_change(), len(self.d.jobs))
        self._sample_next = self._next_sample_due()

    def _next_sample_due(self) -> float:
        return min((j.proc_sample_next() for j in self.d.jobs.values()), default=float("inf"))

    async def do_status(self, r: Request) -> Any:
        await self.fresh_proc_samples()
        if r.args.get("table"):
            return self.status_table(r.job)
        return self.status(r.job)

    async def do_reload(self, r: Request) -> Any:
        return await self.d.reload()

    async def do_reexec(self, r: Request) -> Any:
        from .reexec import reexec  # answered by the new program, on this connection
        return await reexec(self.d, r.conn.writer.get_extra_info("socket").fileno())

    async def do_start(self, r: Request) -> Any:
        job = self.job(r.job)
        if job.alive or job.busy:
            # Idempotent, as supervisorctl and systemctl: the wanted state already holds.
            return {**job.status(), "already": True}
        notice = self.d.active_preemption()
        if notice is not None and not r.args.get("force"):
            deadline = f", deadline {iso_utc(notice.deadline)}" if notice.deadline else ""
            raise RequestError(f"a {notice.source} {notice.kind} notice is in force{deadline}: "
                               f"{r.job} would be stopped again (start --force to start anyway)")
        job.start(reason="manual")
        return job.status()

    async def do_stop(self, r: Request, final: State = State.STOPPED, source: str = "stop") -> Any:
        job = self.job(r.job)
        grace = _float_arg(r.args, "grace")
        if not job.active:
            return {**job.status(), "already": True}       # idempotent: nothing to stop
        return await job.stop(save=not r.args.get("no_save"), final=final, grace=grace, source=source)

    async def do_preempt(self, r: Request) -> Any:
        if not r.args.get("all"):
            return await self.do_stop(r, final=State.PREEMPTED, source="preempt")
        grace = _float_arg(r.args, "grace")
        # The resolved targets, not "every job now": what was authorised is what is done.
        jobs = [j for j in (self.d.jobs.get(n) for n in r.targets) if j is not None]
        moving = [j for j in jobs if j.alive or j.state == State.BACKOFF]
        outs = await asyncio.gather(*(j.stop(save=True, final=State.PREEMPTED, grace=grace, source="preempt")
                                      for j in moving))
        return {"jobs": len(outs), "outcomes": [{"job": j.name, **o} for j, o in zip(moving, outs)]}

    async def do_restart(self, r: Request) -> Any:
        job = self.job(r.job)
        if job.alive or job.busy:
            return await job.stop(save=not r.args.get("no_save"), then_restart="manual", source="restart")
        job.start(reason="manual")
        return job.status()

    async def do_checkpoint(self, r: Request) -> Any:
        return await self._checkpoint(self.job(r.job), r.args)

    async def do_checkpoints(self, r: Request) -> Any:
        job = self.job(r.job)
        await job.ckpts.first_scan()
        return self._checkpoints(job)

    async def do_pin(self, r: Request, pin: bool = True) -> Any:
        job = self.job(r.job)
        step = r.args.get("step")
        verb = "pin" if pin else "unpin"
        if not isinstance(step, int) or isinstance(step, bool):
            raise RequestError(f"{verb}: step must be an integer")
        if pin:
            await job.ckpts.first_scan()        # not "no checkpoint" while the dir is first read
            if not any(i.step == step for i in job.checkpoints):
                raise RequestError(f"job {r.job} has no checkpoint at step {step}")
            job.pin(step)
        else:
            job.unpin(step)
        await self.d.rotation.run(wait_for=job.name)   # `checkpoints` shows the new verdicts at once
        return {"pinned": sorted(job.pinned)}

    async def do_unpin(self, r: Request) -> Any:
        return await self.do_pin(r, pin=False)

    async def do_history(self, r: Request) -> Any:
        n = r.args.get("n", 50)
        if r.args.get("all"):
            n = MAX_HISTORY
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise RequestError("history: n must be a positive integer")
        # a removed job's history too; read off the loop (it waits for queued writes)
        events = await self.d.loop.run_in_executor(None, self.d.db.events, str(r.job), min(n, MAX_HISTORY))
        if not events and r.job not in self.d.jobs and r.job not in self.d.invalid:
            raise self.no_such_job(str(r.job))    # a typo, not an empty history
        return events

    async def do_logs(self, r: Request) -> Any:
        job = self.job(r.job)
        n = r.args.get("n", 100)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RequestError("logs: n must be a non-negative integer")
        text = job.log.tail(min(n, 100000))
        if not r.args.get("follow"):
            return {"text": text}
        return await self._follow(job, text, r.conn)

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
            saved = await asyncio.wait_for(fut, timeout)   # the checkpoint committed after the request
        except asyncio.TimeoutError:
            raise RequestError(f"no new valid checkpoint of {job.name} within {timeout:g}s") from None
        return {"signalled": sent, "step": saved.step, "path": str(saved.path)}

    async def _follow(self, job: Job, text: str, conn: Connection) -> dict:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        job.log.followers.add(q)
        try:
            await conn.send({"ok": True, "result": {"text": text, "more": True}})
            while True:
                data = await q.get()
                await conn.send({"ok": True, "result": {"text": data.decode(errors="replace"), "more": True}})
        finally:
            # A reload that replaced the job moved this follower to the new job's log.
            for j in {job, self.d.jobs.get(job.name)}:
                if j is not None:
                    j.log.followers.discard(q)

    def _checkpoints(self, job: Job) -> list:
        kept = job.ckpts.kept
        out = []
        for i in job.checkpoints:
            out.append({"path": str(i.path), "step": i.step, "bytes": i.bytes, "valid": i.valid,
                        "invalid_reason": i.invalid_reason, "kept": kept.get(str(i.path)), "reason": i.reason,
                        "format": i.format, "metrics": dict(i.metrics), "mtime": i.mtime,
                        # framework entries: aliases (latest, last.ckpt...) and what they duplicate,
                        # the files of a multi-file checkpoint, what a resume is handed
                        "name": i.name, "alias": i.alias_kind, "alias_of": i.alias_of,
                        "members": list(i.members), "resume_path": str(i.resume_path)})
            if job.mirror is not None:        # yes (in the store), uploading, pending, or null
                out[-1]["mirrored"] = job.mirror.mirrored(i)
        return out


def _float_arg(args: dict, key: str) -> float | None:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
        raise RequestError(f"{key} must be a non-negative number of seconds")
    return float(v)
