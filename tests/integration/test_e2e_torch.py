"""Real torch training jobs (jobs/train_mlp.py) under the real daemon, end to end: a
SIGKILL plus a damaged newest checkpoint, a `trainsup preempt` then `trainsup start`,
and torchrun x2 with a daemon-driven save and a killed rank. Conditions are polled with
deadlines; the daemon is a subprocess (tests/conftest.py's `daemon` fixture)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import REPO, committed, manifest, wait_for

torch = pytest.importorskip("torch")

TRAIN_MLP = REPO / "jobs" / "train_mlp.py"
# Under a busy 2-core machine a torch import alone can take several seconds.
SLOW = 60.0


# ---------------------------------------------------------------- helpers

def write_mlp_job(daemon, name: str, argv: list[str], extra: str = "", backoff: str = "1s") -> Path:
    """A job running train_mlp.py (argv: its arguments, or a full command if it starts
    with the interpreter) with its own checkpoint dir under the daemon's root."""
    cmd = argv if argv and argv[0] == sys.executable else [sys.executable, str(TRAIN_MLP), *argv]
    ck = daemon.root / f"{name}-ckpt"
    body = (f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
            f"env: {{PYTHONPATH: {json.dumps(str(REPO))}, OMP_NUM_THREADS: '1', PYTHONUNBUFFERED: '1'}}\n"
            f"stop_timeout: 20s\n"
            f"checkpoint:\n  dir: {ck}\n  format: trainsup\n  keep_last: 10\n  keep_best: 0\n"
            f"restart:\n  policy: on-failure\n  backoff: {{initial: {backoff}, max: {backoff}}}\n"
            f"emergency_save:\n  grace: 30s\n" + extra)
    daemon.write_job(name, body)
    return ck


def events(daemon, job: str, kind: str | None = None) -> list[dict]:
    return [e for e in daemon.history(job) if kind is None or e["kind"] == kind]


def job_log(daemon, job: str) -> str:
    r = daemon.request("logs", job, n=100000)
    assert r["ok"], r
    return r["result"]["text"]


def launch(daemon, job: str, attempt: int) -> dict:
    return wait_for(lambda: [e for e in events(daemon, job, "launch") if e["attempt"] == attempt],
                    SLOW, f"{job} launch #{attempt} (log: {job_log(daemon, job)[-1500:]})")[0]


def steps_logged(daemon, job: str, after: int = 0) -> int:
    """The last `step N` line the job printed after its `after`-th launch note."""
    text = job_log(daemon, job)
    parts = re.split(r"^.*attempt \d+ \(\w+\): pid \d+.*$", text, flags=re.M)
    tail = parts[after] if len(parts) > after else ""
    m = re.findall(r"^step (\d+) ", tail, re.M)
    return int(m[-1]) if m else 0


def wait_steps(daemon, job: str, n: int, attempt: int = 1) -> int:
    return wait_for(lambda: (s := steps_logged(daemon, job, attempt)) >= n and s, SLOW,
                    f"{job} to log step {n} in attempt {attempt} (log: {job_log(daemon, job)[-1500:]})")



