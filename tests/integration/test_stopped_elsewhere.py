"""Issue 14: a multi-node job's outcome is read from its checkpoints and notices, not from
exit codes. When another node's preemption stops the group, the ranks here save (the
helper's agreement: the manifest's reason is `preempt`) and exit, with whatever code the
launcher gives (torchrun's agent exits 1 when the store-hosting node goes, a script may
exit 0). This node's daemon sent no notice. Before: exit 0 read as `finished` (the run was
over for this node), exit 1 as a crash (backoff, counted toward max_restarts). Now both
relaunch at once to rejoin, recorded as `stopped-elsewhere`, not a crash."""

from __future__ import annotations

import pytest
from conftest import wait_for

RESTART = "restart: {policy: on-failure, backoff: {initial: 30s, max: 60s}}\n"


@pytest.mark.parametrize("code", [0, 1])
def test_a_save_for_a_preemption_elsewhere_then_exit_rejoins_at_once(daemon, code):
    daemon.fakejob("rank", flags=f"--peer-preempted {code} --after 0.5", extra=RESTART)
    daemon.start()
    # the first attempt saves for the preemption and exits; the second is launched at once
    # (a crash would wait the 30 s backoff; exit 0 would be `finished`)
    second = daemon.wait_ready("rank", starts=2, timeout=15)
    assert second["reason"] == "preempt", second
    assert second["resume"].endswith(f"step-{second['resumed_step']:08d}"), second
    hist = daemon.history("rank")
    kinds = [e["kind"] for e in hist]
    assert "stopped-elsewhere" in kinds, kinds
    ev = next(e for e in hist if e["kind"] == "stopped-elsewhere")
    assert ev["code"] == code and ev["step"] == second["resumed_step"], ev
    st = wait_for(lambda: (s := daemon.status("rank"))["state"] == "running" and s, 10, "running")
    assert st["crashes_in_a_row"] == 0 and st["restarts"] == 1, st


def test_a_crash_after_an_ordinary_save_is_still_a_crash(daemon):
    # a periodic checkpoint during the attempt says nothing about a preemption
    daemon.fakejob("crashy", flags="--every 0.2 --exit 1 --after 1.0", extra=RESTART)
    daemon.start()
    wait_for(lambda: daemon.status("crashy")["state"] == "backoff", 15, "the crash's backoff")
    assert "stopped-elsewhere" not in [e["kind"] for e in daemon.history("crashy")]
    assert daemon.status("crashy")["crashes_in_a_row"] == 1
