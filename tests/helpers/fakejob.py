"""A small stand-in training program for daemon tests (no torch: fast to start).

Behaviours by flag; every checkpoint it writes goes through trainsup.checkpoint so it
is a real, valid trainsup checkpoint. It records what it saw in files the test reads.
"""

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainsup.checkpoint import write_checkpoint


def _child_main(path):
    Path(path).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def _verify(ckpt):
    """The resumed checkpoint's files match its manifest (a 'corrupt load' otherwise)."""
    from trainsup.checkpoint import hash_file, read_manifest
    m = read_manifest(ckpt)
    return all((ckpt / n).stat().st_size == e["size"] and hash_file(ckpt / n) == e["xxh3_128"]
               for n, e in m["files"].items())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--exit", type=int, default=None, help="exit with this code after --after seconds")
    p.add_argument("--after", type=float, default=0.0)
    p.add_argument("--peer-preempted", type=int, default=None, metavar="CODE",
                   help="first attempt only: after --after s, save for a preemption (as a rank "
                        "does when another node's preemption stops the group) and exit CODE")
    p.add_argument("--catch-usr1", action="store_true", help="save a checkpoint on SIGUSR1")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--save-on-term", action="store_true", help="save then exit 0 on SIGTERM")
    p.add_argument("--save-delay", type=float, default=0.0, help="seconds a save takes")
    p.add_argument("--save-mb", type=float, default=0.0, help="each save also writes this many MiB of weights")
    p.add_argument("--spawn-child", action="store_true", help="a multiprocessing child (spawn)")
    p.add_argument("--setsid-grandchild", action="store_true")
    p.add_argument("--record", default=None, help="append JSON lines about this run to this file")
    p.add_argument("--every", type=float, default=0.0, help="periodic checkpoint every N s")
    p.add_argument("--usr1-no-save", action="store_true", help="catch SIGUSR1 but never save")
    p.add_argument("--record-usr1", action="store_true",
                   help="record ('usr1', at=wall time taken in the handler) for each SIGUSR1")
    p.add_argument("--grow-mb-per-s", type=float, default=0.0, help="grow a bytearray steadily")
    p.add_argument("--heartbeat-for", type=float, default=None,
                   help="touch TRAINSUP_HEARTBEAT_FILE for this many seconds, then hang")
    p.add_argument("--save-every-steps", type=int, default=0,
                   help="periodic checkpoint every N steps (deterministic loss bound for soaks)")
    p.add_argument("--progress", default=None,
                   help="overwrite this file with the last completed step after every step ({pid} in "
                        "the name becomes this process's pid)")
    p.add_argument("--step-time", type=float, default=0.01, help="seconds a step takes")
    p.add_argument("--print-every", type=float, default=0.0,
                   help="print `step N` to stdout (flushed) every N seconds")
    p.add_argument("--lock", default=None,
                   help="hold an exclusive flock on this file while running; one already held (a second "
                        "copy of the job running) is recorded as event `twice` and exits 99")
    args = p.parse_args()
    if args.lock:
        import fcntl
        lock_fd = os.open(args.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if args.record:
                with open(args.record, "a") as f:
                    f.write(json.dumps({"pid": os.getpid(), "t": time.time(), "event": "twice"}) + "\n")
            sys.exit(99)

    state = {"step": 0, "save": False, "term": False}
    usr1_at = []
    ckpt_dir = os.environ.get("TRAINSUP_CHECKPOINT_DIR")
    resume = os.environ.get("TRAINSUP_RESUME_FROM", "")
    resume_ok = None
    if resume:
        try:
            state["step"] = json.loads((Path(resume) / "state.json").read_text())["step"]
            resume_ok = _verify(Path(resume))
        except (OSError, ValueError, KeyError):
            resume_ok = False


    def record(**kw):
        if args.record:
            with open(args.record, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **kw}) + "\n")




    def save(reason):
        if not ckpt_dir:
            return
        time.sleep(args.save_delay)  # simulates the time a real save takes
        files = {"state.json": json.dumps({"step": state["step"]}).encode()}
        if args.save_mb:
            files["weights.bin"] = os.urandom(int(args.save_mb * (1 << 20)))
        p = write_checkpoint(ckpt_dir, state["step"], files, reason=reason)
        record(event="saved", step=state["step"], reason=reason, path=str(p))
        state["save"] = False   # requests that arrived during this save are served by it


    def on_usr1(s, f):
        # The time is taken here, in the handler: the bench measures notice -> delivery,
        # not delivery plus however long the loop takes to come round.
        if args.record_usr1:
            usr1_at.append(time.time())
        if args.catch_usr1:
            state["save"] = True


    if args.catch_usr1 or args.record_usr1:
        signal.signal(signal.SIGUSR1, on_usr1)
    if args.usr1_no_save:
        signal.signal(signal.SIGUSR1, lambda s, f: record(event="usr1-ignored"))
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.save_on_term:
        signal.signal(signal.SIGTERM, lambda s, f: state.__setitem__("term", True))



    if args.spawn_child:
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_child_main, args=(args.record + ".child",), daemon=False)
        child.start()
    if args.setsid_grandchild:
        subprocess.Popen([sys.executable, "-c", "import os,time,sys; os.setsid(); "
                               "open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(3600)",
                               args.record + ".grandchild"])

    # Recorded after the handlers are in place: a test that saw 'start' may signal.
    record(event="start", attempt=os.environ.get("TRAINSUP_ATTEMPT"),
           reason=os.environ.get("TRAINSUP_RESTART_REASON"), resume=resume,
           resumed_step=state["step"], resume_ok=resume_ok,
           env={k: v for k, v in os.environ.items()})
    start = time.monotonic()
    last_save = start
    last_print = 0.0
    hog = []
    hb = os.environ.get("TRAINSUP_HEARTBEAT_FILE")
    last_beat = 0.0
    if args.progress == "heartbeat":      # report the step where the daemon reads it
        args.progress = os.environ["TRAINSUP_HEARTBEAT_FILE"]
    if args.progress:
        args.progress = args.progress.replace("{pid}", str(os.getpid()))
    progress_fd = os.open(args.progress, os.O_WRONLY | os.O_CREAT, 0o644) if args.progress else None
    while True:
        state["step"] += 1
        if args.save_every_steps and state["step"] % args.save_every_steps == 0:
            save("periodic")
        if progress_fd is not None:
            os.pwrite(progress_fd, b"%12d" % state["step"], 0)   # fixed width: never torn
        now = time.monotonic()
        if args.grow_mb_per_s:
            want = int((now - start) * args.grow_mb_per_s)
            while len(hog) < want:
                hog.append(bytearray(1 << 20))   # bytearray() zero-fills: the pages are touched
        if args.heartbeat_for is not None and hb:
            if now - start > args.heartbeat_for:
                time.sleep(3600)              # the hang: no heartbeat, no progress
            if now - last_beat > 0.05:
                Path(hb).touch()
                last_beat = now
        if args.peer_preempted is not None and not resume and time.monotonic() - start >= args.after:
            save("preempt")
            record(event="peer-preempted-exit", code=args.peer_preempted)
            sys.exit(args.peer_preempted)
        if args.exit is not None and time.monotonic() - start >= args.after:
            record(event="exit", code=args.exit)
            sys.exit(args.exit)
        while usr1_at:
            record(event="usr1", at=usr1_at.pop(0))   # before the save: the stop follows it
        if state["save"]:
            state["save"] = False
            save("signal")
        if state["term"]:
            save("preempt")
            record(event="term-exit")
            sys.exit(0)
        if args.print_every and now - last_print >= args.print_every:
            last_print = now
            print(f"step {state['step']}", flush=True)
        if args.every and time.monotonic() - last_save >= args.every:
            last_save = time.monotonic()
            save("periodic")
        time.sleep(args.step_time)


if __name__ == "__main__":
    main()
