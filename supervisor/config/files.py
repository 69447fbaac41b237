"""Files and directories -> specs: one job file, the jobs dir (duplicates, claims, files
still being written), the daemon config and where it is found, and the default state dir
and socket of `trainsup run`."""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import os
import pwd
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..checkpoint.claims import cross_job_conflicts
from ..printable import printable
from ..spec import DaemonSpec, InvalidJob, JobSpec
from ..trust import daemon_groups, daemon_owners, unsafe_dir, unsafe_file, user_label
from .schema import _PATH_KEYS, DAEMON, JOB, Section
from .values import Context, _home, job_name
from .yaml import (
    UNIX_SOCKET_PATH_MAX,
    ConfigError,
    Invalid,
    Node,
    Unsettled,
    _Reported,
    read_text,
    read_text_and_stat,
    read_yaml,
)

# ------------------------------------------------------------------------- job files


@dataclasses.dataclass(frozen=True)
class JobsDirTrust:
    """Who could have written the daemon's jobs dir (trust.py), found once per scan: a job
    file whose owner is not root or the daemon's user, or that sits in a dir others can
    write, runs only as its owner (a team's group-writable drop box: a member's file
    without `user:` ran as root)."""
    path: Path
    dir_problem: str | None
    owners: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, jobs_dir: Path) -> JobsDirTrust:
        owners, gids = daemon_owners(), daemon_groups()
        try:
            problem = unsafe_dir(os.stat(jobs_dir), owners, gids)
        except OSError as e:
            problem = f"cannot be inspected ({e.strerror})"
        return cls(jobs_dir, problem, frozenset(owners), frozenset(gids))

    def refuses(self, st: os.stat_result, spec: JobSpec) -> str | None:
        """Why this job file may not run as the job says, or None. A file owned by the
        user the job runs as (its `user:`) runs, wherever it is: its owner could run that
        command anyway. Any other file must be root's or the daemon's user's, writable by
        no one else, in a dir no one else can write."""
        runs_as = spec.uid if spec.uid is not None else os.geteuid()
        owner = st.st_uid
        if owner == runs_as and runs_as not in self.owners:
            why = unsafe_file(st, {runs_as}, set(self.gids))
            return None if why is None else (f"the job file {_is(why)}: others than its owner could "
                                             "change what it runs; chmod go-w it")
        why = unsafe_file(st, set(self.owners), set(self.gids))
        if why is None and self.dir_problem is None:
            return None
        if owner not in self.owners:
            if spec.user is None:
                return (f"the job file is owned by {user_label(owner)}, not root or the daemon's user, "
                        f"and has no `user:`, so it would run as {user_label(runs_as)}; add "
                        f"`user: {_name_of(owner)}` (a job file may run as its owner) or have root own it")
            return (f"the job file is owned by {user_label(owner)} but says `user: {spec.user}`; a job "
                    "file not owned by root or the daemon's user runs only as its owner")
        if why is not None:
            return f"the job file {_is(why)}: anyone could change what it runs; chmod go-w it"
        return (f"the jobs dir {printable(self.path)} {_is(self.dir_problem or '')}, so others could have "
                f"put this file there; a job file in such a dir must be owned by the user it runs as "
                f"(`user:`), not by {user_label(owner)}")


def _is(why: str) -> str:
    return why.removeprefix("it ")


def _name_of(uid: int) -> str:
    label = user_label(uid)
    return label[label.index("(") + 1:-1] if "(" in label else str(uid)


