"""The control socket: newline-delimited JSON over a Unix socket, one request per line.

Defences (SPEC section 8): a size cap per request line, a deadline per connection, an
allow-list of verbs, and SO_PEERCRED authorisation. The socket is bound under a
restrictive umask (0660), never abstract. The handler behind it is the daemon's; this
module only frames, authorises and dispatches.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

log = logging.getLogger("trainsup.control")

MAX_REQUEST = 64 * 1024
CONNECTION_DEADLINE = 10.0
MAX_CONNECTIONS = 256      # requests being served at once
# Connections waiting for a request line cost one fd and no work: they do not count
# against MAX_CONNECTIONS (a flood of silent clients must not lock root out of `status`);
# past MAX_IDLE the one that has waited longest is closed.
MAX_IDLE = 4096
READ_VERBS = frozenset({"status", "checkpoints", "history", "logs", "ping"})
WRITE_VERBS = frozenset({"start", "stop", "restart", "checkpoint", "preempt", "reload", "pin", "unpin"})
VERBS = READ_VERBS | WRITE_VERBS
# Verbs that act on the whole daemon, not on a job the caller may own.
GLOBAL_WRITE_VERBS = frozenset({"reload"})


class RequestError(Exception):
    """A one-line reason sent back as {"ok": false, "error": ...}."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def groups(self) -> set[int]:
        gids = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        gids.update(int(g) for g in line.split()[1:])
        except OSError:
            pass
        return gids


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def authorize(peer_uid: int, peer_groups: set[int], peer_user: str, verb: str,
              job_user: Optional[str], *, daemon_uid: int, socket_gid: Optional[int]) -> Optional[str]:
    """None when allowed, else the reason. Pure: table-tested.

    root and the daemon's user may do anything; members of the socket group may read,
    and change only jobs that run as themselves; anyone else is refused."""
    if peer_uid == 0 or peer_uid == daemon_uid:
        return None
    if socket_gid is None or socket_gid not in peer_groups:
        return f"permission denied: user {peer_user} is not root, the daemon's user or in the socket group"
    if verb in READ_VERBS:
        return None
    if verb in GLOBAL_WRITE_VERBS:
        return f"permission denied: only root or the daemon's user may {verb}"
    if job_user is not None and job_user == peer_user:
        return None
    return f"permission denied: user {peer_user} may not {verb} a job that does not run as {peer_user}"


Handler = Callable[[dict, Peer, "Connection"], Awaitable[Any]]


class Connection:
    """What a handler needs to stream several replies (logs -f)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    async def send(self, obj: dict) -> None:
        self.writer.write(json.dumps(obj).encode() + b"\n")
        await self.writer.drain()


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, group: Optional[str],
                 job_user_of: Callable[[str], Optional[str]]):
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.job_user_of = job_user_of
        self.daemon_uid = os.getuid()
        self.socket_gid = None
        if group:
            try:
                self.socket_gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.warning("socket_group %r does not exist; only root and the daemon's user may connect", group)
        self.server: Optional[asyncio.AbstractServer] = None
        self.active = 0
        self.idle: dict[asyncio.StreamWriter, float] = {}   # waiting for a line, since when

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket() or self.path.is_symlink():
            self.path.unlink()
        elif self.path.exists():
            raise RequestError(f"{self.path} exists and is not a socket; refusing to replace it")
        old = os.umask(0o117)     # the socket is born 0660: no window where others can connect
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                          limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if self.socket_gid is not None:
            os.chown(self.path, -1, self.socket_gid)

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
            sock = writer.get_extra_info("socket")
            peer = peer_of(sock)
            while True:
                self.idle[writer] = time.monotonic()
                if len(self.idle) > MAX_IDLE:
                    oldest = min(self.idle, key=self.idle.__getitem__)
                    self.idle.pop(oldest)
                    oldest.close()      # its readline() sees EOF and it ends itself
                try:
                    line = await asyncio.wait_for(reader.readline(), CONNECTION_DEADLINE)
                except asyncio.TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await conn.send({"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})
                    return
                finally:
                    self.idle.pop(writer, None)
                if not line:
                    return
                self.active += 1
                try:
                    if self.active > MAX_CONNECTIONS:
                        await conn.send({"ok": False, "error": "busy: too many requests at once"})
                        return
                    if not await self._one(line, peer, conn):
                        return
                finally:
                    self.active -= 1
        except (ConnectionError, BrokenPipeError, OSError):
            pass
        except Exception:   # a bug in one request must never take the daemon down
            log.exception("control: request failed")
        finally:
            self.idle.pop(writer, None)
            try:
                writer.close()
            except Exception:
                pass

    async def _one(self, line: bytes, peer: Peer, conn: Connection) -> bool:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):   # [[[[... nests past the parser
            await conn.send({"ok": False, "error": "bad request: not a JSON object on one line"})
            return False
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            await conn.send({"ok": False, "error": 'bad request: expected {"cmd": "...", "job": ..., "args": {...}}'})
            return False
        cmd = req["cmd"]
        if cmd not in VERBS:
            await conn.send({"ok": False, "error": f"bad request: unknown command {cmd[:40]!r}"})
            return False
        job = req.get("job")
        args = req.get("args") or {}
        if job is not None and not isinstance(job, str) or not isinstance(args, dict):
            await conn.send({"ok": False, "error": "bad request: job must be a string and args an object"})
            return False
        why = authorize(peer.uid, peer.groups(), peer.user, cmd,
                        self.job_user_of(job) if job else None,
                        daemon_uid=self.daemon_uid, socket_gid=self.socket_gid)
        if why is not None:
            log.warning("control: refused %s from uid %d: %s", cmd, peer.uid, why)
            await conn.send({"ok": False, "error": why})
            return False
        try:
            result = await self.handler({"cmd": cmd, "job": job, "args": args}, peer, conn)
        except RequestError as e:
            await conn.send({"ok": False, "error": str(e)})
            return True
        await conn.send({"ok": True, "result": result})
        return True


# -- the client side -------------------------------------------------------------------

class Unreachable(Exception):
    pass


def request(path: Path, cmd: str, job: Optional[str] = None, args: Optional[dict] = None,
            timeout: float = 30.0) -> dict:
    """One request, one reply. Raises Unreachable when no daemon answers."""
    with connect(path, timeout) as s:
        send(s, cmd, job, args)
        return next(replies(s))


def connect(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise Unreachable(f"no trainsup daemon at {path} ({e.strerror.lower()})") from None
    except PermissionError:
        s.close()
        raise Unreachable(f"permission denied connecting to {path}") from None
    return s


def send(s: socket.socket, cmd: str, job: Optional[str], args: Optional[dict]) -> None:
    req: dict = {"cmd": cmd}
    if job is not None:
        req["job"] = job
    if args:
        req["args"] = args
    s.sendall(json.dumps(req).encode() + b"\n")


def replies(s: socket.socket):
    buf = b""
    while True:
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                raise Unreachable("the daemon did not answer in time") from None
            if not chunk:
                if buf:
                    break
                raise Unreachable("the daemon closed the connection")
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        yield json.loads(line)
