"""Preemption notices (issue 5): how soon each notice source gets the save signal to the
job, next to that source's own floor measured in the same run, and how long a whole stop
takes for a job holding a real state, next to a bare save of that state.

    .venv/bin/python tests/bench/run_all.py --only notice [--quick]

Every source runs under its own real daemon with one fake job (tests/helpers/fakejob.py
--record-usr1: its SIGUSR1 handler takes time.time()). Each sample preempts the job, waits
for `preempted`, then `start`s it again, so every notice finds one freshly running job and
nothing else in flight. SIGTERM ends the daemon, so that source starts a daemon per sample
(the job, persisted `preempted`, starts again with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from measure import BENCH, PY, WORK_DIR, Section, Stat, job_yaml, poll, read_records, running_daemon, workdir

POLL = 0.2                      # the AWS poll interval under test, seconds
BIG_JOB = BENCH / "resume_job.py"
FAKE_FLAGS = "--catch-usr1 --record-usr1"
CROWD = 500                     # idle processes added to the machine for the crowd row


def ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


def usr1_times(d, name: str) -> list[float]:
    return [r["at"] for r in d.records(name) if r["event"] == "usr1"]


def notice_to_signal(d, name: str, fire) -> float:
    """One sample: the job's next launch is ready, `fire()` sends the notice and returns
    the wall time just before it; the job's handler says when SIGUSR1 arrived."""
    seen = len(usr1_times(d, name))
    t0 = fire()
    at = poll(lambda: (a := usr1_times(d, name))[seen:] and a[seen], 30, f"SIGUSR1 in job {name}")
    d.wait_state(name, "preempted", timeout=30)
    return ms(t0, at)


def restart(d, name: str, k: int, reps: int) -> None:
    """Launch the job again for sample k (none after the last sample)."""
    if k >= reps:
        return
    r = d.request("start", name)
    assert r["ok"], r
    d.wait_ready(name, k + 1, timeout=30)


# -- floors ---------------------------------------------------------------------------

def signal_floor(reps: int) -> list[float]:
    """kill(SIGUSR1) -> the handler of a bare Python process sleeping in the same loop as
    the fake job (time.sleep(0.01)): what delivering any signal costs."""
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: os.write(1, b'%r\\n' % time.time()))\n"
            "os.write(1, b'ready\\n')\n"
            "while True:\n    time.sleep(0.01)\n")
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        out = []
        for _ in range(reps):
            t0 = time.time()
            os.kill(p.pid, signal.SIGUSR1)
            out.append(ms(t0, float(p.stdout.readline())))
        return out
    finally:
        p.kill()
        p.wait()


class InotifyProbe:
    """watchdog's inotify observer on a folder, as the daemon's trigger-file watch uses
    it: file creation -> on_created callback, the floor of any trigger-file notice."""

    def __init__(self, folder: Path):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver
        self.folder = folder
        self.seen: queue.SimpleQueue = queue.SimpleQueue()
        seen = self.seen

        class Handler(FileSystemEventHandler):
            def on_created(self, event):
                seen.put((os.fsdecode(event.src_path), time.time()))

        folder.mkdir(parents=True, exist_ok=True)
        self.observer = InotifyObserver()
        self.observer.schedule(Handler(), str(folder), recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def sample(self, k: int) -> float:
        path = self.folder / f"probe-{k}"
        t0 = time.time()
        create(path)
        while True:
            got, at = self.seen.get(timeout=10)
            if got == str(path):
                return ms(t0, at)

    def close(self) -> None:
        self.observer.stop()
        self.observer.join(5)


def create(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def config(root: Path, text: str) -> list[str]:
    cfg = root / "trainsup.yaml"
    cfg.write_text(text)
    return ["--config", str(cfg)]


# -- sources --------------------------------------------------------------------------

def trigger_file(root: Path, reps: int) -> tuple[list[float], list[float]]:
    trigger = root / "trigger" / "preempt-now"
    trigger.parent.mkdir(parents=True)
    probe = InotifyProbe(root / "probe")
    ours, floor = [], []
    args = config(root, f"preemption:\n  trigger_file: {json.dumps(str(trigger))}\n")
    try:
        with running_daemon(root / "daemon") as d:
            d.fakejob("trig", FAKE_FLAGS)
            d.start(*args)
            d.wait_ready("trig")
            for k in range(reps):
                floor.append(probe.sample(k))     # interleaved: both see the same machine load

                def fire() -> float:
                    t0 = time.time()
                    create(trigger)
                    return t0
                ours.append(notice_to_signal(d, "trig", fire))
                # inotify delivers the deletion before the next creation, so the watch is
                # re-armed by the time the next sample creates the file.
                trigger.unlink()
                restart(d, "trig", k + 1, reps)
    finally:
        probe.close()
    return ours, floor


class _Imds(BaseHTTPRequestHandler):
    """AWS IMDSv2 on loopback: a token, then spot/instance-action while `action` is set."""
    action: dict | None = None

    def log_message(self, *a):
        pass

    def _reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        self._reply(200, b"tok")

    def do_GET(self):
        act = type(self).action
        if self.path.endswith("spot/instance-action") and act:
            return self._reply(200, json.dumps(act).encode())
        self._reply(404)


def aws(root: Path, reps: int, rng: random.Random) -> list[float]:
    handler = type("Imds", (_Imds,), {"action": None})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    ours = []
    try:
        args = config(root, f"preemption:\n  provider: aws\n  poll: {POLL}s\n"
                            f"  metadata_url: http://127.0.0.1:{srv.server_address[1]}\n")
        with running_daemon(root / "daemon") as d:
            d.fakejob("spot", FAKE_FLAGS)
            d.start(*args)
            d.wait_ready("spot")
            for k in range(reps):
                def fire() -> float:
                    # A random moment: the cycle of stop + start would otherwise fall at the
                    # same phase of the poll every time, and the wait would not be poll/2.
                    time.sleep(rng.uniform(0, POLL))
                    t0 = time.time()
                    # A distinct time per sample: each is a new notice, never a repeat of the last.
                    handler.action = {"action": "terminate",
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 120 + k))}
                    return t0
                ours.append(notice_to_signal(d, "spot", fire))
                handler.action = None
                restart(d, "spot", k + 1, reps)
    finally:
        srv.shutdown()
        srv.server_close()
    return ours