def _read_job(path: Path, is_root: bool, *, settle: bool = False, runnable: bool = False,
              trust: JobsDirTrust | None = None) -> tuple[JobSpec | InvalidJob, int]:
    """The job, or InvalidJob; plus the line of `name:` (0 if none) for duplicate errors.
    `settle`: raise Unsettled for a file still being written. `runnable`: also check that
    the workdir exists and the command resolves (`trainsup validate`). `trust`: the jobs
    dir's (the daemon's scans): a file others could have written is invalid."""
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    # The file's name is the first job-controlled text here: what is not UTF-8 or is a
    # control character is replaced now, so no status row, log line or metrics label
    # downstream ever holds it (a non-UTF-8 name made every metrics scrape fail).
    ctx = Context(printable(path), base, is_root)
    name, name_line = printable(path.stem), 0
    text_, st = read_text_and_stat(path, ctx.report, settle=settle)
    root = read_yaml(text_, ctx.report) if text_ is not None else None
    if root is not None:
        entry = root.value.get("name")
        if entry and entry[1].kind == "scalar":
            try:
                name, name_line = job_name(entry[1], "name", ctx), entry[1].line
            except Invalid:
                pass                             # reported again, in order, below
        try:
            values = JOB.values(root, "", ctx)
        except _Reported:
            values = None
        if values is not None and not ctx.errors:
            values.setdefault("workdir", None)
            if values["workdir"] is None:
                values["workdir"] = base
            values.update(_identity(ctx))
            spec = JobSpec(source=Path(os.path.abspath(path)), **values)
            if runnable:
                _check_runnable(spec, root, ctx)
            refused = trust.refuses(st, spec) if trust is not None and st is not None else None
            if refused:
                ctx.report(1, "(file)", refused)
            if not ctx.errors:
                return spec, name_line
    return InvalidJob(name=name, source=Path(os.path.abspath(path)),
                      errors=tuple(ctx.lines())), name_line


def _identity(ctx: Context) -> dict:
    """uid, gid, home and supplementary groups of the job's `user:`/`group:`, resolved
    now so nothing looks users up on the daemon's event loop later."""
    out: dict[str, Any] = {}
    if ctx.account is not None:
        gid = ctx.group_id if ctx.group_id is not None else ctx.account.pw_gid
        out.update(uid=ctx.account.pw_uid, gid=gid, home=Path(ctx.account.pw_dir),
                   groups=tuple(sorted(set(os.getgrouplist(ctx.account.pw_name, gid)))),
                   shell=ctx.account.pw_shell or "/bin/sh")
    elif ctx.group_id is not None:
        out["gid"] = ctx.group_id
    return out


def _key_line(root: Node, key: str) -> int:
    entry = root.value.get(key)
    return entry[0] if entry else 1


def _check_runnable(spec: JobSpec, root: Node, ctx: Context) -> None:
    """One line each: the workdir is missing, the program does not resolve."""
    if not spec.workdir.is_dir():
        what = "does not exist" if not spec.workdir.exists() else "is not a directory"
        ctx.report(_key_line(root, "workdir"), "workdir", f"{spec.workdir} {what}")
        return
    program = spec.command[0]
    env = dict(spec.env)
    if "/" in program:
        where = spec.workdir / program
        if not (where.is_file() and os.access(where, os.X_OK)):
            ctx.report(_key_line(root, "command"), "command",
                       f"{program!r} is not an executable file (looked at {where})")
        return
    search = env.get("PATH") or os.environ.get("PATH") or os.defpath
    if shutil.which(program, path=search) is None:
        ctx.report(_key_line(root, "command"), "command",
                   f"{program!r} is not found on the job's PATH ({search})")


def load_job_file(path: Path | str, *, is_root: bool) -> JobSpec | InvalidJob:
    """One job file -> JobSpec, or InvalidJob carrying every problem. Never raises for
    bad content or an unreadable file."""
    return _read_job(Path(path), is_root)[0]


def _mark_duplicates(loaded: list[tuple[Path, JobSpec | InvalidJob, int]]) -> list:
    """Later files reusing a name become invalid, pointing at the first file."""
    first: dict[str, tuple[Path, int]] = {}
    result = []
    for path, job, line in loaded:
        if line and job.name in first:
            other, other_line = first[job.name]
            error = (f"{printable(path)}:{line}: name: job name {job.name!r} is already used by "
                     f"{printable(other)}:{other_line}")
            previous = job.errors if isinstance(job, InvalidJob) else ()
            job = InvalidJob(name=job.name, source=job.source,
                             errors=tuple(sorted((*previous, error), key=_line_of)))
        elif line:
            first[job.name] = (path, line)
        result.append(job)
    return result


