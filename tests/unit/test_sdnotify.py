"""trainsup.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest
from trainsup.daemon.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A bound datagram socket at a filesystem path, like systemd's notify socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def recv(sock) -> str:
    return sock.recv(65536).decode()


def test_every_message_arrives_as_one_datagram(listener):
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert recv(sock) == "READY=1"
    n.ready(status="3 jobs running")
    assert recv(sock) == "READY=1\nSTATUS=3 jobs running"
    n.status("saving mlp-demo")
    assert recv(sock) == "STATUS=saving mlp-demo"
    n.stopping()
    assert recv(sock) == "STOPPING=1"
    n.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    n.extend_timeout(120)
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=120000000"
    n.extend_timeout(0.5)
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=500000"
    n.reloading()
    first, second = recv(sock).split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0
    n.close()


def test_status_with_newlines_cannot_smuggle_a_second_assignment(listener):
    path, sock = listener
    n = Notifier(path)
    n.status("job a failed\nREADY=1")
    assert recv(sock) == "STATUS=job a failed READY=1"


def test_abstract_address(tmp_path):
    name = f"trainsup-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv(sock) == "READY=1"
    finally:
        sock.close()


def test_sender_credentials_are_ours(listener):
    # systemd's NotifyAccess=main compares the datagram's SCM_CREDENTIALS pid to MainPID.
    path, sock = listener
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier(path).ready()
    msg, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert msg == b"READY=1"
    creds = [data for level, kind, data in ancdata
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds and int.from_bytes(creds[0][:4], "little") == os.getpid()


def test_without_notify_socket_everything_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.stopping() is False
    assert n.watchdog() is False
    assert n.extend_timeout(10) is False
    assert n.watchdog_interval() is None


def test_send_failure_never_raises_and_logs_once(tmp_path, caplog):
    n = Notifier(str(tmp_path / "no-such-socket"))
    with caplog.at_level(logging.DEBUG, logger="trainsup.sdnotify"):
        assert n.ready() is False
        assert n.status("x") is False
        assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "no-such-socket" in warnings[0].getMessage()


def test_unreachable_address_kind_is_disabled_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trainsup.sdnotify"):
        n = Notifier("vsock:2:1234")
    assert not n.enabled and n.ready() is False
    assert len(caplog.records) == 1


def test_from_env_unset_hides_the_socket_from_children(listener):
    path, _sock = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/bin"}
    n = Notifier.from_env(env, unset=True)
    assert env == {"PATH": "/bin"}
    assert n.enabled and n.watchdog_interval() == 15.0


@pytest.mark.parametrize(
    "usec, pid, expected",
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000000", None, 0.5),
        ("0", None, None),
        ("", None, None),
        ("junk", None, None),
        (None, None, None),
        ("30000000", "junk", None),
    ],
)
def test_watchdog_interval(listener, usec, pid, expected):
    path, _sock = listener
    env = {"NOTIFY_SOCKET": path}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_watchdog_interval_needs_a_socket_to_ping():
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
