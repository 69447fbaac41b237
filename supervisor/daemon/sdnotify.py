"""The systemd notify protocol (sd_notify(3)), spoken by the daemon (SPEC section 2).

One datagram per call to the AF_UNIX socket named by NOTIFY_SOCKET: a filesystem path, or
`@name` for an abstract address. Without NOTIFY_SOCKET every method is a no-op, so the
daemon calls them unconditionally. A failed send never raises: losing a STATUS= line must
not take a supervisor of training runs down; the first failure is logged, later ones only
at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("trainsup.sdnotify")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str:
    # systemd writes abstract addresses with a leading '@'; the kernel wants a NUL byte.
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment and could smuggle in READY=1.
    return " ".join(str(text).splitlines()).strip()


class Notifier:
    """Sends sd_notify messages; create it with `Notifier.from_env()`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failed_once = False
        if self.address is not None and not self.address.startswith(("/", "@")):
            # vsock: (systemd 253+) and relative paths: we cannot reach them; say so once
            # instead of failing on every STATUS= update.
            log.warning(
                "NOTIFY_SOCKET=%r is neither a path nor an @abstract name; "
                "systemd notifications are off", self.address)
            self.address = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID.

        `unset=True` removes them from `environ` (default os.environ) so nothing the daemon
        launches later inherits them and notifies systemd in its name.
        """
        env = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )
        if unset:
            if not isinstance(env, MutableMapping):
                raise TypeError("Notifier.from_env(unset=True) needs a mutable environ")
            for key in _ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # -- the messages the daemon sends ------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"]
        if status is not None:
            fields.append("STATUS=" + _one_line(status))
        return self.send("\n".join(fields))

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + _one_line(text))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload to our READY=1 that ends it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start/stop timeout fires."""
        usec = max(0, int(seconds * 1_000_000))
        return self.send(f"EXTEND_TIMEOUT_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled
        advises), or None when the watchdog is off or meant for another process."""
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    # -- transport -------------------------------------------------------------------

    def send(self, message: str) -> bool:
        """Send one raw notify datagram; True when it left, False when off or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8"), _socket_address(self.address))
            return True
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.warning(
                    "cannot notify systemd at NOTIFY_SOCKET=%s: %s "
                    "(the service keeps running; later failures are logged at debug level)",
                    self.address, exc)
            else:
                log.debug("sd_notify %r failed: %s", message.split("=", 1)[0], exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