def _line_of(error: str) -> int:
    match = re.search(r":(\d+): ", error)
    return int(match.group(1)) if match else 0


def _job_files(jobs_dir: Path) -> list[Path]:
    return sorted(p for p in jobs_dir.iterdir()
                  if not p.name.startswith(".") and p.suffix in (".yaml", ".yml") and p.is_file())


def _refuse_checkpoint_claims(jobs: list, jobs_dir: Path | None, state_dir: Path | None) -> list:
    """checkpoint.dir that is `/`, a home, the state/jobs dir or another job's: invalid."""
    conflicts = cross_job_conflicts([j for j in jobs if isinstance(j, JobSpec)],
                                    jobs_dir=jobs_dir, state_dir=state_dir)
    return [InvalidJob(name=j.name, source=j.source, errors=tuple(conflicts[j.name]))
            if isinstance(j, JobSpec) and j.name in conflicts else j for j in jobs]


def load_jobs_dir(jobs_dir: Path | str, *, is_root: bool,
                  state_dir: Path | None = None) -> tuple[list[JobSpec], list[InvalidJob]]:
    """Every `*.yaml`/`*.yml` in jobs_dir (sorted, hidden files skipped). A missing dir is
    empty; an unreadable one is reported as one invalid entry named after the dir."""
    scan = scan_jobs_dir(jobs_dir, is_root=is_root, settle=False, state_dir=state_dir)
    return scan.jobs, scan.invalid


@dataclasses.dataclass
class JobsDirScan:
    jobs: list[JobSpec]
    invalid: list[InvalidJob]
    unsettled: list[Path]       # files still being written: read them again shortly


def scan_jobs_dir(jobs_dir: Path | str, *, is_root: bool, settle: bool = True,
                  state_dir: Path | None = None) -> JobsDirScan:
    """load_jobs_dir, for the daemon: with `settle`, a file that may still be being
    written is neither a job nor an invalid job but listed in `unsettled`, so the caller
    leaves that job as it is and scans again in a moment."""
    jobs_dir = Path(jobs_dir)
    try:
        files = _job_files(jobs_dir)
    except FileNotFoundError:
        return JobsDirScan([], [], [])
    except OSError as exc:
        error = f"{printable(jobs_dir)}:1: (file): cannot list the jobs dir: {exc.strerror}"
        return JobsDirScan([], [InvalidJob(name=printable(jobs_dir.name), source=jobs_dir, errors=(error,))], [])
    loaded, unsettled = [], []
    trust = JobsDirTrust.of(jobs_dir)
    for p in files:
        try:
            loaded.append((p, *_read_job(p, is_root, settle=settle, trust=trust)))
        except Unsettled:
            unsettled.append(p)
    jobs = _refuse_checkpoint_claims(_mark_duplicates(loaded), jobs_dir, state_dir)
    return JobsDirScan([j for j in jobs if isinstance(j, JobSpec)],
                       [j for j in jobs if isinstance(j, InvalidJob)], unsettled)


def scan_job_file(path: Path | str, *, is_root: bool, settle: bool = True,
                  state_dir: Path | None = None) -> JobsDirScan:
    """scan_jobs_dir for one file (`trainsup run JOB.yaml`): its job, or why it is invalid."""
    path = Path(path)
    try:
        loaded = [(path, *_read_job(path, is_root, settle=settle))]
    except Unsettled:
        return JobsDirScan([], [], [path])
    jobs = _refuse_checkpoint_claims(_mark_duplicates(loaded), None, state_dir)
    return JobsDirScan([j for j in jobs if isinstance(j, JobSpec)],
                       [j for j in jobs if isinstance(j, InvalidJob)], [])


def validate_files(paths: Iterable[Path | str], *, is_root: bool, runnable: bool = False) -> list[str]:
    """All error lines for `trainsup validate`; duplicate names across the files count.
    `runnable` also checks that each workdir exists and each command resolves."""
    loaded = [(Path(p), *_read_job(Path(p), is_root, runnable=runnable)) for p in paths]
    errors: list[str] = []
    for job in _refuse_checkpoint_claims(_mark_duplicates(loaded), None, None):
        if isinstance(job, InvalidJob):
            errors.extend(job.errors)
    return errors


