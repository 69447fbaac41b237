"""The metrics endpoint: a tiny HTTP/1.0 server for `GET /metrics`, bounded in every way
a client could make it grow.

Each connection gets one request and one reply, then is closed. At most MAX_CONNECTIONS
are open at once (one thread each); a connection beyond that is closed at accept. A client
has REQUEST_DEADLINE seconds, in all, to send its request head (at most MAX_HEAD bytes) and
SEND_DEADLINE to take the reply: a silent or dripping client is dropped, never waited for.
So idle scrapers cannot take the daemon's fds (the control socket's budget counts these:
fdbudget.METRICS_CONNECTIONS) nor its threads.

Listening on a Unix socket (`unix:/run/trainsup/metrics.sock`) keeps the numbers from other
local users: the socket is 0660, group the daemon's socket group (0600 without one), in a
directory checked like the control socket's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..fdbudget import METRICS_CONNECTIONS

log = logging.getLogger("trainsup.metrics")

MAX_CONNECTIONS = METRICS_CONNECTIONS
REQUEST_DEADLINE = 5.0
SEND_DEADLINE = 10.0
MAX_HEAD = 8192
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsUnavailable(Exception):
    """metrics.listen cannot be served (port taken, bad socket path): one line, exit 2."""


class BindError(Exception):
    """The endpoint cannot listen where asked (one line)."""


def parse_listen(listen: str) -> tuple[str, str | tuple[str, int]]:
    """("unix", path) or ("tcp", (host, port)) from metrics.listen."""
    if listen.startswith("unix:"):
        return "unix", listen[len("unix:"):]
    host, _, port = listen.rpartition(":")
    return "tcp", (host.strip("[]"), int(port))


def _bind_unix(path: str, gid: int | None) -> socket.socket:
    from ..control.server import SocketRefused, prepare_socket_dir
    p = Path(path)
    try:
        prepare_socket_dir(p.parent, gid)
    except SocketRefused as e:
        raise BindError(str(e)) from None
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"{p} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(p))
            raise BindError(f"{p} is in use by another process")
        except OSError:
            pass                           # nobody answers: a stale socket, ours to replace
        finally:
            probe.close()
        p.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117 if gid is not None else 0o177)   # born 0660 / 0600: no window
    try:
        s.bind(str(p))
    except OSError as e:
        s.close()
        raise BindError(f"cannot listen on {p}: {e.strerror}") from None
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(p, -1, gid)
    return s


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return s


class Endpoint:
    """Serves `body()` at /metrics on its own accept thread, within the bounds above."""

    def __init__(self, listen: str, body: Callable[[], bytes], *, gid: int | None = None):
        self.listen = listen
        self.body = body
        self.kind, where = parse_listen(listen)
        self.sock = _bind_unix(str(where), gid) if self.kind == "unix" else _bind_tcp(*where)  # type: ignore[misc]
        self.sock.listen(MAX_CONNECTIONS)
        self.path = str(where) if self.kind == "unix" else None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.refused = 0            # connections closed at accept: all slots were taken
        self._thread = threading.Thread(target=self._accept_loop, name="trainsup-metrics", daemon=True)

    @property
    def address(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.kind == "tcp" else 0

    def start(self) -> None:
        self._thread.start()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)           # EMFILE and the like: never a hot loop
                continue
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                conn.close()
                continue
            with self._lock:
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="trainsup-metrics-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = _read_head(conn, time.monotonic() + REQUEST_DEADLINE)
            if head is None:
                return
            method, _, rest = head.partition(b" ")
            target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                _reply(conn, b"405 Method Not Allowed", b"only GET\n")
            elif target not in (b"/metrics", b"/"):
                _reply(conn, b"404 Not Found", b"metrics are at /metrics\n")
            else:
                _reply(conn, b"200 OK", self.body(), CONTENT_TYPE)
        except Exception:            # a scrape must never take anything else down
            log.exception("metrics: serving a scrape failed")
        finally:
            with self._lock:
                self._open.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept() of the other thread
        self.sock.close()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self.path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)


def _read_head(conn: socket.socket, deadline: float) -> bytes | None:
    """The request line, once the head has arrived within the deadline; None otherwise."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_HEAD:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except OSError:               # timeout included
            return None
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def _reply(conn: socket.socket, status: bytes, body: bytes, ctype: bytes = b"text/plain; charset=utf-8") -> None:
    head = (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    view = memoryview(head + body)
    deadline = time.monotonic() + SEND_DEADLINE
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            return                    # a client that does not read is dropped
        conn.settimeout(left)
        try:
            sent = conn.send(view)
        except OSError:
            return
        view = view[sent:]
