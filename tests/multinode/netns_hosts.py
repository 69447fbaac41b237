"""Two "hosts" on this machine: two network namespaces joined by a veth pair, each with
its own hosts file (`ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts) and,
for the processes started through `prefix()`, its own hostname (`unshare --uts`).

Addresses come from 198.18.0.0/15 (the benchmarking range; nothing routes there): only
these two addresses and loopback carry the tests' traffic. Everything made here is
removed by `stop()`, which also SIGKILLs whatever still runs inside the namespaces."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


class NetnsUnavailable(RuntimeError):
    """This machine cannot make the namespaces (one line: why)."""


@dataclass(frozen=True)
class Host:
    ns: str          # network namespace
    hostname: str    # its UTS hostname, resolvable in both namespaces
    addr: str        # its address on the veth
    ifname: str      # its end of the veth (GLOO_SOCKET_IFNAME)

    def prefix(self) -> list[str]:
        """Argv prefix running a command on this host: its namespace, its hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname]


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")


class NetnsHosts:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"            # interface names: at most 15 characters
        self.hosts = (Host(f"tsA{tag}", "tshostA", "198.18.0.1", f"tsvA{tag}"),
                      Host(f"tsB{tag}", "tshostB", "198.18.0.2", f"tsvB{tag}"))
        self._made: list[str] = []

    def start(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            raise NetnsUnavailable("`ip` (iproute2) or `unshare` (util-linux) is not installed")
        a, b = self.hosts
        hosts_file = (f"127.0.0.1 localhost\n{a.addr} {a.hostname}\n{b.addr} {b.hostname}\n")
        self._etc_made = not Path("/etc/netns").exists()
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            self._made.append(h.ns)
            d = Path("/etc/netns") / h.ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts_file)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for h in self.hosts:
            _ip("link", "set", h.ifname, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")

    def pids(self, h: Host) -> list[int]:
        p = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True, timeout=20)
        return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []

    def stop(self) -> None:
        """SIGKILL what still runs inside, delete the namespaces (the veth goes with them)
        and their /etc/netns files. Safe to call after a partial start."""
        for h in self.hosts:
            if h.ns in self._made:
                for pid in self.pids(h):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                subprocess.run(["ip", "netns", "delete", h.ns], capture_output=True, timeout=20)
            shutil.rmtree(Path("/etc/netns") / h.ns, ignore_errors=True)
        # A veth end still outside (a start that failed before the move).
        for h in self.hosts:
            subprocess.run(["ip", "link", "delete", h.ifname], capture_output=True, timeout=20)
        self._made.clear()
        if getattr(self, "_etc_made", False):
            try:
                Path("/etc/netns").rmdir()      # ours, and empty again
            except OSError:
                pass
