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


def test_half_written_job_file_on_reload_waits_for_the_whole_file(daemon):
    """Found: a reload that read a half-written file with a valid prefix (no `checkpoint:`
    section yet) restarted the job from scratch. Now the daemon reads the file once it has
    settled, and the job resumes from its checkpoint."""
    import threading
    import time

    path = daemon.fakejob("half", "--catch-usr1")
    daemon.start()
    daemon.wait_ready("half")
    ck = daemon.root / "half-ckpt"
    r = daemon.request("checkpoint", "half", wait=True)
    assert r["ok"], r
    whole = path.read_text() + "stop_timeout: 3s\n"          # a change: the job is replaced
    prefix, rest = whole.split("checkpoint:", 1)
    replies: list = []
    with open(path, "w") as f:
        f.write(prefix)                                        # a valid job on its own
        f.flush()
        asker = threading.Thread(target=lambda: replies.append(daemon.request("reload")))
        asker.start()
        time.sleep(0.25)                                       # the slow writer being reproduced
        f.write("checkpoint:" + rest)
    asker.join(30)
    assert replies and replies[0]["ok"] and replies[0]["result"]["changed"] == ["half"], replies
    second = daemon.wait_ready("half", starts=2)
    assert second["resume"].startswith(str(ck) + "/step-"), second      # not from scratch
    assert len([r for r in daemon.records("half") if r["event"] == "start"]) == 2
