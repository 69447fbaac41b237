"""Config defects seen through a real daemon (issue 10)."""

from __future__ import annotations


def test_5000_digit_integer_in_one_job_file_does_not_stop_the_daemon(daemon):
    """Found: Python's int-digits limit raised inside the YAML loader and the daemon did
    not start at all. Now only that file is invalid, with its FILE:LINE."""
    daemon.fakejob("fine", "--catch-usr1", ckpt=False)
    huge = daemon.write_job("huge", "name: huge\ncommand: [sleep, '1']\nstop_timeout: " + "5" * 5000 + "\n")
    daemon.start()
    daemon.wait_state("fine", "running")
    st = daemon.status("huge")
    assert st["state"] == "invalid"
    assert st["error"].startswith(f"{huge}:3: stop_timeout: "), st["error"]
    assert len(st["error"]) < 300


def test_absurd_backoff_factor_is_invalid_not_a_wedged_job(daemon):
    path = daemon.write_job("fast", "name: fast\ncommand: [sleep, '1']\nrestart:\n  backoff: {factor: 1.0e+300}\n")
    daemon.start()
    st = daemon.status("fast")
    assert st["state"] == "invalid" and st["error"].startswith(f"{path}:4: restart.backoff.factor: must be a number in [1, 10]")
