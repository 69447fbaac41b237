"""The control socket: newline-delimited JSON over a Unix socket, one request per line.

Defences (SPEC section 8): a size cap per request line, a deadline per idle
connection, the verb registry (trainsup.verbs) as the allow-list, SO_PEERCRED
authorisation of every job a request will act on (after its arguments are resolved),
connections bounded per peer uid and in total (fds stay free for launches and the state
DB), log followers counted apart from request slots, and a socket directory nobody else
can write to. The socket is bound under a restrictive umask (0660), never abstract. The
handler behind it is the daemon's; this module only frames, authorises and dispatches.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import json
import logging
import os
import pwd
import resource
import socket
import stat
import struct
import termios
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fdbudget import METRICS_CONNECTIONS
from .protocol import MAX_REQUEST, Encoded, unsafe_dir
from .verbs import VERBS, RequestError, Verb, resolve_targets

__all__ = ["RequestError", "ControlServer", "Peer", "authorize", "SocketRefused", "raise_nofile"]

log = logging.getLogger("trainsup.control")

CONNECTION_DEADLINE = 10.0    # an idle connection (no request line yet) is closed after this
# Requests being served at once. TRAINSUP_MAX_REQUESTS shrinks the pool for tests.
MAX_ACTIVE = int(os.environ.get("TRAINSUP_MAX_REQUESTS", "256"))
MAX_FOLLOWERS = 256           # `logs -f` streams: separate, so followers never starve `status`
MAX_FOLLOWERS_PER_UID = 32
MAX_PER_UID = 128             # connections of one peer uid, whatever they are doing
MAX_TOTAL = 4096              # connections in all, further capped by the fd budget
# fds kept free for everything else: the state DB (db, wal, shm, lock), the log, the
# hashing pool, watchers, and per job a pidfd, a log file and the spawn pipes.
FDS_RESERVED = 128
FDS_PER_JOB = 8
# asyncio accepts up to `backlog` connections per wakeup before any of them is counted
# here, and evicted ones close a loop turn later: room for two batches stays free.
ACCEPT_BACKLOG = 64
NOFILE_WANTED = 65536
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux >= 4.13


class SocketRefused(Exception):
    """The daemon will not serve on this path: one line, exit 2."""


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise the soft fd limit toward `wanted` (never past the hard limit); the new soft
    limit. The default soft limit (1024) is what an idle-connection flood exhausted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
    return soft if soft != resource.RLIM_INFINITY else wanted


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    gids: frozenset[int] = frozenset()    # supplementary groups at connect time

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def groups(self) -> set[int]:
        return {self.gid, *self.gids}


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    try:
        # The kernel's record of the peer's groups when it connected: reading
        # /proc/PID/status later could read a different process that reused the pid.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)   # Python's largest buffer
        gids = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:       # more than 256 groups, or an old kernel
        gids = _proc_groups(pid)
    return Peer(pid, uid, gid, gids)


def _proc_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def authorize(peer_uid: int, peer_groups: set[int], verb: Verb, targets: tuple[str, ...] | None,
              owner_of: Callable[[str], int | None], *, daemon_uid: int,
              socket_gid: int | None) -> str | None:
    """None when allowed, else the reason. Pure: table-tested.

    root and the daemon's user may do anything; members of the socket group may read,
    and change only jobs that run as themselves: every one of `targets` (the jobs the
    request will act on, resolved from its arguments; None = the daemon as a whole)."""
    if peer_uid == 0 or peer_uid == daemon_uid:
        return None
    who = f"uid {peer_uid}"
    if socket_gid is None or socket_gid not in peer_groups:
        return f"permission denied: {who} is not root, the daemon's user or in the socket group"
    if not verb.writes:
        return None
    if targets is None:
        return f"permission denied: only root or the daemon's user may {verb.name}"
    for name in targets:
        if owner_of(name) != peer_uid:
            return f"permission denied: {who} may not {verb.name} job {name}, which does not run as {who}"
    return None


Handler = Callable[[dict, Peer, "Connection"], Awaitable[Any]]


class Connection:
    """What a handler needs to stream several replies (logs -f)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    async def send(self, obj: dict) -> None:
        self.writer.write(json.dumps(obj).encode() + b"\n")
        await self.writer.drain()

    async def send_result(self, result: Any) -> None:
        if isinstance(result, Encoded):
            self.writer.write(b'{"ok": true, "result": ' + result + b"}\n")
            await self.writer.drain()
        else:
            await self.send({"ok": True, "result": result})


