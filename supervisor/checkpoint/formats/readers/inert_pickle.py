"""A small metadata pickle (DCP's `.metadata`) read as data, with no code of its own run.

The unpickler resolves no global: every class or function the stream names becomes an
inert `Record` class that only remembers its name, and calling one (REDUCE, NEWOBJ) makes
a `Record` holding the arguments; BUILD stores the state it is given. So nothing the file
names is imported or executed — the same guarantee as the opcode walks of the other
readers — while the nesting of dicts, lists and records (which the opcode stream only
gives through its memo) comes out whole. Only small files are read this way: the caller
bounds the size, and each opcode makes at most one object.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ..common import Invalid


class Record:
    """An instance of a class the pickle named: `kind` is "module.qualname"; `args` what it
    was called with; `state` what BUILD set (a dict for dataclasses)."""

    kind = "?"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str) -> Any:
        """A dataclass field from BUILD's state (a dict, or (dict, slots) for slotted ones)."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2:
            merged: dict = {}
            for part in st:
                if isinstance(part, dict):
                    merged.update(part)
            st = merged
        return st.get(name) if isinstance(st, dict) else None

    def __reduce__(self) -> Any:      # never pickled back out
        raise TypeError("an inert record")


class _Inert(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.kinds: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> type:
        key = f"{module}.{name}"
        if key not in self.kinds:
            self.kinds[key] = type(name, (Record,), {"kind": key})
        return self.kinds[key]

    def persistent_load(self, pid: Any) -> Any:
        return Record(pid)


def load_inert(data: bytes) -> Any:
    """The object tree of one complete pickle, every class inert; Invalid when it is not one."""
    if not data:
        raise Invalid("empty file (0 bytes)")
    try:
        stream = io.BytesIO(data)
        obj = _Inert(stream).load()
        rest = len(data) - stream.tell()
    except Invalid:
        raise
    except RecursionError:
        raise Invalid("pickle: nested too deeply") from None
    except Exception as e:          # any malformed stream: the verdict, never a crash of the scan
        raise Invalid(f"pickle: {type(e).__name__}: {e}"[:200]) from None
    if rest:
        raise Invalid(f"pickle: {rest} trailing bytes after STOP")
    return obj
