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
from typing import Any, Optional

from . import __version__
from . import verbs
from .control import SocketRefused, Unreachable, connect, replies, request, send

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
    common.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, parents=[common], **kw)  # type: ignore[method-assign,list-item]

    d = sub.add_parser("daemon", help="run the supervisor daemon in the foreground")
    d.add_argument("--config", type=Path)
    d.add_argument("--jobs", type=Path, dest="jobs_dir")
    d.add_argument("--state", type=Path, dest="state_dir")
    d.add_argument("--log-dir", type=Path, dest="log_dir")
    d.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    r = sub.add_parser("run", help="supervise one job in the foreground; the exit code says how it ended",
                       description="Supervise one job in the foreground (a container's main process, a "
                       "Slurm batch step). Exit code: 0 finished, 1 failed, 2 usage, 3 preempted "
                       "(run again to resume), 4 stopped on request.")
    r.add_argument("job_file", type=Path, metavar="JOB.yaml")
    r.add_argument("--state", type=Path, dest="state_dir",
                   help="state dir (default: .trainsup/<job> next to the job file)")
    r.add_argument("--slurm", choices=["auto", "on", "off"], default="auto",
                   help="Slurm mode (auto: when SLURM_JOB_ID is set)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    from .slurm import add_subcommand as add_slurm
    add_slurm(sub)

    verbs.add_subcommands(sub)          # every control verb, from the one registry

    x = sub.add_parser("validate", help="check job YAML files without a daemon")
    x.add_argument("files", nargs="+", type=Path)

    x = sub.add_parser("demo", help="the demonstration (section 12 of the spec)")
    x.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    return p


def socket_path(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("TRAINSUP_SOCKET"):
        return Path(os.environ["TRAINSUP_SOCKET"])
    from .config import load_daemon_config
    return load_daemon_config(None, {}, is_root=os.geteuid() == 0).socket


def daemon_uids() -> tuple[int, ...]:
    """The uid of the daemon user named by the default daemon config (`user:`), if any:
    a socket owned by it is trusted like one owned by root or by the caller."""
    from .config import ConfigError, default_config_path, load_daemon_config
    is_root = os.geteuid() == 0
    path = default_config_path(is_root=is_root)
    try:
        if not path.is_file():
            return ()
        spec = load_daemon_config(path, {}, is_root=is_root)
    except (ConfigError, OSError):
        return ()
    return (spec.uid,) if spec.uid is not None else ()


def main(argv: Optional[list[str]] = None) -> int:
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
    from .config import ConfigError, load_daemon_config
    from .state import LockHeld, StateUnusable
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"jobs_dir": args.jobs_dir, "state_dir": args.state_dir, "log_dir": args.log_dir,
                 "socket": Path(args.socket) if args.socket else None}
    try:
        spec = load_daemon_config(args.config, overrides, is_root=os.geteuid() == 0)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    from .daemon import Daemon
    try:
        return Daemon(spec).run()
    except (LockHeld, SocketRefused, StateUnusable) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_run(args) -> int:
    from .run import run_job
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = getattr(args, "socket", None)
    return run_job(args.job_file, state_dir=args.state_dir, socket=Path(sock) if sock else None,
                   slurm=args.slurm)


def cmd_slurm(args) -> int:
    from .slurm import main as slurm_main
    return slurm_main(args)


def _call(args, cmd: str, job: Optional[str] = None, cargs: Optional[dict] = None,
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


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _human_age(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_status(result: dict) -> str:
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CHECKPOINT", "DISK/QUOTA", "MEMORY")]
    notes = []
    for j in result["jobs"]:
        ck = j.get("checkpoint") or {}
        if ck.get("step") is not None:
            ckpt = f"step {ck['step']}, {_human_age(ck.get('age_s'))} ago"
        elif ck:
            ckpt = "none"
        else:
            ckpt = "-"
        if ck.get("invalid"):
            ckpt += f" ({ck['invalid']} invalid)"
        disk = f"{_human_bytes(ck.get('bytes'))}/{_human_bytes(ck.get('quota')) if ck.get('quota') else '-'}" if ck else "-"
        mem = j.get("memory") or {}
        memtxt = _human_bytes(mem.get("rss")) if mem.get("rss") else "-"
        if mem.get("limit"):
            memtxt += f"/{_human_bytes(mem['limit'])}"
        state = j["state"]
        if ck.get("over_quota"):
            state += " over-quota"
        rows.append((j["name"], state, str(j.get("pid") or "-"), _human_age(j.get("uptime_s")),
                     str(j.get("restarts", 0)), ckpt, disk, memtxt))
        if j.get("error"):
            notes.append(f"  {j['name']}: {j['error']}")
        for w in j.get("warnings") or []:
            notes.append(f"  {j['name']}: warning: {w}")
        ln = j.get("last_notice")
        if ln and ln.get("outcome"):
            notes.append(f"  {j['name']}: last notice: {ln.get('source')} -> {ln.get('outcome')}"
                         + (f" (step {ln['step']} in {ln.get('save_s')}s)" if ln.get("step") is not None else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + notes)


def _bad_job(j: dict) -> bool:
    ck = j.get("checkpoint") or {}
    return j["state"] in ("failed", "invalid") or bool(ck.get("over_quota"))


def cmd_status(args) -> int:
    try:
        ok, res = _ask(args)
    except Unreachable as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not ok:
        print(f"trainsup: {res}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(res, indent=1) if args.json else format_status(res))
    return EXIT_STATUS_BAD if any(_bad_job(j) for j in res["jobs"]) else EXIT_OK


def _simple(verb: str):
    def run(args) -> int:
        ok, res = _ask(args)
        if not ok:
            return _fail(res)
        if verb in ("stop", "preempt", "restart") and isinstance(res, dict) and "outcome" in res:
            extra = f" at step {res['step']} in {res.get('save_s')}s" if res.get("step") is not None else ""
            print(f"{args.job}: {res['outcome']}{extra}; stopped in {res.get('stop_s')}s")
        elif verb == "preempt" and args.all:
            for o in res.get("outcomes", []):
                print(f"{o.get('source')}: {o.get('outcome')}")
            print(f"preempted {res.get('jobs', 0)} jobs")
        elif isinstance(res, dict) and "state" in res:
            print(f"{res['name']}: {res['state']}")
        return EXIT_OK
    return run


def cmd_checkpoint(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    if args.wait:
        print(f"{args.job}: checkpoint at step {res['step']} is valid: {res['path']}")
    else:
        print(f"{args.job}: save signal sent to pid {', '.join(map(str, res['signalled']))}")
    return EXIT_OK


def cmd_reload(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    for k in ("added", "removed", "changed"):
        if res[k]:
            print(f"{k}: {', '.join(res[k])}")
    for line in res.get("invalid", []):
        print(line, file=sys.stderr)
    return EXIT_OK


def cmd_logs(args) -> int:
    if args.n < 0:
        raise UsageError("-n must be >= 0")
    if not args.follow:
        ok, res = _ask(args)
        if not ok:
            return _fail(res)
        sys.stdout.write(res["text"])
        return EXIT_OK
    with connect(socket_path(args.socket), None, daemon_uids()) as s:
        send(s, "logs", *verbs.request_of(verbs.VERBS["logs"], args))
        for reply in replies(s):
            if not reply.get("ok"):
                return _fail(reply.get("error"))
            sys.stdout.write(reply["result"]["text"])
            sys.stdout.flush()
    return EXIT_OK


def cmd_checkpoints(args) -> int:
    ok, res = _ask(args)
    if not ok:
        return _fail(res)
    if args.json:
        keys = ("path", "step", "bytes", "valid", "invalid_reason", "kept", "reason")
        print(json.dumps([{k: c[k] for k in keys} for c in res], indent=1))
        return EXIT_OK
    rows = [("STEP", "SIZE", "VALID", "KEPT", "REASON", "PATH")]
    for c in res:
        valid = "yes" if c["valid"] else f"no: {c['invalid_reason']}"
        rows.append((str(c["step"]) if c["step"] is not None else "-", _human_bytes(c["bytes"]), valid,
                     c["kept"] or "-", c["reason"] or "-", c["path"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(col.ljust(w) for col, w in zip(r, widths)).rstrip())
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
    for ev in res:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ev.pop("at")))
        kind = ev.pop("kind")
        ev.pop("job", None)
        parts = [f"{ev.pop('from', '?')} -> {ev.pop('to', '?')}"] if kind == "state" else []
        parts += [f"{k}={v}" for k, v in ev.items() if v is not None]
        detail = " ".join(parts)
        print(f"{at}Z  {kind:<14} {detail}".rstrip())
    return EXIT_OK


def cmd_validate(args) -> int:
    from .config import validate_files
    errors = validate_files(args.files, is_root=os.geteuid() == 0, runnable=True)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return EXIT_FAIL
    print(f"{len(args.files)} file(s) OK")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(quick=args.quick)


COMMANDS = {
    "daemon": cmd_daemon, "status": cmd_status, "start": _simple("start"), "stop": _simple("stop"),
    "restart": _simple("restart"), "preempt": _simple("preempt"), "checkpoint": cmd_checkpoint,
    "reload": cmd_reload, "logs": cmd_logs, "checkpoints": cmd_checkpoints, "pin": cmd_pin,
    "unpin": cmd_pin, "history": cmd_history, "validate": cmd_validate, "demo": cmd_demo,
    "run": cmd_run, "slurm": cmd_slurm,
}
