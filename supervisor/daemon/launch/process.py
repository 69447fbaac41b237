"""Spawning a job's process, signalling it through pidfds, and ending its whole tree.

Containment: each launch is born inside its own cgroup where one is writable
(trainsup.cgroup); the process group and the subreaper sweep below remain the fallback
where none is (`Child.containment` says which, for `status`).

One way to reap: each launched leader has a pidfd that the event loop watches; when it
becomes readable the leader is reaped with waitpid(pid) for that pid alone. Descendants
orphaned to the daemon (it is a child subreaper) are reaped by pid too. Nothing here ever
calls waitpid(-1): that would steal a leader's status and make a crash read as exit 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ... import contract
from ...spec import DaemonSpec, JobSpec
from . import clone3
from .cgroup import PROCESS_GROUP, CgroupError, Containment, JobCgroup, tree_name

log = logging.getLogger("trainsup.process")

_PR_SET_CHILD_SUBREAPER = 36
# The base environment of every launch, like a systemd service's (SPEC section 4).
_BASE_ENV_KEYS = ("PATH", "LANG", "TZ")


def become_subreaper() -> bool:
    """Orphaned descendants of jobs (double forks, setsid daemons) reparent to us, so a
    stop can still find and end them instead of leaking them to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _daemon_account() -> pwd.struct_passwd | None:
    """The daemon's own account, looked up once (jobs without `user:` run as it)."""
    try:
        return pwd.getpwuid(os.getuid())
    except KeyError:
        return None


def build_env(job: JobSpec, daemon: DaemonSpec, extra: Mapping[str, str],
              daemon_env: Mapping[str, str] = os.environ) -> dict[str, str]:
    env: dict[str, str] = {}
    for k in _BASE_ENV_KEYS:
        if k in daemon_env:
            env[k] = daemon_env[k]
    for k, v in daemon_env.items():
        if k.startswith("LC_"):
            env[k] = v
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if job.user and job.uid is not None:        # resolved when the config loaded
        env.update(HOME=str(job.home or "/"), USER=job.user, LOGNAME=job.user, SHELL=job.shell or "/bin/sh")
    elif (me := _daemon_account()) is not None:
        env.update(HOME=me.pw_dir, USER=me.pw_name, LOGNAME=me.pw_name, SHELL=me.pw_shell or "/bin/sh")
    for k in daemon.pass_env:
        if k in daemon_env:
            env[k] = daemon_env[k]
    env.update(dict(job.env))
    env.update(extra)
    env.pop("LD_PRELOAD", None)
    return env


def signal_number(name: str) -> int:
    return contract.signal_number(name)


def catches_signal(pid: int, signum: int) -> bool:
    """True when the process has a handler for `signum` (SigCgt in /proc/PID/status).
    SIGUSR1's default action kills: DataLoader workers and launchers that do not handle
    it must never receive it."""
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return False
    return False


@dataclass
class ExitRecord:
    reason: str            # "exit N", "signal NAME", "oom-killed", "preempted", "stopped"
    code: int | None
    signal: str | None
    at: float              # wall time, UTC epoch seconds

    def as_dict(self) -> dict:
        return {"reason": self.reason, "code": self.code, "signal": self.signal, "at": self.at}


def classify_exit(returncode: int) -> ExitRecord:
    now = time.time()
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return ExitRecord(f"signal {name}", None, name, now)
    return ExitRecord(f"exit {returncode}", returncode, None, now)


class SpawnError(Exception):
    """The job's process could not be started (one line, for status)."""