def daemon_sigterm(root: Path, reps: int) -> list[float]:
    ours = []
    for k in range(reps):
        with running_daemon(root / "daemon") as d:
            if k == 0:
                d.fakejob("term", FAKE_FLAGS)
            d.start()
            d.wait_ready("term", k + 1, timeout=30)
            seen = len(usr1_times(d, "term"))
            t0 = time.time()
            d.proc.send_signal(signal.SIGTERM)
            at = poll(lambda: (a := usr1_times(d, "term"))[seen:] and a[seen], 30, "SIGUSR1 after daemon SIGTERM")
            ours.append(ms(t0, at))
            rc = d.proc.wait(60)
            assert rc == 0, f"daemon exited {rc} after SIGTERM: {d.log_text()[-2000:]}"
    return ours


@contextlib.contextmanager
def crowd(n: int):
    """`n` idle processes on the machine, ended on the way out whatever happened."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL))
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def preempt_command(root: Path, reps: int) -> tuple[list[float], list[float], list[float]]:
    """`preempt` samples, `ping` round trips between them, then `preempt` samples again
    with CROWD more processes on the machine."""
    ours, pings, crowded = [], [], []
    with running_daemon(root / "daemon") as d:
        d.fakejob("cmd", FAKE_FLAGS)
        d.start()
        d.wait_ready("cmd")

        def sample(k: int, total: int) -> float:
            results = []

            def fire() -> float:
                t0 = time.time()
                results.append(d.request("preempt", "cmd"))    # answers when the stop is over
                return t0
            took = notice_to_signal(d, "cmd", fire)
            assert results[0]["ok"] and results[0]["result"]["outcome"] == "saved", results
            restart(d, "cmd", k + 1, total)
            return took

        for k in range(reps):
            t = time.perf_counter()
            assert d.request("ping")["ok"]
            pings.append(ms(t, time.perf_counter()))
            ours.append(sample(k, 2 * reps))
        with crowd(CROWD):
            for k in range(reps, 2 * reps):
                crowded.append(sample(k, 2 * reps))
    return ours, pings, crowded


# -- a real state: notice -> stop complete ----------------------------------------------

class BareSave:
    """The peer: torch.save + fsync of file and dir of a state of the job's shape, in this
    process (what a careful user writes by hand)."""

    def __init__(self, mib: int, folder: Path):
        import torch
        self.torch = torch
        self.folder = folder
        per = (mib << 20) // 4 // 8
        # Filled, not torch.empty: the job's state after a restore is real pages, not zero pages.
        self.model = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(per)) for _ in range(8)])

    def sample(self) -> float:
        path = self.folder / "bare.pt"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            self.torch.save({"model": self.model.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        took = ms(t0, time.perf_counter())
        path.unlink()
        return took


def torch_exit(mib: int) -> float:
    """A python that imported torch and holds `mib` MiB: end of its code -> process gone.
    The part of any stop that is the interpreter's teardown, not trainsup's."""
    code = ("import sys, time, torch\n"
            "per = (int(sys.argv[1]) << 20) // 4 // 8\n"
            "m = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(per)) for _ in range(8)])\n"
            "print(repr(time.time()), flush=True)\n")
    p = subprocess.Popen([PY, "-c", code, str(mib)], stdout=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = float(p.stdout.readline())
    p.wait()
    return ms(t0, time.time())


def stop_with_state(root: Path, mib: int, reps: int) -> dict:
    """`preempt` -> its reply (save committed, validated by the daemon, process gone) for
    tests/bench/resume_job.py holding `mib` MiB under trainsup.training.Checkpointer.
    The peers are measured between samples, while the job is stopped: same disk, same
    page cache, no job competing for the two cores."""
    rec = root / "big.rec"
    bare = BareSave(mib, root)
    out = {"stop": [], "save": [], "stop_rest": [], "bare": [], "exit": [], "resaved": 0}
    with running_daemon(root / "daemon") as d:
        d.write_job("big", job_yaml("big", [PY, str(BIG_JOB), str(rec), str(mib), str(10 ** 9)], workdir=root,
                                    ckpt_dir=root / "ck", env={"OMP_NUM_THREADS": "1"},
                                    extra="emergency_save: {grace: 120s}\nstop_timeout: 120s\n"))
        d.start()
        for k in range(reps):
            # Ready = this launch has made its first training step (restore is over).
            poll(lambda: len(r := read_records(rec)) == k + 1 and d.status("big")["pid"] == r[-1]["pid"],
                 180, f"launch {k + 1} of the {mib} MiB job to train")
            t0 = time.perf_counter()
            r = d.request("preempt", "big", timeout=300)
            stop = ms(t0, time.perf_counter())
            assert r["ok"] and r["result"]["outcome"] == "saved", r
            out["stop"].append(stop)
            out["save"].append(r["result"]["save_s"] * 1e3)
            out["stop_rest"].append(stop - r["result"]["save_s"] * 1e3)
            out["bare"].append(bare.sample())
            out["exit"].append(torch_exit(mib))
            if k + 1 < reps:
                assert d.request("start", "big")["ok"]
        # Checkpointer saves on SIGTERM too: count the stops where that wrote a second checkpoint.
        out["resaved"] = sum(1 for e in d.history("big") if e["kind"] == "checkpoint" and e.get("reason") == "preempt")
    return out


def run(quick: bool = False) -> Section:
    sec = Section("notice")
    reps = 3 if quick else 10
    big_reps, mib = (1, 64) if quick else (3, 256)
    rng = random.Random(5)
    with workdir("notice", WORK_DIR) as root:
        (root / "trig").mkdir()
        trig, inotify = trigger_file(root / "trig", reps)
        sec.add("trigger file created -> SIGUSR1 in the job", Stat("ms", trig),
                "inotify floor: creation -> watchdog on_created", Stat("ms", inotify),
                compare="delta", latency=True)
        (root / "aws").mkdir()
        spot = aws(root / "aws", reps, rng)
        sec.add(f"AWS spot instance-action up -> SIGUSR1 in the job (poll {POLL:g} s)", Stat("ms", spot),
                "expected wait of the poll (poll/2)", Stat.one(POLL / 2 * 1e3, "ms"), compare="delta",
                latency=True)
        (root / "term").mkdir()
        term = daemon_sigterm(root / "term", reps)
        floor = signal_floor(reps)
        sec.add("SIGTERM to the daemon -> SIGUSR1 in the job", Stat("ms", term),
                "signal floor: kill -> handler, bare python", Stat("ms", floor), compare="delta", latency=True)
        (root / "cmd").mkdir()
        cmd, pings, crowded = preempt_command(root / "cmd", reps)
        sec.add("`preempt` over the socket -> SIGUSR1 in the job", Stat("ms", cmd),
                "`ping` round trip, same socket", Stat("ms", pings), compare="delta", latency=True)
        # The daemon lists the job's descendants (psutil children(), which reads
        # /proc/*/stat of every process) before it signals: this row shows that cost.
        sec.add(f"  same, with {CROWD} more (idle) processes on the machine", Stat("ms", crowded),
                "same, without them", Stat("ms", cmd), compare="delta", latency=True)
        (root / "big").mkdir()
        big = stop_with_state(root / "big", mib, big_reps)
        bare, teardown = Stat("ms", big["bare"]), Stat("ms", big["exit"])
        lat = big_reps > 1
        sec.add(f"`preempt` -> reply: saved, validated, exited ({mib} MiB Checkpointer job)", Stat("ms", big["stop"]),
                "torch.save + fsync, same state", bare, latency=lat,
                note=f"{big['resaved']} of {big_reps} stops saved again on SIGTERM")
        sec.add("  of which `preempt` -> new checkpoint validated (reply's save_s)", Stat("ms", big["save"]),
                "torch.save + fsync, same state", bare, latency=lat)
        # The job's Checkpointer saves again on SIGTERM (the loop went on stepping after the
        # first save), then the interpreter exits: the peer is those two things, measured.
        sec.add("  of which validated -> process exited (SIGTERM: save again, exit)", Stat("ms", big["stop_rest"]),
                "torch.save + fsync, then exit of python+torch", Stat("ms", [a + b for a, b in zip(big["bare"], big["exit"])]),
                latency=lat, note=f"python+torch exit alone {teardown.text(lat)}")
    sec.notes.append("notice -> signal: each sample preempts one freshly running fake job (fakejob.py "
                     "--record-usr1 takes time.time() in its SIGUSR1 handler), then `start`s it again; "
                     "SIGTERM starts a daemon per sample. AWS: loopback IMDSv2 server, notice = the moment "
                     "instance-action starts answering 200.")
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
