"""rowgen.RowFields: a status row is re-made exactly when a field it shows is given a
different value (the status reply at 200 jobs re-encodes nothing else)."""

from __future__ import annotations

from trainsup.daemon.rowgen import RowFields


class Shown(RowFields):
    ROW_FIELDS = frozenset({"state", "rss", "warnings"})

    def __init__(self) -> None:
        self.state = "running"
        self.rss = 10 ** 9
        self.warnings: list[str] = []
        self.private = 0


def test_assigning_a_shown_field_a_new_value_moves_the_count():
    s = Shown()
    g = s.row_gen
    s.state = "backoff"
    assert s.row_gen == g + 1
    s.rss = 2 * 10 ** 9
    assert s.row_gen == g + 2


def test_same_value_or_unshown_field_leaves_it():
    s = Shown()
    g = s.row_gen
    s.state = "running"
    s.rss = int("1" + "0" * 9)          # equal, but another int object
    s.warnings = []
    s.private = 5
    assert s.row_gen == g


def test_in_place_change_needs_touch():
    s = Shown()
    g = s.row_gen
    s.warnings.append("over-quota")     # no assignment: the owner says so
    assert s.row_gen == g
    s.touch()
    assert s.row_gen == g + 1
