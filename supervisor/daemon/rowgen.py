"""Which status rows changed, known by construction: every assignment to a field a row
shows moves the object's `row_gen`, so `status` re-encodes a job's row, and re-joins the
reply of 200 rows, only when a count moved (plus once a second for what depends on time
alone). A hand-kept "dirty" flag at each of the places that change those fields would
miss the next one added."""

from __future__ import annotations

from typing import Any, ClassVar

_MISSING = object()


_any = [0]     # bumped with every object's row_gen


def any_change() -> int:
    """A count that moves whenever any row of any object changes: `status` at 200 jobs
    checks one number, not 200, to know its joined reply still holds."""
    return _any[0]


class RowFields:
    """Mixin: assignments to a name in ROW_FIELDS that change its value bump row_gen.
    Changes made in place (a list appended to) call touch()."""
    ROW_FIELDS: ClassVar[frozenset[str]] = frozenset()
    row_gen: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.ROW_FIELDS:
            old = getattr(self, name, _MISSING)
            if old is _MISSING or old is not value and old != value:
                object.__setattr__(self, "row_gen", self.row_gen + 1)
                _any[0] += 1
        object.__setattr__(self, name, value)

    def touch(self) -> None:
        object.__setattr__(self, "row_gen", self.row_gen + 1)
        _any[0] += 1
