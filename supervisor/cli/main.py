"""`trainsup`: argument parsing and printing. Talks to the daemon only through the
control socket (trainsup.control); prints one-line errors, never tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__, contract
from ..contract import iso_utc
from ..control import verbs
from ..control.client import Unreachable, connect, replies, request, send
from ..control.protocol import TABLE_FIELDS, table_rows
from ..printable import log_to_stderr, printable
from . import outcomes
from .outcomes import ACTIVE_STATES, JSON_SCHEMA, Outcome
from .render import format_checkpoints, format_status

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_STATUS_BAD, EXIT_UNREACHABLE = (
    outcomes.EXIT_OK, outcomes.EXIT_FAIL, outcomes.EXIT_USAGE, outcomes.EXIT_NOT_ACTIVE, outcomes.EXIT_UNKNOWN)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse exits 2 on usage errors, as we want; keep it one line
        self.exit(EXIT_USAGE, f"trainsup: {message} (see trainsup --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="trainsup", description="Preemption-tolerant supervisor for long training runs.")
    p.add_argument("--version", action="store_true",
                   help="print this trainsup's version, and the running daemon's when one answers")
    p.add_argument("--socket", help="control socket (default: $TRAINSUP_SOCKET, else the daemon's default)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    # `trainsup daemon --socket PATH` (SPEC section 2) and `trainsup status --socket PATH`
    # both work: every subcommand also accepts --socket.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH",
                        help="the daemon's control socket (default: $TRAINSUP_SOCKET, else the socket "
                             "the daemon config names, else the daemon's default)")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, parents=[common], **kw)  # type: ignore[method-assign,list-item]

    d = sub.add_parser("daemon", help="run the supervisor daemon in the foreground",
                       description="Run the daemon in the foreground (systemd runs it as a service). "
                       "Flags beat the config file, which beats the defaults.")
    d.add_argument("--config", metavar="FILE|none",
                   help="daemon config; `none` reads no file (default: $TRAINSUP_CONFIG, else "
                        "/etc/trainsup/trainsup.yaml as root or $XDG_CONFIG_HOME/trainsup/trainsup.yaml, "
                        "when present); the log and `status` name the file in use")
    d.add_argument("--jobs", type=Path, dest="jobs_dir", metavar="DIR", help="the job YAML files' dir")
    d.add_argument("--state", type=Path, dest="state_dir", metavar="DIR",
                   help="state database and lock (one daemon per state dir)")
    d.add_argument("--log-dir", type=Path, dest="log_dir", metavar="DIR",
                   help="one log per job (default: <state dir>/logs when --state is given)")
    d.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the daemon's own log, on stderr (default info)")

    r = sub.add_parser("run", help="supervise one job in the foreground; the exit code says how it ended",
                       description="Supervise one job in the foreground (a container's main process, a "
                       "Slurm batch step). Exit code: 0 finished, 1 failed, 2 usage, 3 preempted "
                       "(run again to resume), 4 stopped on request.")
    r.add_argument("job_file", type=Path, metavar="JOB.yaml", help="the job file (the same YAML as in a jobs dir)")
    r.add_argument("--state", type=Path, dest="state_dir",
                   help="state dir (default: .trainsup/<job> next to the job file)")
    r.add_argument("--slurm", choices=["auto", "on", "off"], default="auto",
                   help="Slurm mode (auto: when SLURM_JOB_ID is set)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="trainsup's own log, on stderr (default info)")

    from .slurm import add_subcommand as add_slurm
    add_slurm(sub)

    verbs.add_subcommands(sub)          # every control verb, from the one registry

    x = sub.add_parser("plot", help="draw a job's timeline: steps, saves, notices, crashes, disk use",
                       description="Draw a job's timeline from its history: steps over wall time per "
                       "attempt, requested saves, notices, crashes, resumes, the steps each interruption "
                       "lost, and checkpoint disk use against the quota. Needs matplotlib "
                       "(pip install 'trainsup[plot]').")
    x.add_argument("job", help="the job to draw")
    x.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="where to write the picture; .svg writes SVG, anything else PNG")
    x.add_argument("-n", type=int, default=0, help="only the newest N events (default: the whole history)")
    x.add_argument("--history", type=Path, metavar="FILE",
                   help="draw from a saved `trainsup history JOB --all --json` file instead of asking the daemon")
    x.add_argument("--quota", type=int, metavar="BYTES",
                   help="the quota line with --history (default: the job's quota from the daemon)")

    x = sub.add_parser("pid", help="the pid of jobs (none given: of the daemon)",
                       description="Print the pid of each job named (`all`: NAME PID lines), or the "
                       "daemon's pid when no job is given. Exit 1 when a job is not running.")
    x.add_argument("job", nargs="*", metavar="JOB", help="job names, or `all`")
    x.add_argument("--json", action="store_true", help="print {schema, daemon, jobs: [{job, pid, state}]} as JSON")

    x = sub.add_parser("validate", help="check job YAML files (or the daemon config) without a daemon",
                       description="Check job YAML files as the daemon would, and with --daemon-config the "
                       "daemon's own config; exit 1 on any error.")
    x.add_argument("files", nargs="*", type=Path, metavar="FILE", help="job YAML files")
    x.add_argument("--daemon-config", nargs="?", const="", default=None, metavar="CONFIG",
                   help="check a daemon config file; without CONFIG, the one `trainsup daemon` would read "
                        "($TRAINSUP_CONFIG, else the default place); `systemctl start` runs this first")
    x.add_argument("--json", action="store_true",
                   help="print [{file, ok, errors}] as JSON instead of error lines")

    x = sub.add_parser("demo", help="a real daemon takes an example job through a preemption, crashes "
                       "and rotation", description="Run a real daemon in a temporary dir with the example "
                       "torch job: checkpoints, a preemption, SIGKILL crashes, resumes, rotation under a "
                       "quota; ends by drawing the run's timeline. Needs torch (trainsup[torch]).")
    x.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    x.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="where to draw the run's timeline (default: a new trainsup-demo-*.png in the temp dir, "
                   "never the current dir; .svg for SVG)")
    return p


def socket_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get(contract.SOCKET):
        return Path(os.environ[contract.SOCKET])
    from ..config.files import discover_config, load_daemon_config
    from ..config.yaml import ConfigError
    is_root = os.geteuid() == 0
    try:
        # The socket a config file names ($TRAINSUP_CONFIG, else the conventional one).
        return load_daemon_config(discover_config(None, is_root=is_root), {}, is_root=is_root).socket
    except ConfigError:
        return load_daemon_config(None, {}, is_root=is_root).socket


def daemon_uids() -> tuple[int, ...]:
    """The uid of the daemon user named by the default daemon config (`user:`), if any:
    a socket owned by it is trusted like one owned by root or by the caller."""
    from ..config.files import discover_config, load_daemon_config
    from ..config.yaml import ConfigError
    is_root = os.geteuid() == 0
    try:
        path = discover_config(None, is_root=is_root)
        if path is None:
            return ()
        spec = load_daemon_config(path, {}, is_root=is_root)
    except (ConfigError, OSError):
        return ()
    return (spec.uid,) if spec.uid is not None else ()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return show_version(args)
    if not args.cmd:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.cmd](args)
    except Unreachable as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except UsageError as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def show_version(args) -> int:
    """This program's version; then, asked over the socket, the daemon's (after an
    upgrade and `trainsup reexec` the two agree; before it they may not)."""
    print(f"trainsup {__version__}")
    sock = socket_path(getattr(args, "socket", None))
    try:
        reply = request(sock, "ping", timeout=5.0, trusted=daemon_uids())
    except Unreachable:
        return EXIT_OK
    res = reply.get("result") or {}
    if reply.get("ok"):
        print(f"daemon: trainsup {res.get('version')} (pid {res.get('pid')}) at {sock}")
    return EXIT_OK


# -- commands ----------------------------------------------------------------------------

def _preflight() -> int:
    """`trainsup reexec` runs the new program this way first: it imported, its config
    read; the daemon's code imports too. Nothing is started."""
    from ..daemon import loop  # noqa: F401
    print(__version__)
    return EXIT_OK


