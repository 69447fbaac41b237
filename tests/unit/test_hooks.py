"""Hook runner on a real event loop with real processes (no daemon: the daemon-level
tests are in tests/integration/test_ops_hooks.py)."""

import asyncio
import json
import sys
import time

from trainsup.daemon.hooks import HookRunner, hook_event
from trainsup.spec import HookSpec


def test_hook_events_from_daemon_events():
    assert hook_event("state", {"from": "running", "to": "failed"}, "running") == "failed"
    assert hook_event("state", {"from": "stopping", "to": "preempted"}, "stopping") == "preempted"
    assert hook_event("state", {"from": "running", "to": "backoff"}, "running") is None
    assert hook_event("exit", {"reason": "signal SIGKILL"}, "running") == "crash"
    assert hook_event("exit", {"reason": "exit 0"}, "running") is None
    # An exit during the daemon's own stop flow is not a crash.
    assert hook_event("exit", {"reason": "signal SIGTERM"}, "stopping") is None
    assert hook_event("spawn-failed", {"error": "x"}, "starting") == "crash"
    assert hook_event("checkpoint", {"step": 3, "took_s": 0.4}, "running") == "saved"
    assert hook_event("checkpoint", {"step": 3}, "running") is None     # periodic: not an alert
    assert hook_event("over-quota", {"bytes": 9, "quota": 5}, "running") == "over-quota"


def _run(coro):
    return asyncio.run(coro)


def test_hook_gets_the_event_on_stdin_and_a_hung_hook_is_killed(tmp_path):
    out = tmp_path / "got.jsonl"
    rec = HookSpec(command=(sys.executable, "-c",
                            f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n'); print('ok')"),
                   on=("crash",), timeout=10)
    hang = HookSpec(command=(sys.executable, "-c", "import time; time.sleep(60)"), on=("crash",), timeout=0.5)

    async def main():
        loop = asyncio.get_running_loop()
        runner = HookRunner(loop, [rec, hang])
        done = []
        runner.on_finished = lambda label, rc, killed: done.append((rc, killed))
        runner.on_event("j", "state", {"from": "starting", "to": "running"})
        t0 = time.monotonic()
        runner.on_event("j", "exit", {"reason": "exit 3", "code": 3})
        # The loop stays responsive while both run: timers fire on time.
        lags = []
        while len(done) < 2 and time.monotonic() - t0 < 10:
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)
        return done, max(lags), time.monotonic() - t0, runner.pids()

    done, lag, took, left = _run(main())
    assert sorted(done) == [(-9, True), (0, False)], done
    assert 0.5 <= took < 5, took
    assert lag < 0.2, lag
    assert left == set()
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    ev = json.loads(lines[0])
    assert ev["event"] == "crash" and ev["job"] == "j" and ev["data"]["code"] == 3
