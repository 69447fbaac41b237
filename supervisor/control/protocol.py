"""The control socket's wire format, shared by both ends: one JSON object per line each way,
request `{"cmd", "job", "args"}`, reply `{"ok": true, "result": ...}` or `{"ok": false,
"error": "one-line reason"}`; the size limit of a request line; the `status` table view's
row fields; and the check both ends make of the socket's directory (trust.py). Imports nothing of
the daemon: the client (and so `trainsup status`) loads this and client.py only."""

from __future__ import annotations

from ..trust import unsafe_dir  # noqa: F401  (both ends of the socket check its dir with it)

MAX_REQUEST = 64 * 1024


class Encoded(bytes):
    """A result already encoded as JSON (one line), sent as is: `status` joins rows each
    job keeps encoded rather than encoding 200 dicts per request."""


# The table view (`status` without --json) sends each job as one string, its fields in
# TABLE_FIELDS order joined by "|": 200 such strings decode and split in a quarter of the
# time 200 nested objects take (a tab would be escaped in JSON, and escapes are the slow
# path). It is for display only: in a value, "|" reads as "¦" and a tab or newline as a
# space. Free text (error, warnings, the last notice) travels apart, in "notes", keyed by
# job, for the jobs that have any. Times are wall timestamps: the reader computes ages.
TABLE_FIELDS = ("name", "state", "pid", "started", "restarts", "has_checkpoint", "bytes", "rss",
                "crashes_in_a_row", "step", "latest", "mtime", "invalid", "quota", "over_quota", "mem_limit",
                "adopted", "goodput")
TABLE_SEP = "|"
_ZERO_IS_EMPTY = frozenset({"restarts", "crashes_in_a_row", "invalid"})
_DISPLAY = str.maketrans({"|": "¦", "\t": " ", "\n": " ", "\r": " "})


def table_row(**fields: object) -> str:
    """One job's table-view string: the fields by name, in TABLE_FIELDS order. None and
    False read as empty, and so does 0 for the counts (restarts, crashes, invalid);
    trailing empty fields are left out: an idle job's row is 8 fields, not 16, and splits
    in half the time."""
    cells = []
    for name in TABLE_FIELDS:
        f = fields.get(name)
        cells.append("" if f is None or f is False or (f == 0 and name in _ZERO_IS_EMPTY) else "1" if f is True
                     else str(f).translate(_DISPLAY))
    while cells and not cells[-1]:
        cells.pop()
    return TABLE_SEP.join(cells)


def table_rows(result: dict) -> list[list[str]]:
    """The table view's rows, each padded to TABLE_FIELDS' length (trailing empty fields
    are not sent; a daemon of another version may send more: they are cut)."""
    n = len(TABLE_FIELDS)
    pad = [""] * n
    out = []
    for r in result.get("rows") or ():
        f = r.split(TABLE_SEP)
        out.append(f if len(f) == n else (f + pad)[:n])
    return out

