"""Job YAML and daemon config -> validated specs (trainsup.spec), with FILE:LINE errors.

Three layers, top to bottom:
  1. a strict YAML reader: bytes -> a small tree of nodes that keep their line numbers;
     anchors, aliases and tags are refused as events arrive, before anything expands;
  2. value parsers (durations, sizes, signals, cron, ...) that raise Invalid(message);
  3. schema tables, one per section, mapping each key to its parser; the dataclass in
     spec.py supplies the defaults, so they live in exactly one place.
Every problem becomes one line `FILE:LINE: KEY: what is wrong`; all of them are collected.
"""

from __future__ import annotations

import codecs
import dataclasses
import grp
import json
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional
from urllib.parse import urlsplit

import yaml

from .checkpoint.claims import cross_job_conflicts
from .checkpoint.naming import PatternError, compile_pattern
from .spec import (HOOK_EVENTS, BackoffSpec, CheckpointSpec, DaemonSpec, EmergencySaveSpec,
                   HangSpec, HookSpec, InvalidJob, JobSpec, MemorySpec, MetricsSpec,
                   PreemptionSpec, RestartSpec, ScheduleSpec, SlurmSpec)

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32            # a job file is 3 levels deep; deep nesting is only an attack
MAX_ERRORS = 30           # per file: a 1 MiB file of typos should not flood `status`
# Every number has a range: absurd values once broke supervision (a backoff factor of 1e300
# overflowed on the third crash; a 400-digit memory limit silently disabled monitoring).
MAX_DURATION = 30 * 86400.0   # 30 days; no timer here is meant to be longer
MAX_SIZE = 1 << 60            # 1 EiB
MAX_COUNT = 1_000_000         # keep_last, max_restarts, ...
MAX_NUMBER_DIGITS = 30        # an integer longer than this is refused as written
SETTLE_SECONDS = 0.3          # a job file written more recently may still be being written
UNIX_SOCKET_PATH_MAX = 107

JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when built with it


class ConfigError(Exception):
    """Raised for a bad daemon config; `errors` holds one line per problem."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Invalid(ValueError):
    """A value parser's verdict on one node: the message after `KEY: `."""


class _Reported(Exception):
    """The problem was already recorded (compound values report per item)."""


# ---------------------------------------------------------------------------- values

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


class HugeNumber(str):
    """An integer written with more than MAX_NUMBER_DIGITS digits, kept as its text: Python
    refuses to convert more than 4300 digits (a 5000-digit value once stopped the daemon
    from starting) and nothing here needs more than 30. Used as text it is just text."""

    @property
    def message(self) -> str:
        return f"number is too large (more than {MAX_NUMBER_DIGITS} digits)"


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


# ----------------------------------------------------------------------- YAML reader

class Node:
    """One YAML node. kind: "map" (value: {key: (key_line, Node)}), "seq", "scalar"."""

    __slots__ = ("kind", "value", "line", "raw")

    def __init__(self, kind: str, value: Any, line: int, raw: str = ""):
        self.kind, self.value, self.line, self.raw = kind, value, line, raw


_resolver = yaml.resolver.Resolver()
_constructor = yaml.constructor.SafeConstructor()
_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("null", "bool", "int", "float")}


def _scalar_value(event: Any) -> Any:
    tag = _resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag not in _PLAIN_TAGS:
        # timestamps, `=`, `<<`: keep the text as written, that is what a user means
        return event.value
    if tag.endswith(":int") and sum(c.isdigit() for c in event.value) > MAX_NUMBER_DIGITS:
        return HugeNumber(event.value)
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)  # type: ignore[arg-type]
    try:
        return _constructor.yaml_constructors[tag](_constructor, node)
    except ValueError:       # any other number Python will not convert: keep the text
        return HugeNumber(event.value)


