"""Typed, validated job and daemon specs: what config/ produces from YAML.

Field names are the YAML keys. Durations are float seconds, sizes int bytes, paths
absolute. These objects are immutable values: the daemon compares them to decide
whether a reload changed a job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MirrorSpec:
    """`checkpoint.mirror:`: checkpoints copied to object storage (daemon/mirror/), restored
    on a fresh machine, one machine training the job at a time (the lease)."""
    url: str                                   # any fsspec URL; `{job}` is the job's name
    keep_last: int | None = None               # remote retention; None: the job's keep_last
    options: tuple[tuple[str, object], ...] = ()   # passed to the filesystem (no credentials)
    restore: str = "auto"                      # auto | never
    lease: bool = False                        # one machine trains this job at a time
    lease_ttl: float = 60.0                    # unrenewed this long (as seen by the waiter): expired
    max_rate: int | None = None                # bytes/s for uploads; None: unlimited
    parallel: int = 4                          # concurrent ranges of one large download

    def location(self, job: str) -> str:
        return self.url.replace("{job}", job).rstrip("/")


@dataclass(frozen=True)
class CheckpointSpec:
    dir: Path                                  # absolute
    format: str = "auto"                       # auto | trainsup | torch | hf | paddle | tf | keras | lightning | safetensors
    keep_last: int = 3
    keep_best: int = 1
    metric: str | None = None
    mode: str = "min"                          # min | max
    keep_every: int = 0
    quota: int | None = None                # bytes
    resume_args: tuple[str, ...] = ()
    pattern: str | None = None              # regex: extra names rotation may manage
    # A network filesystem: inotify does not see other hosts' writes; rescan this often.
    rescan: float | None = None             # seconds; None: the daemon's periodic rescan
    # A dir shared by the nodes of one job is rotated by one of them. None: yes, unless the
    # job's env sets NODE_RANK to something other than 0.
    rotate: bool | None = None
    mirror: MirrorSpec | None = None        # copies in object storage (daemon/mirror/)


def rotates(job: JobSpec) -> bool:
    """Whether this daemon rotates the job's checkpoint dir (see CheckpointSpec.rotate)."""
    ck = job.checkpoint
    if ck is None:
        return False
    if ck.rotate is not None:
        return ck.rotate
    return dict(job.env).get("NODE_RANK", "0").strip() in ("", "0")


@dataclass(frozen=True)
class BackoffSpec:
    initial: float = 1.0
    max: float = 300.0
    factor: float = 2.0


@dataclass(frozen=True)
class RestartSpec:
    policy: str = "on-failure"                 # always | on-failure | never
    max_restarts: int = 10
    window: float = 3600.0
    backoff: BackoffSpec = field(default_factory=BackoffSpec)
    max_restarts_without_progress: int = 5
    # Like systemd's StartLimitBurst/StartLimitIntervalSec: more automatic relaunches than
    # `start_limit_burst` within `start_limit_interval` seconds -> failed (0 s: no limit).
    start_limit_burst: int = 5
    start_limit_interval: float = 60.0


@dataclass(frozen=True)
class EmergencySaveSpec:
    signal: str = "SIGUSR1"                    # canonical name, e.g. SIGUSR1
    grace: float = 120.0


@dataclass(frozen=True)
class MemorySpec:
    limit: int | None = None
    save_at: float = 0.9
    min_available: int | None = None
    action: str = "save"                       # save | stop
    interval: float = 1.0


@dataclass(frozen=True)
class HangSpec:
    timeout: float | None = None


@dataclass(frozen=True)
class ScheduleSpec:
    checkpoint_every: float | None = None
    checkpoint_cron: str | None = None
    preempt_cron: str | None = None


HOOK_EVENTS = ("failed", "preempted", "finished", "saved", "crash", "over-quota")


@dataclass(frozen=True)
class HookSpec:
    """A command run (no shell) with the event as JSON on stdin (trainsup.hooks)."""
    command: tuple[str, ...]
    on: tuple[str, ...] = HOOK_EVENTS          # which events fire it
    timeout: float = 10.0                      # then the hook's process group is killed


@dataclass(frozen=True)
class SlurmSpec:
    """`slurm:` keys: how `trainsup slurm submit` asks for the allocation and how
    `trainsup run` launches the ranks in it (srun, one task per rank)."""
    nodes: int = 1
    ntasks_per_node: int = 1
    time: float | None = None               # seconds; sbatch --time in whole minutes
    partition: str | None = None
    sbatch_args: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    signal_margin: float = 30.0                # USR1 comes grace + margin before the limit


@dataclass(frozen=True)
class JobSpec:
    name: str
    command: tuple[str, ...]
    workdir: Path                              # absolute
    source: Path                               # the YAML file it came from
    env: tuple[tuple[str, str], ...] = ()      # ordered pairs, hashable
    user: str | None = None
    group: str | None = None
    # Resolved when the config loads (never on the event loop later): who the job runs
    # as. None when it runs as the daemon itself.
    uid: int | None = None
    gid: int | None = None
    home: Path | None = None
    groups: tuple[int, ...] = ()               # supplementary groups of `user`
    shell: str | None = None                # `user`'s login shell (SHELL in its environment)
    autostart: bool = True
    stop_timeout: float = 10.0
    checkpoint: CheckpointSpec | None = None
    restart: RestartSpec = field(default_factory=RestartSpec)
    emergency_save: EmergencySaveSpec = field(default_factory=EmergencySaveSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    hang: HangSpec = field(default_factory=HangSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    hooks: tuple[HookSpec, ...] = ()           # run after the daemon's own hooks
    slurm: SlurmSpec | None = None

    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) the files made for a `user:`/`group:` job belong to (its checkpoint
        dir, heartbeat, notice dir); None when it runs as the daemon. From the ids the
        config resolved: nothing here looks a user up."""
        if not self.user and not self.group:
            return None
        return (self.uid if self.uid is not None else os.getuid(),
                self.gid if self.gid is not None else os.getgid())


@dataclass(frozen=True)
class InvalidJob:
    """A job file that failed validation: shown in status as state `invalid`."""
    name: str                                  # the `name:` if readable, else the file stem
    source: Path
    errors: tuple[str, ...]                    # each "FILE:LINE: KEY: what is wrong"


@dataclass(frozen=True)
class PreemptionSpec:
    trigger_file: Path | None = None
    provider: str | None = None             # aws | gcp | azure
    poll: float = 5.0
    metadata_url: str | None = None


@dataclass(frozen=True)
class MetricsSpec:
    listen: str | None = None               # "HOST:PORT" or "unix:PATH" for Prometheus; None = off
    required: bool = True                   # cannot listen: the daemon does not start (exit 2)


@dataclass(frozen=True)
class DaemonSpec:
    jobs_dir: Path
    state_dir: Path
    socket: Path
    log_dir: Path
    socket_group: str | None = None
    user: str | None = None                 # the daemon's user: clients trust a socket it owns
    uid: int | None = None                  # `user`, resolved
    disk_quota: int | None = None
    pass_env: tuple[str, ...] = ()
    log_max_bytes: int = 50 << 20              # per-job log rotation size
    log_backups: int = 3
    preemption: PreemptionSpec = field(default_factory=PreemptionSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    hooks: tuple[HookSpec, ...] = ()
