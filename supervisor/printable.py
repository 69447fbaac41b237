"""Text a person or a log reads, made safe to print: one function, used wherever a
job-controlled string (a file name, a manifest's `reason`, a hook's output, an error that
quotes either) reaches a terminal, a log line or a table.

Why: a file name holding `ESC ]` sequences rewrote root's terminal when `trainsup
checkpoints` printed it; a newline in a manifest's `reason` forged whole lines in the
daemon's log; a job file named with bytes that are not UTF-8 made every metrics scrape
fail to encode. Imports nothing: the CLI, the config loader and the daemon all use it.
"""

from __future__ import annotations

import logging
import re

# C0 controls (newline and tab included: one value stays one line, one cell), DEL, C1
# controls (U+0080-U+009F: some terminals read U+009B as CSI), and the bidi overrides and
# isolates that make a line read in another order than it is stored.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What os.fsdecode makes of bytes that are not UTF-8 (surrogateescape): U+DC80-U+DCFF.
# Any other lone surrogate cannot be encoded either.
_UNDECODABLE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}"


def printable(text: object) -> str:
    """`text` as one printable line: control characters escaped (`\\x1b`, `\\n`, `\\u202e`),
    bytes that were not UTF-8 replaced by U+FFFD. Plain text comes back unchanged (the
    common case costs one regex scan that finds nothing)."""
    s = text if isinstance(text, str) else str(text)
    if _UNDECODABLE.search(s):
        s = _UNDECODABLE.sub("\ufffd", s)
    if _CONTROL.search(s):
        s = _CONTROL.sub(_escape, s)
    return s


class PrintableFormatter(logging.Formatter):
    """The daemon's log lines: each message is one line whatever it quotes (a `reason`
    holding a newline forged lines in root's log). A traceback keeps its own lines: it is
    appended after the message, and it is the daemon's, not a job's."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def log_to_stderr(level: str) -> None:
    """logging.basicConfig for the daemon and `trainsup run`, through PrintableFormatter."""
    import sys
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
