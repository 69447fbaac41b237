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

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ... import contract
from ...spec import DaemonSpec, JobSpec
from . import clone3, shim
from .cgroup import PROCESS_GROUP, CgroupError, Containment, JobCgroup, tree_name
from .proctree import children_of  # noqa: F401  (notices.memory reads it here)

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
    """A running job: the process the daemon watches and reaps (`popen`: the job itself,
    or the shim it runs under), its pidfd, and what we know of the job's tree. `pid` is
    always the job's own process, the one users see and signals go to."""
    popen: subprocess.Popen | clone3.Leader | shim.ShimLeader   # .wait() reaps it
    pidfd: int                  # readable when `popen` has exited
    started_mono: float
    started_wall: float
    create_time: float          # the job process's
    known: dict[int, float] = field(default_factory=dict)   # descendant pid -> create_time
    cgroup: JobCgroup | None = None                       # None: process-group containment
    job_pid: int | None = None  # under a shim: the job (its child)
    job_pidfd: int = -1
    adopted: bool = False       # launched by an earlier daemon and taken over by this one

    @property
    def pid(self) -> int:
        return self.job_pid if self.job_pid is not None else self.popen.pid

    @property
    def leader_pid(self) -> int:
        """The process whose exit ends the attempt (the shim, when there is one)."""
        return self.popen.pid

    @property
    def shim_pid(self) -> int | None:
        return self.popen.pid if isinstance(self.popen, shim.ShimLeader) else None

    @property
    def shim_alive(self) -> bool:
        return isinstance(self.popen, shim.ShimLeader) and not self.popen.reaped

    @property
    def containment(self) -> str:
        return self.cgroup.kind if self.cgroup is not None else PROCESS_GROUP

    def send(self, signum: int) -> bool:
        """Signal the job through its pidfd: a recycled pid can never be hit."""
        fd = self.job_pidfd if self.job_pidfd >= 0 else self.pidfd if self.job_pid is None else -1
        if fd < 0:
            return False
        try:
            signal.pidfd_send_signal(fd, signum)
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

    def tree(self) -> list[int]:
        """The job's processes below its leader: under a shim, everything the shim
        parents (the orphans of the job's tree come to it) but the leader."""
        if self.job_pid is None:
            return descendants(self.pid)
        return [p for p in descendants(self.leader_pid) if p != self.job_pid]

    def refresh_tree(self) -> list[psutil.Process]:
        """Remember every descendant (with its start time) so that ones that leave the
        process group (setsid) are still ended at stop."""
        procs = []
        for pid in self.tree():
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
        for fd in (self.pidfd, self.job_pidfd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.job_pidfd = -1


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
        if pid == child.shim_pid:
            continue                 # the shim is not the job: it ignores the signal anyway
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
            others = [p for p in child.cgroup.pids() if p not in (child.pid, child.shim_pid)]
            if child.shim_alive:
                # The stop flow's last resort: the shim still has the job's exit status to
                # write, so everything but it (what is left gets cgroup.kill after the exit).
                for pid in (child.pid, *others):
                    try:
                        os.kill(pid, signum)
                    except OSError:
                        pass
                return len(others)
            if others or child.cgroup.populated():
                child.cgroup.kill()
            return len(others)
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


async def term_then_kill(loop: asyncio.AbstractEventLoop, pidfd: int, send: Callable[[int], None],
                         timeout: float, kill_wait: float = 5.0) -> bool:
    """`send(SIGTERM)`, wait up to `timeout` for the process behind `pidfd` to exit, then
    `send(SIGKILL)` and wait up to `kill_wait`. `send` picks the targets (a group, a tree)
    and may raise OSError for one already gone. True when it exited. Waits on the pidfd:
    no polling, and a pid reused meanwhile is never signalled through it."""
    fut = loop.create_future()
    loop.add_reader(pidfd, lambda: None if fut.done() else fut.set_result(None))
    try:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, kill_wait)):
            with contextlib.suppress(OSError):
                send(sig)
            try:
                await asyncio.wait_for(asyncio.shield(fut), wait)
                return True
            except asyncio.TimeoutError:
                continue
        return False
    finally:
        loop.remove_reader(pidfd)


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
          containment: Containment | None = None, cgroup: JobCgroup | None = None,
          plan: shim.Plan | None = None) -> Child:
    """Start the job leader in its own session, born inside `cgroup` when one is given:
    clone3(CLONE_INTO_CGROUP) for a v2 cgroup, else Popen from inside it (see
    trainsup.clone3 and trainsup.cgroup for why and what each costs).

    With a shim `plan` the process born there is trainsup-shim, which starts the job
    (user, workdir, session, exec) and writes its output to the log itself: `stdout_fd`
    is then unused. The call returns once the job is exec'd, as without a shim."""
    leader: subprocess.Popen | clone3.Leader | None = None
    pidfd = -1
    report = (-1, -1)
    job_pid: int | None = None
    try:
        run_argv: list[str] | list[bytes] = argv
        execs = None
        if plan is not None:
            drop = _privilege_drop(job)
            report = os.pipe2(os.O_CLOEXEC)
            stdout_fd = report[1]      # the shim's fd 1 is its start report to us
            run_argv = plan.argv(clone3.exec_candidates(argv[0], env), argv, str(job.workdir),
                                 drop.get("user"), drop.get("group"), drop.get("extra_groups", ()))
            execs = [os.fsencode(shim.SHIM)]
        if containment is not None and cgroup is not None and cgroup.version == 2 and clone3.available():
            try:
                leader, pidfd = _clone_into(job, run_argv, env, stdout_fd, containment, cgroup, execs)
            except OSError as e:
                if clone3.available():
                    raise
                log.warning("%s; launching through cgroup.procs instead (slower)", e)
        if leader is None:
            with (containment.entered(cgroup) if containment is not None else _nothing()):
                leader = subprocess.Popen(
                    run_argv,
                    executable=execs[0] if execs else None,
                    cwd="/" if plan is not None else str(job.workdir),
                    env=dict(env),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout_fd,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    **_own_session(),
                    **({} if plan is not None else _privilege_drop(job)),
                )
        if plan is not None:
            os.close(report[1])
            report = (report[0], -1)
            try:
                job_pid = shim.read_start(report[0])
            except OSError:
                _reap_failed(leader)
                raise
    except FileNotFoundError as e:
        what = "workdir" if e.filename in (str(job.workdir), "workdir") else "command"
        raise SpawnError(f"{job.source}: {what}: {e.filename or argv[0]!r} not found (workdir {job.workdir})") from None
    except PermissionError as e:
        raise SpawnError(f"{job.source}: command: {argv[0]!r}: {e.strerror}") from None
    except CgroupError as e:
        raise SpawnError(f"{job.source}: cannot start job {job.name}: {e}") from None
    except shim.ShimFailed as e:
        raise SpawnError(_shim_failure(job, argv, e)) from None
    except (OSError, KeyError, subprocess.SubprocessError) as e:
        raise SpawnError(f"{job.source}: cannot start {argv[0]!r}: {e}") from None
    finally:
        for fd in report:
            if fd >= 0:
                os.close(fd)
    if pidfd < 0:
        try:
            pidfd = os.pidfd_open(leader.pid)
        except OSError:
            os.kill(leader.pid, signal.SIGKILL)
            leader.wait()
            raise
    if job_pid is None:
        return Child(leader, pidfd, time.monotonic(), time.time(), _create_time(leader.pid), cgroup=cgroup)
    assert plan is not None
    # The job is the shim's child: its pidfd, taken now, is checked to be that child.
    shim_pid = leader.pid
    job_fd = shim.open_verified(job_pid, lambda p: shim.parent_of(p) == shim_pid)
    return Child(shim.ShimLeader(shim_pid, plan.status, ours=True), pidfd, time.monotonic(), time.time(),
                 _create_time(job_pid), cgroup=cgroup, job_pid=job_pid, job_pidfd=-1 if job_fd is None else job_fd)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _reap_failed(leader: subprocess.Popen | clone3.Leader) -> None:
    """A shim that could not start its job has exited (or is stuck): gone either way."""
    try:
        os.kill(leader.pid, signal.SIGKILL)
    except OSError:
        pass
    leader.wait()