@dataclass
class Child:
    """A running job leader: its Popen handle, its pidfd, and what we know of its tree."""
    popen: subprocess.Popen | clone3.Leader        # the leader; .wait() reaps it
    pidfd: int
    started_mono: float
    started_wall: float
    create_time: float
    known: dict[int, float] = field(default_factory=dict)   # descendant pid -> create_time
    cgroup: JobCgroup | None = None                       # None: process-group containment

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def containment(self) -> str:
        return self.cgroup.kind if self.cgroup is not None else PROCESS_GROUP

    def send(self, signum: int) -> bool:
        """Signal the leader through its pidfd: a recycled pid can never be hit."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.ESRCH:
                return False
            raise

    def signal_group(self, signum: int) -> None:
        # The group id is the leader's pid; it cannot be reused while the leader is
        # unreaped or any member is alive, so killpg cannot hit a stranger's group.
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def refresh_tree(self) -> list[psutil.Process]:
        """Remember every descendant (with its start time) so that ones that leave the
        process group (setsid) are still ended at stop."""
        procs = []
        for pid in descendants(self.pid):
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        for p in procs:
            try:
                self.known.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        return procs

    def live_descendants(self) -> list[psutil.Process]:
        self.refresh_tree()
        out = []
        for pid, ctime in list(self.known.items()):
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - ctime) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                    self.known.pop(pid, None)
                    continue
                out.append(p)
            except psutil.Error:
                self.known.pop(pid, None)
        return out

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def deliver_save_signal(child: Child, signum: int) -> list[int]:
    """Send the save signal to every process of the tree that catches it. Returns the
    pids signalled (empty: nobody can do an emergency save)."""
    sent = []
    if child.cgroup is not None:
        # The cgroup lists every process of the job, the ones that left the tree too.
        procs = [child.pid] + [p for p in child.cgroup.pids() if p != child.pid]
    else:
        procs = [child.pid] + [p.pid for p in child.refresh_tree()]
    for pid in procs:
        if catches_signal(pid, signum):
            try:
                if pid == child.pid:
                    if child.send(signum):
                        sent.append(pid)
                elif child.cgroup is not None:
                    os.kill(pid, signum)     # a member of the job's cgroup: ours
                    sent.append(pid)
                else:
                    ctime = child.known.get(pid)
                    p = psutil.Process(pid)
                    if ctime is None or abs(p.create_time() - ctime) < 0.01:
                        p.send_signal(signum)
                        sent.append(pid)
            except (psutil.Error, OSError):
                pass
    return sent


def kill_leftovers(child: Child, signum: int = signal.SIGKILL) -> int:
    """End what is left of the job: through its cgroup (all of it at once, whatever left
    the tree), else the descendants that escaped the process group (setsid)."""
    if child.cgroup is not None:
        try:
            n = len([p for p in child.cgroup.pids() if p != child.pid])
            if n or child.cgroup.populated():
                child.cgroup.kill()
            return n
        except CgroupError as e:
            log.warning("%s; ending the process tree instead", e)
    n = 0
    for p in child.live_descendants():
        try:
            p.send_signal(signum)
            n += 1
        except psutil.Error:
            pass
    return n


def children_of(pid: int) -> list[int]:
    """The direct children of every thread of `pid` (/proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        # not a job path: /proc
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            # not a job path: /proc
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every descendant of pid, walking /proc/PID/task/*/children: it reads the job's
    own tree only, where psutil's children(recursive=True) reads /proc/*/stat of every
    process on the machine (thousands on a busy node) before each save signal."""
    out: list[int] = []
    todo = [pid]
    seen = {pid}
    while todo:
        for child in children_of(todo.pop()):
            if child not in seen:
                seen.add(child)
                out.append(child)
                todo.append(child)
    return out


def _own_children() -> list[int]:
    """Our direct children: a few small reads, not a scan of /proc."""
    return children_of(os.getpid())


def _is_zombie(pid: int) -> bool:
    try:
        # not a job path: /proc
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the last ')' (the command name may contain one).
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def reap_orphans(leaders: Iterable[int]) -> list[int]:
    """Reap zombies reparented to the daemon (we are a subreaper), by pid, never -1.
    Runs on every SIGCHLD, so it must be cheap: it is on the relaunch path."""
    keep = set(leaders)
    reaped = []
    for pid in _own_children():
        if pid in keep or not _is_zombie(pid):
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
            reaped.append(pid)
        except ChildProcessError:
            pass
    return reaped


def orphans_of_job(job_name: str, leaders: Iterable[int]) -> list[psutil.Process]:
    """Live processes reparented to the daemon (it is a subreaper) that were launched for
    `job_name` (contract.JOB in their environment), with their descendants."""
    keep = set(leaders)
    marker = b"\0" + contract.JOB.encode() + b"=" + job_name.encode() + b"\0"
    out: list[psutil.Process] = []
    for pid in _own_children():
        if pid in keep:
            continue
        try:
            # not a job path: /proc
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in b"\0" + f.read():
                    continue
            p = psutil.Process(pid)
            out.append(p)
            for d in descendants(pid):
                try:
                    out.append(psutil.Process(d))
                except psutil.Error:
                    pass
        except (OSError, psutil.Error):
            continue
    return out


def kill_orphans(job_name: str, leaders: Iterable[int]) -> int:
    """SIGKILL what a dead leader left behind (a stuck DataLoader worker, a setsid helper),
    so the next attempt never shares the machine with the previous one."""
    n = 0
    for p in orphans_of_job(job_name, leaders):
        try:
            p.kill()
            n += 1
        except psutil.Error:
            pass
    return n


def _privilege_drop(job: JobSpec) -> dict:
    """Popen arguments that drop to the job's user in the safe order (supplementary
    groups, gid, uid), with that user's groups rather than root's: the ids the config
    resolved when it loaded (a lookup here would block the loop on NSS, LDAP say)."""
    if not job.user and not job.group:
        return {}
    if job.gid is None or (job.user and job.uid is None):
        raise KeyError(f"user/group of job {job.name} not resolved")
    kw: dict = {"group": job.gid, "extra_groups": list(job.groups) if job.user else [job.gid]}
    if job.user:
        kw["user"] = job.uid
    return kw


def _own_session() -> dict:
    """Each job leads its own session (and so its own process group): it has no
    controlling terminal, so a job cannot open /dev/tty or TIOCSTI into the terminal the
    daemon was started from, and a stop reaches its group with killpg. setsid keeps
    Popen's vfork path (no preexec_fn): a launch stays well under a millisecond."""
    return {"start_new_session": True}


