"""The section tables: each YAML key of a section mapped to its value parser. The dataclass
in spec.py supplies the defaults, so they live in exactly one place."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint.naming import PatternError, compile_pattern
from ..spec import (
    HOOK_EVENTS,
    BackoffSpec,
    CheckpointSpec,
    DaemonSpec,
    EmergencySaveSpec,
    HangSpec,
    HookSpec,
    JobSpec,
    MemorySpec,
    MetricsSpec,
    MirrorSpec,
    PreemptionSpec,
    RestartSpec,
    ScheduleSpec,
    SlurmSpec,
)
from .values import (
    Context,
    boolean,
    choice,
    command,
    cron,
    daemon_user,
    duration,
    each_item,
    env_map,
    existing_group,
    expand_home,
    group_name,
    integer,
    job_name,
    name_list,
    number,
    path,
    save_signal,
    size,
    store_options,
    store_url,
    string,
    text,
    text_list,
    url,
    user_name,
)
from .yaml import UNIX_SOCKET_PATH_MAX, Invalid, Node, _Reported, describe, join_key

# ------------------------------------------------------------------------- sections

class Section:
    """A mapping whose keys are fixed by a table; the dataclass gives the defaults.

    Keys missing from the YAML are left out of the constructor call so the dataclass
    default applies. A key whose default is None also accepts `null`.
    """

    def __init__(self, cls: type, keys: dict[str, Callable], required: tuple[str, ...] = (),
                 check: Callable[[dict, dict, str, Context], None] | None = None):
        self.cls, self.keys, self.required, self.check = cls, keys, required, check
        self.nullable = {f.name for f in dataclasses.fields(cls) if f.default is None}

    def values(self, node: Node, key: str, ctx: Context) -> dict:
        """The present keys, parsed; raises _Reported if anything in here was bad."""
        if node.kind == "scalar" and node.value is None:
            node = Node("map", {}, node.line)          # `restart:` with nothing under it
        if node.kind != "map":
            raise Invalid(f"must be a mapping, got {describe(node)}")
        before = len(ctx.errors)
        for name, (line, _) in node.value.items():
            if name not in self.keys:
                import difflib  # only for a typo: not imported by every daemon
                close = difflib.get_close_matches(name, list(self.keys), n=1, cutoff=0.6)
                hint = (f"did you mean {close[0]!r}?" if close
                        else f"valid keys: {', '.join(self.keys)}")
                ctx.report(line, join_key(key, name), f"unknown key; {hint}")
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for name, parser in self.keys.items():    # table order: workdir before checkpoint
            path = join_key(key, name)
            if name not in node.value:
                if name in self.required:
                    ctx.report(node.line, path, "required key is missing")
                continue
            value_node = node.value[name][1]
            lines[name] = value_node.line
            if value_node.kind == "scalar" and value_node.value is None and name in self.nullable:
                values[name] = None
                continue
            try:
                values[name] = parser(value_node, path, ctx)
            except Invalid as exc:
                ctx.report(value_node.line, path, str(exc))
            except _Reported:
                pass
        if self.check and len(ctx.errors) == before:
            self.check(values, lines, key, ctx)
        if len(ctx.errors) != before:
            raise _Reported
        return values

    def __call__(self, node: Node, key: str, ctx: Context) -> Any:
        return self.cls(**self.values(node, key, ctx))


def _check_backoff(values: dict, lines: dict, key: str, ctx: Context) -> None:
    initial = values.get("initial", BackoffSpec.initial)
    maximum = values.get("max", BackoffSpec.max)
    if maximum < initial:
        ctx.report(lines.get("max", lines.get("initial", 1)), join_key(key, "max"),
                   f"must be >= initial ({initial:g}s), got {maximum:g}s")


def checkpoint_pattern(node: Node, key: str, ctx: Context) -> str:
    """`checkpoint.pattern`: a regex over whole entry names that rotation may manage."""
    raw = string(node, key, ctx)
    try:
        compile_pattern(raw)
    except PatternError as e:
        raise Invalid(str(e)) from None
    return raw


class _CheckpointDir:
    """checkpoint.dir resolves against the job's workdir, not the YAML's folder."""

    def __call__(self, node: Node, key: str, ctx: Context) -> Path:
        raw = expand_home(string(node, key, ctx), ctx)
        return Path(os.path.normpath(os.path.join(ctx.workdir, raw)))


def _workdir(node: Node, key: str, ctx: Context) -> Path:
    resolved = path(node, key, ctx)
    ctx.workdir = resolved
    return resolved


def plain_options(options: tuple) -> dict:
    """MirrorSpec.options (hashable pairs) as the keyword arguments a filesystem takes."""
    return {k: plain_options(v) if isinstance(v, tuple) else v for k, v in options}


def _check_mirror(values: dict, lines: dict, key: str, ctx: Context) -> None:
    """A missing package, refused credentials or a missing bucket: one line now (validate,
    reload, start), not a traceback on the first upload."""
    from ..checkpoint import objectstore
    url = values["url"].replace("{job}", ctx.job_name or "job")
    why = objectstore.probe(url, plain_options(values.get("options", ())))
    if why:
        ctx.report(lines.get("url", 1), join_key(key, "url"), why)


MIRROR = Section(MirrorSpec, {
    "url": store_url,
    "keep_last": integer(1),
    "options": store_options,
    "restore": choice("auto", "never"),
    "lease": boolean,
    "lease_ttl": duration(minimum=2.0),
    "max_rate": size(1024),
    "parallel": integer(1, 64),
}, required=("url",), check=_check_mirror)

def _format_names() -> tuple[str, ...]:
    """checkpoint.format's values: the format table's names (imported with the first job)."""
    from ..checkpoint import formats
    return formats.CHOICES


CHECKPOINT = Section(CheckpointSpec, {
    "dir": _CheckpointDir(),
    "format": choice(among=_format_names),
    "keep_last": integer(1),
    "keep_best": integer(0),
    "metric": string,
    "mode": choice("min", "max"),
    "keep_every": integer(0),
    "quota": size(1),
    "resume_args": text_list,
    "pattern": checkpoint_pattern,
    "rescan": duration(minimum=0.1),
    "rotate": boolean,
    "mirror": MIRROR,
}, required=("dir",))

BACKOFF = Section(BackoffSpec, {
    "initial": duration(),
    "max": duration(),
    "factor": number(1, 10),
}, check=_check_backoff)

RESTART = Section(RestartSpec, {
    "policy": choice("always", "on-failure", "never"),
    "max_restarts": integer(0),
    "window": duration(positive=True),
    "backoff": BACKOFF,
    "max_restarts_without_progress": integer(1),
    "start_limit_burst": integer(1),
    "start_limit_interval": duration(),
})

EMERGENCY_SAVE = Section(EmergencySaveSpec, {
    "signal": save_signal,
    "grace": duration(),
})

MEMORY = Section(MemorySpec, {
    "limit": size(1),
    "save_at": number(0, 1, low_open=True),
    "min_available": size(1),
    "action": choice("save", "stop"),
    "interval": duration(positive=True),
})

HANG = Section(HangSpec, {"timeout": duration(positive=True)})

SCHEDULE = Section(ScheduleSpec, {
    "checkpoint_every": duration(positive=True),
    "checkpoint_cron": cron,
    "preempt_cron": cron,
})

def _hook_events(node: Node, key: str, ctx: Context) -> tuple[str, ...]:
    names = [node] if node.kind == "scalar" else node.value if node.kind == "seq" else None
    if not names or any(n.kind != "scalar" or n.value not in HOOK_EVENTS for n in names):
        raise Invalid(f"must be a list of events from {', '.join(HOOK_EVENTS)}, got {describe(node)}")
    return tuple(dict.fromkeys(n.value for n in names))


HOOK = Section(HookSpec, {
    "command": command,
    "on": _hook_events,
    "timeout": duration(positive=True),
}, required=("command",))


def hook_list(node: Node, key: str, ctx: Context) -> tuple[HookSpec, ...]:
    if node.kind != "seq":
        raise Invalid(f"must be a list of hooks ({{command: [...], on: [...], timeout: 10s}}), "
                      f"got {describe(node)}")
    return tuple(each_item(node, key, ctx, HOOK))


SLURM = Section(SlurmSpec, {
    "nodes": integer(1, 100000),
    "ntasks_per_node": integer(1, 100000),
    "time": duration(minimum=60.0),
    "partition": string,
    "sbatch_args": text_list,
    "srun_args": text_list,
    "signal_margin": duration(),
})

JOB = Section(JobSpec, {
    "name": job_name,
    "command": command,
    "user": user_name,             # before workdir and checkpoint: `~` is the user's home
    "group": group_name,
    "workdir": _workdir,
    "env": env_map,
    "autostart": boolean,
    "stop_timeout": duration(),
    "checkpoint": CHECKPOINT,
    "restart": RESTART,
    "emergency_save": EMERGENCY_SAVE,
    "memory": MEMORY,
    "hang": HANG,
    "schedule": SCHEDULE,
    "hooks": hook_list,
    "slurm": SLURM,
}, required=("name", "command"))
JOB.nullable.add("workdir")                      # `workdir: null` = the YAML's folder

PREEMPTION = Section(PreemptionSpec, {
    "trigger_file": path,
    "provider": choice("aws", "gcp", "azure"),
    "poll": duration(positive=True),
    "metadata_url": url,
})

def listen_address(node: Node, key: str, ctx: Context) -> str:
    """"HOST:PORT", "[V6]:PORT", or a bare port (then loopback): metrics are for a local
    scraper unless the admin names another address. "unix:/ABS/PATH": a Unix socket that
    only the daemon's socket group may read."""
    raw = text(node, key, ctx).strip()
    if raw.startswith("unix:"):
        where = raw[len("unix:"):]
        if not os.path.isabs(where):
            raise Invalid(f"a Unix socket needs an absolute path (unix:/run/trainsup/metrics.sock), got {raw!r}")
        if len(os.fsencode(where)) > UNIX_SOCKET_PATH_MAX:
            raise Invalid(f"socket path {where} is longer than {UNIX_SOCKET_PATH_MAX} bytes")
        return "unix:" + os.path.normpath(where)
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "", raw
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:      # 0: any free port (status shows it)
        raise Invalid(f"must be HOST:PORT such as 127.0.0.1:9184, got {describe(node)}")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


METRICS = Section(MetricsSpec, {"listen": listen_address, "required": boolean})

DAEMON = Section(DaemonSpec, {
    "jobs_dir": path,
    "state_dir": path,
    "socket": path,
    "log_dir": path,
    "socket_group": existing_group,
    "user": daemon_user,
    "disk_quota": size(1),
    "pass_env": name_list,
    "log_max_bytes": size(1),
    "log_backups": integer(0, 1000),
    "preemption": PREEMPTION,
    "metrics": METRICS,
    "hooks": hook_list,
})
_PATH_KEYS = frozenset({"jobs_dir", "state_dir", "socket", "log_dir"})
DAEMON.nullable.update(_PATH_KEYS)               # null = the default
