"""The helper after torchrun restarted its workers in place (--max-restarts, as in a
multi-node job whose peer node was preempted or crashed): the daemon's TRAINSUP_RESUME_FROM
comes from the agent's launch and is older than what the ranks saved since. Found on the
network-namespace 2-node test: the surviving node's restarted worker resumed from the stale
checkpoint while the relaunched node resumed from the new one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainsup.training import Checkpointer  # noqa: E402


def _model(fill: float):
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(fill)
    return m


def test_torchrun_restart_in_place_resumes_from_newest_not_the_launch_time_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINSUP_JOB", "j")          # run by the daemon: no implicit "latest"
    ck = Checkpointer(model=_model(1.0), dir=tmp_path, install_signals=False)
    old = ck.save(10)
    ck.model.weight.data.fill_(2.0)
    new = ck.save(20)
    ck.close()
    monkeypatch.setenv("TRAINSUP_RESUME_FROM", str(old))   # what the daemon gave the agent

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # first workers: the daemon's choice
    first = Checkpointer(model=_model(0.0), dir=tmp_path, install_signals=False)
    assert first.restore() == 10
    first.close()

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # restarted in place: the newest
    again = Checkpointer(model=_model(0.0), dir=tmp_path, install_signals=False)
    assert again.restore() == 20 and again.resumed_from == new
    assert torch.equal(again.model.weight, torch.full((1, 2), 2.0))
    again.close()
