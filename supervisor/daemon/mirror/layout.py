"""Where a job's mirror keeps things under its location (pure: names and bodies, no I/O).

    <url>/data/<key>/<path relative to the checkpoint dir>   the checkpoint's files
    <url>/commits/<key>.json                                 written last: the entry is complete
    <url>/lease/<generation>.json                            who trains the job (lease.py)

A key is unique per checkpoint version: the step (zero-padded, so names sort by step) and
the entry's name (`000000000420-step-00000420`); an unnumbered entry rewritten in place
(`last.pt`) gets its mtime instead, so a new save never overwrites the copy an older
commit object describes. A remote entry without its commit object is incomplete and is
never restored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

COMMITS, DATA, LEASE = "commits", "data", "lease"
COMMIT_FORMAT = "trainsup-mirror/1"
MAX_COMMIT_BYTES = 4 << 20          # a commit object lists files: never read more than this
MAX_FILES = 100_000
_SAFE = re.compile(r"[^A-Za-z0-9._=-]")
_KEY_RE = re.compile(r"(\d{12}|t\d{1,16})-[A-Za-z0-9._=%-]{1,400}")


def entry_key(name: str, step: int | None, mtime: float) -> str:
    head = f"{step:012d}" if step is not None and 0 <= step < 10**12 else f"t{int(mtime * 1000)}"
    return f"{head}-{_SAFE.sub(lambda m: f'%{ord(m.group()):02X}', name)}"


def commit_rel(key: str) -> str:
    return f"{COMMITS}/{key}.json"


def data_rel(key: str, rel: str = "") -> str:
    return f"{DATA}/{key}/{rel}" if rel else f"{DATA}/{key}"


def key_of_commit_name(name: str) -> str | None:
    if not name.endswith(".json"):
        return None
    key = name[:-5]
    return key if _KEY_RE.fullmatch(key) else None


def safe_rel(rel: str) -> bool:
    """A path a restore may create beneath the checkpoint dir: relative, no `..`, no dot
    entries at the top (trainsup's own dirs), no NUL."""
    parts = rel.split("/")
    return (bool(rel) and "\0" not in rel and not rel.startswith("/")
            and all(p not in ("", ".", "..") for p in parts) and not parts[0].startswith(".trainsup"))


@dataclass(frozen=True)
class RemoteFile:
    rel: str           # relative to the checkpoint dir
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class RemoteEntry:
    """One complete checkpoint in the store, as its commit object describes it."""
    key: str
    name: str                      # the entry's name in the checkpoint dir
    step: int | None
    files: tuple[RemoteFile, ...]
    resume: str                    # relative: what TRAINSUP_RESUME_FROM names once restored
    created: float                 # wall time of the local save (its newest mtime)
    uploaded: float                # wall time the commit was written
    reason: str | None = None
    holder: str | None = None      # the machine that uploaded it

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tops(self) -> list[str]:
        """The top-level names a restore renames into the checkpoint dir, in order."""
        seen: dict[str, None] = {}
        for f in self.files:
            seen.setdefault(f.rel.split("/", 1)[0], None)
        return list(seen)


def commit_body(e: RemoteEntry) -> bytes:
    return json.dumps({
        "format": COMMIT_FORMAT, "key": e.key, "name": e.name, "step": e.step, "resume": e.resume,
        "created": e.created, "uploaded": e.uploaded, "reason": e.reason, "holder": e.holder,
        "files": [{"path": f.rel, "size": f.size, "xxh3_128": f.xxh3_128} for f in e.files],
    }, separators=(",", ":")).encode()


def parse_commit(key: str, data: bytes) -> RemoteEntry | None:
    """The commit object's entry, or None when it is not one this code can trust (another
    format, a path escaping the checkpoint dir, a bad size or hash)."""
    try:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("format") != COMMIT_FORMAT or d.get("key") != key:
            return None
        files = d["files"]
        if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
            return None
        out = []
        for f in files:
            rel, size, h = f["path"], f["size"], f["xxh3_128"]
            if (not isinstance(rel, str) or not safe_rel(rel) or not isinstance(size, int) or size < 0
                    or isinstance(size, bool) or not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{32}", h)):
                return None
            out.append(RemoteFile(rel, size, h))
        step = d.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            return None
        name, resume = d["name"], d["resume"]
        if not isinstance(name, str) or not safe_rel(name) or not isinstance(resume, str) or not safe_rel(resume):
            return None
        reason, holder = d.get("reason"), d.get("holder")
        return RemoteEntry(key=key, name=name, step=step, files=tuple(out), resume=resume,
                           created=float(d.get("created") or 0), uploaded=float(d.get("uploaded") or 0),
                           reason=reason if isinstance(reason, str) else None,
                           holder=holder if isinstance(holder, str) else None)
    except (ValueError, KeyError, TypeError):
        return None