# ----------------------------------------------------------------------- daemon config


def _xdg(env: Mapping[str, str], name: str, fallback: Path) -> Path:
    value = env.get(name, "")
    # The XDG spec says relative values are invalid and must be ignored.
    return Path(value) if value and os.path.isabs(value) else fallback


def default_config_path(*, is_root: bool, env: Mapping[str, str] = os.environ) -> Path:
    """Where a daemon config would conventionally live (the caller decides whether to
    read it when it exists; load_daemon_config(None, ...) reads nothing)."""
    if is_root:
        return Path("/etc/trainsup/trainsup.yaml")
    return _xdg(env, "XDG_CONFIG_HOME", _home(env) / ".config") / "trainsup" / "trainsup.yaml"


# `--config none` / TRAINSUP_CONFIG=none: read no config file at all (a test daemon on a
# machine whose /etc/trainsup/trainsup.yaml has production hooks and a metrics port).
NO_CONFIG = "none"


def choose_config(explicit: Path | str | None, *, is_root: bool,
                  env: Mapping[str, str] = os.environ) -> tuple[Path | None, str]:
    """(the daemon config to read, or None; how it was chosen, for the log and `status`).

    --config FILE beats TRAINSUP_CONFIG, which beats the conventional file
    ($CONFIGURATION_DIRECTORY/trainsup.yaml under systemd, /etc/trainsup/trainsup.yaml as
    root, else $XDG_CONFIG_HOME/trainsup/trainsup.yaml) when it exists. `none` in either
    of the first two means no file. An explicit file must exist (load_daemon_config says so)."""
    for value, how in ((explicit, "--config"), (env.get("TRAINSUP_CONFIG") or None, "TRAINSUP_CONFIG")):
        if value is None:
            continue
        if str(value) == NO_CONFIG:
            return None, f"no config file ({how} none)"
        return Path(value), f"{os.path.abspath(value)} ({how})"
    candidates = [default_config_path(is_root=is_root, env=env)]
    systemd = _systemd_dir(env, "CONFIGURATION_DIRECTORY")
    if systemd is not None:              # a unit's ConfigurationDirectory=trainsup
        candidates.insert(0, systemd / "trainsup.yaml")
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return found, f"{found} (found at its default place)"
    return None, f"no config file (none at {candidates[0]})"


def discover_config(explicit: Path | str | None, *, is_root: bool,
                    env: Mapping[str, str] = os.environ) -> Path | None:
    """The daemon config to read (choose_config without the why)."""
    return choose_config(explicit, is_root=is_root, env=env)[0]


def _systemd_dir(env: Mapping[str, str], name: str) -> Path | None:
    """A directory systemd made for the unit (StateDirectory= etc.); the first when it
    lists several, colon-separated."""
    value = env.get(name, "").split(":")[0]
    return Path(value) if value and os.path.isabs(value) else None


def _under_systemd(defaults: dict, state_dir: Path | None, env: Mapping[str, str]) -> dict:
    """Under systemd the unit's own directories are the defaults, so `ExecStart=trainsup
    daemon` needs no path flags and the config file can still change every path."""
    for key, var, leaf in (("jobs_dir", "CONFIGURATION_DIRECTORY", "jobs.d"),
                           ("state_dir", "STATE_DIRECTORY", ""),
                           ("socket", "RUNTIME_DIRECTORY", "trainsup.sock"),
                           ("log_dir", "LOGS_DIRECTORY", "")):
        d = _systemd_dir(env, var)
        if d is not None and not (key in ("state_dir", "log_dir") and state_dir):
            defaults[key] = d / leaf if leaf else d
    return defaults


