"""The strict YAML reader: bytes -> a small tree of nodes that keep their line numbers;
anchors, aliases and tags are refused as events arrive, before anything expands. Also the
limits every job file is held to and the errors every layer raises."""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

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
        self.key: str | None = None     # a mapping's key waiting for its value
        self.key_line = 0
        self.skip = False                  # the pending value belongs to a refused key


def _child_path(frame: _Frame | None) -> str:
    if frame is None:
        return ""
    if frame.node.kind == "seq":
        return f"{frame.path}[{len(frame.node.value)}]"
    return join_key(frame.path, frame.key) if frame.key is not None else frame.path


def read_yaml(text: str, report: Callable[[int, str, str], None]) -> Node | None:
    """Builds the node tree from parser events. Returns None when the document cannot be
    trusted or read (already reported); duplicate keys are reported and the tree kept."""
    stack: list[_Frame] = []
    root: Node | None = None
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
              settle: bool = False) -> str | None:
    """The file as text, or None (reported). Never blocks on a FIFO, never reads > 1 MiB.
    With `settle`, raises Unsettled for a file that may still be being written (its
    size or mtime changed around the read, or it was modified < SETTLE_SECONDS ago): a
    half-written file with a valid prefix once restarted a job from scratch."""
    return read_text_and_stat(path, report, settle=settle)[0]


def read_text_and_stat(path: Path, report: Callable[[int, str, str], None], *,
                       settle: bool = False) -> tuple[str | None, os.stat_result | None]:
    """read_text, plus the fstat of the very file that was read (its owner and mode say
    who could have written it: trust.py), or None when it could not be opened."""
    before: os.stat_result | None = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        report(1, "(file)", f"cannot open: {exc.strerror}")
        return None, None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            report(1, "(file)", "not a regular file")
            return None, before
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
        return None, before
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        report(1, "(file)", f"file is larger than {MAX_FILE_BYTES} bytes (1 MiB)")
        return None, before
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8"), before
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        report(data.count(b"\n", 0, offset) + 1, "(file)",
               f"not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset})")
        return None, before


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

class HugeNumber(str):
    """An integer written with more than MAX_NUMBER_DIGITS digits, kept as its text: Python
    refuses to convert more than 4300 digits (a 5000-digit value once stopped the daemon
    from starting) and nothing here needs more than 30. Used as text it is just text."""

    @property
    def message(self) -> str:
        return f"number is too large (more than {MAX_NUMBER_DIGITS} digits)"
