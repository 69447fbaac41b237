"""trainsup.save_requested / atomic_save / the notice, in real processes with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from fw import REPO

LOOP = """
import os, signal, sys, time, trainsup
from pathlib import Path
state = {"step": 0}
ready = Path(os.environ["READY"])
for step in range(1, 100000):
    state["step"] = step
    if trainsup.save_requested():
        print("saving", step, flush=True)
        trainsup.atomic_save(state, Path(os.environ["TRAINSUP_CHECKPOINT_DIR"]) / "last.pt")
        print("saved", step, flush=True)
    if step == 1:
        ready.touch()
    time.sleep(0.005)
print("finished", flush=True)
"""


def _run(tmp_path, notice: dict | None, signals: list[int]) -> tuple[int, str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    nf = tmp_path / "notice.json"
    env.update(PYTHONPATH=str(REPO), TRAINSUP_CHECKPOINT_DIR=str(tmp_path), TRAINSUP_NOTICE_FILE=str(nf),
               READY=str(tmp_path / "ready"))
    p = subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
    from conftest import wait_for

    wait_for(lambda: (tmp_path / "ready").exists(), 60, "the loop to start")
    if notice is not None:
        nf.write_text(json.dumps(notice))
    for s in signals:
        p.send_signal(s)
    out, _ = p.communicate(timeout=60)
    ack = json.loads((tmp_path / "notice.json.ack").read_text()) if (tmp_path / "notice.json.ack").exists() else {}
    return p.returncode, out, ack


def test_a_preempt_notice_gets_one_save_then_exit_0_and_an_ack(tmp_path):
    rc, out, ack = _run(tmp_path, {"id": "7.1", "kind": "preempt", "deadline": None}, [signal.SIGUSR1])
    assert rc == 0
    assert out.count("saving") == 1 and "saved" not in out and "finished" not in out, out
    assert ack["id"] == "7.1" and ack["state"] == "saved" and ack["exits"] is True
    assert ack["path"] == str(tmp_path / "last.pt")


def test_a_checkpoint_notice_saves_and_goes_on(tmp_path):
    import time

    env_notice = {"id": "1.1", "kind": "checkpoint", "deadline": time.time() + 30}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), TRAINSUP_CHECKPOINT_DIR=str(tmp_path),
               TRAINSUP_NOTICE_FILE=str(tmp_path / ".n"), READY=str(tmp_path / "ready"))
    p = subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
    from conftest import wait_for

    wait_for(lambda: (tmp_path / "ready").exists(), 60, "the loop to start")
    (tmp_path / ".n").write_text(json.dumps(env_notice))
    p.send_signal(signal.SIGUSR1)
    wait_for(lambda: json.loads((tmp_path / ".n.ack").read_text()).get("state") == "saved", 30, "the ack")
    assert p.poll() is None, "a checkpoint notice must not end the job"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143 and out.count("saving") == 2, out


def test_sigterm_without_a_notice_saves_and_exits_143(tmp_path):
    rc, out, _ = _run(tmp_path, None, [signal.SIGTERM])
    assert rc == 143 and out.count("saving") == 1, out
    assert (tmp_path / "last.pt").exists()


def test_an_unreadable_notice_is_a_plain_checkpoint_request(tmp_path):
    (tmp_path / "notice.json").write_text("{not json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    code = ("import trainsup.emergency as e, signal\n"
            "e.install(); signal.raise_signal(signal.SIGUSR1)\n"
            "r = e.take(); print(r.kind, r.stops)\n")
    env.update(PYTHONPATH=str(REPO), TRAINSUP_NOTICE_FILE=str(tmp_path / "notice.json"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "checkpoint False", r.stderr


def test_a_stop_request_is_not_downgraded_by_a_later_checkpoint_signal(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    code = ("import trainsup.emergency as e, signal\n"
            "e.install(); signal.raise_signal(signal.SIGTERM)\n"
            "a = e.take(); signal.raise_signal(signal.SIGUSR1); b = e.take()\n"
            "print(a.kind, b.kind, e.current().kind)\n")
    env.update(PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "terminate terminate terminate", r.stderr


OWN_SAVE = """
import json, os, signal, sys, trainsup
from pathlib import Path
ack = Path(os.environ["TRAINSUP_NOTICE_FILE"] + ".ack")
assert not trainsup.save_requested()         # the first call installs the handlers
signal.raise_signal(signal.SIGUSR1)
assert trainsup.save_requested()
print("taken", json.loads(ack.read_text())["exits"], trainsup.should_stop(), flush=True)
p = Path(os.environ["TRAINSUP_CHECKPOINT_DIR"]) / "weights.bin"
p.write_bytes(b"x" * 16)                     # any save function: no atomic_save
trainsup.saved(p)
print("not reached", flush=True)
"""


def test_saved_after_any_save_function_ends_a_preempted_job_and_only_then_promises_the_exit(tmp_path):
    """save_requested() acknowledged every preempt notice as "taken, will exit" although only
    atomic_save() exited: a script saving otherwise had the daemon wait the whole grace.
    Now "taken" promises nothing, should_stop() is true at once, and saved(path) acks the
    save with the exit it then makes (0 after a preempt)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    nf = tmp_path / "notice.json"
    nf.write_text(json.dumps({"id": "3.1", "kind": "preempt", "deadline": None}))
    env.update(PYTHONPATH=str(REPO), TRAINSUP_CHECKPOINT_DIR=str(tmp_path), TRAINSUP_NOTICE_FILE=str(nf))
    r = subprocess.run([sys.executable, "-c", OWN_SAVE], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["taken False True"], r.stdout + r.stderr
    ack = json.loads((tmp_path / "notice.json.ack").read_text())
    assert ack["state"] == "saved" and ack["exits"] is True and ack["path"] == str(tmp_path / "weights.bin")


def test_saved_without_a_request_does_nothing_and_a_checkpoint_request_goes_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    nf = tmp_path / "notice.json"
    nf.write_text(json.dumps({"id": "4.1", "kind": "checkpoint", "deadline": None}))
    env.update(PYTHONPATH=str(REPO), TRAINSUP_NOTICE_FILE=str(nf))
    code = ("import signal, trainsup\n"
            "print(trainsup.saved('/nonexistent'))\n"
            "assert not trainsup.save_requested()\n"
            "signal.raise_signal(signal.SIGUSR1)\n"
            "assert trainsup.save_requested() and not trainsup.should_stop()\n"
            "print(trainsup.saved('/x', exit=False), trainsup.should_stop())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["None", "None False"], r.stdout + r.stderr
    ack = json.loads((tmp_path / "notice.json.ack").read_text())
    assert ack["state"] == "saved" and ack["exits"] is False


def test_sigterm_on_top_of_an_untaken_preempt_notice_is_one_stop_exit_0(tmp_path):
    """Found under load in the framework suite: a periodic save landed between the preempt
    notice and the job's next step; the daemon confirmed it and sent SIGTERM before the job
    took the notice, and the job took SIGTERM as a request of its own (a save, exit 143).
    Both pending at once: the preemption's one save, then exit 0."""
    rc, out, ack = _run(tmp_path, {"id": "9.1", "kind": "preempt", "deadline": None},
                        [signal.SIGUSR1, signal.SIGTERM])
    assert rc == 0, out
    assert out.count("saving") == 1 and "finished" not in out, out
    assert ack["id"] == "9.1" and ack["state"] == "saved"
