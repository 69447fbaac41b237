"""Every control verb, defined once: its name, whether it writes, which jobs it acts on,
its handler and its command-line arguments.

The control socket's allow-list and authorisation (control/server.py), the dispatcher
(daemon/handlers.py) and the CLI parser (cli/main.py) all derive from VERBS, so they cannot drift
apart. To add a verb: add a Verb here, a `do_<name>` handler in daemon/handlers.py and a printer
in cli/main.py; a unit test checks that all three exist.

Targets are resolved here, before authorisation, and the handler is given exactly the
resolved list: a request cannot act on a job it was not authorised for by changing its
arguments (`preempt` with `{"all": true}` once authorised the named job and acted on all).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class RequestError(Exception):
    """A one-line reason sent back as {"ok": false, "error": ...}."""


# How a verb's targets come from the request's `job` and `args`:
NO_JOB = "none"            # acts on no job (ping, status of everything)
DAEMON = "daemon"          # acts on the daemon as a whole (reload): privileged callers only
ONE_JOB = "job"            # exactly the named job
OPTIONAL_JOB = "job?"      # the named job, or none
JOB_OR_ALL = "job|all"     # the named job, or every job with args["all"]


def duration(text: str) -> float:
    """argparse type for --grace/--timeout: "90", "5m", "1h30m"."""
    from ..config.values import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Arg:
    """One command-line argument. `flags` and `options` go to argparse.add_argument;
    `send` says whether its value travels in the request's args (under `dest`)."""
    flags: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    send: bool = True
    exclusive: bool = False      # a member of the verb's required either-or group

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return self.options["dest"]
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")


JOB_ARG = Arg(("job",), {"help": "the job's name"})
# Verbs a person runs on several jobs at once (supervisorctl/systemctl style): the CLI
# sends one request per job, so authorisation stays per job.
JOBS_ARG = Arg(("job",), {"nargs": "+", "metavar": "JOB", "help": "one or more job names, or `all`"})


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    writes: bool
    targets: str
    args: tuple[Arg, ...] = ()
    timeout: float = 30.0        # how long the CLI waits for the reply
    follows: Callable[[Mapping[str, Any]], bool] | None = None  # a streaming request

    @property
    def handler(self) -> str:
        """The name of the method in daemon/handlers.py that serves this verb."""
        return f"do_{self.name}"

    def streams(self, args: Mapping[str, Any]) -> bool:
        return bool(self.follows and self.follows(args))


_GRACE = Arg(("--grace",), {"type": duration, "metavar": "DURATION",
                            "help": "how long the emergency save may take (default: the job's "
                                    "emergency_save.grace); 90, 90s, 5m"})
_NO_SAVE = Arg(("--no-save",), {"action": "store_true", "help": "skip the emergency save"})
_JSON = Arg(("--json",), {"action": "store_true", "help": "print JSON instead of text (for scripts)"},
            send=False)
_LONG = 24 * 3600.0              # the daemon bounds a stop flow by grace + stop_timeout