def cmd_daemon(args) -> int:
    from ..config.files import choose_config, load_daemon_config
    from ..config.yaml import ConfigError
    from ..daemon.notices.trigger import TriggerRefused
    from ..daemon.state import LockHeld, StateUnusable
    log_to_stderr(args.log_level)
    overrides = {"jobs_dir": args.jobs_dir, "state_dir": args.state_dir, "log_dir": args.log_dir,
                 "socket": Path(args.socket) if args.socket else None}
    try:
        is_root = os.geteuid() == 0
        path, how = choose_config(args.config, is_root=is_root)
        spec = load_daemon_config(path, overrides, is_root=is_root)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("TRAINSUP_PREFLIGHT"):
        return _preflight()
    import faulthandler

    from ..control.server import SocketRefused
    from ..daemon.loop import Daemon
    from ..daemon.metrics_http import MetricsUnavailable
    faulthandler.enable()       # a crash in C code leaves every thread's traceback in the journal
    try:
        daemon = Daemon(spec)
        daemon.config_file = how
        code = daemon.run()
    except (LockHeld, SocketRefused, StateUnusable, MetricsUnavailable, TriggerRefused) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _exit_now(code)


def _exit_now(code: int) -> int:
    """End the daemon's process once everything it owns is committed and closed (state DB,
    logs, lock, socket). Worker threads may still be inside a job's hostile work (hashing a
    sparse file, walking a huge tree): the interpreter's teardown would wait for them, or
    run them into a runtime being torn down (found: the daemon died of SIGSEGV after a clean
    stop in the hostile-neighbour test)."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_run(args) -> int:
    if os.environ.get("TRAINSUP_PREFLIGHT"):
        return _preflight()
    from ..daemon.run import run_job
    log_to_stderr(args.log_level)
    sock = getattr(args, "socket", None)
    return run_job(args.job_file, state_dir=args.state_dir, socket=Path(sock) if sock else None,
                   slurm=args.slurm)


def cmd_slurm(args) -> int:
    from .slurm import main as slurm_main
    return slurm_main(args)


def _call(args, cmd: str, job: str | None = None, cargs: dict | None = None,
          timeout: float = 30.0) -> tuple[bool, Any]:
    reply = request(socket_path(args.socket), cmd, job, cargs, timeout=timeout, trusted=daemon_uids())
    if reply.get("ok"):
        return True, reply.get("result")
    return False, reply.get("error", "unknown error")


def _ask(args) -> tuple[bool, Any]:
    """The request the command line asks for, built from the verb registry."""
    verb = verbs.VERBS[args.cmd]
    job, cargs = verbs.request_of(verb, args)
    return _call(args, verb.name, job, cargs, timeout=verb.timeout)


def _fail(msg) -> int:
    print(f"trainsup: {printable(msg)}", file=sys.stderr)
    return EXIT_UNREACHABLE if str(msg).startswith("no such job") else EXIT_FAIL


def _print_json(obj: dict) -> None:
    print(json.dumps({"schema": JSON_SCHEMA, **obj}, indent=1))


def use_colour(stream) -> bool:
    """Colour only for a person at a terminal: never in a pipe or file, never with
    NO_COLOR set (https://no-color.org), never on a dumb terminal."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _bad(state: str, over_quota: bool, crashes_in_a_row: int, config_error: bool = False) -> bool:
    """What `status` exits 3 for: a job that needs a person (a crash loop included)."""
    looping = state == "backoff" and crashes_in_a_row >= 2
    return state in ("failed", "invalid") or over_quota or looping or config_error


def _any_bad(res: dict, names: list[str] | None = None) -> bool:
    """Exit 3: some job needs a person; with NAMEs, also a named job that is not active
    (systemctl status UNIT: 3 when the unit is not active)."""
    fields = {f: i for i, f in enumerate(TABLE_FIELDS)}
    st, over, crashes = fields["state"], fields["over_quota"], fields["crashes_in_a_row"]
    notes = res.get("notes") or {}
    rows = [(r[0], r[st], bool(r[over]), int(r[crashes] or 0), bool((notes.get(r[0]) or {}).get("config_error")))
            for r in table_rows(res)]
    rows += [(j["name"], j["state"], bool((j.get("checkpoint") or {}).get("over_quota")),
              j.get("crashes_in_a_row") or 0, bool(j.get("config_error"))) for j in res.get("jobs") or ()]
    if any(_bad(state, over, crashes, cfg) for _, state, over, crashes, cfg in rows):
        return True
    return bool(names) and any(state not in ACTIVE_STATES for _, state, *_ in rows)


def _only(res: dict, names: list[str]) -> dict:
    """The status reply cut to the named jobs, in the order named."""
    out = dict(res)
    if "rows" in res:
        by = {r.split("|", 1)[0]: r for r in res.get("rows") or ()}
        out["rows"] = [by[n] for n in names if n in by]
        out["notes"] = {n: v for n, v in (res.get("notes") or {}).items() if n in names}
    if "jobs" in res:
        by_job = {j["name"]: j for j in res.get("jobs") or ()}
        out["jobs"] = [by_job[n] for n in names if n in by_job]
    return out


def cmd_status(args) -> int:
    names = list(dict.fromkeys(args.job or []))
    args.table = not args.json           # the table needs its rows only (SPEC 8: --json is full)
    try:
        verb = verbs.VERBS["status"]
        _, cargs = verbs.request_of(verb, argparse.Namespace(**{**vars(args), "job": None}))
        ok, res = _call(args, "status", names[0] if len(names) == 1 else None, cargs, timeout=verb.timeout)
        if ok and len(names) > 1:
            known = {j["name"] for j in res.get("jobs") or ()} | {r.split("|", 1)[0] for r in res.get("rows") or ()}
            for n in names:
                if n not in known:     # the daemon's "no such job (did you mean ...)"
                    ok, res = _call(args, "status", n, cargs, timeout=verb.timeout)
                    if not ok:
                        break
            else:
                res = _only(res, names)
    except Unreachable as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not ok:
        print(f"trainsup: {res}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        _print_json({"daemon": res.get("daemon") or {}, "jobs": [stable_job(j) for j in res.get("jobs") or ()]})
    else:
        print(format_status(res, colour=use_colour(sys.stdout), overview=not names))
    return EXIT_STATUS_BAD if _any_bad(res, names) else EXIT_OK


# Every job object of `status --json` has these keys, whatever its state (an invalid job's
# fields that do not apply are null): a script never meets a missing key.
JOB_KEYS = ("name", "state", "sigstopped", "pid", "uptime_s", "since", "attempt", "restarts", "crashes_in_a_row",
            "last_exit", "restart_reason", "resumed_from", "checkpoint", "memory", "last_notice", "warnings",
            "error", "config_error", "source", "user", "containment")


def stable_job(j: dict) -> dict:
    out = {k: j.get(k) for k in JOB_KEYS}
    out["warnings"] = out["warnings"] or []
    return {**out, **{k: v for k, v in j.items() if k not in out}}


def _job_names(args) -> list[str]:
    """The jobs a multi-job command acts on: the names given, or every (valid) job for `all`."""
    names = list(args.job or [])
    if getattr(args, "all", False) or "all" in names:
        if [n for n in names if n != "all"]:
            raise UsageError("give job names or `all`, not both")
        ok, res = _call(args, "status")
        if not ok:
            raise UsageError(str(res))
        return [j["name"] for j in res["jobs"] if j["state"] != "invalid"]
    if not names:
        raise UsageError(f"{args.cmd}: give one or more job names, or `all`")
    return names


def _for_each_job(args, show) -> int:
    """One request per job, all at once (a stop waits for each job's save); one line per job
    in the order given (or one JSON object); the exit status is the worst of them."""
    from concurrent.futures import ThreadPoolExecutor
    names = _job_names(args)
    verb = verbs.VERBS[args.cmd]

    def one(name: str) -> tuple[bool, Any]:
        ns = argparse.Namespace(**{**vars(args), "job": name})
        job, cargs = verbs.request_of(verb, ns)
        cargs.pop("all", None)
        return _call(args, verb.name, job, cargs, timeout=verb.timeout)
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(names)))) as pool:
        replies = list(pool.map(one, names))
    return _report(args, [show(args, name, res) if ok else _failed(name, res) for name, (ok, res) in zip(names, replies)])


