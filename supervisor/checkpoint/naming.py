"""Which names in a checkpoint dir are checkpoints: the only entries rotation may touch.

A name is *managed* when the job's format names it as a checkpoint:
  - trainsup: `step-<8+ digits>` directories;
  - hf: `checkpoint-<N>` directories;
  - torch: files whose name carries a step-like word and a number (`step_300.pt`,
    `epoch=3-step=400.ckpt`, `model_epoch_7.pth`, `ckpt-12.pt`), or ends in a number set
    off by a separator (`model-100.pt`; not `resnet50.pt`), or a known alias of the
    newest save (`last.ckpt`, `last-v1.ckpt`, `latest.pt`, `last.pth`...);
  - anything the job's `checkpoint.pattern` (a regex over the whole name) matches.
Everything else is *unmanaged*: listed, never deleted (when `auto` claimed every `*.pt`,
it numbered a user's `resnet50.pt` as step 50 and rotated it away). Every match is a
fullmatch (`step-00000300\\n` is not a checkpoint; `$` would have let the newline through).
"""

from __future__ import annotations

import re

TRAINSUP_DIR = re.compile(r"step-(\d{8,})")
HF_DIR = re.compile(r"checkpoint-(\d+)")
TORCH_SUFFIX = r"\.(?:pt|pth|ckpt)"
# a step-like word, optional separator, digits; anything word-ish around it
_STEPWORD = r"(?:step|global_step|epoch|iter|iteration|ckpt|checkpoint)"
TORCH_NUMBERED = re.compile(
    rf"(?:[A-Za-z0-9_.=-]*[_.=-])?{_STEPWORD}[=_-]?\d+(?:[_.=-][A-Za-z0-9_.=-]*)?{TORCH_SUFFIX}")
# `model-100.pt`, `legacy_50.ckpt`: a number set off by a separator right before the
# suffix (`resnet50.pt`, `vgg16.pth` glue it to a word: a model name, not a step)
TORCH_SEPARATED = re.compile(rf"[A-Za-z0-9_.=-]*[A-Za-z][_=-]\d+{TORCH_SUFFIX}")
TORCH_ALIAS = re.compile(rf"(?:last(?:-v\d+)?\.ckpt)|(?:(?:latest|last){TORCH_SUFFIX})")
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(?:global_)?step[=_-]?(\d+)")
_OTHER_NUMBER = re.compile(rf"{_STEPWORD}[=_-]?(\d+)")


# Steps, epochs and every framework counter: what a signed 64-bit integer holds. Found: a
# Paddle `.states` global_step of 10**5000 broke the verdict's JSON (the whole index was
# lost), and a manifest step of 10**400 made the metrics scrape unparseable.
MAX_COUNTER = 2**63 - 1


def counter(value: object) -> int | None:
    """A step/epoch-like count: an int (or a string of digits) in 0..2**63-1, else None."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()) or len(value) > 19:
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        return None
    return value


def show_int(value: int) -> str:
    """An int for a message: a 5000-digit one has no str() (Python limits it)."""
    return str(value) if abs(value) <= MAX_COUNTER else f"a {value.bit_length()}-bit number"


class PatternError(ValueError):
    pass


def compile_pattern(text: str) -> re.Pattern:
    """`checkpoint.pattern`: a Python regex matched against whole entry names."""
    try:
        rx = re.compile(text)
    except re.error as e:
        raise PatternError(f"is not a valid regular expression: {e}") from None
    if rx.fullmatch(""):
        raise PatternError("matches the empty name: it would claim everything")
    return rx


def is_alias(name: str) -> bool:
    """An unnumbered name a framework rewrites with its newest state (`last.ckpt`)."""
    return bool(TORCH_ALIAS.fullmatch(name))


def step_of(name: str) -> int | None:
    """The step a managed name carries; None for aliases and unnumbered names."""
    for rx in (TRAINSUP_DIR, HF_DIR):
        m = rx.fullmatch(name)
        if m:
            return counter(m.group(1))
    if is_alias(name):
        return None
    m = (_STEP_IN_NAME.search(name) or _OTHER_NUMBER.search(name)
         or re.search(rf"[_=-](\d+){TORCH_SUFFIX}\Z", name))
    return counter(m.group(1)) if m else None