VERBS: dict[str, Verb] = {v.name: v for v in (
    Verb("ping", "is the daemon there", writes=False, targets=NO_JOB),
    Verb("status", "what every job is doing", writes=False, targets=OPTIONAL_JOB,
         args=(Arg(("job",), {"nargs": "*", "metavar": "JOB", "help": "show these jobs only"}), _JSON,
               # The table's rows only, times as timestamps (Job.status_row); the CLI sets it
               # for its table, scripts get the full shape (`status --json`).
               Arg(("--table",), {"action": "store_true",
                                  "help": "ask for the table's fields only (the default without --json)"}))),
    Verb("start", "start jobs (already running: says so, exit 0)", writes=True, targets=ONE_JOB,
         args=(JOBS_ARG, _JSON, Arg(("--force",), {"action": "store_true",
                                            "help": "start even while a preemption notice is in force"}))),
    Verb("stop", "save, then stop jobs (already stopped: says so, exit 0)", writes=True, targets=ONE_JOB,
         args=(JOBS_ARG, _NO_SAVE, _GRACE, _JSON), timeout=_LONG),
    Verb("restart", "save, stop and start jobs again", writes=True, targets=ONE_JOB,
         args=(JOBS_ARG, _NO_SAVE, _JSON), timeout=_LONG),
    Verb("preempt", "save, then stop jobs (state preempted: they resume at the daemon's next start)",
         writes=True, targets=JOB_OR_ALL,
         args=(Arg(("job",), {"nargs": "*", "metavar": "JOB", "help": "one or more job names, or `all`"}),
               Arg(("--all",), {"action": "store_true", "help": "every job (same as `all`)"}),
               _GRACE, _JSON), timeout=_LONG),
    Verb("checkpoint", "ask jobs for a checkpoint now", writes=True, targets=ONE_JOB,
         args=(JOBS_ARG, Arg(("--wait",), {"action": "store_true",
                                           "help": "return when the new checkpoint is valid"}),
               Arg(("--timeout",), {"type": duration, "metavar": "DURATION",
                                    "help": "with --wait: give up after this long (default: the job's "
                                            "emergency_save.grace)"}), _JSON), timeout=_LONG),
    Verb("reload", "re-read job files", writes=True, targets=DAEMON, args=(_JSON,), timeout=600.0),
    Verb("reexec", "re-execute the daemon as the version installed now, same pid, every job kept "
         "running (the upgrade path)", writes=True, targets=DAEMON, timeout=600.0),
    Verb("logs", "a job's stdout and stderr", writes=False, targets=ONE_JOB,
         args=(JOB_ARG, Arg(("-f", "--follow"), {"action": "store_true",
                                                 "help": "keep printing new output until interrupted"}),
               Arg(("-n",), {"type": int, "default": 100, "dest": "n", "metavar": "N",
                             "help": "print the last N lines first (default 100)"}),
               Arg(("--json",), {"action": "store_true", "help": "print the lines as a JSON list"},
                   send=False)),
         follows=lambda args: bool(args.get("follow"))),
    Verb("checkpoints", "every checkpoint of a job: valid or why not, kept or why not",
         writes=False, targets=ONE_JOB, args=(JOB_ARG, _JSON)),
    Verb("pin", "pin a checkpoint (protect it from rotation)", writes=True, targets=ONE_JOB,
         args=(JOB_ARG, Arg(("step",), {"type": int, "help": "the checkpoint's step number"}))),
    Verb("unpin", "unpin a checkpoint (rotation may delete it again)", writes=True,
         targets=ONE_JOB, args=(JOB_ARG, Arg(("step",), {"type": int, "help": "the checkpoint's step number"}))),
    Verb("history", "a job's events", writes=False, targets=ONE_JOB,
         args=(JOB_ARG, Arg(("-n",), {"type": int, "default": 50, "dest": "n", "metavar": "N",
                             "help": "the last N events (default 50)"}),
               Arg(("--all",), {"action": "store_true",
                                "help": "every event the daemon keeps (what `plot --history` needs)"}), _JSON)),
)}


def resolve_targets(verb: Verb, job: str | None, args: Mapping[str, Any],
                    all_jobs: Callable[[], Iterable[str]]) -> tuple[str, ...] | None:
    """The jobs this request will act on, in order; None for the daemon as a whole.
    Raises RequestError for a request whose targets do not make sense."""
    if verb.targets == DAEMON:
        return None
    if verb.targets == NO_JOB:
        return ()
    if verb.targets == JOB_OR_ALL and args.get("all"):
        if job is not None:
            raise RequestError(f"{verb.name}: give a job or all, not both")
        return tuple(sorted(all_jobs()))
    if job is None:
        if verb.targets == OPTIONAL_JOB:
            return ()
        raise RequestError(f"{verb.name}: this command needs a job name")
    return (job,)


# -- the command line: the parser and the request come from the same table ---------------

def add_subcommands(sub: Any) -> None:
    """One subparser per verb, with the verb's arguments."""
    for verb in VERBS.values():
        if verb.name == "ping":
            continue                   # for scripts and tests; not a command for people
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        either = None
        for arg in verb.args:
            if arg.exclusive:
                either = either or p.add_mutually_exclusive_group(required=True)
                either.add_argument(*arg.flags, **arg.options)
            else:
                p.add_argument(*arg.flags, **arg.options)


def request_of(verb: Verb, ns: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """(job, args) for the request the parsed command line asks for. Flags left at their
    default of False/None are not sent (the daemon applies its own defaults)."""
    job: str | None = None
    args: dict[str, Any] = {}
    for arg in verb.args:
        value = getattr(ns, arg.dest, None)
        if arg.dest == "job":
            job = value or None          # `preempt --all` parses as an empty list of jobs
        elif arg.send and value is not None and value is not False:
            args[arg.dest] = value
    return job, args
