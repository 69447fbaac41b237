"""A real systemd user manager for tests (SPEC section 10).

The manager runs in a private mount namespace (`unshare --mount`) with a fresh tmpfs on
/run, so it gets its own XDG_RUNTIME_DIR, /run/systemd/system (the marker that makes
systemd believe it is booted with systemd) and never touches the host's /run. Unit files
go in XDG_CONFIG_HOME/systemd/user, which is a temp dir on the normal filesystem, so tests
write them directly; commands that need the namespace's /run (systemctl, the CLI talking to
a socket under RuntimeDirectory=) go through `nsenter --mount --target PID`.

There is no journald in the namespace, so `install_unit` adds a drop-in sending the unit's
stdout+stderr to a file (`unit_log`), and the manager's own log goes to `manager_log`.

    with UserManager(tmp_path) as um:
        um.install_unit("x.service", text)
        um.systemctl("start", "x.service")
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import scaled, wait_for  # noqa: F401 (test_systemd imports wait_for from here)

SYSTEMD = "/lib/systemd/systemd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class HarnessError(RuntimeError):
    pass


def missing_prerequisite() -> str | None:
    """Why a user manager cannot run here, or None when it can."""
    if not os.path.exists(SYSTEMD):
        return f"systemd is not installed ({SYSTEMD} missing)"
    for tool in ("systemctl", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "needs root: unshare --mount and a tmpfs on /run need CAP_SYS_ADMIN"
    return None


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_mount_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _mount_ns(int(entry)) == ns:
            pids.append(int(entry))
    return pids


class UserManager:
    """`systemd --user` in its own mount namespace; a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uid = os.getuid()
        self.runtime_dir = f"/run/user/{self.uid}"   # inside the namespace only
        self.config_home = self.root / "config"
        self.state_home = self.root / "state"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.log_dir = self.root / "logs"
        self.manager_log_path = self.log_dir / "manager.log"
        self.setup_log_path = self.log_dir / "setup.log"   # unshare/mount errors
        self.proc: subprocess.Popen | None = None
        self._mnt_ns: str | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "UserManager is not started"
        return self.proc.pid

    @property
    def env(self) -> dict[str, str]:
        """The environment for the manager and everything run inside its namespace.

        A lean, explicit one: the manager hands its environment to every unit, and the
        test runner's (PYTEST_CURRENT_TEST, a stray NOTIFY_SOCKET) must not leak in.
        """
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_STATE_HOME": str(self.state_home),
            "XDG_DATA_HOME": str(self.root / "data"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
        }
        return env

    def start(self) -> UserManager:
        for d in (self.unit_dir, self.state_home, self.log_dir,
                  self.root / "data", self.root / "cache"):
            d.mkdir(parents=True, exist_ok=True)
        # The manager closes its stderr and there is no journald here, so it logs to
        # "kmsg": a FIFO bind-mounted over /dev/kmsg in the namespace, drained into
        # manager.log by a `cat` holding the FIFO open read-write (so it never sees EOF
        # and no writer's open() ever blocks). A plain file would not do: each opener
        # writes from offset 0 over the others.
        fifo = self.log_dir / "kmsg.fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        self.manager_log_path.touch()
        # `exec` keeps one process: Popen.pid is the manager itself, so we can nsenter
        # it, signal it and reap it.
        script = (
            "set -e; mount -t tmpfs -o mode=755 trainsup-test-run /run; "
            "cat <>\"$HARNESS_FIFO\" >>\"$HARNESS_LOG\" & "
            "mount --bind \"$HARNESS_FIFO\" /dev/kmsg; "
            "mkdir -p /run/systemd/system \"$XDG_RUNTIME_DIR\"; "
            # PID 1 makes these at boot; the unit's ProtectKernelLogs=, ProtectProc= etc.
            # mount them over what they hide. This /run is fresh, so make them here.
            "mkdir -p /run/systemd/inaccessible && cd /run/systemd/inaccessible && "
            "touch reg && mkdir dir && mknod chr c 0 0 && mknod blk b 0 0 && mkfifo fifo && "
            "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\" && "
            "chmod 0000 reg dir chr blk fifo sock && cd /; "
            "chmod 700 \"$XDG_RUNTIME_DIR\"; "
            f"exec {SYSTEMD} --user --log-target=kmsg --log-level=info"
        )
        env = dict(self.env, HARNESS_FIFO=str(fifo), HARNESS_LOG=str(self.manager_log_path))
        with open(self.setup_log_path, "ab") as setup_log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                env=env, stdin=subprocess.DEVNULL, stdout=setup_log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            self._wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_running(self) -> None:
        deadline = time.monotonic() + scaled(START_TIMEOUT)
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"systemd --user exited with status {self.proc.returncode} at start; "
                    f"its log ({self.manager_log_path}):\n{self.manager_log()}")
            if self._mnt_ns is None:
                ns = _mount_ns(self.pid)
                # Until unshare has run, the child still shares our namespace.
                if ns is not None and ns != _mount_ns(os.getpid()):
                    self._mnt_ns = ns
            if self._mnt_ns is not None:
                r = self.systemctl("is-system-running", check=False, timeout=5)
                state = r.stdout.strip()
                # degraded: some stock user unit (gpg-agent, ...) failed; ours can still run.
                if state in ("running", "degraded"):
                    return
            time.sleep(0.05)
        raise HarnessError(
            f"systemd --user not running after {START_TIMEOUT}s (state {state!r}); "
            f"its log:\n{self.manager_log()}")

    def stop(self) -> None:
        """Stop the manager (which stops its units), then kill anything left in the namespace."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM makes a user manager start exit.target: units are stopped properly.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._mnt_ns is not None:
            ns = self._mnt_ns
            for pid in _pids_in_mount_ns(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # Orphans are reaped by init, not us: wait until they are gone.
            wait_for(lambda: not _pids_in_mount_ns(ns), 5.0,
                     "leftover processes in the test mount namespace to die")

    def __enter__(self) -> UserManager:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- running things inside ----------------------------------------------------------

    def run(self, argv: Sequence[str], *, check: bool = False, timeout: float = 30,
            env: dict | None = None, input: str | None = None
            ) -> subprocess.CompletedProcess:
        """Run `argv` in the manager's mount namespace (its /run, its sockets)."""
        full_env = dict(self.env, **(env or {}))
        cmd = ["nsenter", "--mount", f"--target={self.pid}", "--", *argv]
        r = subprocess.run(cmd, env=full_env, capture_output=True, text=True,
                           timeout=scaled(timeout), input=input)
        if check and r.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30
                  ) -> subprocess.CompletedProcess:
        r = self.run(["systemctl", "--user", "--no-pager", *args], timeout=timeout)
        if check and r.returncode != 0:
            # "See journalctl" is no help without a journal: show what we have instead.
            units = [a for a in args[1:] if not a.startswith("-")]
            detail = "\n".join(self.diagnostics(u) for u in units
                               if args[0] in ("start", "stop", "restart", "reload"))
            raise HarnessError(
                f"systemctl --user {' '.join(args)} exited {r.returncode}: "
                f"{r.stderr.strip() or r.stdout.strip()}\n{detail}")
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def host_path(self, inner: str) -> Path:
        """A path inside the namespace (e.g. under its /run) as seen from the test."""
        return Path(f"/proc/{self.pid}/root") / inner.lstrip("/")

    # -- units and logs -----------------------------------------------------------------

    def install_unit(self, name: str, text: str,
                     dropins: dict[str, str] | None = None) -> Path:
        """Write a unit (+ drop-ins), route its output to `unit_log(name)`, daemon-reload."""
        path = self.unit_dir / name
        path.write_text(text)
        ddir = self.unit_dir / f"{name}.d"
        ddir.mkdir(exist_ok=True)
        (ddir / "zz-harness-log.conf").write_text(
            "[Service]\n"
            f"StandardOutput=append:{self.unit_log_path(name)}\n"
            "StandardError=inherit\n")
        for dname, dtext in (dropins or {}).items():
            (ddir / dname).write_text(dtext)
        self.systemctl("daemon-reload")
        return path

    def unit_log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def unit_log(self, name: str) -> str:
        try:
            return self.unit_log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def manager_log(self) -> str:
        """The manager's own messages (unit started/failed, exec errors) and setup errors."""
        text = ""
        for path in (self.setup_log_path, self.manager_log_path):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def diagnostics(self, unit: str) -> str:
        """Everything worth printing when a test about `unit` fails."""
        status = self.run(["systemctl", "--user", "--no-pager", "status", unit]).stdout
        return (f"--- systemctl status {unit}\n{status}\n--- {unit} output\n"
                f"{self.unit_log(unit)}\n--- manager log (tail)\n"
                f"{self.manager_log()[-4000:]}")


@pytest.fixture
def user_manager(tmp_path) -> Iterator[UserManager]:
    why = missing_prerequisite()
    if why:
        pytest.skip(f"no systemd user manager: {why}")
    with UserManager(tmp_path / "systemd-user") as um:
        yield um