def spawn(job: JobSpec, argv: list[str], env: Mapping[str, str], stdout_fd: int,
          containment: Containment | None = None, cgroup: JobCgroup | None = None) -> Child:
    """Start the job leader in its own session, born inside `cgroup` when one is given:
    clone3(CLONE_INTO_CGROUP) for a v2 cgroup, else Popen from inside it (see
    trainsup.clone3 and trainsup.cgroup for why and what each costs)."""
    leader: subprocess.Popen | clone3.Leader | None = None
    pidfd = -1
    try:
        if containment is not None and cgroup is not None and cgroup.version == 2 and clone3.available():
            try:
                leader, pidfd = _clone_into(job, argv, env, stdout_fd, containment, cgroup)
            except OSError as e:
                if clone3.available():
                    raise
                log.warning("%s; launching through cgroup.procs instead (slower)", e)
        if leader is None:
            with (containment.entered(cgroup) if containment is not None else _nothing()):
                leader = subprocess.Popen(
                    argv,
                    cwd=str(job.workdir),
                    env=dict(env),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout_fd,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    **_own_session(),
                    **_privilege_drop(job),
                )
    except FileNotFoundError as e:
        what = "workdir" if e.filename == str(job.workdir) else "command"
        raise SpawnError(f"{job.source}: {what}: {e.filename or argv[0]!r} not found (workdir {job.workdir})") from None
    except PermissionError as e:
        raise SpawnError(f"{job.source}: command: {argv[0]!r}: {e.strerror}") from None
    except CgroupError as e:
        raise SpawnError(f"{job.source}: cannot start job {job.name}: {e}") from None
    except (OSError, KeyError, subprocess.SubprocessError) as e:
        raise SpawnError(f"{job.source}: cannot start {argv[0]!r}: {e}") from None
    if pidfd < 0:
        try:
            pidfd = os.pidfd_open(leader.pid)
        except OSError:
            os.kill(leader.pid, signal.SIGKILL)
            leader.wait()
            raise
    try:
        ctime = psutil.Process(leader.pid).create_time()
    except psutil.Error:
        ctime = 0.0
    return Child(leader, pidfd, time.monotonic(), time.time(), ctime, cgroup=cgroup)


