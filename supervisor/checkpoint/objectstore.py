"""One object store location (any fsspec URL) as the checkpoint mirror uses it: a few
blocking calls on paths relative to the location, and every failure as a `StoreError` whose
`kind` says what it means for the caller.

Blocking by design: the daemon calls these only on the mirror's own threads
(daemon/mirror/transfer.py), never on its event loop; `trainsup validate` and the config
load (a worker thread in the daemon) call `probe`.

Kinds, and why they are kept apart:
  transient  timeouts, resets, 5xx, throttling: try again later. Never "the object is
             gone" and never "the other machine is gone" (the lease reads absence only
             from a successful listing);
  denied     the credentials were refused (403, a bad key);
  missing    the bucket / container does not exist;
  full       the store (or the local disk, for a restore) has no room;
  not-found  the object is not there (a successful answer);
  exists     create-if-absent found the object already there;
  config     fsspec or the store's package is not installed, a bad option.
fsspec and its store packages are imported only here, only when a job has a mirror.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Which extra installs each protocol's filesystem (the one-line error names it).
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
           "abfss": "azure", "adl": "azure"}
# Store error codes (S3, MinIO, GCS, Azure) that say "try again", whatever status carried them.
_TRANSIENT_CODES = ("SlowDown", "Throttl", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "ServerBusy", "OperationTimedOut", "TooManyRequests", "503", "500", "502", "504",
                    "429", "Timeout", "timed out", "Connection reset", "Connection refused",
                    "Cannot connect", "ServerDisconnected", "Server disconnected", "ClientPayloadError")
_FULL_CODES = ("XMinioStorageFull", "StorageFull", "InsufficientStorage", "507", "QuotaExceeded",
               "No space left")
_DENIED_CODES = ("NoCredentialsError", "Unable to locate credentials", "DefaultCredentialsError",
                 "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AuthenticationFailed",
                 "AuthorizationFailure", "ExpiredToken", "InvalidToken", "403", "401", "Forbidden")
_EXISTS_CODES = ("PreconditionFailed", "conditionNotMet", "BlobAlreadyExists", "ConditionNotMet", "412")
_MISSING_CODES = ("NoSuchBucket", "ContainerNotFound", "bucket does not exist", "The specified bucket")


def _mentions(text: str, codes: tuple[str, ...]) -> bool:
    """Whether the error text names one of `codes`. A numeric status counts only standing
    alone ("503 Slow Down", "(403)"), never inside a word, a number or a path: an error
    about `.../run-75c1...335037/commits` is not a 503 (found: a listing that was merely
    empty, read as a store outage because its random prefix held the digits 503; a job
    named exp403 would have read as refused credentials)."""
    for c in codes:
        if c.isdigit():
            if re.search(rf"(?<![\w/.:-]){c}(?![\w/.-])", text):
                return True
        elif c in text:
            return True
    return False


class StoreError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return self.args[0]


def _text(exc: BaseException) -> str:
    parts = [type(exc).__name__, str(exc)]
    for attr in ("response", "error_code", "code", "status", "reason"):
        v = getattr(exc, attr, None)
        if v is not None:
            parts.append(str(v)[:300])
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        parts.append(f"{type(cause).__name__} {cause}")
    return " ".join(parts)


def classify(exc: BaseException, what: str = "") -> StoreError:
    """The StoreError an exception from fsspec (or the store's client under it) means."""
    if isinstance(exc, StoreError):
        return exc
    text = _text(exc)
    one_line = " ".join(str(exc).split())[:300] or type(exc).__name__
    where = f"{what}: " if what else ""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or _mentions(text, _FULL_CODES):
        return StoreError("full", f"{where}store full: {one_line}")
    if _mentions(text, _MISSING_CODES):
        return StoreError("missing", f"{where}bucket does not exist: {one_line}")
    if isinstance(exc, PermissionError) or _mentions(text, _DENIED_CODES):
        return StoreError("denied", f"{where}credentials refused: {one_line}")
    if isinstance(exc, FileExistsError):
        return StoreError("exists", f"{where}already exists")
    if isinstance(exc, (TimeoutError, ConnectionError)) or _mentions(text, _TRANSIENT_CODES):
        return StoreError("transient", f"{where}{one_line}")
    if isinstance(exc, FileNotFoundError):
        return StoreError("not-found", f"{where}not found")
    return StoreError("transient", f"{where}{one_line}")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def extra_for(url: str) -> str | None:
    return _EXTRAS.get(protocol_of(url))


def filesystem_class(url: str) -> type:
    """The fsspec filesystem class for `url`; StoreError("config") naming the extra to
    install when fsspec or the store's package is missing."""
    extra = extra_for(url)
    hint = f"pip install 'trainsup[{extra}]'" if extra else "pip install fsspec"
    try:
        import fsspec
    except ImportError:
        raise StoreError("config", f"the mirror needs fsspec, which is not installed in the daemon's "
                                   f"environment ({hint})") from None
    protocol = protocol_of(url)
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise StoreError("config", f"{protocol}:// needs a package not installed in the daemon's "
                                   f"environment ({hint}): {' '.join(str(e).split())[:160]}") from None
    except ValueError:
        raise StoreError("config", f"unknown storage protocol {protocol!r} (fsspec knows s3, gs, az, file, "
                                   "memory, ...)") from None


@dataclass
class Listed:
    name: str           # the last path component
    size: int
    is_dir: bool


class Store:
    """The location `url` (a prefix in a bucket) with fsspec `options`. Thread-safe as far
    as fsspec is: each mirror thread calls it in turn."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        cls = filesystem_class(self.url)
        opts = dict(options or {})
        s3 = protocol_of(self.url) in ("s3", "s3a")
        if s3:
            # A throttling or failing store answers within seconds: botocore and s3fs each
            # retry 5 times by default (minutes in all), and the mirror has its own backoff.
            # A stalled server (no answer, no error) is an error after read_timeout, not a
            # thread held for botocore's default minute per attempt.
            opts.setdefault("config_kwargs", {"retries": {"max_attempts": 2, "mode": "standard"},
                                              "connect_timeout": 10, "read_timeout": 30})
        if protocol_of(self.url) == "file":
            # Object stores have no directories; a local one must make them (found: every
            # upload to file:// failed, "not found", for want of the object's parent dir).
            opts.setdefault("auto_mkdir", True)
        try:
            # A fresh instance: fsspec caches filesystems by arguments, and one job's broken
            # session must not be shared with another's.
            self.fs = cls(skip_instance_cache=True, **opts)
        except TypeError as e:
            raise StoreError("config", f"bad mirror option: {e}") from None
        except Exception as e:
            raise classify(e, "opening the store") from None
        if s3:
            self.fs.retries = 2
        self.root = str(cls._strip_protocol(self.url)).rstrip("/")  # type: ignore[attr-defined]

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except StoreError:
            raise
        except Exception as e:
            raise classify(e, what) from None

    # -- small objects --------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call(f"writing {rel}", self.fs.pipe_file, self.path(rel), data)

    def create_if_absent(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if no object is there; False when one was (another writer won).
        The store decides atomically (S3 If-None-Match, GCS ifGenerationMatch=0, Azure
        overwrite=False, O_EXCL locally), so two machines can never both win."""
        if protocol_of(self.url) == "file":
            return self._create_local(rel, data)
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
        except Exception as e:
            # S3 and GCS answer 412 (PreconditionFailed / conditionNotMet), Azure 409
            # (BlobAlreadyExists); s3fs turns some into FileExistsError
            if isinstance(e, FileExistsError) or _mentions(_text(e), _EXISTS_CODES):
                return False
            raise classify(e, f"creating {rel}") from None
        return True

    def _create_local(self, rel: str, data: bytes) -> bool:
        # fsspec's local pipe_file checks, then writes (two machines could both pass the
        # check on a shared filesystem): O_EXCL is the atomic create-if-absent here
        path = self.path(rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # not a job path: a file:// object store's own object (the store, not a job's dir)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise classify(e, f"creating {rel}") from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def read_bytes(self, rel: str, limit: int) -> bytes | None:
        """The object's bytes (at most `limit`: a hostile or broken store object never
        grows the daemon); None when there is no such object."""
        try:
            data = self._call(f"reading {rel}", self.fs.cat_file, self.path(rel), start=0, end=limit + 1)
        except StoreError as e:
            if e.kind == "not-found":
                return None
            raise
        if len(data) > limit:
            raise StoreError("transient", f"reading {rel}: larger than {limit} bytes")
        return bytes(data)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return bytes(self._call(f"reading {rel}", self.fs.cat_file, self.path(rel), start=start, end=end))

    def size(self, rel: str) -> int | None:
        try:
            info = self._call(f"looking at {rel}", self.fs.info, self.path(rel))
        except StoreError as e:
            if e.kind == "not-found":
                return None
            raise
        return int(info.get("size") or 0)

    def listdir(self, rel: str) -> list[Listed]:
        """The children of `rel` ([] when there are none: an empty prefix is no error)."""
        path = self.path(rel)
        try:
            self.fs.invalidate_cache(path)
            entries = self._call(f"listing {rel or self.url}", self.fs.ls, path, detail=True)
        except StoreError as e:
            if e.kind == "not-found":
                return []
            raise
        out = []
        for ent in entries:
            name = str(ent.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if name:
                out.append(Listed(name, int(ent.get("size") or 0), ent.get("type") == "directory"))
        return out

    def remove(self, rel: str) -> None:
        try:
            self._call(f"removing {rel}", self.fs.rm_file, self.path(rel))
        except StoreError as e:
            if e.kind != "not-found":
                raise

    def remove_tree(self, rel: str) -> None:
        try:
            self._call(f"removing {rel}", self.fs.rm, self.path(rel), recursive=True)
        except StoreError as e:
            if e.kind != "not-found":
                raise

    # -- large objects ----------------------------------------------------------------------
    def open_write(self, rel: str, block_size: int) -> Any:
        """A file to write `rel` through; multipart on stores that have it (s3fs, gcsfs and
        adlfs upload each block as a part). close() commits, discard() abandons."""
        kw: dict[str, Any] = {"block_size": block_size} if protocol_of(self.url) not in ("file", "memory") else {}
        return self._call(f"writing {rel}", self.fs.open, self.path(rel), "wb", **kw)

    def close(self) -> None:
        pass


# -- the check at load ------------------------------------------------------------------

_PROBED: dict[tuple, tuple[float, str | None]] = {}
# The store each probe opened, for the job's mirror to take over (once): its session is made
# and its credentials resolved, which a fresh machine's restore would otherwise pay again
# before its first request.
_OPENED: dict[tuple, tuple[float, Store]] = {}
_PROBE_LOCK = threading.Lock()
PROBE_CACHE_S = 30.0
PROBE_WAIT_S = 5.0


def _key(url: str, options: Mapping[str, Any] | None) -> tuple:
    return (url.rstrip("/"), tuple(sorted((k, repr(v)) for k, v in dict(options or {}).items())))


def open_store(url: str, options: Mapping[str, Any] | None = None) -> Store:
    """A Store for `url`: the one the load's probe opened moments ago when there is one
    (taken, never shared: one job's broken session is not another's), else a new one."""
    with _PROBE_LOCK:
        hit = _OPENED.pop(_key(url, options), None)
    if hit is not None and time.monotonic() - hit[0] < PROBE_CACHE_S:
        return hit[1]
    return Store(url, options)


def probe(url: str, options: Mapping[str, Any] | None = None) -> str | None:
    """At load (`validate`, `reload`, daemon start): None when the mirror can be used, else
    one line saying why not — a missing package, refused credentials, a missing bucket.
    A store that is merely unreachable now is not a config error (training goes on and
    status says so), so it passes here. Results are kept PROBE_CACHE_S: a reload of 200
    jobs asks the store once per location."""
    key = _key(url, options)
    now = time.monotonic()
    with _PROBE_LOCK:
        hit = _PROBED.get(key)
        if hit is not None and now - hit[0] < PROBE_CACHE_S:
            return hit[1]
    answer: list[str | None] = []

    def ask() -> None:
        verdict: str | None = None
        try:
            store = Store(url, options)
            store.listdir("")
            with _PROBE_LOCK:
                # at most one per location, none older than PROBE_CACHE_S: a reload of jobs
                # whose mirrors never take theirs does not keep sessions open
                for k in [k for k, (t, _) in _OPENED.items() if time.monotonic() - t >= PROBE_CACHE_S]:
                    del _OPENED[k]
                _OPENED[key] = (time.monotonic(), store)
        except StoreError as e:
            if e.kind in ("config", "denied", "missing"):
                verdict = str(e)
        answer.append(verdict)

    # Its own thread, waited for PROBE_WAIT_S: a stalled store (accepts, never answers)
    # must not hold a daemon's start or a reload for the client's timeouts.
    asker = threading.Thread(target=ask, daemon=True, name="trainsup-mirror-probe")
    asker.start()
    asker.join(PROBE_WAIT_S)
    if not answer:
        return None             # no answer yet is not a config error; not cached
    verdict = answer[0]
    with _PROBE_LOCK:
        _PROBED[key] = (now, verdict)
    return verdict
