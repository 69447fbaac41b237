"""Value parsers: durations, sizes, signals, users, cron, paths. Each takes (node, key path,
context) and returns a value or raises Invalid with a one-line verdict on that node."""

from __future__ import annotations

import grp
import math
import os
import pwd
import re
import shlex
import signal
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .yaml import (
    ENV_NAME_RE,
    JOB_NAME_RE,
    MAX_COUNT,
    MAX_DURATION,
    MAX_ERRORS,
    MAX_SIZE,
    HugeNumber,
    Invalid,
    Node,
    _Reported,
    describe,
    join_key,
)

# ---------------------------------------------------------------------------- values

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}



def _is_number(value: Any) -> bool:
    # bool is an int subclass; `keep_last: true` must not read as 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: Any) -> float:
    """90, 1.5, "90", "90s", "5m", "1h30m", "1.5s", "250ms", "2d" -> seconds."""
    if isinstance(value, HugeNumber):
        raise ValueError(value.message)
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = list(_DURATION_PART.finditer(text))
            if not text or "".join(p.group(0) for p in parts) != text:
                raise ValueError('not a duration (use e.g. 90, "90s", "5m", "1h30m", "250ms")')
            seconds = sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    else:
        raise ValueError('not a duration (use e.g. 90, "90s", "5m", "1h30m", "250ms")')
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("a duration must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration is too large (at most {MAX_DURATION / 86400:g} days)")
    return seconds


def parse_size(value: Any) -> int:
    """1048576, "500MB" (10^6), "10GiB" (2^30), "1.5GB", K/KB/KiB ... T/TiB -> bytes."""
    if isinstance(value, HugeNumber):
        raise ValueError(value.message)
    if _is_number(value):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError("a size must be a whole number of bytes")
        number, multiplier = Decimal(int(value)), 1
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if not match:
            raise ValueError('not a size (use e.g. 1048576, "500MB", "10GiB")')
        digits, prefix, binary, _ = match.groups()
        if binary and not prefix:
            raise ValueError('not a size (use e.g. 1048576, "500MB", "10GiB")')
        base = 1024 if binary else 1000
        try:
            number = Decimal(digits)
        except InvalidOperation:
            raise ValueError("not a size") from None
        multiplier = base ** _SIZE_POWERS[prefix.lower()]
    else:
        raise ValueError('not a size (use e.g. 1048576, "500MB", "10GiB")')
    if number < 0:
        raise ValueError("a size must not be negative")
    total = number * multiplier
    if total > MAX_SIZE:
        raise ValueError("size is too large (at most 2^60 bytes)")
    if total != total.to_integral_value():
        raise ValueError("a size must be a whole number of bytes")
    return int(total)


def parse_signal(value: Any) -> str:
    """"SIGUSR1", "USR1", "usr1" or 10 -> "SIGUSR1"."""
    try:
        if _is_number(value) and isinstance(value, int):
            sig = signal.Signals(value)
        elif isinstance(value, str):
            name = value.strip().upper()
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            raise KeyError(value)
    except (KeyError, ValueError):
        raise ValueError("not a signal name or number (e.g. SIGUSR1)") from None
    return sig.name


# --------------------------------------------------------------------- error context

class Context:
    """Where values come from (for messages and relative paths) and what went wrong."""

    def __init__(self, label: str, base_dir: Path, is_root: bool, flags: bool = False):
        self.label = label
        self.base_dir = base_dir          # relative paths resolve against this
        self.is_root = is_root
        self.flags = flags                # values from the command line: no line numbers
        self.workdir = base_dir           # checkpoint.dir resolves against this
        self.account: pwd.struct_passwd | None = None   # the job's `user:`, looked up once
        self.group_id: int | None = None                # the job's `group:`, looked up once
        self.job_name: str | None = None                # `{job}` in checkpoint.mirror.url
        self.errors: list[tuple[int, str]] = []

    def report(self, line: int, key: str, message: str) -> None:
        message = " ".join(message.split())
        if self.flags:
            text = f"{self.label}: --{key.replace('_', '-')}: {message}"
        else:
            text = f"{self.label}:{line}: {key}: {message}"
        self.errors.append((line, text))

    def lines(self) -> list[str]:
        ordered = sorted(self.errors, key=lambda e: e[0])
        if len(ordered) <= MAX_ERRORS:
            return [text for _, text in ordered]
        shown = ordered[:MAX_ERRORS - 1]
        hidden = len(ordered) - len(shown)
        return [text for _, text in shown] + [
            f"{self.label}:{shown[-1][0]}: (file): {hidden} more problems not shown"]


# -------------------------------------------------------------------- value parsers
# Each parser: (node, key_path, ctx) -> value; raises Invalid for a one-line verdict on
# this node, or reports per item and raises _Reported.

