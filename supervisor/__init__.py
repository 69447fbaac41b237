"""trainsup: a preemption-tolerant supervisor for long training runs.

The source folder is `supervisor/`; it is installed and imported as `trainsup` (see
pyproject.toml), so it never shadows supervisord's own `supervisor` package.

`trainsup.save_requested()`, `trainsup.atomic_save()`, `trainsup.saved()` and
`trainsup.should_stop()` (see trainsup.emergency) are loaded on first use: the daemon
imports this package and must not pay for, or depend on, anything a training job uses.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "save_requested": "emergency",
    "atomic_save": "emergency",
    "atomic_write": "emergency",
    "should_stop": "emergency",
    "saved": "emergency",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'trainsup' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value   # later lookups are plain attribute reads
    return value


def __dir__() -> list:
    return sorted([*globals(), *_LAZY])
