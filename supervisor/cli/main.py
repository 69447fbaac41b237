"""`trainsup`: argument parsing and printing. Talks to the daemon only through the
control socket (trainsup.control); prints one-line errors, never tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..contract import iso_utc
from ..control import verbs
from ..control.client import Unreachable, connect, replies, request, send
from ..control.protocol import TABLE_FIELDS, table_rows
from ..control.server import SocketRefused
from .render import format_checkpoints, format_status

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_STATUS_BAD, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse exits 2 on usage errors, as we want; keep it one line
        self.exit(EXIT_USAGE, f"trainsup: {message} (see trainsup --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="trainsup", description="Preemption-tolerant supervisor for long training runs.")
    p.add_argument("--version", action="version", version=f"trainsup {__version__}")
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
    d.add_argument("--config", type=Path, metavar="FILE",
                   help="daemon config (default: /etc/trainsup/trainsup.yaml as root, else "
                        "$XDG_CONFIG_HOME/trainsup/trainsup.yaml, when present)")
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

    x = sub.add_parser("validate", help="check job YAML files without a daemon",
                       description="Check job YAML files as the daemon would; exit 1 on any error.")
    x.add_argument("files", nargs="+", type=Path, metavar="FILE", help="job YAML files")
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
    if os.environ.get("TRAINSUP_SOCKET"):
        return Path(os.environ["TRAINSUP_SOCKET"])
    from ..config.files import discover_config, load_daemon_config
    from ..config.yaml import ConfigError
    is_root = os.geteuid() == 0
    try:
        # The socket a config file names (the conventional one: the CLI has no --config).
        return load_daemon_config(discover_config(None, is_root=is_root), {}, is_root=is_root).socket
    except ConfigError:
        return load_daemon_config(None, {}, is_root=is_root).socket


def daemon_uids() -> tuple[int, ...]:
    """The uid of the daemon user named by the default daemon config (`user:`), if any:
    a socket owned by it is trusted like one owned by root or by the caller."""
    from ..config.files import default_config_path, load_daemon_config
    from ..config.yaml import ConfigError
    is_root = os.geteuid() == 0
    path = default_config_path(is_root=is_root)
    try:
        if not path.is_file():
            return ()
        spec = load_daemon_config(path, {}, is_root=is_root)
    except (ConfigError, OSError):
        return ()
    return (spec.uid,) if spec.uid is not None else ()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


# -- commands ----------------------------------------------------------------------------

def cmd_daemon(args) -> int:
    from ..config.files import discover_config, load_daemon_config
    from ..config.yaml import ConfigError
    from ..daemon.state import LockHeld, StateUnusable
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"jobs_dir": args.jobs_dir, "state_dir": args.state_dir, "log_dir": args.log_dir,
                 "socket": Path(args.socket) if args.socket else None}
    try:
        is_root = os.geteuid() == 0
        spec = load_daemon_config(discover_config(args.config, is_root=is_root), overrides, is_root=is_root)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    from ..daemon.loop import Daemon
    try:
        return Daemon(spec).run()
    except (LockHeld, SocketRefused, StateUnusable) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_run(args) -> int:
    from ..daemon.run import run_job
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    print(f"trainsup: {msg}", file=sys.stderr)
    return EXIT_UNREACHABLE if str(msg).startswith("no such job") else EXIT_FAIL


def use_colour(stream) -> bool:
    """Colour only for a person at a terminal: never in a pipe or file, never with
    NO_COLOR set (https://no-color.org), never on a dumb terminal."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _bad(state: str, over_quota: bool, crashes_in_a_row: int) -> bool:
    """What `status` exits 3 for: a job that needs a person (a crash loop included)."""
    looping = state == "backoff" and crashes_in_a_row >= 2
    return state in ("failed", "invalid") or over_quota or looping


def _any_bad(res: dict) -> bool:
    fields = {f: i for i, f in enumerate(TABLE_FIELDS)}
    st, over, crashes = fields["state"], fields["over_quota"], fields["crashes_in_a_row"]
    return (any(_bad(r[st], bool(r[over]), int(r[crashes] or 0)) for r in table_rows(res))
            or any(_bad(j["state"], bool((j.get("checkpoint") or {}).get("over_quota")),
                        j.get("crashes_in_a_row") or 0) for j in res.get("jobs") or ()))


def cmd_status(args) -> int:
    args.table = not args.json           # the table needs its rows only (SPEC 8: --json is full)
    try:
        ok, res = _ask(args)
    except Unreachable as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not ok:
        print(f"trainsup: {res}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(res, indent=1) if args.json else format_status(res, colour=use_colour(sys.stdout)))
    return EXIT_STATUS_BAD if _any_bad(res) else EXIT_OK


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
    in the order given; the exit status is the worst of them."""
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
    worst = EXIT_OK
    for name, (ok, res) in zip(names, replies):
        code = show(args, name, res) if ok else _fail(res)
        worst = max(worst, code)
    return worst


def _show_start(args, name: str, res: dict) -> int:
    if res.get("already"):
        print(f"{name}: already {res['state']}" + (f" (pid {res['pid']})" if res.get("pid") else ""))
        return EXIT_OK
    # `start` answers once the launch is under way; say where it got to, as systemctl does.
    deadline = time.monotonic() + 10.0
    st = res
    while st.get("state") in ("pending", "starting") and time.monotonic() < deadline:
        time.sleep(0.05)
        ok, full = _call(args, "status", name)
        if not ok:
            break
        st = full["jobs"][0]
    print(f"{name}: {st['state']}" + (f" (pid {st['pid']})" if st.get("pid") else "")
          + (f": {st['error']}" if st.get("error") and st["state"] not in ("running",) else ""))
    return EXIT_OK if st["state"] in ("running", "starting", "finished") else EXIT_FAIL


def _show_stop(args, name: str, res: dict) -> int:
    if res.get("already"):
        print(f"{name}: already {res['state']}")
    elif "outcome" in res:
        extra = f" at step {res['step']} in {res.get('save_s')}s" if res.get("step") is not None else ""
        print(f"{name}: {res['outcome']}{extra}; stopped in {res.get('stop_s')}s")
        if res.get("lost"):
            # A stop that asked for a save and could not get one: say what it cost.
            print(f"{name}: {res['lost']} (see README 'Integrations'; --no-save to stop without asking)",
                  file=sys.stderr)
            return EXIT_FAIL
    else:
        print(f"{name}: {res.get('state')}" + (f" (pid {res['pid']})" if res.get("pid") else ""))
    return EXIT_OK


def _show_checkpoint(args, name: str, res: dict) -> int:
    if args.wait:
        what = f"at step {res['step']}" if res.get("step") is not None else Path(res["path"]).name
        print(f"{name}: checkpoint {what} is valid: {res['path']}")
    else:
        print(f"{name}: save signal sent to pid {', '.join(map(str, res['signalled']))}")
    return EXIT_OK


def cmd_start(args) -> int:
    return _for_each_job(args, _show_start)


def cmd_stop(args) -> int:
    if args.cmd == "preempt" and (args.all or args.job == ["all"]):
        # One request the daemon authorises as a whole: "every job" is a daemon-wide act.
        ns = argparse.Namespace(**{**vars(args), "job": None, "all": True})
        job, cargs = verbs.request_of(verbs.VERBS["preempt"], ns)
        ok, res = _call(args, "preempt", job, cargs, timeout=verbs.VERBS["preempt"].timeout)
        if not ok:
            return _fail(res)
        for o in res.get("outcomes", []):
            _show_stop(args, o.get("job", "?"), o)
        print(f"preempted {res.get('jobs', 0)} jobs")
        return EXIT_OK
    return _for_each_job(args, _show_stop)


def cmd_checkpoint(args) -> int:
    return _for_each_job(args, _show_checkpoint)


def cmd_pid(args) -> int:
    ok, res = _call(args, "status")
    if not ok:
        return _fail(res)
    if not args.job:
        print(res["daemon"]["pid"])
        return EXIT_OK
    jobs = {j["name"]: j for j in res["jobs"]}
    everyone = args.job == ["all"]
    worst = EXIT_OK
    for name in (sorted(jobs) if everyone else args.job):
        j = jobs.get(name)
        if j is None:
            ok, err = _call(args, "status", name)     # the daemon's "no such job (did you mean)"
            worst = max(worst, _fail(err if not ok else f"no such job: {name}"))
        elif everyone:
            print(f"{name} {j.get('pid') or '-'}")
        elif j.get("pid"):
            print(j["pid"])
        else:
            print(f"trainsup: {name} is not running (state {j['state']})", file=sys.stderr)
            worst = max(worst, EXIT_FAIL)
    return worst


def cmd_reload(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    for k in ("added", "removed", "changed"):
        print(f"{k}: {', '.join(res[k]) or 'none'}")
    bad = res.get("invalid_jobs") or []
    print(f"invalid: {', '.join(bad) or 'none'}")
    for line in res.get("invalid", []):
        print(line, file=sys.stderr)
    return EXIT_FAIL if bad or res.get("invalid") else EXIT_OK


def cmd_logs(args) -> int:
    if args.n < 0:
        raise UsageError("-n must be >= 0")
    if not args.follow:
        ok, res = _ask(args)
        if not ok:
            return _fail(res)
        if args.json:
            print(json.dumps(res["text"].splitlines(), indent=1))
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
        print(json.dumps([{k: c.get(k) for k in keys} for c in res], indent=1))
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
        print(json.dumps(res, indent=1))
        return EXIT_OK
    for ev in res:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ev.pop("at")))
        kind = ev.pop("kind")
        ev.pop("job", None)
        parts = [f"{ev.pop('from', '?')} -> {ev.pop('to', '?')}"] if kind == "state" else []
        # times inside a record (when a notice came) read as times, not epoch floats
        parts += [f"{k}={iso_utc(v) if k.endswith('_at') and isinstance(v, (int, float)) else v}"
                  for k, v in ev.items() if v is not None]
        detail = " ".join(parts)
        print(f"{at}Z  {kind:<14} {detail}".rstrip())
    return EXIT_OK


def cmd_validate(args) -> int:
    from ..config.files import validate_files
    errors = validate_files(args.files, is_root=os.geteuid() == 0, runnable=True)
    if args.json:
        per_file = [{"file": str(f), "errors": [e for e in errors if e.startswith(f"{f}:")]} for f in args.files]
        print(json.dumps([{**p, "ok": not p["errors"]} for p in per_file], indent=1))
        return EXIT_FAIL if errors else EXIT_OK
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return EXIT_FAIL
    print(f"{len(args.files)} file(s) OK")
    return EXIT_OK


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
    "reload": cmd_reload, "logs": cmd_logs, "checkpoints": cmd_checkpoints, "pin": cmd_pin,
    "unpin": cmd_pin, "history": cmd_history, "validate": cmd_validate, "demo": cmd_demo, "plot": cmd_plot,
    "run": cmd_run, "slurm": cmd_slurm,
}
