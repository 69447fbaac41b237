"""Text rendering of what the daemon answers: tables and human units. Pure functions of
the reply dicts; imported by the CLI and the demo (neither imports the other)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from ..contract import iso_utc
from ..control.protocol import table_rows


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def human_age(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# State colours for a terminal (the CLI decides whether it is one; NO_COLOR wins).
_SGR = {"running": "32", "finished": "32", "saving": "36", "starting": "36", "stopping": "36",
        "backoff": "33", "pending": "33", "stopped": "2", "preempted": "33",
        "failed": "1;31", "invalid": "1;31"}


def paint(text: str, state: str) -> str:
    code = _SGR.get(state.split()[0] if state else "", "")
    if "over-quota" in state:
        code = "1;31"
    return f"\x1b[{code}m{text}\x1b[0m" if code else text


def table(rows: Sequence[Sequence[str]], colour_column: int | None = None) -> list[str]:
    """Left-aligned columns two spaces apart; the first row is the header. With
    `colour_column`, that column's cells are coloured by their text (after padding, so
    the escape codes never break the alignment)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(r, widths)]
        if colour_column is not None and n > 0:
            cells[colour_column] = paint(cells[colour_column], r[colour_column])
        out.append("  ".join(cells).rstrip())
    return out




Val = str | float | int | None      # a field of either view


def _num(x: Val) -> float | None:
    """A number from either view: None, "" (table view) and 0 are "not set"."""
    if x is None or x == "":
        return None
    return float(x) or None


def _cells(name: str, state: str, pid: Val, uptime: float | None, restarts: Val, has_ck: bool,
           step: Val, latest: str | None, age: float | None, invalid: Val, nbytes: Val,
           quota: Val, over: bool, rss: Val, limit: Val) -> tuple[str, ...]:
    if step is not None and step != "":
        ckpt = f"step {step}, {human_age(age)} ago"
    elif latest:
        # A valid checkpoint without a step number (a torch file): by name.
        ckpt = f"{latest.rstrip('/').rsplit('/', 1)[-1]}, {human_age(age)} ago"
    else:
        ckpt = "none" if has_ck else "-"
    if _num(invalid):
        ckpt += f" ({invalid} invalid)"
    quota_n, rss_n, limit_n = _num(quota), _num(rss), _num(limit)
    disk = f"{human_bytes(None if nbytes is None or nbytes == '' else float(nbytes))}/" \
           f"{human_bytes(quota_n) if quota_n else '-'}" if has_ck else "-"
    memtxt = human_bytes(rss_n) if rss_n else "-"
    if limit_n:
        memtxt += f"/{human_bytes(limit_n)}"
    if over:
        state += " over-quota"
    return (name, state, str(pid or "-"), human_age(uptime), str(restarts or 0), ckpt, disk, memtxt)


def _notes(name: str, j: dict) -> list[str]:
    notes = []
    if j.get("error"):
        notes.append(f"  {name}: {j['error']}")
    for w in j.get("warnings") or []:
        notes.append(f"  {name}: warning: {w}")
    ln = j.get("last_notice")
    if ln and ln.get("outcome"):
        notes.append(f"  {name}: last notice at {iso_utc(ln['at'])}: {ln.get('source')} -> {ln.get('outcome')}"
                     + (f" (step {ln['step']} in {ln.get('save_s')}s)" if ln.get("step") is not None else ""))
    return notes


def format_status(result: dict, colour: bool = False) -> str:
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CHECKPOINT", "DISK/QUOTA", "MEMORY")]
    notes: list[str] = []
    now = time.time()
    if "rows" in result:          # the table view
        by_job = result.get("notes") or {}
        for (name, state, pid, started, restarts, has_ck, nbytes, rss, _crashes, step, latest, mtime,
             invalid, quota, over, limit) in table_rows(result):
            rows.append(_cells(name, state, pid, _since(now, float(started)) if started else None, restarts,
                               bool(has_ck), step, latest, _since(now, float(mtime)) if mtime else None, invalid,
                               nbytes, quota, bool(over), rss, limit))
            notes += _notes(name, by_job.get(name) or {})
    for j in result.get("jobs") or ():     # the full shape (--json's), ages included
        ck = j.get("checkpoint") or {}
        mem = j.get("memory") or {}
        rows.append(_cells(j["name"], j["state"], j.get("pid"), j.get("uptime_s"), j.get("restarts"),
                           bool(ck), ck.get("step"), ck.get("latest"), ck.get("age_s"), ck.get("invalid"),
                           ck.get("bytes"), ck.get("quota"), bool(ck.get("over_quota")), mem.get("rss"),
                           mem.get("limit")))
        notes += _notes(j["name"], j)
    daemon = result.get("daemon") or {}
    head = [f"notice in force: {n['source']} {n['kind']}"
            + (f", deadline {n['deadline_iso']}" if n.get("deadline_iso") else "")
            + (f" ({n['detail']})" if n.get("detail") else "") for n in daemon.get("notices") or []]
    head += [f"{s['source']}: {s['error']} since {s['since_iso']}" for s in daemon.get("sources") or []
             if not s.get("ok")]
    head += [f"warning: {w}" for w in daemon.get("warnings") or []]
    return "\n".join(head + table(rows, 1 if colour else None) + notes)


def _since(now: float, t: float | None) -> float | None:
    return None if t is None else max(0.0, now - t)


def format_checkpoints(entries: Iterable[dict]) -> str:
    entries = list(entries)
    mirrored = any("mirrored" in c for c in entries)      # a job with checkpoint.mirror
    rows = [("STEP", "SIZE", "VALID", "KEPT", *(("MIRROR",) if mirrored else ()), "REASON", "PATH")]
    for c in entries:
        valid = "yes" if c["valid"] else f"no: {c['invalid_reason']}"
        rows.append((str(c["step"]) if c["step"] is not None else "-", human_bytes(c["bytes"]), valid,
                     c["kept"] or "-", *((c.get("mirrored") or "-",) if mirrored else ()),
                     c["reason"] or "-", c["path"] + _alias_note(c)))
    return "\n".join(table(rows))


def _alias_note(c: dict) -> str:
    """` (latest: same as iter_epoch_3)` for a name the framework rewrites."""
    if not c.get("alias"):
        return ""
    return f" ({c['alias']}: same as {c['alias_of']})" if c.get("alias_of") else f" ({c['alias']})"