def _wrap(fn: Callable[[Any], Any], what: str) -> Callable:
    def parse(node: Node, key: str, ctx: Context) -> Any:
        if node.kind != "scalar":
            raise Invalid(f"must be {what}, got {describe(node)}")
        try:
            return fn(node.value)
        except ValueError as exc:
            raise Invalid(f"{exc}, got {describe(node)}") from None
    return parse


def duration(minimum: float = 0.0, positive: bool = False) -> Callable:
    bound = "> 0" if positive else f">= {minimum:g}"

    def parse(node: Node, key: str, ctx: Context) -> float:
        value = _wrap(parse_duration, "a duration")(node, key, ctx)
        if (positive and value <= 0) or value < minimum:
            raise Invalid(f"must be a duration {bound}, got {describe(node)}")
        return value
    return parse


def size(minimum: int = 0) -> Callable:
    def parse(node: Node, key: str, ctx: Context) -> int:
        value = _wrap(parse_size, "a size")(node, key, ctx)
        if value < minimum:
            raise Invalid(f"must be a size >= {minimum}, got {describe(node)}")
        return value
    return parse


def integer(minimum: int, maximum: int = MAX_COUNT) -> Callable:
    def parse(node: Node, key: str, ctx: Context) -> int:
        value = node.value if node.kind == "scalar" else None
        if isinstance(value, HugeNumber) or (isinstance(value, int) and not isinstance(value, bool)
                                             and value > maximum):
            raise Invalid(f"must be an integer in [{minimum}, {maximum}], got {describe(node)}")
        if not (_is_number(value) and isinstance(value, int)) or value < minimum:
            raise Invalid(f"must be an integer >= {minimum}, got {describe(node)}")
        return value
    return parse


def number(low: float, high: float = math.inf, low_open: bool = False) -> Callable:
    shown = f"in ({low:g}, {high:g}]" if low_open else (
        f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]")

    def parse(node: Node, key: str, ctx: Context) -> float:
        value = node.value if node.kind == "scalar" else None
        ok = _is_number(value) and math.isfinite(value) and value <= high and (  # type: ignore[arg-type,operator]
            value > low if low_open else value >= low)  # type: ignore[operator]
        if not ok:
            raise Invalid(f"must be a number {shown}, got {describe(node)}")
        return float(value)  # type: ignore[arg-type]
    return parse


def boolean(node: Node, key: str, ctx: Context) -> bool:
    if node.kind != "scalar" or not isinstance(node.value, bool):
        raise Invalid(f"must be true or false, got {describe(node)}")
    return node.value


def choice(*options: str, among: Callable[[], tuple[str, ...]] | None = None) -> Callable:
    """One of `options`, or of what `among()` names (looked up at the first value: a table
    the CLI need not import to read the daemon config)."""
    def parse(node: Node, key: str, ctx: Context) -> str:
        allowed = options or (among() if among is not None else ())
        if node.kind != "scalar" or node.value not in allowed:
            raise Invalid(f"must be one of {', '.join(allowed)}, got {describe(node)}")
        return node.value
    return parse


def string(node: Node, key: str, ctx: Context) -> str:
    if node.kind != "scalar" or not isinstance(node.value, str) or not node.value:
        raise Invalid(f"must be a non-empty string, got {describe(node)}")
    if "\x00" in node.value:
        raise Invalid("must not contain a NUL character")
    return node.value


def text(node: Node, key: str, ctx: Context) -> str:
    """A word of a command line or an env value: numbers are taken as written."""
    value = node.value if node.kind == "scalar" else None
    if node.kind != "scalar" or value is None or isinstance(value, bool):
        hint = " (quote it if you mean the text)" if node.kind == "scalar" else ""
        raise Invalid(f"must be a string, got {describe(node)}{hint}")
    word = value if isinstance(value, str) else node.raw
    if "\x00" in word:
        raise Invalid("must not contain a NUL character")
    return word


T = TypeVar("T")


def each_item(node: Node, key: str, ctx: Context, parse: Callable[[Node, str, Context], T]) -> list[T]:
    """`parse` applied to every item of a list node; each bad item is reported at its own
    line (all of them, not the first), then _Reported."""
    out: list[T] = []
    bad = False
    for index, item in enumerate(node.value):
        try:
            out.append(parse(item, f"{key}[{index}]", ctx))
        except Invalid as exc:
            ctx.report(item.line, f"{key}[{index}]", str(exc))
            bad = True
        except _Reported:
            bad = True
    if bad:
        raise _Reported
    return out


def text_list(node: Node, key: str, ctx: Context) -> tuple[str, ...]:
    if node.kind != "seq":
        raise Invalid(f"must be a list of strings, got {describe(node)}")
    return tuple(each_item(node, key, ctx, text))


