"""`trainsup demo`: a real daemon takes the example job through a preemption, SIGKILL
crashes and checkpoint rotation, narrated as it goes (SPEC section 12).

Nothing is simulated: a `trainsup daemon` subprocess in a temporary dir, jobs/train_mlp.py
(a small MLP on synthetic data, checkpointed by trainsup.training), real signals and the
control socket. Every wait polls a condition up to a deadline. Whatever happens, the
daemon is stopped and the dir removed. This module never imports torch: the job does.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from .. import contract
from ..control.client import Unreachable, request
from .render import format_checkpoints, format_status

JOB = "mlp-demo"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "jobs"
QUOTA = 128 * 1024      # ~3 checkpoints of the example model (~38 KB each): rotation must work
WAIT = 60.0             # deadline of any one wait; generous for a loaded 2-core machine
STEP_RE = re.compile(r"^step (\d+) ")
RESUMED_RE = re.compile(r"^resumed from step (\d+) ")
FINISHED_RE = re.compile(r"^finished step (\d+) weights (\w+)")
STOPPING_RE = re.compile(r"^stopping at step (\d+): saved for preemption")


@dataclass(frozen=True)
class Plan:
    steps: int              # the job's total steps
    every: int              # checkpoint interval in steps
    sleep: float            # seconds per step on top of compute: paces the demo
    first_checkpoints: int  # valid checkpoints before the preemption
    crashes: int


QUICK = Plan(steps=400, every=50, sleep=0.01, first_checkpoints=2, crashes=1)
FULL = Plan(steps=700, every=50, sleep=0.02, first_checkpoints=3, crashes=2)


class DemoFailed(Exception):
    """One line for people: what did not happen."""


@dataclass
class Row:
    event: str
    last_step: int
    resumed: int
    resume_s: float
    lost: int


@dataclass
class Story:
    rows: list[Row] = field(default_factory=list)
    kept_bytes: int = 0
    deleted: int = 0
    weights: str = ""
    goodput: dict | None = None           # status --json's, once the job finished


def _die_with_parent() -> None:
    # If the demo itself is killed, the daemon gets SIGTERM (preempt jobs, exit) instead
    # of running on unsupervised. PR_SET_PDEATHSIG = 1.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_for(what: str, pred: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoFailed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, n: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _dir_bytes(path: Path) -> int:
    """Bytes of regular files under `path`, links not followed: measured apart from the daemon."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(top, name)):
                total += st.st_size
    return total


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


class DemoDaemon:
    """The daemon subprocess, its dirs, and the demo job's log."""

    def __init__(self, root: Path):
        self.root = root
        self.jobs = root / "jobs.d"
        self.work = root / "work"
        self.state = root / "state"
        self.logs = root / "logs"
        self.socket = root / "trainsup.sock"
        self.output = root / "daemon.out"
        self.job_log = self.logs / f"{JOB}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)        # the demo's daemon is nobody's systemd service
        cmd = [sys.executable, "-m", "trainsup", "daemon", "--jobs", str(self.jobs),
               "--state", str(self.state), "--socket", str(self.socket), "--log-dir", str(self.logs),
               "--config", "none"]     # never the machine's own config (its hooks, its metrics port)
        with open(self.output, "ab") as out:
            # Own session: a Ctrl-C reaches the demo only, which then stops the daemon in order.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoFailed(f"the daemon exited with status {self.proc.returncode}")

    def ping(self) -> bool:
        self._check_alive()
        try:
            return bool(request(self.socket, "ping", timeout=2.0).get("ok"))
        except (Unreachable, OSError, ValueError):
            return False

    def call(self, cmd: str, job: str | None = None, timeout: float = 10.0, **args) -> Any:
        self._check_alive()
        try:
            reply = request(self.socket, cmd, job, args or None, timeout=timeout)
        except Unreachable as e:
            self._check_alive()
            raise DemoFailed(f"{cmd}: {e}") from None
        if not reply.get("ok"):
            raise DemoFailed(f"{cmd} {job or ''}: {reply.get('error')}")
        return reply["result"]

    def job(self) -> dict:
        return self.call("status", JOB)["jobs"][0]

    def history(self) -> list[dict]:
        return self.call("history", JOB, all=True)

    def event(self, kind: str, **match) -> dict | None:
        for ev in reversed(self.history()):
            if ev["kind"] == kind and all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None

    def checkpoints(self) -> list[dict]:
        return self.call("checkpoints", JOB)

    def attempt_lines(self, attempt: int) -> list[str]:
        """The job log's lines from one attempt (trainsup notes each launch in the log)."""
        try:
            lines = self.job_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        start = [i for i, l in enumerate(lines) if l.startswith(f"[trainsup] attempt {attempt} (")]
        if not start:
            return []
        out = []
        for line in lines[start[-1] + 1:]:
            if line.startswith(f"[trainsup] attempt {attempt + 1} ("):
                break
            out.append(line)
        return out

    def last_match(self, attempt: int, pattern: re.Pattern) -> re.Match | None:
        found = None
        for line in self.attempt_lines(attempt):
            found = pattern.match(line) or found
        return found

    def last_step(self, attempt: int) -> int:
        m = self.last_match(attempt, STEP_RE)
        return int(m.group(1)) if m else 0

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (the daemon preempts its jobs and exits); SIGKILL the whole tree if it hangs."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    tree = psutil.Process(p.pid).children(recursive=True)
                except psutil.Error:
                    tree = []
                p.kill()
                p.wait()
                for child in tree:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
        return p.returncode


