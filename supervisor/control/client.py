"""The control socket's client end: connect (after checking that what listens is a
daemon we trust), send one request, read replies. What the `trainsup` CLI imports to talk
to the daemon: no asyncio, no server."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .protocol import unsafe_dir


class Unreachable(Exception):
    pass


def request(path: Path, cmd: str, job: str | None = None, args: dict | None = None,
            timeout: float = 30.0, trusted: Iterable[int] = ()) -> dict:
    """One request, one reply. Raises Unreachable when no daemon answers (or when what
    answers is not a daemon we trust: see connect)."""
    with connect(path, timeout, trusted) as s:
        send(s, cmd, job, args)
        return next(replies(s))


def check_server(path: Path, trusted: set[int]) -> None:
    """Before talking: the socket must be a socket owned by a trusted uid, in a directory
    that no untrusted user can write to (unless sticky, where only the socket's owner can
    replace it). Raises Unreachable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise Unreachable(f"no trainsup daemon at {path} (no such file or directory)") from None
    except OSError as e:
        raise Unreachable(f"cannot inspect {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Unreachable(f"{path} is not a socket; refusing to talk to it")
    if st.st_uid not in trusted:
        raise Unreachable(f"{path} is owned by uid {st.st_uid}, not by root or the daemon's user; "
                          "refusing to talk to it (someone may be impersonating the daemon)")
    try:
        dst = os.stat(path.parent)
    except OSError as e:
        raise Unreachable(f"cannot inspect {path.parent}: {e.strerror}") from None
    why = unsafe_dir(dst, trusted, {0, os.getegid()})
    if why and not (dst.st_mode & stat.S_ISVTX and stat.S_ISDIR(dst.st_mode)):
        raise Unreachable(f"refusing to talk to {path}: its directory {path.parent} is unsafe ({why}), "
                          "so anyone could have replaced the socket")


def trusted_uids(extra: Iterable[int] = ()) -> set[int]:
    """Who may own the daemon's socket: root, the caller, and the daemon's configured user."""
    return {0, os.getuid(), *extra}


def connect(path: Path, timeout: float | None, trusted: Iterable[int] = ()) -> socket.socket:
    path = Path(path)
    allowed = trusted_uids(trusted)
    check_server(path, allowed)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
    try:
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:
                # The listen backlog is full (a busy daemon, or a flood): it drains in
                # milliseconds; wait for it rather than fail.
                if time.monotonic() >= deadline:
                    s.close()
                    raise Unreachable(f"the daemon at {path} is too busy to accept a connection") from None
                time.sleep(0.01)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise Unreachable(f"no trainsup daemon at {path} ({(e.strerror or str(e)).lower()})") from None
    except PermissionError:
        s.close()
        raise Unreachable(f"permission denied connecting to {path}") from None
    # The decisive check, free of races with the lstat above: the kernel's record of
    # who is listening on the other end.
    raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, server_uid, _ = struct.unpack("3i", raw)
    if server_uid not in allowed:
        s.close()
        raise Unreachable(f"the process listening on {path} runs as uid {server_uid}, not as root or "
                          "the daemon's user; refusing to talk to it")
    return s


def send(s: socket.socket, cmd: str, job: str | None, args: dict | None) -> None:
    req: dict = {"cmd": cmd}
    if job is not None:
        req["job"] = job
    if args:
        req["args"] = args
    s.sendall(json.dumps(req).encode() + b"\n")


def replies(s: socket.socket) -> Iterator[Any]:
    buf = b""
    while True:
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise Unreachable("the daemon did not answer in time") from None
            if not chunk:
                if buf:
                    break
                raise Unreachable("the daemon closed the connection")
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        yield json.loads(line)