def _shim_failure(job: JobSpec, argv: list[str], e: shim.ShimFailed) -> str:
    stage = e.filename
    if stage == "exec":
        if e.errno == errno.ENOENT:
            return f"{job.source}: command: {argv[0]!r} not found (workdir {job.workdir})"
        return f"{job.source}: command: {argv[0]!r}: {e.strerror}"
    if stage == "workdir":
        return f"{job.source}: workdir: {str(job.workdir)!r}: {e.strerror}"
    return f"{job.source}: cannot start {argv[0]!r}: {stage}: {e.strerror}"


def adopt(shim_pid: int, shim_fd: int, job_pid: int, job_fd: int, status: Path, cgroup: JobCgroup | None,
          ours: bool) -> Child:
    """A Child for a job a previous daemon (or this daemon's previous image, before a
    re-exec) launched, found and verified by trainsup.daemon.adoption. Its start is the
    job process's own; `started_mono` is that instant on this boot's monotonic clock."""
    ctime = _create_time(job_pid)
    started_wall = ctime or time.time()
    started_mono = time.monotonic() - max(0.0, time.time() - started_wall)
    return Child(shim.ShimLeader(shim_pid, status, ours=ours), shim_fd, started_mono, started_wall, ctime,
                 cgroup=cgroup, job_pid=job_pid, job_pidfd=job_fd, adopted=True)


