"""`logs -f` keeps following a job when a reload replaces it (issue 10: the follower stayed
attached to the retired job's log and went silent)."""

from __future__ import annotations

import json
import socket
import sys

from conftest import wait_for


def _talker(daemon, tag: str, extra: str = "") -> None:
    program = ("import time\\nfor i in range(100000):\\n  print('" + tag + "', i, flush=True); time.sleep(0.05)")
    daemon.write_job("talk", f"name: talk\ncommand: [{json.dumps(sys.executable)}, -u, -c, \"{program}\"]\n"
                             f"stop_timeout: 2s\n{extra}")


def test_logs_follow_continues_after_a_reload_changes_the_job(daemon):
    _talker(daemon, "OLDJOB")
    daemon.start()
    daemon.wait_state("talk", "running")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(daemon.socket))
    s.sendall(json.dumps({"cmd": "logs", "job": "talk", "args": {"n": 0, "follow": True}}).encode() + b"\n")
    lines = s.makefile("rb")
    seen = []

    def saw(word: str) -> bool:
        while True:
            reply = json.loads(lines.readline())
            assert reply["ok"], reply
            seen.append(reply["result"]["text"])
            if word in reply["result"]["text"]:
                return True

    try:
        assert saw("OLDJOB")
        _talker(daemon, "NEWJOB", extra="autostart: true\n")      # a changed spec: the job is replaced
        r = daemon.request("reload")
        assert r["ok"] and r["result"]["changed"] == ["talk"], r
        wait_for(lambda: saw("NEWJOB"), 15, "the follower to see the new job's output")
    finally:
        s.close()