def _show_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _seg(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else json.dumps(key, ensure_ascii=False)


def join_key(parent: str, key: str) -> str:
    return f"{parent}.{_seg(key)}" if parent else _seg(key)


class _Frame:
    __slots__ = ("node", "path", "key", "key_line", "skip")

    def __init__(self, node: Node, path: str):
        self.node, self.path = node, path
        self.key: Optional[str] = None     # a mapping's key waiting for its value
        self.key_line = 0
        self.skip = False                  # the pending value belongs to a refused key


def _child_path(frame: Optional[_Frame]) -> str:
    if frame is None:
        return ""
    if frame.node.kind == "seq":
        return f"{frame.path}[{len(frame.node.value)}]"
    return join_key(frame.path, frame.key) if frame.key is not None else frame.path


def read_yaml(text: str, report: Callable[[int, str, str], None]) -> Optional[Node]:
    """Builds the node tree from parser events. Returns None when the document cannot be
    trusted or read (already reported); duplicate keys are reported and the tree kept."""
    stack: list[_Frame] = []
    root: Optional[Node] = None
    documents = 0
    events: Any = yaml.parse(text, Loader=_Parser)
    try:
        for event in events:
            line = event.start_mark.line + 1 if event.start_mark else 1
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    report(line, "(file)", "more than one YAML document; one job per file")
                    return None
                continue
            if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
                continue
            parent = stack[-1] if stack else None
            path = _child_path(parent)
            where = path or "(file)"
            # Refused here, at the event, so an alias is never expanded (billion laughs).
            if isinstance(event, yaml.AliasEvent):
                report(line, where, f"aliases (*{event.anchor}) are not allowed")
                return None
            anchor, tag = getattr(event, "anchor", None), getattr(event, "tag", None)
            if anchor is not None:
                report(line, where, f"anchors (&{anchor}) are not allowed")
                return None
            if tag is not None:
                report(line, where, f"tags ({_show_tag(tag)}) are not allowed")
                return None
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    report(line, where, f"nested deeper than {MAX_DEPTH} levels")
                    return None
                kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
                if parent is not None and parent.key is not None:
                    line = parent.key_line   # `checkpoint:` itself, not its first child
                stack.append(_Frame(Node(kind, {} if kind == "map" else [], line), path))
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                node = stack.pop().node
            else:
                scalar: Any = event
                node = Node("scalar", _scalar_value(scalar), line, scalar.value)
            parent = stack[-1] if stack else None
            if parent is None:
                root = node
            elif parent.node.kind == "seq":
                parent.node.value.append(node)
            elif parent.key is None and not parent.skip:
                if node.kind != "scalar":
                    report(node.line, parent.path or "(file)", "mapping keys must be plain names")
                    parent.skip = True
                    continue
                # Keys stay as written: YAML 1.1 would turn `N:` or `on:` into booleans.
                key = node.raw
                if key in parent.node.value:
                    first = parent.node.value[key][0]
                    report(node.line, join_key(parent.path, key),
                           f"duplicate key (first set on line {first})")
                    parent.skip = True
                    continue
                parent.key, parent.key_line = key, node.line
            else:
                if not parent.skip:
                    parent.node.value[parent.key] = (parent.key_line, node)
                parent.key, parent.skip = None, False
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(str(exc.problem or exc.context or "syntax error").split())
        if exc.context and exc.problem:
            message = f"{message} ({' '.join(exc.context.split())})"
        report(mark.line + 1 if mark else 1, "(yaml)", message)
        return None
    except yaml.reader.ReaderError as exc:
        # libyaml counts the position in bytes, the pure-Python reader in characters
        cparser = getattr(getattr(yaml, "cyaml", None), "CParser", None)
        if cparser and issubclass(_Parser, cparser):
            newlines = text.encode()[:exc.position].count(b"\n")
        else:
            newlines = text[:exc.position].count("\n")
        code = exc.character if isinstance(exc.character, int) else ord(exc.character or "\0")
        report(newlines + 1, "(yaml)",
               f"character U+{code:04X} is not allowed in YAML")
        return None
    except yaml.YAMLError as exc:
        report(1, "(yaml)", " ".join(str(exc).split()))
        return None
    finally:
        events.close()
    if root is None or (root.kind == "scalar" and root.value is None and root.raw == ""):
        report(1, "(file)", "the file is empty")
        return None
    if root.kind != "map":
        report(root.line, "(file)", f"the top level must be a mapping of settings, got {describe(root)}")
        return None
    return root


class Unsettled(Exception):
    """The file changed while it was read, or was written moments ago: it may be half
    written. The daemon leaves the job as it is and reads the file again shortly."""


def read_text(path: Path, report: Callable[[int, str, str], None], *,
              settle: bool = False) -> Optional[str]:
    """The file as text, or None (reported). Never blocks on a FIFO, never reads > 1 MiB.
    With `settle`, raises Unsettled for a file that may still be being written (its
    size or mtime changed around the read, or it was modified < SETTLE_SECONDS ago): a
    half-written file with a valid prefix once restarted a job from scratch."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        report(1, "(file)", f"cannot open: {exc.strerror}")
        return None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            report(1, "(file)", "not a regular file")
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if settle:
            after = os.fstat(fd)
            age = time.time() - after.st_mtime
            if ((before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)
                    or 0 <= age < SETTLE_SECONDS):
                raise Unsettled(str(path))
    except OSError as exc:
        report(1, "(file)", f"cannot read: {exc.strerror}")
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        report(1, "(file)", f"file is larger than {MAX_FILE_BYTES} bytes (1 MiB)")
        return None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        report(data.count(b"\n", 0, offset) + 1, "(file)",
               f"not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset})")
        return None


def describe(node: Node) -> str:
    """A node as an error message shows it after `got`."""
    if node.kind == "map":
        return "a mapping"
    if node.kind == "seq":
        return "a list"
    value = node.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    return node.raw if len(node.raw) <= 60 else node.raw[:57] + "..."


# --------------------------------------------------------------------- error context

class Context:
    """Where values come from (for messages and relative paths) and what went wrong."""

    def __init__(self, label: str, base_dir: Path, is_root: bool, flags: bool = False):
        self.label = label
        self.base_dir = base_dir          # relative paths resolve against this
        self.is_root = is_root
        self.flags = flags                # values from the command line: no line numbers
        self.workdir = base_dir           # checkpoint.dir resolves against this
        self.account: Optional[pwd.struct_passwd] = None   # the job's `user:`, looked up once
        self.group_id: Optional[int] = None                # the job's `group:`, looked up once
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


def choice(*options: str) -> Callable:
    def parse(node: Node, key: str, ctx: Context) -> str:
        if node.kind != "scalar" or node.value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {describe(node)}")
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


def text_list(node: Node, key: str, ctx: Context) -> tuple[str, ...]:
    if node.kind != "seq":
        raise Invalid(f"must be a list of strings, got {describe(node)}")
    words, bad = [], False
    for index, item in enumerate(node.value):
        try:
            words.append(text(item, f"{key}[{index}]", ctx))
        except Invalid as exc:
            ctx.report(item.line, f"{key}[{index}]", str(exc))
            bad = True
    if bad:
        raise _Reported
    return tuple(words)


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
    names, bad = [], False
    for index, item in enumerate(node.value):
        try:
            names.append(env_name(item, f"{key}[{index}]", ctx))
        except Invalid as exc:
            ctx.report(item.line, f"{key}[{index}]", str(exc))
            bad = True
    if bad:
        raise _Reported
    return tuple(dict.fromkeys(names))


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
    weekdays from 0 = Monday (its issue 286), so "0 2 * * 1" would fire on Tuesdays."""
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


def crontab_trigger(expression: str, timezone: Any = "UTC"):
    """A CronTrigger that reads `expression` the way crontab(5) does (0 or 7 = Sunday)."""
    from apscheduler.triggers.cron import CronTrigger   # deferred: heavy import
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


def _current_user() -> Optional[str]:
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


# ------------------------------------------------------------------------- sections

class Section:
    """A mapping whose keys are fixed by a table; the dataclass gives the defaults.

    Keys missing from the YAML are left out of the constructor call so the dataclass
    default applies. A key whose default is None also accepts `null`.
    """

    def __init__(self, cls: type, keys: dict[str, Callable], required: tuple[str, ...] = (),
                 check: Optional[Callable[[dict, dict, str, Context], None]] = None):
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
                import difflib      # only for a typo: not imported by every daemon
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


CHECKPOINT = Section(CheckpointSpec, {
    "dir": _CheckpointDir(),
    "format": choice("auto", "trainsup", "torch", "hf", "paddle", "tf", "keras", "lightning", "safetensors"),
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
    hooks, bad = [], False
    for index, item in enumerate(node.value):
        try:
            hooks.append(HOOK(item, f"{key}[{index}]", ctx))
        except Invalid as exc:
            ctx.report(item.line, f"{key}[{index}]", str(exc))
            bad = True
        except _Reported:
            bad = True
    if bad:
        raise _Reported
    return tuple(hooks)


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
    scraper unless the admin names another address."""
    raw = text(node, key, ctx).strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "", raw
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:      # 0: any free port (status shows it)
        raise Invalid(f"must be HOST:PORT such as 127.0.0.1:9184, got {describe(node)}")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


METRICS = Section(MetricsSpec, {"listen": listen_address})

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


# ------------------------------------------------------------------------- job files

def _read_job(path: Path, is_root: bool, *, settle: bool = False,
              runnable: bool = False) -> tuple[JobSpec | InvalidJob, int]:
    """The job, or InvalidJob; plus the line of `name:` (0 if none) for duplicate errors.
    `settle`: raise Unsettled for a file still being written. `runnable`: also check that
    the workdir exists and the command resolves (`trainsup validate`)."""
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    ctx = Context(str(path), base, is_root)
    name, name_line = path.stem, 0
    text_ = read_text(path, ctx.report, settle=settle)
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
            error = (f"{path}:{line}: name: job name {job.name!r} is already used by "
                     f"{other}:{other_line}")
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


def _refuse_checkpoint_claims(jobs: list, jobs_dir: Optional[Path], state_dir: Optional[Path]) -> list:
    """checkpoint.dir that is `/`, a home, the state/jobs dir or another job's: invalid."""
    conflicts = cross_job_conflicts([j for j in jobs if isinstance(j, JobSpec)],
                                    jobs_dir=jobs_dir, state_dir=state_dir)
    return [InvalidJob(name=j.name, source=j.source, errors=tuple(conflicts[j.name]))
            if isinstance(j, JobSpec) and j.name in conflicts else j for j in jobs]


def load_jobs_dir(jobs_dir: Path | str, *, is_root: bool,
                  state_dir: Optional[Path] = None) -> tuple[list[JobSpec], list[InvalidJob]]:
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
                  state_dir: Optional[Path] = None) -> JobsDirScan:
    """load_jobs_dir, for the daemon: with `settle`, a file that may still be being
    written is neither a job nor an invalid job but listed in `unsettled`, so the caller
    leaves that job as it is and scans again in a moment."""
    jobs_dir = Path(jobs_dir)
    try:
        files = _job_files(jobs_dir)
    except FileNotFoundError:
        return JobsDirScan([], [], [])
    except OSError as exc:
        error = f"{jobs_dir}:1: (file): cannot list the jobs dir: {exc.strerror}"
        return JobsDirScan([], [InvalidJob(name=jobs_dir.name, source=jobs_dir, errors=(error,))], [])
    loaded, unsettled = [], []
    for p in files:
        try:
            loaded.append((p, *_read_job(p, is_root, settle=settle)))
        except Unsettled:
            unsettled.append(p)
    jobs = _refuse_checkpoint_claims(_mark_duplicates(loaded), jobs_dir, state_dir)
    return JobsDirScan([j for j in jobs if isinstance(j, JobSpec)],
                       [j for j in jobs if isinstance(j, InvalidJob)], unsettled)


def scan_job_file(path: Path | str, *, is_root: bool, settle: bool = True,
                  state_dir: Optional[Path] = None) -> JobsDirScan:
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

def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    if home and os.path.isabs(home):
        return Path(home)
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


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


def discover_config(explicit: Optional[Path | str], *, is_root: bool,
                    env: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The daemon config to read: --config when given (it must exist), else the
    conventional file (/etc/trainsup/trainsup.yaml for root, else
    $XDG_CONFIG_HOME/trainsup/trainsup.yaml) when it exists, else none."""
    if explicit is not None:
        return Path(explicit)
    candidates = [default_config_path(is_root=is_root, env=env)]
    systemd = _systemd_dir(env, "CONFIGURATION_DIRECTORY")
    if systemd is not None:              # a unit's ConfigurationDirectory=trainsup
        candidates.insert(0, systemd / "trainsup.yaml")
    return next((c for c in candidates if c.is_file()), None)


def _systemd_dir(env: Mapping[str, str], name: str) -> Optional[Path]:
    """A directory systemd made for the unit (StateDirectory= etc.); the first when it
    lists several, colon-separated."""
    value = env.get(name, "").split(":")[0]
    return Path(value) if value and os.path.isabs(value) else None


def _under_systemd(defaults: dict, state_dir: Optional[Path], env: Mapping[str, str]) -> dict:
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


def _defaults(state_dir: Optional[Path], is_root: bool, env: Mapping[str, str]) -> dict:
    if is_root:
        try:
            grp.getgrnam("trainsup")
            group: Optional[str] = "trainsup"
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


def load_daemon_config(path: Optional[Path | str], overrides: Mapping[str, Any], *,
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
