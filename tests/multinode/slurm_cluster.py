"""A real Slurm cluster on this host: one slurmctld and two slurmd "nodes" (n1, n2) with
their own ports, config, state and logs in a temp dir (recipe: shared/recipes/multinode.md).

Started by hand (PID 1 here is not systemd) and torn down by PID: every job is cancelled
first and the queue waited empty (stopping slurmd does not stop running steps), then
slurmd, then slurmctld. Authentication is auth/none + cred/none (Slurm 22.05 accepts it)
so no munged has to run; nothing outside loopback can talk to this cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: the suite's one wait_for
from conftest import wait_for  # noqa: E402

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
GRACE_TIME = 20          # the `low` partition's GraceTime (seconds)


class ClusterUnavailable(Exception):
    """Why this host cannot run the test cluster (a skip reason)."""


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_installed() -> None:
    """Install the Debian packages if they are missing (root only); else ClusterUnavailable."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ClusterUnavailable(f"cannot install Slurm: {' '.join(argv)}: {e}") from None
        if p.returncode != 0:
            raise ClusterUnavailable(f"cannot install Slurm: {' '.join(argv)}: {p.stderr.strip()[-300:]}")


class SlurmCluster:
    def __init__(self, root: Path, bf_interval: int | None = None):
        self.root = root
        # Seconds between backfill passes (Slurm's default: 30). On this idle cluster a
        # requeued job whose BeginTime has passed is started by the next backfill pass.
        self.bf_interval = bf_interval
        self.conf = root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in list(self.env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                del self.env[k]

    def write_conf(self) -> None:
        ctld, p1, p2 = free_ports(3)
        host = socket.gethostname()
        r = self.root
        (r / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=trainsup
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldPidFile={r}/slurmctld.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=preempt_send_user_signal{f',bf_interval={self.bf_interval}' if self.bf_interval else ''}
KillWait=10
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=4000
PartitionName=low  Nodes=n1,n2 Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_TIME}
PartitionName=high Nodes=n1,n2 PriorityTier=10 PreemptMode=OFF
""")

    def _daemon(self, name: str, argv: list[str], pidfile: Path) -> None:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.env)
        if p.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(argv)} failed: {p.stderr.strip()[-500:]}")
        try:
            self.pids[name] = int(wait_for(lambda: pidfile.read_text().strip(), 15, f"{name}'s pid file", 0.05))
        except (AssertionError, ValueError):
            raise ClusterUnavailable(f"{name} wrote no pid file {pidfile}") from None

    def start(self) -> SlurmCluster:
        ensure_installed()
        self.write_conf()
        r = self.root
        self._daemon("slurmctld", ["slurmctld", "-c", "-f", str(self.conf)], r / "slurmctld.pid")
        for n in ("n1", "n2"):
            self._daemon(n, ["slurmd", "-f", str(self.conf), "-N", n], r / f"slurmd-{n}.pid")
        self.wait(lambda: self.idle_nodes() >= 2, 30, "both nodes idle")
        return self

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
        return p.stdout

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])

    def job(self, job_id: str) -> dict:
        from trainsup.slurm.allocation import parse_fields
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_fields(out) if out.strip() else {}

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).split()

    @staticmethod
    def wait(pred, timeout: float, what: str, interval: float = 0.1):
        return wait_for(pred, timeout, what, interval)

    def log(self, name: str = "slurmctld") -> str:
        path = self.root / (f"{name}.log" if name == "slurmctld" else f"slurmd-{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """scancel everything, wait for an empty queue, then end the daemons by PID."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "-u", "root", check=False)
            try:
                self.wait(lambda: not self.queue(), 40, "an empty queue", 0.3)
            except AssertionError:
                pass
        for name in ("n1", "n2", "slurmctld"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _end(pid)


def _end(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        wait_for(gone, timeout, f"pid {pid} to exit on SIGTERM", 0.05)
    except AssertionError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_cluster(root: Path) -> SlurmCluster | None:
    c = SlurmCluster(root)
    try:
        return c.start()
    except BaseException:
        c.stop()
        raise