def _clone_into(job: JobSpec, argv: list[str], env: Mapping[str, str], stdout_fd: int,
                containment: Containment, cgroup: JobCgroup) -> tuple[clone3.Leader, int]:
    drop = _privilege_drop(job)
    # not a job path: cgroupfs
    cg_fd = os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with containment.entered_memory(cgroup):
            return clone3.spawn(argv, env, str(job.workdir), stdout_fd, cg_fd,
                                uid=drop.get("user"), gid=drop.get("group"),
                                groups=drop.get("extra_groups", ()))
    finally:
        os.close(cg_fd)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


RUN_DIR = Path("/run/trainsup")


def heartbeat_dir(state_dir: Path, run_dir: Path = RUN_DIR) -> Path:
    """Where the jobs' heartbeat files live. The state dir is 0750 root: a `user:` job
    cannot even reach a file there. A root daemon keeps them in /run/trainsup/<tree>/, each
    level root-owned 0711 (reachable by name, not listable, not writable), one per state
    dir like the cgroup tree; a daemon that cannot write /run (not root: it has no `user:`
    jobs) uses state_dir/heartbeat. Raises OSError when neither can be made."""
    if os.geteuid() == 0:
        try:
            d = run_dir / tree_name(state_dir)
            for level in (run_dir, d):
                try:
                    os.mkdir(level, 0o711)
                    os.chmod(level, 0o711)          # whatever the umask
                except FileExistsError:
                    pass
                st = os.lstat(level)
                # /run/trainsup may be systemd's RuntimeDirectory (the socket's, 0755): used
                # as it is when root's, searchable by all and writable by root alone.
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 \
                        or not st.st_mode & 0o001:
                    raise OSError(errno.EPERM, f"{level}: not a root-owned directory others can "
                                               f"search and not write")
            os.chmod(d, 0o711)
            return d
        except OSError as e:
            log.warning("heartbeat files in %s: %s; using the state dir (`user:` jobs cannot reach it)",
                        run_dir, e.strerror or e)
    d = state_dir / "heartbeat"
    d.mkdir(parents=True, exist_ok=True)
    return d


def discard_heartbeat_dir(d: Path, run_dir: Path = RUN_DIR) -> None:
    """At daemon exit: remove the heartbeat files of a /run dir (a state dir's are kept)."""
    if d.parent != run_dir:
        return
    try:
        # not a job path: the daemon's /run heartbeat dir
        for e in os.scandir(d):
            if e.is_file(follow_symlinks=False) or e.is_symlink():
                os.unlink(e.path)
        os.rmdir(d)
    except OSError as e:
        log.warning("heartbeat dir %s: %s", d, e.strerror)


def prepare_heartbeat(path: Path, owner: tuple[int, int] | None) -> None:
    """Create the job's heartbeat file owned by the job's user, so a `user:` job can touch
    it (a root-owned one made hang detection restart healthy jobs). The file is opened
    without following a symlink (O_NOFOLLOW) and changed through that fd only: a link
    planted there by the user cannot make root chown another file. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # not a job path: the daemon's heartbeat file (O_NOFOLLOW|O_NONBLOCK, checked regular)
        fd = os.open(path, flags, 0o644)
        st = os.fstat(fd)
        if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
            os.close(fd)                     # a hard link to some other file: replaced
            raise OSError(errno.ELOOP, "not a file of its own")
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        os.unlink(path)                      # a symlink: never followed, replaced
        # not a job path: the daemon's heartbeat file (O_EXCL)
        fd = os.open(path, flags | os.O_EXCL, 0o644)
        st = os.fstat(fd)
    try:
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


def process_matches(pid: int, create_time: float) -> bool:
    """A pid read from disk is only ours if the process there started when ours did."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False
