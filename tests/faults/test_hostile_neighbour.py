"""One daemon serves every job of every user: a hostile job cannot freeze, starve or blind it
for another user's job.

Job A (user `daemon`) plants, for every format trainsup reads and under every name a
validator or bookkeeping reader opens: FIFOs, sockets, symlink loops, a sparse 4 TiB file
listed by two manifests, an overlapping-zip bomb, a 3000-deep tree, a 100,000-entry dir,
non-UTF-8 and escape-sequence names, a 100 MB manifest, 5000-digit integers; and swaps
HF's trainer_state.json with a FIFO every 20 ms. Meanwhile job B (user `nobody`) saves a
checkpoint every second under a quota. Asserted, as a user of B would check: every save
of B confirmed (listed valid by `trainsup checkpoints`) within 2 s of landing, B's quota
held, `status` p99 <= 50 ms, the daemon's RSS <= 100 MB, and the daemon ends on SIGTERM
within its jobs' stop timeout.

The machine's own latency is measured beside `status`, request by request: the round trip
to a bare asyncio echo server in another process (it shares nothing with the daemon, so a
stalled daemon loop cannot hide in it). On a machine shared with other test runs (a load
average of 10 on 2 cores gave that floor a p99 of 200 ms) `status` is held to 50 ms over
the floor's p99; on a quiet machine the floor is about a millisecond. It runs once as it
is and once beside two processes spinning on the CPU.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from test_hostile_files_in_the_daemon import Swapper

PY = "/usr/bin/python3"
SAVER = REPO / "tests" / "helpers" / "plain_saver.py"
QUOTA = 2 << 20
SAVE_BYTES = 256 << 10
STOP_TIMEOUT_S = 5
RUN_S = 30


def _users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("two users' jobs need a root daemon")
    if not os.access(PY, os.X_OK):
        pytest.skip(f"{PY} (world-executable) is needed: the venv under /root is not other users'")
    try:
        return pwd.getpwnam("daemon"), pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("users daemon and nobody are needed")


def _overlapping_zip(members: int, inflated: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * inflated)
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", raw, eocd + 16)[0]
    cd = raw[cd_off:eocd]
    fixed = cd[:46]
    entries = [cd] + [fixed[:28] + struct.pack("<H", len(n)) + fixed[30:] + n
                      for n in (f"archive/x{i:05d}".encode() for i in range(members - 1))]
    body = b"".join(entries)
    return raw[:cd_off] + body + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, members, members, len(body), cd_off, 0)


def _chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def _files(d: Path, n: int) -> None:
    d.mkdir(parents=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _manifest(d: Path, raw: bytes | str) -> None:
    d.mkdir(parents=True)
    (d / "MANIFEST.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)


BIG = "1" + "0" * 5000          # a 5000-digit integer, as JSON text


def plant(ck: Path, socks: list[socket.socket]) -> None:
    """Everything job A plants (run as root here, then given to A's user)."""
    def sock(p: Path) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        socks.append(s)

    # trainsup: MANIFEST.json a FIFO, a socket, a loop; a 4 TiB sparse file with a wrong hash
    # listed by two manifests; a 100 MB manifest; 5000-digit steps; a 2 MB reason
    (ck / "step-00000201").mkdir()
    os.mkfifo(ck / "step-00000201" / "MANIFEST.json")
    (ck / "step-00000202").mkdir()
    sock(ck / "step-00000202" / "MANIFEST.json")
    (ck / "step-00000203").mkdir()
    os.symlink("MANIFEST.json", ck / "step-00000203" / "MANIFEST.json")
    for step in (204, 205):
        e = ck / f"step-{step:08d}"
        _manifest(e, json.dumps({"format": "trainsup-checkpoint/1", "step": step,
                                 "files": {"huge.bin": {"size": 4 << 40, "sha256": "0" * 64}}}))
        with open(e / "huge.bin", "wb") as f:
            f.truncate(4 << 40)
    _manifest(ck / "step-00000206", b'{"format": "trainsup-checkpoint/1", "step": 206, "pad": "'
              + b"x" * (100 << 20) + b'", "files": {}}')
    _manifest(ck / "step-00000207", '{"format": "trainsup-checkpoint/1", "step": ' + BIG + ', "files": {}}')
    _manifest(ck / "step-00000208", json.dumps({"format": "trainsup-checkpoint/1", "step": 208,
                                                "reason": "r" * (2 << 20), "files": {}}))
    os.symlink("step-00000209", ck / "step-00000209")
    # HF: trainer_state.json a FIFO (and one swapped with a FIFO every 20 ms), a loop,
    # a 5000-digit global_step, weights a FIFO, a 3000-deep tree, a 100,000-entry dir
    for k in (101, 103, 104, 105, 106, 107, 1500):
        (ck / f"checkpoint-{k}").mkdir()
    os.mkfifo(ck / "checkpoint-101" / "trainer_state.json")
    # the newest: kept by rotation, so the swapping goes on all along
    (ck / "checkpoint-1500" / "trainer_state.json").write_text('{"global_step": 1500}')
    os.symlink("trainer_state.json", ck / "checkpoint-103" / "trainer_state.json")
    (ck / "checkpoint-104" / "trainer_state.json").write_text('{"global_step": ' + BIG + "}")
    os.mkfifo(ck / "checkpoint-104" / "model.safetensors")
    (ck / "checkpoint-105" / "trainer_state.json").write_text('{"global_step": 105}')
    _chain(ck / "checkpoint-105", 3000)
    (ck / "checkpoint-106" / "trainer_state.json").write_text('{"global_step": 106}')
    _files(ck / "checkpoint-106" / "many", 100_000)
    sock(ck / "checkpoint-107" / "trainer_state.json")
    # TF: the state file a FIFO, and a planted FIFO under the rewrite's temp name
    os.mkfifo(ck / "checkpoint")
    (ck / "ckpt-1.index").write_bytes(b"\0" * 64)
    (ck / "ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 64)
    # torch: the overlapping-zip bomb, a FIFO, a socket, a loop
    (ck / "ckpt-1.pt").write_bytes(_overlapping_zip(2000, 100 << 20))
    os.mkfifo(ck / "ckpt-2.pt")
    sock(ck / "ckpt-3.pt")
    os.symlink("model-4.pt", ck / "model-4.pt")
    # Lightning: last.ckpt a FIFO, a sparse 4 TiB .ckpt
    lv = ck / "lightning_logs" / "version_0" / "checkpoints"
    lv.mkdir(parents=True)
    os.mkfifo(lv / "last.ckpt")
    with open(lv / "epoch=0-step=5.ckpt", "wb") as f:
        f.truncate(4 << 40)
    # Paddle: .states with a 5000-digit global_step; both files FIFOs
    (ck / "model_7.pdparams").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    (ck / "model_7.states").write_bytes(pickle.dumps({"global_step": 10**5000}, protocol=2))
    os.mkfifo(ck / "model_8.pdparams")
    os.mkfifo(ck / "model_8.states")
    # Keras: BackupAndRestore's metadata a FIFO, a .keras FIFO
    (ck / "backup").mkdir()
    os.mkfifo(ck / "backup" / "training_metadata.json")
    (ck / "backup" / "latest.weights.h5").write_bytes(b"\0" * 64)
    os.mkfifo(ck / "model-9.keras")
    # names: non-UTF-8 bytes, terminal escapes; a dot-dir of 3000 dirs
    os.mkdir(os.fsencode(ck) + b"/step-00000210\xff")
    (ck / "ckpt-\x1b]0;pwned\x07\x1b[2J-11.pt").write_bytes(b"PK\x03\x04junk")
    for i in range(3000):
        (ck / ".hidden" / f"d{i}").mkdir(parents=True)


_ECHO = """
import asyncio, sys
async def main():
    async def echo(r, w):
        while (line := await r.readline()):
            w.write(line)
            await w.drain()
    srv = await asyncio.start_unix_server(echo, sys.argv[1])
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""


class EchoFloor:
    """A bare asyncio echo server in its own process: the machine's round-trip floor."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")

    def round_trip(self) -> float:
        t = time.perf_counter()
        self.f.write(b"ping\n")
        self.f.flush()
        assert self.f.readline() == b"ping\n"
        return time.perf_counter() - t

    def close(self) -> None:
        self.f.close()
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _dir_bytes(ck: Path) -> int:
    """What B's saves hold now. Rotation deletes while this adds up: an entry (or a file
    of it) gone between the listing and its stat holds nothing (found: FileNotFoundError
    in CI, a save rotated away mid-count)."""
    total = 0
    for e in os.scandir(ck):
        if e.name.startswith("step-") and e.is_dir(follow_symlinks=False):
            try:
                with os.scandir(e.path) as files:
                    for f in files:
                        try:
                            total += f.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            pass
            except FileNotFoundError:
                pass
    return total


@pytest.mark.parametrize("cpu_hogs", [0, 2])
def test_hostile_neighbour_cannot_freeze_starve_or_blind_the_daemon(daemon, cpu_hogs):
    """cpu_hogs: processes spinning on the CPU all along (found: on a CI machine at load
    15-20 `status` p99 was 200-350 ms against a floor p99 of 8-10 ms: a pool thread at
    nice 10 held the GIL while it waited for the CPU, and the loop waited for the GIL)."""
    ua, ub = _users()
    top = Path(tempfile.mkdtemp(prefix="trainsup-hostile-"))
    socks: list[socket.socket] = []
    hogs: list[subprocess.Popen] = []
    try:
        os.chmod(top, 0o755)
        wa, wb = top / "a", top / "b"
        for w, u in ((wa, ua), (wb, ub)):
            w.mkdir()
            os.chown(w, u.pw_uid, u.pw_gid)
        cka, ckb = wa / "ck", wb / "ck"
        cka.mkdir()
        os.chown(cka, ua.pw_uid, ua.pw_gid)
        log_b = wb / "saves.jsonl"
        daemon.write_job("a", f"name: a\nuser: daemon\nworkdir: {wa}\nstop_timeout: {STOP_TIMEOUT_S}s\n"
                              f"command: [{PY}, -c, 'import time; time.sleep(3600)']\n"
                              f"checkpoint:\n  dir: {cka}\n  keep_last: 1\n"
                              f"emergency_save:\n  grace: 0s\n")
        daemon.write_job("b", f"name: b\nuser: nobody\nworkdir: {wb}\nstop_timeout: {STOP_TIMEOUT_S}s\n"
                              f"command: [{PY}, {SAVER}, --every, '1', --size, '{SAVE_BYTES}', --log, {log_b}]\n"
                              f"checkpoint:\n  dir: {ckb}\n  keep_last: 1000\n  quota: {QUOTA}\n"
                              f"emergency_save:\n  grace: 0s\n")
        # What A plants is built apart (twice) and moved in name by name while B saves, as
        # saves land; checkpoint-1500 is valid and newest, so rotation deletes the rest of
        # what A planted (TF's FIFO state file rewritten first, the 100,000 files and the
        # 3000-deep tree emptied from the trash), and the second batch comes half way.
        stages = [wa / "stage1", wa / "stage2"]
        for st in stages:
            st.mkdir()
            plant(st, socks)
            subprocess.run(["chown", "-R", "-h", f"{ua.pw_uid}:{ua.pw_gid}", str(st)], check=True, timeout=300)

        def move_in(st: Path) -> None:
            for name in os.listdir(os.fsencode(st)):
                try:
                    os.rename(os.fsencode(st) + b"/" + name, os.fsencode(cka) + b"/" + name)
                except OSError:
                    pass        # still there from the first batch

        hogs += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpu_hogs)]
        daemon.start()
        daemon.wait_state("a", "running", timeout=30)
        daemon.wait_state("b", "running", timeout=30)
        seen: dict[int, float] = {}          # B's step -> when the daemon first listed it valid
        status_s: list[float] = []
        floor_s: list[float] = []
        floor = EchoFloor(wa.parent / "echo.sock")
        when: list[float] = []
        rss: list[float] = []
        held: list[int] = []
        stop = threading.Event()

        def watch_b() -> None:
            while not stop.is_set():
                r = daemon.request("checkpoints", "b", timeout=30)
                now = time.time()
                if r["ok"]:
                    for c in r["result"]:
                        if c.get("valid") and c.get("step") is not None and c["step"] not in seen:
                            seen[c["step"]] = now
                time.sleep(0.05)

        tb = threading.Thread(target=watch_b, daemon=True)
        tb.start()
        wait_for(lambda: seen, 30, "B's first save confirmed")
        move_in(stages[0])
        swapper = Swapper(cka / "checkpoint-1500", "trainer_state.json")
        swapper.start()
        watched_from = time.time()
        try:
            end = time.monotonic() + RUN_S
            second = time.monotonic() + RUN_S / 2
            while time.monotonic() < end:
                if second and time.monotonic() >= second:
                    second = 0
                    move_in(stages[1])
                floor_s.append(floor.round_trip())
                t = time.perf_counter()
                r = daemon.request("status", timeout=30)
                status_s.append(time.perf_counter() - t)
                when.append(time.monotonic() - (end - RUN_S))
                assert r["ok"], r
                rss.append(_rss_mb(daemon.proc.pid))
                held.append(_dir_bytes(ckb))
                time.sleep(0.1)
        finally:
            stop.set()
            tb.join(60)
            swapper.release()
            floor.close()

        saves = [json.loads(line) for line in log_b.read_text().splitlines()]
        watched = [s for s in saves[:-2] if s["landed"] >= watched_from]
        assert len(watched) >= RUN_S - 5
        late = {s["step"]: round(seen[s["step"]] - s["landed"], 2) if s["step"] in seen else None
                for s in watched if s["step"] not in seen or seen[s["step"]] - s["landed"] > 2.0}
        assert not late, f"B's saves confirmed late or never (step: seconds): {late}"
        assert max(held) <= QUOTA + SAVE_BYTES + 4096, f"B held {max(held)} bytes, quota {QUOTA}"
        slow = [(round(w, 1), round(s * 1000), round(f * 1000)) for w, s, f in zip(when, status_s, floor_s)
                if s > 0.050]
        status_s.sort()
        floor_s.sort()
        p99 = status_s[int(len(status_s) * 0.99) - 1]
        floor99 = floor_s[int(len(floor_s) * 0.99) - 1]
        print(f"status p50/p99/max {status_s[len(status_s) // 2] * 1000:.1f}/{p99 * 1000:.1f}/"
              f"{status_s[-1] * 1000:.1f} ms, floor p50/p99 {floor_s[len(floor_s) // 2] * 1000:.1f}/"
              f"{floor99 * 1000:.1f} ms (n={len(status_s)}), RSS max {max(rss):.0f} MB, load {os.getloadavg()[0]:.1f}")
        assert p99 <= 0.050 + floor99, (
            f"status p99 {p99 * 1000:.1f} ms (max {status_s[-1] * 1000:.1f} ms), the machine's floor p99 "
            f"{floor99 * 1000:.1f} ms; over 50 ms (s into the run, status ms, floor ms): {slow}")
        assert max(rss) <= 100, f"daemon RSS reached {max(rss):.0f} MB"
        assert daemon.status("a")["state"] == "running" and daemon.status("b")["state"] == "running"
        t = time.monotonic()
        assert daemon.terminate(timeout=60) == 0
        took = time.monotonic() - t
        assert took <= STOP_TIMEOUT_S + 5, f"the daemon took {took:.1f}s to end on SIGTERM"
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        for s in socks:
            s.close()
        daemon.terminate(timeout=60)
        subprocess.run(["rm", "-rf", "--", str(top)], check=False, timeout=600)
        wait_for(lambda: not top.exists(), 60, "the planted tree removed")
        shutil.rmtree(top, ignore_errors=True)