class Demo:
    def __init__(self, plan: Plan, root: Path, picture: Path | None = None):
        self.plan = plan
        self.picture_path = picture
        self.d = DemoDaemon(root)
        self.t0 = time.monotonic()
        self.story = Story()
        self.attempt = 0
        self.ckpt_dir = self.d.work / "ckpt"

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    def show_status(self) -> None:
        print(_indent(format_status(self.d.call("status"))), flush=True)

    def job_running(self, attempt: int) -> dict | None:
        """The job's status once attempt `attempt` runs; fails fast if the job gave up."""
        j = self.d.job()
        if j["state"] in ("failed", "finished", "stopped", "invalid"):
            why = (j.get("last_exit") or {}).get("reason")
            raise DemoFailed(f"job {JOB} is {j['state']} (last exit: {why})"
                             + (f": {j['error']}" if j.get("error") else ""))
        return j if j["attempt"] == attempt and j["state"] in ("running", "saving") and j["pid"] else None

    # -- stages ------------------------------------------------------------------------
    def setup(self) -> None:
        p = self.plan
        script, base_yaml = EXAMPLE_DIR / "train_mlp.py", EXAMPLE_DIR / f"{JOB}.yaml"
        for f in (script, base_yaml):
            if not f.is_file():
                raise DemoFailed(f"{f}: the example job is missing (run the demo from a trainsup "
                                 f"source checkout: make demo)")
        if importlib.util.find_spec("torch") is None:
            raise DemoFailed(f"torch is not installed for {sys.executable}: pip install 'trainsup[torch]' "
                             f"(CPU-only machines: pip install torch==2.13.0)")
        for d in (self.d.jobs, self.d.work):
            d.mkdir(parents=True)
        shutil.copy2(script, self.d.work / script.name)
        # The example's own settings, with what the demo needs on top: this interpreter
        # (its torch), a short run, and a quota tight enough that rotation has to work.
        spec = yaml.safe_load(base_yaml.read_text())
        spec["command"] = [sys.executable, script.name, "--steps", str(p.steps), "--every", str(p.every),
                           "--sleep-per-step", str(p.sleep), "--log-every", "1"]
        spec["workdir"] = str(self.d.work)
        spec["env"] = {**spec.get("env", {}), "PYTHONPATH": str(REPO)}
        spec.setdefault("checkpoint", {})["quota"] = QUOTA
        job_file = self.d.jobs / f"{JOB}.yaml"
        job_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        from ..config.files import load_job_file
        from ..spec import InvalidJob
        loaded = load_job_file(job_file, is_root=os.geteuid() == 0)
        if isinstance(loaded, InvalidJob):
            raise DemoFailed(loaded.errors[0])
        ck = loaded.checkpoint
        if ck is None:
            raise DemoFailed(f"{loaded.source}: the demo job has no checkpoint section")
        print(f"trainsup demo: a real daemon supervising jobs/{script.name} (a small MLP on synthetic data, "
              f"checkpointed by trainsup.training)", flush=True)
        print(f"  in {self.d.root} (removed at the end)", flush=True)
        print(f"  job {JOB}: {p.steps} steps, a checkpoint every {p.every} steps, keep_last {ck.keep_last}, "
              f"keep_best {ck.keep_best} by {ck.metric}, quota {QUOTA} bytes ({_kib(QUOTA)})", flush=True)

    def start_daemon(self) -> None:
        self.d.start()
        wait_for("the daemon to answer on its socket", self.d.ping, 30)
        self.attempt = 1
        j = wait_for(f"job {JOB} to run", lambda: self.job_running(1))
        self.say(f"daemon up (pid {self.d.proc.pid if self.d.proc else '?'}); job {JOB} running (attempt 1, pid {j['pid']})")

    def first_checkpoints(self) -> None:
        n = self.plan.first_checkpoints
        # By step, not by count: rotation may already be deleting the oldest.
        j = wait_for(f"{n} periodic checkpoints",
                     lambda: (j := self.job_running(1)) and (j["checkpoint"]["step"] or 0) >= n * self.plan.every and j)
        ck = j["checkpoint"]
        self.say(f"checkpoints landing every {self.plan.every} steps: {ck['valid']} valid, "
                 f"latest step {ck['step']}; `trainsup status`:")
        self.show_status()

    def preempt(self) -> None:
        t = time.monotonic()
        out = self.d.call("preempt", JOB, timeout=WAIT * 2)
        if out.get("outcome") != "saved":
            raise DemoFailed(f"preempt: expected an emergency save, got: {out.get('outcome')}")
        self.say(f"preempt: saved step {out['step']} in {out['save_s']:.2f}s (save signal), "
                 f"then SIGTERM; stopped in {out['stop_s']:.2f}s")
        # On SIGTERM the helper saves once more at its next step and exits: that newest
        # checkpoint is where the job must resume.
        m = wait_for("the job's 'stopping at step N' line", lambda: self.d.last_match(1, STOPPING_RE))
        last = int(m.group(1))
        newest = wait_for(f"the daemon to index the checkpoint at step {last}",
                          lambda: (j := self.d.job())["checkpoint"]["step"] == last and j)
        if newest["state"] != "preempted":
            raise DemoFailed(f"after preempt the job is {newest['state']}, expected preempted")
        if last < out["step"]:
            raise DemoFailed(f"the job stopped at step {last}, before the saved step {out['step']}")
        self.preempt_ckpt = newest["checkpoint"]["latest"]
        self.preempt_last = last
        reason = next((c["reason"] for c in self.d.checkpoints() if c["path"] == self.preempt_ckpt), None)
        self.say(f"job preempted at step {last}; newest checkpoint step {last} (reason {reason}), "
                 f"{time.monotonic() - t:.2f}s after the notice")

    def recorded(self, attempt: int) -> Row:
        """The interruption of `attempt` as the daemon recorded it (what `history`, the
        metrics and the picture show): the exit's last_step, the next launch's resume point
        and steps_lost. The summary prints these, so it and the picture agree."""
        exit_ev = wait_for("the exit event", lambda: self.d.event("exit", attempt=attempt))
        launch = wait_for("the launch event", lambda: self.d.event("launch", attempt=attempt + 1))
        for what, ev, key in (("exit", exit_ev, "last_step"), ("launch", launch, "steps_lost"),
                              ("launch", launch, "resume_step")):
            if not isinstance(ev.get(key), int):
                raise DemoFailed(f"the {what} event of attempt {ev.get('attempt')} has no {key}: {ev}")
        return Row("", exit_ev["last_step"], launch["resume_step"], 0.0, launch["steps_lost"])

    def restart(self) -> None:
        t = time.monotonic()
        self.d.call("start", JOB)
        self.attempt = 2
        m = wait_for("the job to resume", lambda: self.job_running(2) and self.d.last_match(2, RESUMED_RE))
        took = time.monotonic() - t
        resumed = int(m.group(1))
        launch = wait_for("the launch event", lambda: self.d.event("launch", attempt=2))
        if launch.get("resume_from") != self.preempt_ckpt or resumed != self.preempt_last:
            raise DemoFailed(f"start: resumed from {launch.get('resume_from')} (step {resumed}), expected "
                             f"{self.preempt_ckpt} (step {self.preempt_last})")
        row = self.recorded(1)
        row.event, row.resume_s = "preempt", took
        self.story.rows.append(row)
        self.say(f"start: resumed from step {resumed} ({Path(self.preempt_ckpt).name}), the checkpoint "
                 f"the preemption saved; {row.lost} steps lost; training again "
                 f"{took:.1f}s after the request")

    def crash(self) -> None:
        E, a = self.plan.every, self.attempt
        resumed = self.story.rows[-1].resumed
        # Kill mid-run: after this attempt committed a checkpoint, halfway to the next one.
        j = wait_for("a checkpoint from the resumed attempt",
                     lambda: (j := self.job_running(a)) and (j["checkpoint"]["step"] or 0) > resumed and j)
        wait_for("training to pass the next half interval",
                 lambda: self.job_running(a) and self.d.last_step(a) >= j["checkpoint"]["step"] + E // 2)
        j = self.job_running(a)
        if not j:
            raise DemoFailed(f"job {JOB} stopped running before the kill")
        pid, before = j["pid"], j["checkpoint"]["step"]
        try:
            # Never signal a bare number: check it is this job's process.
            if psutil.Process(pid).environ().get(contract.JOB) != JOB:
                raise DemoFailed(f"pid {pid} is not the {JOB} job's process")
        except psutil.Error as e:
            raise DemoFailed(f"cannot inspect pid {pid}: {e}") from None
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.say(f"SIGKILL to the job's process (pid {pid}) mid-run; latest valid checkpoint: step {before}")
        self.attempt = a + 1
        m = wait_for("the daemon to restart the job and the job to resume",
                     lambda: self.job_running(a + 1) and self.d.last_match(a + 1, RESUMED_RE))
        took = time.monotonic() - t
        resumed = int(m.group(1))
        exit_ev = wait_for("the exit event", lambda: self.d.event("exit", attempt=a))
        launch = wait_for("the launch event", lambda: self.d.event("launch", attempt=a + 1))
        backoff = self.d.event("state", to="backoff")
        last = self.d.last_step(a)
        if exit_ev.get("reason") != "signal SIGKILL" or launch.get("reason") != "crash":
            raise DemoFailed(f"expected exit 'signal SIGKILL' and a relaunch for 'crash', got "
                             f"{exit_ev.get('reason')!r} and {launch.get('reason')!r}")
        if not (before <= resumed <= last and last - resumed <= E):
            raise DemoFailed(f"resumed from step {resumed}; expected the latest valid checkpoint "
                             f"(>= {before}, within {E} steps of the last step {last})")
        row = self.recorded(a)
        # The job prints "step N" before its helper records step N: the daemon's last
        # step is the job's last printed step or the one before it, never more.
        if not (last - 1 <= row.last_step <= last and row.resumed == resumed):
            raise DemoFailed(f"the daemon recorded last step {row.last_step} and a resume from {row.resumed}; "
                             f"the job's log says {last} and {resumed}")
        row.event, row.resume_s = "SIGKILL", took
        self.story.rows.append(row)
        delay = f", backoff {backoff['delay']:g}s" if backoff and backoff.get("delay") is not None else ""
        self.say(f"daemon recorded exit '{exit_ev['reason']}' and restarted the job (reason crash{delay}): "
                 f"resumed from step {resumed}, the latest valid checkpoint ({Path(launch['resume_from']).name}); "
                 f"{row.lost} steps lost (last step {row.last_step}); training again {took:.1f}s after the kill")

    def finish(self) -> None:
        def finished() -> bool:
            j = self.d.job()
            if j["state"] not in ("finished", "running", "saving", "starting", "backoff"):
                raise DemoFailed(f"job {JOB} is {j['state']} instead of finishing "
                                 f"(last exit: {(j.get('last_exit') or {}).get('reason')})")
            return j["state"] == "finished"
        wait_for(f"the job to finish its {self.plan.steps} steps", finished)
        m = self.d.last_match(self.attempt, FINISHED_RE)
        if not m:
            raise DemoFailed(f"job {JOB} finished without its 'finished step N weights H' line")
        self.story.weights = m.group(2)
        self.story.goodput = self.d.job().get("goodput")
        self.say(f"job finished step {m.group(1)} (weights {m.group(2)}); `trainsup status`:")
        self.show_status()

    def rotation(self) -> None:
        def settled():
            cps = self.d.checkpoints()
            total = sum(c["bytes"] for c in cps)
            # A save cut short by SIGKILL leaves an in-progress dir that rotation collects
            # only after grace + 1 minute: it is kept, not valid, and still counts.
            return total <= QUOTA and all(c["kept"] and (c["valid"] or c["kept"] == "in-progress")
                                          for c in cps) and cps
        cps = wait_for(f"rotation to bring {self.ckpt_dir} under its quota", settled)
        on_disk = _dir_bytes(self.ckpt_dir)
        if on_disk > QUOTA:
            raise DemoFailed(f"{self.ckpt_dir} holds {on_disk} bytes, over its quota of {QUOTA}")
        deleted = [e for e in self.d.history() if e["kind"] == "deleted"]
        if not deleted:
            raise DemoFailed("rotation deleted nothing; expected old checkpoints to be rotated away")
        self.story.kept_bytes, self.story.deleted = on_disk, len(deleted)
        self.say(f"rotation: {len(cps)} checkpoints kept, {on_disk} bytes on disk ({_kib(on_disk)}) <= quota "
                 f"{QUOTA} bytes; {len(deleted)} deleted. `trainsup checkpoints {JOB}`:")
        print(_indent(format_checkpoints(cps)), flush=True)
        print(f"    deletions in `trainsup history {JOB}` (last 3 of {len(deleted)}):", flush=True)
        for e in deleted[-3:]:
            print(f"      step {e.get('step')}: {e.get('bytes')} bytes: {e.get('why')}", flush=True)

    def picture(self) -> None:
        """The run's timeline, as `trainsup plot` draws it (what users want to look at)."""
        from .plot import INSTALL_HINT, PlotUnavailable, draw, timeline
        history = self.d.history()
        drawn = timeline(history).steps_lost
        told = sum(r.lost for r in self.story.rows)
        if drawn != told:
            raise DemoFailed(f"the picture would show {drawn} steps lost, the summary {told}")
        if importlib.util.find_spec("matplotlib") is None:
            self.say(f"no picture of the run: {INSTALL_HINT}")
            return
        try:
            out = draw(history, self.picture_path or default_picture(), job=JOB, quota=QUOTA)
        except PlotUnavailable as e:
            self.say(f"no picture of the run: {e}")
            return
        self.say(f"the run's timeline (`trainsup plot {JOB} -o {out.name}`): {out}")

    def stop_daemon(self) -> None:
        rc = self.d.stop(timeout=WAIT)
        if rc != 0:
            raise DemoFailed(f"the daemon exited with status {rc} on SIGTERM, expected 0")
        self.say("daemon stopped on SIGTERM (exit 0)")

    def reference(self) -> None:
        """An uninterrupted run of the same job: resuming must not have changed a single bit."""
        p = self.plan
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "train_mlp.py", "--steps", str(p.steps), "--every", str(p.every),
               "--log-every", "0", "--ckpt-dir", str(self.d.root / "reference-ckpt")]
        try:
            r = subprocess.run(cmd, cwd=self.d.work, env=env, capture_output=True, text=True, timeout=WAIT * 2)
        except subprocess.TimeoutExpired:
            raise DemoFailed("the uninterrupted reference run took too long") from None
        m = next((m for l in r.stdout.splitlines() if (m := FINISHED_RE.match(l))), None)
        if r.returncode != 0 or not m:
            raise DemoFailed(f"the reference run failed (exit {r.returncode}): "
                             f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
        if m.group(2) != self.story.weights:
            raise DemoFailed(f"final weights {self.story.weights} differ from the uninterrupted run's {m.group(2)}")
        self.say(f"uninterrupted reference run: weights {m.group(2)}, identical")

    def summary(self) -> None:
        s, E = self.story, self.plan.every
        rows = [("EVENT", "LAST STEP", "RESUMED FROM", "STEPS LOST", "TIME TO RESUME")]
        rows += [(r.event, str(r.last_step), str(r.resumed), str(r.lost), f"{r.resume_s:.1f}s") for r in s.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("\nsummary", flush=True)
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        pre = sum(1 for r in s.rows if r.event == "preempt")
        crashes = len(s.rows) - pre
        print(f"  survived {pre} preemption(s) and {crashes} crash(es); at most {max(r.lost for r in s.rows)} "
              f"steps lost per interruption (save interval {E} steps)")
        print(f"  checkpoints: {s.kept_bytes} bytes kept, quota {QUOTA} bytes (respected); "
              f"{s.deleted} deleted by rotation")
        if s.goodput and s.goodput.get("ratio") is not None:
            print("  " + goodput_line(s.goodput))
        print(f"  final weights identical to an uninterrupted run: {s.weights}", flush=True)

    def run(self) -> None:
        self.setup()
        self.start_daemon()
        self.first_checkpoints()
        self.preempt()
        self.restart()
        self.show_status()
        for _ in range(self.plan.crashes):
            self.crash()
        self.show_status()
        self.finish()
        self.rotation()
        self.picture()
        self.stop_daemon()
        self.reference()
        self.summary()


_PART_WORDS = {"recomputed": "recomputed", "resume": "resuming", "restart": "restarting", "backoff": "backoff",
               "save_emergency": "emergency saves", "save_periodic": "periodic saves", "queue": "waiting to run"}


def goodput_line(g: dict) -> str:
    """One line for the summary: the ratio, then where the rest of the wall time went."""
    rest = ", ".join(f"{_PART_WORDS.get(p, p)} {s:.1f}s" for p, s in (g.get("lost_s") or {}).items() if s >= 0.05)
    return (f"goodput {g['ratio'] * 100:.0f}%: {g['productive_s']:.1f}s of {g['wall_s']:.1f}s since the first "
            f"launch went into training that was kept" + (f"; the rest: {rest}" if rest else ""))


def default_picture() -> Path:
    """Where the picture goes unless --plot says: a new file in the temp dir, never the
    current dir (`make demo` runs in the checkout and must leave nothing there)."""
    fd, name = tempfile.mkstemp(prefix="trainsup-demo-", suffix=".png")
    os.close(fd)
    return Path(name)


def run_demo(quick: bool = False, picture: Path | None = None) -> int:
    root = Path(tempfile.mkdtemp(prefix="trainsup-demo-"))
    demo = Demo(QUICK if quick else FULL, root, picture.resolve() if picture else None)
    try:
        demo.run()
        return 0
    except (DemoFailed, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"trainsup demo: {'interrupted' if interrupted else f'failed: {e}'}", file=sys.stderr, flush=True)
        if not interrupted:
            for title, path in (("job log", demo.d.job_log), ("daemon output", demo.d.output)):
                lines = _tail(path)
                print(f"--- {title} ({path.name}), last {len(lines)} lines ---", file=sys.stderr)
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
        return 130 if interrupted else 1
    finally:
        try:
            demo.d.stop(timeout=WAIT)
        finally:
            shutil.rmtree(root, ignore_errors=True)