def _failed(name: str, error: Any) -> Outcome:
    o = outcomes.failed(name, str(error))
    if str(error).startswith("no such job"):
        o.outcome = "no-such-job"
    return o


def _report(args, results: list[Outcome]) -> int:
    """Print each job's outcome (text lines, or one JSON object) and return the worst code."""
    if getattr(args, "json", False):
        _print_json({"verb": args.cmd, "results": [o.as_json() for o in results]})
    else:
        for o in results:
            if o.outcome in ("failed", "no-such-job") and o.line.startswith("trainsup: "):
                print(printable(o.line), file=sys.stderr)
            else:
                print(printable(o.line))
            if o.warning:
                print(o.warning, file=sys.stderr)
    return max((EXIT_UNREACHABLE if o.outcome == "no-such-job" else o.code for o in results), default=EXIT_OK)


def _show_start(args, name: str, res: dict) -> Outcome:
    if res.get("already"):
        return outcomes.start_outcome(name, res)
    # `start` answers once the launch is under way; say where it got to, as systemctl does.
    st = _settle(args, name, res)
    return outcomes.start_outcome(name, st)


def _settle(args, name: str, res: dict, wait: float = 10.0) -> dict:
    """The job's status once it has left pending/starting (or `wait` s have passed)."""
    deadline = time.monotonic() + wait
    st = res
    while st.get("state") in ("pending", "starting", "stopping", "saving", None) and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            ok, full = _call(args, "status", name)
        except (Unreachable, OSError):
            break
        if not ok:
            break
        st = full["jobs"][0]
    return st