@dataclass
class _Slot:
    """One open connection: whose, since when, and what it is doing."""
    uid: int
    since: float
    reader: asyncio.StreamReader | None = None
    phase: str = "idle"      # idle | active | follow

    def silent(self, writer: asyncio.StreamWriter) -> bool:
        """Idle and nothing sent yet: a request already on its way is never evicted."""
        if self.phase != "idle":
            return False
        if self.reader is not None and len(getattr(self.reader, "_buffer", b"")):
            return False
        sock = writer.get_extra_info("socket")
        try:
            pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            return struct.unpack("i", pending)[0] == 0
        except (OSError, AttributeError):
            return True


class _Slots:
    """Every open connection, with the counts the limits need kept up to date (a flood
    is thousands of admissions: none of them may scan every connection)."""

    def __init__(self) -> None:
        self.all: dict[asyncio.StreamWriter, _Slot] = {}
        self.by_uid: Counter[int] = Counter()
        self.by_phase: Counter[tuple[str, int | None]] = Counter()   # (phase, uid|None)
        # Idle connections per uid, longest idle first.
        self.idle: dict[int, OrderedDict[asyncio.StreamWriter, None]] = {}

    def __len__(self) -> int:
        return len(self.all)

    def __contains__(self, w: object) -> bool:
        return w in self.all

    def __getitem__(self, w: asyncio.StreamWriter) -> _Slot:
        return self.all[w]

    def count(self, phase: str | None = None, uid: int | None = None) -> int:
        if phase is None:
            return len(self.all) if uid is None else self.by_uid[uid]
        return self.by_phase[(phase, uid)]

    def add(self, w: asyncio.StreamWriter, slot: _Slot) -> None:
        self.all[w] = slot
        self.by_uid[slot.uid] += 1
        self._enter(w, slot)

    def set_phase(self, w: asyncio.StreamWriter, phase: str) -> None:
        slot = self.all[w]
        self._leave(w, slot)
        slot.phase, slot.since = phase, time.monotonic()
        self._enter(w, slot)

    def remove(self, w: asyncio.StreamWriter) -> _Slot | None:
        slot = self.all.pop(w, None)
        if slot is not None:
            self.by_uid[slot.uid] -= 1
            self._leave(w, slot)
        return slot

    def uids_by_count(self) -> list[int]:
        return [uid for uid, n in self.by_uid.most_common() if n > 0]

    def _enter(self, w: asyncio.StreamWriter, slot: _Slot) -> None:
        self.by_phase[(slot.phase, None)] += 1
        self.by_phase[(slot.phase, slot.uid)] += 1
        if slot.phase == "idle":
            self.idle.setdefault(slot.uid, OrderedDict())[w] = None

    def _leave(self, w: asyncio.StreamWriter, slot: _Slot) -> None:
        self.by_phase[(slot.phase, None)] -= 1
        self.by_phase[(slot.phase, slot.uid)] -= 1
        if slot.phase == "idle":
            self.idle.get(slot.uid, OrderedDict()).pop(w, None)