def _defaults(state_dir: Path | None, is_root: bool, env: Mapping[str, str]) -> dict:
    if is_root:
        try:
            grp.getgrnam("trainsup")
            group: str | None = "trainsup"
        except KeyError:
            group = None
        # A daemon given its own state dir keeps its logs there too: two daemons with
        # same-named jobs must not share /var/log/trainsup/<job>.log.
        return {"jobs_dir": Path("/etc/trainsup/jobs.d"),
                "state_dir": state_dir or Path("/var/lib/trainsup"),
                "socket": Path("/run/trainsup/trainsup.sock"),
                "log_dir": state_dir / "logs" if state_dir else Path("/var/log/trainsup"),
                "socket_group": group}
    home = _home(env)
    state = state_dir or _xdg(env, "XDG_STATE_HOME", home / ".local" / "state") / "trainsup"
    runtime = env.get("XDG_RUNTIME_DIR", "")
    return {"jobs_dir": _xdg(env, "XDG_CONFIG_HOME", home / ".config") / "trainsup" / "jobs.d",
            "state_dir": state,
            "socket": (Path(runtime) / "trainsup.sock" if runtime and os.path.isabs(runtime)
                       else state / "trainsup.sock"),
            "log_dir": state / "logs",
            "socket_group": None}


def _flag_node(value: Any) -> Node:
    if isinstance(value, Path):
        value = str(value)
    return Node("scalar", value, 0, str(value))


def load_daemon_config(path: Path | str | None, overrides: Mapping[str, Any], *,
                       is_root: bool, env: Mapping[str, str] = os.environ) -> DaemonSpec:
    """Flags (non-None overrides) beat the config file, which beats the defaults of
    SPEC section 2. Raises ConfigError with one line per problem."""
    errors: list[str] = []
    from_file: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        ctx = Context(str(path), Path(os.path.abspath(path)).parent, is_root)
        text_ = read_text(path, ctx.report)
        root = read_yaml(text_, ctx.report) if text_ is not None else None
        if root is not None:
            try:
                from_file = DAEMON.values(root, "", ctx)
            except _Reported:
                pass
        errors += ctx.lines()

    flags = Context("command line", Path.cwd(), is_root, flags=True)
    from_flags: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        parser = DAEMON.keys.get(key)
        if parser is None or isinstance(parser, Section):
            raise ValueError(f"unsupported daemon setting override {key!r}")
        try:
            from_flags[key] = parser(_flag_node(value), key, flags)
        except Invalid as exc:
            flags.report(0, key, str(exc))
        except _Reported:
            pass
    errors += flags.lines()
    if errors:
        raise ConfigError(errors)

    # `jobs_dir: null` means "the default"; `socket_group: null` means "no group".
    chosen = {k: v for k, v in from_file.items() if v is not None or k not in _PATH_KEYS}
    chosen.update(from_flags)
    chosen = {**_under_systemd(_defaults(chosen.get("state_dir"), is_root, env), chosen.get("state_dir"), env),
              **chosen}
    socket_bytes = len(os.fsencode(str(chosen["socket"])))
    if socket_bytes > UNIX_SOCKET_PATH_MAX:
        raise ConfigError([f"socket: {chosen['socket']} is {socket_bytes} bytes long; a Unix "
                           f"socket path may have at most {UNIX_SOCKET_PATH_MAX} "
                           "(set `socket` in the config file or pass --socket)"])
    if chosen.get("user"):
        try:
            chosen["uid"] = pwd.getpwnam(chosen["user"]).pw_uid
        except KeyError:
            raise ConfigError([f"user: no such user {chosen['user']!r}"]) from None
    return DaemonSpec(**chosen)


# -- `trainsup run` defaults

def default_state_dir(job: JobSpec) -> Path:
    """Next to the job file: `<dir>/.trainsup/<job>`. A requeued Slurm job comes back on
    any node: its history is found where its job file is (usually shared storage)."""
    return job.source.parent / ".trainsup" / job.name


def default_socket(state_dir: Path) -> Path:
    sock = state_dir / "run.sock"
    if len(os.fsencode(str(sock))) <= UNIX_SOCKET_PATH_MAX:
        return sock
    # A deep state dir: a short name in the runtime dir, unique per state dir.
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/trainsup-run-{os.getuid()}"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(runtime) / f"trainsup-run-{digest}.sock"