def _show_stop(args, name: str, res: dict) -> Outcome:
    # Asked only when the reply does not say (no save was attempted): `trainsup run` exits
    # with its job, so there may be no daemon left to ask.
    has_ck = True if "outcome" in res or getattr(args, "no_save", False) else _has_checkpoint(args, name)
    o = outcomes.stop_outcome(name, res, verb=args.cmd, no_save=bool(getattr(args, "no_save", False)),
                              has_checkpoint=has_ck)
    if args.cmd == "restart" and o.outcome == "restarted":
        st = _settle(args, name, {"state": None})
        o.state, o.pid = st.get("state"), st.get("pid")
        o.line = o.line.replace("restarted", "restarted" + (f" (pid {o.pid})" if o.pid else ""), 1)
    elif o.outcome in ("stopped", "preempted"):
        o.state = o.outcome
    return o


def _has_checkpoint(args, name: str) -> bool:
    try:
        ok, st = _call(args, "status", name)
    except (Unreachable, OSError):
        return False
    return bool(ok and st["jobs"] and st["jobs"][0].get("checkpoint") is not None)


def _show_checkpoint(args, name: str, res: dict) -> Outcome:
    return outcomes.checkpoint_outcome(name, res, wait=bool(args.wait))


def cmd_start(args) -> int:
    return _for_each_job(args, _show_start)


