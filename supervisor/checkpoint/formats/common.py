"""What every format shares: the verdict on one checkpoint, the cache it is kept in, and
the only way a format reads a job's files (checkpoint/jobfile.py: relative to a directory
fd, never through a symlink in any component, never blocking on a FIFO, regular files
only, small files under a cap per kind)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..format import REASONS as SAVE_REASONS
from ..jobfile import (  # noqa: F401  (the formats' one way to a job's files)
    LIMITS,
    Invalid,
    open_entry_dir,
    open_file,
    pread_exact,
    read_capped,
    read_capped_fd,
)
from ..naming import counter, show_int

# A verdict is stored (the state DB's cache), logged and shown: each of its fields is
# bounded here, whatever a checkpoint's bytes claim. Found: 15 manifests with a 2 MB
# `reason` and one with 120 MB of metrics grew the state DB by 219 MiB.
MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_REASON_TEXT = 1000


class VerdictCache(Protocol):
    """Where verdicts survive between scans (the daemon backs it with SQLite)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, verdict_json: str) -> None: ...


class MemoryVerdictCache:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, verdict_json: str) -> None:
        self.data[key] = verdict_json


def metric_value(v: object) -> float | int | None:
    """A metric's value as stored: a number (NaN and inf too: a diverged loss is a
    fact), ints within 64 bits; None for anything else."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int) and abs(v) > 2**63:
        return None
    return v


def bounded_metrics(raw: object) -> dict[str, float | int]:
    """At most MAX_METRICS numeric metrics with short names; the rest are left out."""
    out: dict[str, float | int] = {}
    if not isinstance(raw, Mapping):
        return out
    for k, v in raw.items():
        if len(out) >= MAX_METRICS:
            break
        val = metric_value(v)
        if isinstance(k, str) and 0 < len(k) <= MAX_METRIC_NAME and val is not None:
            out[k] = val
    return out


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON_TEXT else text[: MAX_REASON_TEXT - 1] + "…"


@dataclass(frozen=True)
class Verdict:
    format: str
    valid: bool
    invalid_reason: str | None = None
    step: int | None = None            # from the manifest / trainer_state, else the name
    epoch: int | None = None
    reason: str | None = None          # the manifest's save reason
    created: str | None = None         # the manifest's UTC timestamp
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    save_s: float | None = None        # the manifest's: how long the save held training up

    def __post_init__(self) -> None:
        # Bounded by construction (every format, every cache row): a counter outside
        # 0..2**63-1 makes the verdict invalid, never a number the DB, the metrics scrape or
        # `trainsup plot` choke on.
        put = object.__setattr__
        valid, why = self.valid, self.invalid_reason
        for name in ("step", "epoch"):
            v = getattr(self, name)
            if v is not None and counter(v) is None:
                shown = show_int(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v)[:40]
                valid = False
                why = f"{name} {shown} is not a count in 0..2**63-1" + (f"; {why}" if why else "")
                put(self, name, None)
        if why is not None:
            why = _short(str(why))
        put(self, "valid", bool(valid))
        put(self, "invalid_reason", why)
        put(self, "reason", self.reason if self.reason in SAVE_REASONS else None)
        put(self, "created", self.created if isinstance(self.created, str) and len(self.created) <= 40 else None)
        metrics = self.metrics
        if not (isinstance(metrics, dict) and len(metrics) <= MAX_METRICS
                and all(isinstance(k, str) and len(k) <= MAX_METRIC_NAME and metric_value(v) is not None
                        for k, v in metrics.items())):
            put(self, "metrics", bounded_metrics(metrics))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Verdict:
        # A verdict cached by another trainsup version may lack or add a field.
        known = cls.__dataclass_fields__
        d: dict[str, Any] = json.loads(s)
        return cls(**{k: v for k, v in d.items() if k in known})


def entry_dir(path: str, fmt: str, step: int | None) -> int | Verdict:
    """An fd on a directory checkpoint, never through a symlink; or the invalid Verdict."""
    try:
        return open_entry_dir(path)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return Verdict(fmt, False, "symlink" if os.path.islink(path) else "not a directory", step)
        raise
