"""Text rendering of what the daemon answers: tables and human units. Pure functions of
the reply dicts; imported by the CLI and the demo (neither imports the other)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from ..contract import iso_utc
from ..control.protocol import table_rows
from ..printable import printable


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
    # Every cell may quote a job's text (a file name with terminal escapes rewrote
    # root's terminal): escaped here, before widths are measured.
    rows = [[printable(c) for c in r] for r in rows]
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


def _goodput(pct: Val) -> str:
    """GOODPUT: productive training over wall time since the first launch ("-": never ran)."""
    if pct is None or pct == "":
        return "-"
    return f"{float(pct):.0f}%"


def _cells(name: str, state: str, pid: Val, uptime: float | None, restarts: Val, has_ck: bool,
           step: Val, latest: str | None, age: float | None, invalid: Val, nbytes: Val,
           quota: Val, over: bool, rss: Val, limit: Val, adopted: bool = False,
           goodput: Val = None) -> tuple[str, ...]:
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
    pidtxt = str(pid or "-") + (ADOPTED_MARK if adopted and pid else "")
    return (name, state, pidtxt, human_age(uptime), str(restarts or 0), _goodput(goodput), ckpt, disk,
            memtxt)


ADOPTED_MARK = "*"       # PID column: the process was re-adopted, not launched, by this daemon


def _notes(name: str, j: dict) -> list[str]:
    notes = []
    if j.get("error"):
        more = j.get("more_errors") or 0
        notes.append(f"  {name}: {j['error']}" + (f" (and {more} more: trainsup validate {j['source']})"
                                                   if more and j.get("source") else ""))
    if j.get("config_error"):
        # The job's file broke on a reload: it runs as it was loaded until the file is fixed.
        notes.append(f"  {name}: job file broken, running as last loaded: {j['config_error']}")
    for w in j.get("warnings") or []:
        notes.append(f"  {name}: warning: {w}")
    ln = j.get("last_notice")
    if ln and ln.get("outcome"):
        notes.append(f"  {name}: last notice at {iso_utc(ln['at'])}: {ln.get('source')} -> {ln.get('outcome')}"
                     + (f" (step {ln['step']} in {ln.get('save_s')}s)" if ln.get("step") is not None else ""))
    return notes


def format_status(result: dict, colour: bool = False, overview: bool = True) -> str:
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "GOODPUT", "CHECKPOINT",
                                    "DISK/QUOTA", "MEMORY")]
    notes: list[str] = []
    now = time.time()
    if "rows" in result:          # the table view
        by_job = result.get("notes") or {}
        for (name, state, pid, started, restarts, has_ck, nbytes, rss, _crashes, step, latest, mtime,
             invalid, quota, over, limit, adopted, goodput) in table_rows(result):
            rows.append(_cells(name, state, pid, _since(now, float(started)) if started else None, restarts,
                               bool(has_ck), step, latest, _since(now, float(mtime)) if mtime else None, invalid,
                               nbytes, quota, bool(over), rss, limit, bool(adopted), goodput))
            notes += _notes(name, by_job.get(name) or {})
    for j in result.get("jobs") or ():     # the full shape (--json's), ages included
        ck = j.get("checkpoint") or {}
        mem = j.get("memory") or {}
        rows.append(_cells(j["name"], j["state"], j.get("pid"), j.get("uptime_s"), j.get("restarts"),
                           bool(ck), ck.get("step"), ck.get("latest"), ck.get("age_s"), ck.get("invalid"),
                           ck.get("bytes"), ck.get("quota"), bool(ck.get("over_quota")), mem.get("rss"),
                           mem.get("limit"), bool(j.get("adopted")),
                           _ratio_percent(j.get("goodput"))))
        notes += _notes(j["name"], j)
    daemon = result.get("daemon") or {}
    head = [f"notice in force: {n['source']} {n['kind']}"
            + (f", deadline {n['deadline_iso']}" if n.get("deadline_iso") else "")
            + (f" ({n['detail']})" if n.get("detail") else "") for n in daemon.get("notices") or []]
    head += [f"{s['source']}: {s['error']} since {s['since_iso']}" for s in daemon.get("sources") or []
             if not s.get("ok")]
    head += [f"warning: {w}" for w in daemon.get("warnings") or []]
    if any(r[2].endswith(ADOPTED_MARK) for r in rows[1:]):
        notes.append(f"{ADOPTED_MARK} taken over from an earlier daemon (a crash or `trainsup reexec`), not relaunched")
    # Which daemon config is in force: a daemon that silently read another file is how
    # tests once fired production hooks.
    tail = [f"  daemon config: {daemon['config']}"] if overview and daemon.get("config") else []
    return "\n".join([printable(h) for h in head] + table(rows, 1 if colour else None)
                     + [printable(n) for n in notes] + tail)


def _ratio_percent(g: dict | None) -> float | None:
    return g["ratio"] * 100 if g and g.get("ratio") is not None else None


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