def cmd_stop(args) -> int:
    if args.cmd == "preempt" and (args.all or args.job == ["all"]):
        # One request the daemon authorises as a whole: "every job" is a daemon-wide act.
        ns = argparse.Namespace(**{**vars(args), "job": None, "all": True})
        job, cargs = verbs.request_of(verbs.VERBS["preempt"], ns)
        ok, res = _call(args, "preempt", job, cargs, timeout=verbs.VERBS["preempt"].timeout)
        if not ok:
            return _report(args, [_failed("all", res)])
        results = [_show_stop(args, o.get("job", "?"), o) for o in res.get("outcomes", [])]
        if not results and not args.json:
            print("preempt: no job was running")
        return _report(args, results)
    return _for_each_job(args, _show_stop)


def cmd_checkpoint(args) -> int:
    return _for_each_job(args, _show_checkpoint)


def cmd_pid(args) -> int:
    ok, res = _call(args, "status")
    if not ok:
        return _fail(res)
    if not args.job:
        if args.json:
            _print_json({"daemon": res["daemon"]["pid"], "jobs": []})
        else:
            print(res["daemon"]["pid"])
        return EXIT_OK
    jobs = {j["name"]: j for j in res["jobs"]}
    everyone = args.job == ["all"]
    worst = EXIT_OK
    found: list[dict] = []
    for name in (sorted(jobs) if everyone else args.job):
        j = jobs.get(name)
        if j is None:
            ok, err = _call(args, "status", name)     # the daemon's "no such job (did you mean)"
            worst = max(worst, _fail(err if not ok else f"no such job: {name}"))
            continue
        found.append({"job": name, "pid": j.get("pid"), "state": j["state"]})
        if not j.get("pid"):
            # A job that is down is a failure for `pid`, named or in `all` (systemctl show
            # MainPID=0 is no answer a script can use).
            worst = max(worst, EXIT_FAIL)
            if not everyone and not args.json:
                print(f"trainsup: {name} is not running (state {j['state']})", file=sys.stderr)
        if args.json:
            continue
        if everyone:
            print(f"{name} {j.get('pid') or '-'}")
        elif j.get("pid"):
            print(j["pid"])
    if args.json:
        _print_json({"daemon": res["daemon"]["pid"], "jobs": found})
    return worst