def _uid_of_user(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def prepare_socket_dir(directory: Path, gid: int | None) -> None:
    """Create the socket's directory (0750 with the socket group, else 0755; ours), or
    check an existing one: a directory others can write to lets them replace the socket
    and impersonate the daemon. Raises SocketRefused."""
    try:
        os.makedirs(directory.parent, mode=0o755, exist_ok=True)
        try:
            os.mkdir(directory, 0o750 if gid is not None else 0o755)
            os.chmod(directory, 0o750 if gid is not None else 0o755)   # whatever the umask
            if gid is not None:
                os.chown(directory, -1, gid)
        except FileExistsError:
            pass
        st = os.stat(directory)
    except OSError as e:
        raise SocketRefused(f"cannot create the socket directory {directory}: {e.strerror}") from None
    why = unsafe_dir(st, {0, os.geteuid()}, {0, os.getegid()})
    if why:
        raise SocketRefused(f"refusing to serve in {directory}: {why}; use a directory only root "
                            f"or the daemon's user can write (e.g. /run/trainsup, mode 0755)")


def socket_answers(path: Path) -> bool:
    """Whether something listens on the Unix socket at `path` (a stale socket file left
    by a daemon that died refuses the connection). Non-blocking: a live daemon whose
    accept queue is full still counts as live."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect(str(path))
        return True
    except (BlockingIOError, InterruptedError):
        return True             # EAGAIN/EINPROGRESS: listening, its queue full
    except OSError:
        return False            # ECONNREFUSED (nobody listens), ENOENT, ...
    finally:
        s.close()


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, group: str | None,
                 job_user_of: Callable[[str], str | None] | None = None,
                 job_owner: Callable[[str], int | None] | None = None,
                 job_names: Callable[[], Iterable[str]] | None = None):
        """`job_owner(name)` is the uid a job runs as (None: the daemon's own, or no such
        job); `job_names()` lists every job (`preempt --all`)."""
        self.path = Path(path)
        self.handler = handler
        self.group = group
        if job_owner is None:
            lookup = job_user_of or (lambda name: None)
            job_owner = lambda name: _uid_of_user(lookup(name))
        self.job_owner = job_owner
        # Without the list of jobs "all" cannot be resolved: it then means "some job the
        # caller does not own", which only a privileged caller may touch.
        self.job_names = job_names or (lambda: ("(every job)",))
        self.daemon_uid = os.getuid()
        self.socket_gid: int | None = None
        if group:
            try:
                self.socket_gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.warning("socket_group %r does not exist; only root and the daemon's user may connect", group)
        self.server: asyncio.Server | None = None
        self.slots = _Slots()
        self.fd_limit = 1024

    # -- counts ------------------------------------------------------------------------
    def _count(self, phase: str | None = None, uid: int | None = None) -> int:
        return self.slots.count(phase, uid)

    @property
    def active(self) -> int:
        return self._count("active")

    def max_total(self) -> int:
        try:
            jobs = sum(1 for _ in self.job_names())
        except Exception:
            jobs = 0
        return max(16, min(MAX_TOTAL, self.fd_limit - FDS_RESERVED - FDS_PER_JOB * jobs - 2 * ACCEPT_BACKLOG
                           - METRICS_CONNECTIONS))

    def _evict_idle(self, uid: int | None) -> bool:
        """Close the longest-idle connection (of `uid`, else of the uid holding the most);
        False when there is none to close."""
        if uid is None:
            return any(self._evict_idle(candidate) for candidate in self.slots.uids_by_count())
        victim = next((w for w in self.slots.idle.get(uid, ()) if self.slots[w].silent(w)), None)  # longest idle first
        if victim is None:
            return False
        self.slots.remove(victim)
        victim.close()      # its readline() sees EOF and its task ends itself
        return True

    def _admit(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, uid: int) -> bool:
        """Count a new connection, making room by closing idle ones: a flood of silent
        clients costs its sender its own oldest connections, not everyone's `status`.
        The per-uid cap is for unprivileged peers (one socket-group member must not lock
        out the others); root and the daemon's user are bounded by the total only."""
        privileged = uid in (0, self.daemon_uid)
        if not privileged and self._count(uid=uid) >= MAX_PER_UID and not self._evict_idle(uid):
            return False
        if len(self.slots) >= self.max_total() and not self._evict_idle(None):
            return False
        self.slots.add(writer, _Slot(uid, time.monotonic(), reader))
        return True

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, inherited: int | None = None) -> None:
        """Raises SocketRefused (one line) when the path or its directory is unsafe.
        `inherited`: the listening socket handed over by `trainsup reexec` (its clients
        waited in its backlog meanwhile), used when it is still the one at our path."""
        self.fd_limit = raise_nofile()
        if inherited is not None:
            sock = socket.socket(fileno=inherited)
            try:
                if sock.family == socket.AF_UNIX and sock.getsockname() == str(self.path) \
                        and stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST,
                                                                  backlog=ACCEPT_BACKLOG)
                    return
            except OSError:
                pass
            sock.close()
        prepare_socket_dir(self.path.parent, self.socket_gid)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise SocketRefused(f"cannot inspect {self.path}: {e.strerror}") from None
        if st is not None:
            if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise SocketRefused(f"{self.path} exists and is not a socket; refusing to replace it")
            if stat.S_ISSOCK(st.st_mode) and socket_answers(self.path):
                # A second daemon (another state dir, the same socket) once unlinked the
                # live daemon's socket and bound its own: when it exited, the first one,
                # still running its jobs, could no longer be reached.
                raise SocketRefused(f"another daemon is listening on {self.path}; refusing to take its "
                                    "socket (stop that daemon first, or pass another --socket)")
            self.path.unlink()
        old = os.umask(0o117)     # the socket is born 0660: no window where others can connect
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                          limit=MAX_REQUEST, backlog=ACCEPT_BACKLOG)
        except OSError as e:
            raise SocketRefused(f"cannot listen on {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        if self.socket_gid is not None:
            os.chown(self.path, -1, self.socket_gid)

    def listening_fd(self) -> int | None:
        """The listening socket's fd (what `trainsup reexec` hands to the new program)."""
        socks = self.server.sockets if self.server is not None else ()
        return socks[0].fileno() if socks else None

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            if not self._admit(writer, reader, peer.uid):
                await conn.send({"ok": False, "error": "busy: too many connections"})
                return
            slot = self.slots[writer]
            while True:
                if writer not in self.slots:                  # evicted
                    return
                self.slots.set_phase(writer, "idle")
                try:
                    line = await asyncio.wait_for(reader.readline(), CONNECTION_DEADLINE)
                except asyncio.TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await conn.send({"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})
                    return
                if not line or writer not in self.slots:      # EOF, or evicted while idle
                    return
                if not await self._one(line, peer, conn, slot):
                    return
        except (ConnectionError, BrokenPipeError, OSError):
            pass
        except Exception:   # a bug in one request must never take the daemon down
            log.exception("control: request failed")
        finally:
            self.slots.remove(writer)
            try:
                writer.close()
            except Exception:
                pass

    async def _one(self, line: bytes, peer: Peer, conn: Connection, slot: _Slot) -> bool:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):   # [[[[... nests past the parser
            await conn.send({"ok": False, "error": "bad request: not a JSON object on one line"})
            return False
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            await conn.send({"ok": False, "error": 'bad request: expected {"cmd": "...", "job": ..., "args": {...}}'})
            return False
        cmd = req["cmd"]
        verb = VERBS.get(cmd)
        if verb is None:
            await conn.send({"ok": False, "error": f"bad request: unknown command {cmd[:40]!r}"})
            return False
        job = req.get("job")
        args = req.get("args") or {}
        if job is not None and not isinstance(job, str) or not isinstance(args, dict):
            await conn.send({"ok": False, "error": "bad request: job must be a string and args an object"})
            return False
        try:
            targets = resolve_targets(verb, job, args, self.job_names)
        except RequestError as e:
            await conn.send({"ok": False, "error": str(e)})
            return True
        why = authorize(peer.uid, peer.groups(), verb, targets, self.job_owner,
                        daemon_uid=self.daemon_uid, socket_gid=self.socket_gid)
        if why is not None:
            log.warning("control: refused %s from uid %d: %s", cmd, peer.uid, why)
            await conn.send({"ok": False, "error": why})
            return False
        phase = "follow" if verb.streams(args) else "active"
        if phase == "follow":
            full = (self._count("follow") >= MAX_FOLLOWERS
                    or self._count("follow", peer.uid) >= MAX_FOLLOWERS_PER_UID)
        else:
            full = self._count("active") >= MAX_ACTIVE
        if full:
            what = "log followers" if phase == "follow" else "requests"
            await conn.send({"ok": False, "error": f"busy: too many {what} at once"})
            return False
        self.slots.set_phase(conn.writer, phase)
        # The handler acts on `targets` — exactly what was authorised — never on args again.
        try:
            result = await self.handler({"cmd": cmd, "job": job, "args": args, "targets": targets},
                                        peer, conn)
        except RequestError as e:
            await conn.send({"ok": False, "error": str(e)})
            return True
        await conn.send_result(result)
        return True