def checkpoints_json(daemon, job: str) -> list[dict]:
    r = daemon.cli("checkpoints", job, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["checkpoints"]


def final_hash(text: str) -> str:
    m = re.findall(r"^finished step \d+ weights ([0-9a-f]{16})$", text, re.M)
    assert m, f"no final weights line in:\n{text[-1500:]}"
    return m[-1]


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"tensors differ from the uninterrupted run: {diff}"


def env_of(pid: int) -> dict:
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return {}


@pytest.fixture
def reaper(tmp_path):
    """Leave no training process behind, whatever the daemon managed: every process whose
    checkpoint dir is under this test's tmp_path is killed at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
    for p in psutil.process_iter():
        try:
            if env_of(p.pid).get("TRAINSUP_CHECKPOINT_DIR", "").startswith(str(tmp_path)):
                p.kill()
        except psutil.Error:
            pass


def reference_run(tmp_path: Path, args: list[str], reaper: list) -> tuple[subprocess.Popen, Path, Path]:
    """The uninterrupted run, outside the daemon, started now and awaited later."""
    out, log = tmp_path / "ref.pt", tmp_path / "ref.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TRAINSUP_CHECKPOINT_DIR=str(tmp_path / "ref-ckpt"))
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, str(TRAIN_MLP), *args, "--final-out", str(out)],
                             env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    reaper.append(p)
    return p, out, log


# ---------------------------------------------------------------- tests

def test_sigkill_and_damaged_newest_checkpoint_resume_from_the_one_before(daemon, tmp_path, reaper):
    """SIGKILL mid-run; in the restart backoff window the newest checkpoint is truncated.
    The relaunch resumes from the checkpoint before it, `checkpoints` says why the
    damaged one is invalid, and the finished weights equal an uninterrupted run's."""
    steps = 150
    train = ["--steps", str(steps), "--every", "0", "--log-every", "1", "--seed", "3"]
    ref, ref_out, ref_log = reference_run(tmp_path, train, reaper)
    # Slow enough that it is still training when the test kills it, after two confirmed
    # saves and a pin on a busy machine (at 0.03 s a step, all 150 steps were done first in CI).
    ck = write_mlp_job(daemon, "kill", train + ["--sleep-per-step", "0.15",
                                                "--final-out", str(tmp_path / "final.pt")],
                       backoff="4s")
    daemon.start()
    wait_steps(daemon, "kill", 5)
    # Two saves at steps of the daemon's choosing (the save signal), none periodic: the
    # resumed run never writes these steps again, so the damaged one stays for inspection.
    saves = []
    for _ in range(2):
        r = daemon.request("checkpoint", "kill", wait=True)
        assert r["ok"], r
        saves.append(r["result"])
    prev, newest = (Path(s["path"]) for s in saves)
    assert saves[0]["step"] < saves[1]["step"]
    assert [p.name for p in committed(ck)] == [prev.name, newest.name]
    # Pinned before the damage, as a user keeps a checkpoint: rotation must not hide it.
    assert daemon.cli("pin", "kill", str(saves[1]["step"])).returncode == 0

    st = daemon.status("kill")
    assert st["pid"] is not None, f"the job ended before the test could kill it (slow it down): {st}"
    os.kill(st["pid"], signal.SIGKILL)
    st = daemon.wait_state("kill", "backoff", timeout=SLOW)
    assert st["last_exit"]["signal"] == "SIGKILL", st
    state_pt = newest / "state.pt"
    size = state_pt.stat().st_size
    os.truncate(state_pt, size // 2)
    assert daemon.status("kill")["state"] == "backoff", "relaunched before the damage: raise backoff"

    second = launch(daemon, "kill", 2)
    assert second["reason"] == "crash"
    assert second["resume_from"] == str(prev), (second, str(newest))
    daemon.wait_state("kill", "finished", timeout=SLOW)

    text = job_log(daemon, "kill")
    assert f"resumed from step {saves[0]['step']} ({prev})" in text
    listing = {c["path"]: c for c in checkpoints_json(daemon, "kill")}
    bad = listing[str(newest)]
    assert bad["valid"] is False, bad
    assert bad["invalid_reason"] == f"state.pt: size {size // 2} != manifest {size} (truncated or rewritten)", bad
    assert listing[str(prev)]["valid"] is True
    exits = events(daemon, "kill", "exit")
    assert [e["reason"] for e in exits] == ["signal SIGKILL", "exit 0"], exits

    assert ref.wait(SLOW) == 0, ref_log.read_text()[-1500:]
    assert final_hash(text) == final_hash(ref_log.read_text())
    assert_same_state(ref_out, tmp_path / "final.pt")


def test_preempt_saves_before_sigterm_and_start_resumes_from_it(daemon, tmp_path, reaper):
    ck = write_mlp_job(daemon, "pre", ["--steps", "100000", "--every", "0", "--log-every", "1",
                                       "--sleep-per-step", "0.02"])
    daemon.start()
    wait_steps(daemon, "pre", 5)
    r = daemon.cli("preempt", "pre")
    assert r.returncode == 0, r.stderr
    st = daemon.status("pre")
    assert st["state"] == "preempted", st
    notice = st["last_notice"]
    assert notice["outcome"] == "saved" and notice["source"] == "preempt", notice
    assert f"saved at step {notice['step']} " in r.stdout, r.stdout

    ev = daemon.history("pre")
    requested = [i for i, e in enumerate(ev) if e["kind"] == "save-requested"]
    confirmed = [i for i, e in enumerate(ev) if e["kind"] == "checkpoint" and e["step"] == notice["step"]]
    exits = [i for i, e in enumerate(ev) if e["kind"] == "exit"]
    assert requested and confirmed and exits, [(e["kind"], e.get("to")) for e in ev]
    # The save was valid (indexed) before the job's process ended.
    assert requested[0] < confirmed[0] < exits[0], [(e["kind"], e.get("to"), e.get("step")) for e in ev]
    assert ev[confirmed[0]]["reason"] == "preempt"

    # One save per preemption (issue 13): the daemon's notice file said "preempt", so the
    # helper saved once and exited 0 by itself; no second save on a SIGTERM.
    listing = [c for c in checkpoints_json(daemon, "pre") if c["valid"]]
    assert len(listing) == 1, listing
    newest = listing[0]
    assert newest["step"] == notice["step"] and newest["reason"] == "preempt", listing
    assert ev[exits[0]]["code"] == 0, ev[exits[0]]
    assert f"stopping at step {newest['step']}: saved for preemption" in job_log(daemon, "pre")
    assert [p.name for p in committed(ck)] == [Path(c["path"]).name for c in listing]

    r = daemon.cli("start", "pre")
    assert r.returncode == 0, r.stderr
    second = launch(daemon, "pre", 2)
    assert second["resume_from"] == newest["path"] and second["reason"] == "manual", second
    env = wait_for(lambda: env_of(second["pid"]).get("TRAINSUP_RESUME_FROM") and env_of(second["pid"]),
                   SLOW, "the relaunched job's environment")
    assert env["TRAINSUP_RESUME_FROM"] == newest["path"]
    assert env["TRAINSUP_RESTART_REASON"] == "manual" and env["TRAINSUP_ATTEMPT"] == "2"
    wait_for(lambda: f"resumed from step {newest['step']} ({newest['path']})" in job_log(daemon, "pre"),
             SLOW, "the job's resume line")
    r = daemon.request("stop", "pre", no_save=True)
    assert r["ok"], r


def rank_pids(job_pid: int) -> dict[int, int]:
    """{LOCAL_RANK: pid} of torchrun's two train_mlp.py workers under the job's leader."""
    out = {}
    try:
        kids = psutil.Process(job_pid).children(recursive=True)
    except psutil.Error:
        return {}
    for p in kids:
        try:
            env, cmd = p.environ(), " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "LOCAL_RANK" in env and str(TRAIN_MLP) in cmd:
            out[int(env["LOCAL_RANK"])] = p.pid
    return out if len(out) == 2 else {}


def test_torchrun_two_ranks_daemon_checkpoint_then_killed_rank_resumes(daemon, tmp_path, reaper):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--monitor-interval", "0.2", str(TRAIN_MLP), "--steps", "100000", "--every", "0",
           "--log-every", "1", "--sleep-per-step", "0.01"]
    ck = write_mlp_job(daemon, "ddp", cmd, backoff="1s")
    daemon.start()
    leader = launch(daemon, "ddp", 1)["pid"]
    ranks = wait_for(lambda: rank_pids(leader), SLOW, "two ranks")
    wait_steps(daemon, "ddp", 5)

    r = daemon.cli("checkpoint", "ddp", "--wait")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"ddp: checkpoint at step (\d+) is valid: (\S+)\n", r.stdout)
    assert m, r.stdout
    step, path = int(m.group(1)), Path(m.group(2))
    # torchrun does not catch SIGUSR1 (its default action would kill it): only the ranks get it.
    asked = events(daemon, "ddp", "save-requested")
    assert len(asked) == 1 and sorted(asked[0]["pids"]) == sorted(ranks.values()), (asked, ranks)
    man = manifest(path)
    assert man["step"] == step and man["reason"] == "signal" and man["world_size"] == 2, man
    assert {"state.pt", "rank-00000.pt", "rank-00001.pt"} <= set(man["files"]), man
    # Must not happen: a second commit (each rank saving on its own signal). Settle 20 steps.
    wait_steps(daemon, "ddp", step + 20)
    assert committed(ck) == [path], committed(ck)
    assert len(events(daemon, "ddp", "checkpoint")) == 1

    os.kill(ranks[1], signal.SIGKILL)
    first_exit = wait_for(lambda: events(daemon, "ddp", "exit"), SLOW, "torchrun to exit")[0]
    assert first_exit["pid"] == leader, first_exit
    assert first_exit["code"] not in (None, 0) or first_exit["signal"] is not None, first_exit
    second = launch(daemon, "ddp", 2)
    assert second["reason"] == "crash" and second["resume_from"] == str(path), second
    new_ranks = wait_for(lambda: rank_pids(second["pid"]), SLOW, "two relaunched ranks")
    assert not set(new_ranks.values()) & set(ranks.values())
    for rank, pid in new_ranks.items():
        env = env_of(pid)
        assert env.get("TRAINSUP_RESUME_FROM") == str(path), (rank, env)
        assert env.get("TRAINSUP_RESTART_REASON") == "crash" and env.get("TRAINSUP_ATTEMPT") == "2", (rank, env)
    wait_for(lambda: f"resumed from step {step} ({path})" in job_log(daemon, "ddp"), SLOW, "resume line")
    # Both ranks restored the same step: they train on in lockstep past it.
    wait_steps(daemon, "ddp", step + 5, attempt=2)
    r = daemon.request("stop", "ddp", no_save=True)
    assert r["ok"], r