def command(node: Node, key: str, ctx: Context) -> tuple[str, ...]:
    if node.kind == "scalar" and isinstance(node.value, str):
        try:
            words = tuple(shlex.split(node.value))
        except ValueError as exc:
            raise Invalid(f"cannot split into words: {exc}") from None
    elif node.kind == "seq":
        words = text_list(node, key, ctx)
    else:
        raise Invalid(f"must be a list of strings or a command line string, got {describe(node)}")
    if not words:
        raise Invalid("must name a program to run, got an empty command")
    if "\x00" in "".join(words):
        raise Invalid("must not contain a NUL character")
    return words


def job_name(node: Node, key: str, ctx: Context) -> str:
    name = text(node, key, ctx)
    if not JOB_NAME_RE.fullmatch(name):
        raise Invalid("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                      f"or digit, got {describe(node)}")
    ctx.job_name = name
    return name


def env_name(node: Node, key: str, ctx: Context) -> str:
    name = string(node, key, ctx)
    if not ENV_NAME_RE.fullmatch(name):
        raise Invalid(f"must be a variable name like OMP_NUM_THREADS, got {describe(node)}")
    return name


def env_map(node: Node, key: str, ctx: Context) -> tuple[tuple[str, str], ...]:
    if node.kind != "map":
        raise Invalid(f"must be a mapping of NAME: value, got {describe(node)}")
    pairs, bad = [], False
    for name, (line, value) in node.value.items():
        path = join_key(key, name)
        if not ENV_NAME_RE.fullmatch(name):
            ctx.report(line, path, "not a variable name (letters, digits, '_'; not starting with a digit)")
            bad = True
        elif name.startswith("TRAINSUP_"):
            ctx.report(line, path, "TRAINSUP_* variables are set by the daemon")
            bad = True
        else:
            try:
                pairs.append((name, text(value, path, ctx)))
            except Invalid as exc:
                ctx.report(value.line, path, str(exc))
                bad = True
    if bad:
        raise _Reported
    return tuple(pairs)


def name_list(node: Node, key: str, ctx: Context) -> tuple[str, ...]:
    if node.kind != "seq":
        raise Invalid(f"must be a list of variable names, got {describe(node)}")
    return tuple(dict.fromkeys(each_item(node, key, ctx, env_name)))


def expand_home(raw: str, ctx: Context) -> str:
    """`~` and `~/x` -> the job user's home (the daemon's when the job has no `user:`);
    `~name/x` -> name's home. Anything else is returned as written."""
    if not raw.startswith("~"):
        return raw
    head, sep, rest = raw[1:].partition("/")
    if head:
        try:
            home = pwd.getpwnam(head).pw_dir
        except KeyError:
            raise Invalid(f"no such user {head!r} in {raw!r}") from None
    elif ctx.account is not None:
        home = ctx.account.pw_dir
    else:
        home = str(_home(os.environ))
    return os.path.join(home, rest) if sep else home


def path(node: Node, key: str, ctx: Context) -> Path:
    raw = expand_home(string(node, key, ctx), ctx)
    return Path(os.path.normpath(os.path.join(ctx.base_dir, raw)))


def save_signal(node: Node, key: str, ctx: Context) -> str:
    name = _wrap(parse_signal, "a signal name")(node, key, ctx)
    if name in ("SIGKILL", "SIGSTOP"):
        raise Invalid(f"{name} cannot be caught, so it cannot ask for a save")
    return name


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")   # crontab order: 0 = Sunday


def _crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field as APScheduler 3 day names. APScheduler 3 numbers
    weekdays from 0 = Monday (unlike crontab(5)), so "0 2 * * 1" would fire on Tuesdays."""
    if field == "*":
        return field
    days: set[int] = set()

    def day(token: str) -> int:
        token = token.lower()
        if token in _CRON_DAYS:
            return _CRON_DAYS.index(token)
        if token.isdigit() and int(token) <= 7:
            return int(token)
        raise ValueError(f"bad day of week {token!r}")

    for part in field.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first, last = (day(t) for t in span.split("-", 1))
        else:
            first = last = day(span)
            if step:
                last = 6
        if first > last:
            raise ValueError(f"bad day-of-week range {span!r}")
        if step and not (step.isdigit() and int(step) >= 1):
            raise ValueError(f"bad step {step!r}")
        days.update(d % 7 for d in range(first, last + 1, int(step or 1)))
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def crontab_trigger(expression: str, timezone: Any = "UTC") -> Any:
    """A CronTrigger that reads `expression` the way crontab(5) does (0 or 7 = Sunday)."""
    from apscheduler.triggers.cron import CronTrigger  # deferred: heavy import
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    minute, hour, day, month, weekday = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_crontab_weekdays(weekday), timezone=timezone)


def cron(node: Node, key: str, ctx: Context) -> str:
    expression = string(node, key, ctx)
    try:
        crontab_trigger(expression)
    except (ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise Invalid(f"not a valid cron expression ({reason}), got {describe(node)}") from None
    return expression


def url(node: Node, key: str, ctx: Context) -> str:
    value = string(node, key, ctx)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Invalid(f"must be an http:// or https:// URL, got {describe(node)}")
    return value.rstrip("/")


_STORE_URL_RE = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
# Credentials come from each store library's own chain (AWS env/profile/instance role, GCP
# ADC, Azure env), never from a job file that other users may read.
_SECRET_OPTIONS = re.compile(r"(?i)(secret|password|passwd|token|credential|account_key|sas|"
                             r"connection_string|^key$|access_key|private)")
_TOKEN_METHODS = ("anon", "google_default", "cloud", "browser")     # gcsfs: how, not a secret


def store_url(node: Node, key: str, ctx: Context) -> str:
    """checkpoint.mirror.url: an fsspec URL (s3://bucket/prefix/{job}, gs://, az://,
    file:///abs/path, memory://...)."""
    value = string(node, key, ctx).strip()
    if not _STORE_URL_RE.fullmatch(value):
        raise Invalid(f"must be a storage URL such as s3://bucket/prefix/{{job}}, got {describe(node)}")
    if value.startswith("file://") and not value[len("file://"):].startswith("/"):
        raise Invalid(f"a file:// URL needs an absolute path (file:///srv/ckpt), got {describe(node)}")
    if "{" in value.replace("{job}", ""):
        raise Invalid(f"the only placeholder is {{job}}, got {describe(node)}")
    return value


def store_options(node: Node, key: str, ctx: Context) -> tuple[tuple[str, object], ...]:
    """checkpoint.mirror.options: NAME: scalar pairs passed to the filesystem; nested maps
    (s3fs's client_kwargs) allowed one level down. No credentials."""
    if node.kind != "map":
        raise Invalid(f"must be a mapping of option: value, got {describe(node)}")

    def value_of(n: Node, path: str, depth: int) -> object:
        if n.kind == "map" and depth == 0:
            return tuple((k, value_of(v, join_key(path, k), 1)) for k, (_, v) in n.value.items())
        if n.kind != "scalar" or isinstance(n.value, (list, dict)):
            raise Invalid(f"{path}: must be a string, number or boolean, got {describe(n)}")
        return n.value

    pairs = []
    for name, (line, value) in node.value.items():
        path = join_key(key, name)
        if _SECRET_OPTIONS.search(str(name)) and not (name == "token" and value.kind == "scalar"
                                                       and value.value in _TOKEN_METHODS):
            ctx.report(line, path, "credentials are never read from job files: use the store's own "
                                   "chain (AWS_* / a profile / an instance role, GOOGLE_APPLICATION_CREDENTIALS, "
                                   "AZURE_STORAGE_* in the daemon's environment)")
            continue
        try:
            pairs.append((str(name), value_of(value, path, 0)))
        except Invalid as exc:
            ctx.report(value.line, path, str(exc))
    if len(pairs) != len(node.value):
        raise _Reported
    return tuple(pairs)


def _current_user() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def user_name(node: Node, key: str, ctx: Context) -> str:
    name = string(node, key, ctx)
    if not ctx.is_root and name != _current_user():
        raise Invalid(f"runs the job as {name!r}, but the daemon is not running as root "
                      "and cannot switch users")
    try:
        ctx.account = pwd.getpwnam(name)
    except KeyError:
        raise Invalid(f"no such user {name!r}") from None
    return name


def daemon_user(node: Node, key: str, ctx: Context) -> str:
    name = string(node, key, ctx)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise Invalid(f"no such user {name!r}") from None
    return name


def group_name(node: Node, key: str, ctx: Context) -> str:
    name = string(node, key, ctx)
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise Invalid(f"no such group {name!r}") from None
    if not ctx.is_root and gid != os.getgid() and gid not in os.getgroups():
        raise Invalid(f"runs the job in group {name!r}, but the daemon is not running as "
                      "root and is not a member")
    ctx.group_id = gid
    return name


def existing_group(node: Node, key: str, ctx: Context) -> str:
    name = string(node, key, ctx)
    try:
        grp.getgrnam(name)
    except KeyError:
        raise Invalid(f"no such group {name!r}") from None
    return name


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    if home and os.path.isabs(home):
        return Path(home)
    return Path(pwd.getpwuid(os.getuid()).pw_dir)
