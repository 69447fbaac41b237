"""Which checkpoint confirms a save request (pure policy, table-driven)."""

from __future__ import annotations

from dataclasses import dataclass

from trainsup.checkpoint.confirm import confirmation, save_request

T = 1_000_000.0   # the request's wall time


@dataclass
class E:
    name: str
    step: int | None
    mtime: float
    valid: bool = True
    in_progress: bool = False
    bytes: int = 10
    alias_kind: str | None = None

    @property
    def path(self):
        return f"/ck/{self.name}"


def test_an_old_checkpoint_found_after_the_request_never_confirms():
    before = [E("checkpoint-10", 10, T - 100)]
    req = save_request(before, T)
    # checkpoint-92 completes in the index only now, but it was written an hour ago
    after = before + [E("checkpoint-92", 92, T - 3600)]
    assert confirmation(after, req) is None
    after.append(E("checkpoint-661", 661, T + 0.4))
    assert confirmation(after, req).step == 661


def test_a_new_save_must_be_past_the_newest_valid_step():
    req = save_request([E("checkpoint-10", 10, T - 100), E("checkpoint-20", 20, T - 50)], T)
    # rewritten after the request, but no newer than what was there: not a new save
    assert confirmation([E("checkpoint-20", 20, T + 1)], req) is None
    assert confirmation([E("checkpoint-21", 21, T + 1)], req).step == 21


def test_invalid_and_in_progress_entries_never_confirm():
    req = save_request([], T)
    assert confirmation([E("checkpoint-5", 5, T + 1, valid=False)], req) is None
    assert confirmation([E("step-5", 5, T + 1, in_progress=True)], req) is None
    assert confirmation([E("checkpoint-5", 5, T + 1)], req).name == "checkpoint-5"


def test_an_unnumbered_file_rewritten_after_the_request_confirms():
    old = E("latest.pth", None, T - 30)
    req = save_request([old], T)
    assert confirmation([old], req) is None
    assert confirmation([E("latest.pth", None, T + 0.5, bytes=11)], req).name == "latest.pth"


def test_the_numbered_entry_is_reported_over_its_alias():
    req = save_request([E("iter_epoch_1", 4, T - 60)], T)
    found = confirmation([E("latest", 8, T + 1, alias_kind="latest"), E("iter_epoch_2", 8, T + 1)], req)
    assert found.name == "iter_epoch_2"


def test_coarse_kernel_clock_a_tick_behind_still_confirms():
    req = save_request([E("checkpoint-1", 1, T - 9)], T)
    assert confirmation([E("checkpoint-2", 2, T - 0.005)], req).step == 2


# ---------------------------------------------------------------- status warnings (layout_warnings)

def test_in_place_rewrite_is_reported_once_seen_and_kept():
    from trainsup.checkpoint.layout_warnings import InPlaceWrites
    w = InPlaceWrites()
    w.observe([E("latest.pth", None, T, bytes=100)])
    assert w.warning() is None
    w.observe([E("latest.pth", None, T + 1, bytes=0, valid=False)])   # torch.save's O_TRUNC
    w.observe([E("latest.pth", None, T + 2, bytes=100)])
    assert "latest.pth was seen truncated or rewritten" in w.warning()


def test_a_new_entry_filling_up_is_not_an_in_place_write():
    from trainsup.checkpoint.layout_warnings import InPlaceWrites
    w = InPlaceWrites()
    w.observe([E("checkpoint-6", 6, T, valid=False)])
    w.observe([E("checkpoint-6", 6, T + 1)])
    assert w.warning() is None


def test_unrecognised_non_empty_dir(tmp_path):
    from trainsup.checkpoint.layout_warnings import unrecognised
    assert unrecognised(tmp_path, "auto", []) is None                 # empty: nothing saved yet
    (tmp_path / ".trainsup-tmp").mkdir()
    assert unrecognised(tmp_path, "auto", []) is None
    (tmp_path / "model_state.npz").write_bytes(b"x")
    assert unrecognised(tmp_path, "auto", []).startswith(f"no checkpoints recognised in {tmp_path}: set checkpoint.format")
    assert "no paddle checkpoints recognised" in unrecognised(tmp_path, "paddle", [])
    assert unrecognised(tmp_path, "auto", [E("x.pth", 1, T)]) is None