def cmd_reload(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    bad = res.get("invalid_jobs") or []
    if args.json:
        _print_json({"added": res["added"], "removed": res["removed"], "changed": res["changed"],
                     "invalid": bad, "errors": res.get("invalid", [])})
    else:
        for k in ("added", "removed", "changed"):
            print(f"{k}: {', '.join(res[k]) or 'none'}")
        print(f"invalid: {', '.join(bad) or 'none'}")
        for line in res.get("invalid", []):
            print(printable(line), file=sys.stderr)
    return EXIT_FAIL if bad or res.get("invalid") else EXIT_OK


def cmd_reexec(args) -> int:
    try:
        ok, res = _ask(args)
    except Unreachable as e:
        # The connection closed with no answer: the new program did not come up.
        return _fail(f"{e}: the re-executed daemon did not answer (see its log; under systemd it is "
                     f"restarted and takes the jobs over)")
    if not ok:
        return _fail(res)
    print(f"daemon pid {res['pid']}: trainsup {res['was']} -> {res['version']}, "
          f"{res['jobs_kept']} running jobs kept ({res['took_s']}s)")
    return EXIT_OK


def cmd_logs(args) -> int:
    if args.n < 0:
        raise UsageError("-n must be >= 0")
    if not args.follow:
        ok, res = _ask(args)
        if not ok:
            return _fail(res)
        if args.json:
            _print_json({"job": args.job, "lines": res["text"].splitlines()})
        else:
            sys.stdout.write(res["text"])
        return EXIT_OK
    with connect(socket_path(args.socket), None, daemon_uids()) as s:
        send(s, "logs", *verbs.request_of(verbs.VERBS["logs"], args))
        for reply in replies(s):
            if not reply.get("ok"):
                return _fail(reply.get("error"))
            text = reply["result"]["text"]
            # --json with -f: one JSON string per line (a stream a script can read as it comes).
            sys.stdout.write("".join(json.dumps(line) + "\n" for line in text.splitlines())
                             if args.json else text)
            sys.stdout.flush()
    return EXIT_OK


def cmd_checkpoints(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    if args.json:
        keys = ("path", "step", "bytes", "valid", "invalid_reason", "kept", "reason",
                "format", "alias", "alias_of", "members", "resume_path")
        _print_json({"job": args.job, "checkpoints": [{k: c.get(k) for k in keys} for c in res]})
        return EXIT_OK
    print(format_checkpoints(res))
    return EXIT_OK


def cmd_pin(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    print(f"{args.job}: pinned steps: {', '.join(map(str, res['pinned'])) or 'none'}")
    return EXIT_OK


def cmd_history(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    if args.json:
        _print_json({"job": args.job, "events": res})
        return EXIT_OK
    for ev in res:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ev.pop("at")))
        kind = ev.pop("kind")
        ev.pop("job", None)
        parts = [f"{ev.pop('from', '?')} -> {ev.pop('to', '?')}"] if kind == "state" else []
        # times inside a record (when a notice came) read as times, not epoch floats
        parts += [f"{k}={iso_utc(v) if k.endswith('_at') and isinstance(v, (int, float)) else v}"
                  for k, v in ev.items() if v is not None]
        # file names and a manifest's reason are the job's text: one escaped line each
        detail = printable(" ".join(parts))
        print(f"{at}Z  {printable(kind):<14} {detail}".rstrip())
    return EXIT_OK


def cmd_validate(args) -> int:
    from ..config.files import validate_files
    if not args.files and args.daemon_config is None:
        raise UsageError("validate: give job files, or --daemon-config [CONFIG]")
    errors = validate_files(args.files, is_root=os.geteuid() == 0, runnable=True) if args.files else []
    checked: list[tuple[str, list[str]]] = [(str(f), [e for e in errors if e.startswith(f"{f}:")]) for f in args.files]
    if args.daemon_config is not None:
        checked.append(_validate_daemon_config(args.daemon_config or None))
        errors = errors + checked[-1][1]
    if args.json:
        print(json.dumps({"schema": JSON_SCHEMA, "files": [{"file": f, "ok": not e, "errors": e} for f, e in checked]},
                         indent=1))
        return EXIT_FAIL if errors else EXIT_OK
    for line in errors:
        print(printable(line), file=sys.stderr)
    if errors:
        return EXIT_FAIL
    print(f"{len(checked)} file(s) OK" if args.files else f"daemon config OK: {checked[-1][0]}")
    return EXIT_OK


def _validate_daemon_config(given: str | None) -> tuple[str, list[str]]:
    """(what was checked, its error lines): the file as `trainsup daemon` reads it."""
    from ..config.files import choose_config, load_daemon_config
    from ..config.yaml import ConfigError
    is_root = os.geteuid() == 0
    path, how = choose_config(given, is_root=is_root)
    try:
        load_daemon_config(path, {}, is_root=is_root)
    except ConfigError as e:
        return (str(path) if path else how), list(e.errors)
    return how, []


def cmd_plot(args) -> int:
    from .plot import PlotUnavailable, draw
    quota = args.quota
    if args.history is not None:
        try:
            events = json.loads(args.history.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{args.history}: cannot read a history: {e}") from None
        if isinstance(events, dict):           # {"events": [...], "quota": N} also accepted
            quota = quota if quota is not None else events.get("quota")
            events = events.get("events", [])
    else:
        # The whole history (the picture of a run needs its first launch), not history's 50.
        ok, res = _call(args, "history", args.job, {"n": args.n} if args.n else {"all": True})
        if not ok:
            return _fail(res)
        events = res
        if quota is None:
            ok, st = _call(args, "status", args.job)
            if ok:
                quota = ((st["jobs"][0].get("checkpoint") or {}).get("quota"))
    try:
        out = draw(events, args.output, job=args.job, quota=quota)
    except PlotUnavailable as e:
        return _fail(e)
    except (ValueError, OSError) as e:
        return _fail(f"plot: {e}")
    print(f"{args.job}: wrote {out}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(quick=args.quick, picture=args.plot)


COMMANDS = {
    "daemon": cmd_daemon, "status": cmd_status, "start": cmd_start, "stop": cmd_stop,
    "restart": cmd_stop, "preempt": cmd_stop, "checkpoint": cmd_checkpoint, "pid": cmd_pid,
    "reload": cmd_reload, "reexec": cmd_reexec, "logs": cmd_logs, "checkpoints": cmd_checkpoints, "pin": cmd_pin,
    "unpin": cmd_pin, "history": cmd_history, "validate": cmd_validate, "demo": cmd_demo, "plot": cmd_plot,
    "run": cmd_run, "slurm": cmd_slurm,
}