def reap(child: Child) -> ExitRecord:
    """Reap the attempt's leader; how the job ended. Under a shim the status (and its
    time) is the one the shim wrote; a shim that left none was killed before its job
    ended: that exit is unknown ("lost") and treated as a crash."""
    rc = child.popen.wait()
    if isinstance(child.popen, shim.ShimLeader):
        st = child.popen.exit
        if st is None:
            return ExitRecord("lost (its shim ended without an exit status)", None, None, time.time())
        ex = classify_exit(st.returncode)
        ex.at = st.at
        return ex
    assert rc is not None
    return classify_exit(rc)


def _clone_into(job: JobSpec, argv: list[str] | list[bytes], env: Mapping[str, str], stdout_fd: int,
                containment: Containment, cgroup: JobCgroup,
                execs: list[bytes] | None = None) -> tuple[clone3.Leader, int]:
    drop = _privilege_drop(job) if execs is None else {}
    # not a job path: cgroupfs
    cg_fd = os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with containment.entered_memory(cgroup):
            return clone3.spawn(argv, env, "/" if execs is not None else str(job.workdir), stdout_fd, cg_fd,
                                uid=drop.get("user"), gid=drop.get("group"),
                                groups=drop.get("extra_groups", ()), execs=execs)
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
    """At daemon exit: remove the heartbeat files and notice dirs of a /run dir (a state
    dir's are kept)."""
    if d.parent != run_dir:
        return
    try:
        # not a job path: the daemon's /run heartbeat dir
        for e in os.scandir(d):
            if e.is_dir(follow_symlinks=False):
                # not a job path: the daemon's /run heartbeat dir (rmtree is fd-based)
                shutil.rmtree(e.path)        # fd-based: a link a job planted is never followed
            elif e.is_file(follow_symlinks=False) or e.is_symlink():
                os.unlink(e.path)
        os.rmdir(d)
    except OSError as e:
        log.warning("heartbeat dir %s: %s", d, e.strerror)


def prepare_heartbeat(path: Path, owner: tuple[int, int] | None) -> None:
    """Create the job's heartbeat file owned by the job's user, so a `user:` job can touch
    it (a root-owned one made hang detection restart healthy jobs), and empty it: the step
    an earlier attempt wrote must never read as this one's. The file is opened without
    following a symlink (O_NOFOLLOW) and changed through that fd only: a link planted there
    by the user cannot make root chown another file. Raises OSError."""
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
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def process_matches(pid: int, create_time: float) -> bool:
    """A pid read from disk is only ours if the process there started when ours did."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False
