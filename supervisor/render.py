"""Text rendering of what the daemon answers: tables and human units. Pure functions of
the reply dicts; imported by the CLI and the demo (neither imports the other)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence


def iso_utc(t: float) -> str:
    """Wall time for people and logs: 2026-12-01T10:04:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


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


def format_status(result: dict, colour: bool = False) -> str:
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CHECKPOINT", "DISK/QUOTA", "MEMORY")]
    notes = []
    now = time.time()
    for j in result["jobs"]:
        ck = j.get("checkpoint") or {}
        # The table view sends timestamps (`started`, checkpoint `mtime`), the full one ages.
        uptime = j["uptime_s"] if "uptime_s" in j else _since(now, j.get("started"))
        if ck and "age_s" not in ck:
            ck = {**ck, "age_s": _since(now, ck.get("mtime"))}
        if ck.get("step") is not None:
            ckpt = f"step {ck['step']}, {human_age(ck.get('age_s'))} ago"
        elif ck.get("latest"):
            # A valid checkpoint without a step number (a torch file): by name.
            ckpt = f"{ck['latest'].rstrip('/').rsplit('/', 1)[-1]}, {human_age(ck.get('age_s'))} ago"
        elif ck:
            ckpt = "none"
        else:
            ckpt = "-"
        if ck.get("invalid"):
            ckpt += f" ({ck['invalid']} invalid)"
        disk = f"{human_bytes(ck.get('bytes'))}/{human_bytes(ck.get('quota')) if ck.get('quota') else '-'}" if ck else "-"
        mem = j.get("memory") or {}
        memtxt = human_bytes(mem.get("rss")) if mem.get("rss") else "-"
        if mem.get("limit"):
            memtxt += f"/{human_bytes(mem['limit'])}"
        state = j["state"]
        if ck.get("over_quota"):
            state += " over-quota"
        rows.append((j["name"], state, str(j.get("pid") or "-"), human_age(uptime),
                     str(j.get("restarts", 0)), ckpt, disk, memtxt))
        if j.get("error"):
            notes.append(f"  {j['name']}: {j['error']}")
        for w in j.get("warnings") or []:
            notes.append(f"  {j['name']}: warning: {w}")
        ln = j.get("last_notice")
        if ln and ln.get("outcome"):
            notes.append(f"  {j['name']}: last notice at {iso_utc(ln['at'])}: {ln.get('source')} -> {ln.get('outcome')}"
                         + (f" (step {ln['step']} in {ln.get('save_s')}s)" if ln.get("step") is not None else ""))
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
    rows = [("STEP", "SIZE", "VALID", "KEPT", "REASON", "PATH")]
    for c in entries:
        valid = "yes" if c["valid"] else f"no: {c['invalid_reason']}"
        rows.append((str(c["step"]) if c["step"] is not None else "-", human_bytes(c["bytes"]), valid,
                     c["kept"] or "-", c["reason"] or "-", c["path"] + _alias_note(c)))
    return "\n".join(table(rows))


def _alias_note(c: dict) -> str:
    """` (latest: same as iter_epoch_3)` for a name the framework rewrites."""
    if not c.get("alias"):
        return ""
    return f" ({c['alias']}: same as {c['alias_of']})" if c.get("alias_of") else f" ({c['alias']})"
