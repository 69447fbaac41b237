"""Multi-node torchrun with one trainsup daemon per node, on two network-namespace "hosts"
of this machine (netns_hosts.py: a veth pair, 198.18.0.0/15 addresses, a hostname each).

Each node's daemon runs inside its namespace and supervises that node's half of a 2-node
c10d torchrun job (jobs/train_mlp.py, gloo, CPU), set up as jobs/torchrun-2node-*.yaml
say: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a process-group timeout, GLOO_SOCKET_IFNAME,
NODE_RANK, one checkpoint dir both nodes see (here the same path on the one filesystem).

Run with `make test-multinode` (root)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import DaemonProc, committed, manifest, wait_for  # noqa: E402
from netns_hosts import Host, NetnsHosts, NetnsUnavailable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "train_mlp.py"
JOB = "mlp2"
STEPS = 240
# --sync-every 1: the ranks agree on a save request at every step (the adaptive default
# may act a second later); a small, slowed-down model so a notice lands mid-run.
ARGS = [str(TRAIN), "--steps", str(STEPS), "--every", "25", "--sleep-per-step", "0.03",
        "--sync-every", "1", "--log-every", "1", "--hidden", "16", "--pg-timeout", "30"]
STEP_RE = re.compile(r"^step (\d+) ", re.M)


@pytest.fixture(scope="module")
def hosts():
    h = NetnsHosts()
    try:
        h.start()
    except NetnsUnavailable as e:
        h.stop()
        pytest.skip(f"no network-namespace hosts here: {e}")
    yield h.hosts
    h.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training uninterrupted: torchrun x2 on this host (loopback). Two ranks,
    same seeds, same data shards: its weights are what the 2-node runs must end with.
    Started in the background; call to get its weights file."""
    d = tmp_path_factory.mktemp("ref")
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith("TRAINSUP_")]:
        del env[k]
    log = open(d / "ref.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *ARGS, "--ckpt-dir", str(d / "ckpt"), "--final-out", str(d / "ref.pt")],
                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)

    def result() -> Path:
        assert p.wait(180) == 0, (d / "ref.log").read_text()[-3000:]
        return d / "ref.pt"

    yield result
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    log.close()


class Node:
    """One "host": its daemon (inside its namespace, with its hostname) and its job."""

    def __init__(self, host: Host, root: Path, ckpt: Path, mark: str, node_rank: int, endpoint: str):
        self.host, self.mark = host, mark
        self.d = DaemonProc(root)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", mark,
               "--max-restarts", "3", "--monitor-interval", "0.2", *ARGS,
               "--final-out", str(ckpt.parent / "final.pt")]
        env = {"PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               "GLOO_SOCKET_IFNAME": host.ifname, "NODE_RANK": str(node_rank),
               "OMP_NUM_THREADS": "1", "TS_NETNS_MARK": mark}
        self.d.write_job(JOB, f"name: {JOB}\ncommand: {json.dumps(cmd)}\nworkdir: {root}\n"
                              f"env: {json.dumps(env)}\nstop_timeout: 5s\n"
                              f"checkpoint: {{dir: {ckpt}}}\n"
                              "emergency_save: {grace: 20s}\n"
                              "restart: {policy: on-failure, max_restarts: 10, backoff: {initial: 0.5, max: 2}}\n")

    def start(self) -> Node:
        self.d.start(prefix=self.host.prefix())
        return self

    def log(self) -> str:
        try:
            return (self.d.logs / f"{JOB}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def workers(self) -> list[psutil.Process]:
        """This node's torchrun workers of this test's job (by their environment)."""
        out = []
        for p in psutil.process_iter():
            try:
                env = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                continue
            if env.get("TS_NETNS_MARK") == self.mark and env.get("GLOO_SOCKET_IFNAME") == self.host.ifname \
                    and "LOCAL_RANK" in env:
                out.append(p)
        return out


class Pair:
    def __init__(self, hosts: tuple[Host, Host], root: Path, port: int):
        self.ckpt = root / "ckpt"                      # "shared storage": one path both nodes see
        self.mark = f"netns-{uuid.uuid4().hex[:12]}"
        endpoint = f"{hosts[0].hostname}:{port}"      # node A hosts the c10d store
        self.a = Node(hosts[0], root / "hostA", self.ckpt, self.mark, 0, endpoint)
        self.b = Node(hosts[1], root / "hostB", self.ckpt, self.mark, 1, endpoint)
        self.final = root / "final.pt"

    def logs(self) -> str:
        return self.a.log() + self.b.log()

    def detail(self) -> str:
        return "\n".join(f"--- {n} job log:\n{x.log()[-2500:]}\n--- {n} daemon:\n{x.d.log_text()[-1500:]}"
                         for n, x in (("A", self.a), ("B", self.b)))

    def last_step(self, after: int = 0) -> int:
        """The newest step rank 0 logged (on either node) after `after` chars of logs."""
        steps = [int(m) for x in (self.a.log(), self.b.log()) for m in STEP_RE.findall(x[after:])]
        return max(steps, default=0)

    def resumes(self) -> list[int]:
        return [int(s) for s in re.findall(r"^resumed from step (\d+) ", self.logs(), re.M)]

    def marked(self) -> list[int]:
        """Every process anywhere that carries this job's marker."""
        pids = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("TS_NETNS_MARK") == self.mark:
                    pids.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                continue
        return pids

    def stop(self) -> None:
        for n in (self.a, self.b):
            try:
                n.d.terminate(timeout=30)
            except AssertionError:
                pass
            if getattr(n.d, "out_f", None):
                n.d.out_f.close()
        for pid in self.marked():   # leave nothing behind, even when a test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def pair(hosts, tmp_path, request):
    port = 29400 + (abs(hash(request.node.name)) % 500)
    p = Pair(hosts, tmp_path, port)
    yield p
    p.stop()


@pytest.mark.parametrize("preempted", ["B", "A"])
def test_netns_preempt_one_node_one_checkpoint_both_resume_bit_identical(pair, reference, preempted):
    pair.a.start(), pair.b.start()
    # b: the node that gets the notice; a: the other. Node A hosts the rendezvous store:
    # when A is preempted, B's torchrun loses the store and its daemon relaunches it
    # (restart policy) until A is back.
    b, a = (pair.b, pair.a) if preempted == "B" else (pair.a, pair.b)
    wait_for(lambda: pair.last_step() >= 40, 150, "the 2-node group training", 0.2, detail=pair.detail)
    before = {p.name for p in committed(pair.ckpt)}
    # The preemption notice goes to one node's daemon only.
    t0 = time.monotonic()
    r = b.d.cli("preempt", JOB, timeout=90)
    assert r.returncode == 0, (r.stdout, r.stderr, pair.detail())
    b.d.wait_state(JOB, "preempted", timeout=30)
    t_preempt = time.monotonic() - t0
    new = [manifest(p) for p in committed(pair.ckpt) if p.name not in before]
    # One commit for the notice, made by rank 0 (on whichever node) with every rank's state.
    saves = [m for m in new if m["reason"] != "periodic"]
    assert [m["reason"] for m in saves] == ["preempt"], new
    saved = saves[0]
    assert saved["world_size"] == 2 and {"state.pt", "rank-00000.pt", "rank-00001.pt"} <= set(saved["files"])
    assert all(m["world_size"] == 2 for m in new)
    # The other node was not preempted: its worker exits 75 and torchrun restarts it in
    # place (its daemon does not take the job for finished); it waits in the rendezvous.
    wait_for(lambda: "another node's preemption" in a.log(), 30, "the other node's worker to stop for the notice",
             detail=pair.detail)
    assert a.d.status(JOB)["state"] in ("running", "starting", "backoff"), a.d.status(JOB)
    # The preempted node's daemon starts the job again: both resume from that one checkpoint.
    t0 = time.monotonic()
    r = b.d.cli("start", JOB)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: saved["step"] in pair.resumes(), 120, f"a resume from step {saved['step']}", 0.2,
             detail=pair.detail)
    print(f"\nnetns preempt: notice on {preempted} -> checkpoint step {saved['step']} committed and its job "
          f"stopped in {t_preempt:.1f} s; `trainsup start` there -> both resumed in {time.monotonic() - t0:.1f} s")
    a.d.wait_state(JOB, "finished", timeout=150)
    b.d.wait_state(JOB, "finished", timeout=30)
    torch = pytest.importorskip("torch")
    got, want = torch.load(pair.final, weights_only=True), torch.load(reference(), weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the uninterrupted run"


def test_netns_node_sigkill_other_rejoins_orphan_killed_no_worker_survives(pair):
    a, b = pair.a.start(), pair.b.start()
    wait_for(lambda: pair.last_step() >= 30, 150, "the 2-node group training", 0.2, detail=pair.detail)
    orphans = b.workers()
    assert len(orphans) == 1, orphans
    agent = b.d.status(JOB)["pid"]
    resumes = len(pair.resumes())
    mark = len(pair.a.log()), len(pair.b.log())
    t0 = time.monotonic()
    os.kill(agent, signal.SIGKILL)       # node B's job crashes: its torchrun agent, not its worker
    # The agent's worker is orphaned (torchrun starts it in a session of its own); B's
    # daemon, a subreaper containing the job, must kill it, not leave it training.
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans), 30,
             "the SIGKILLed agent's orphaned worker to be killed", detail=pair.detail)
    t_orphan = time.monotonic() - t0
    # B's daemon restarts B's job; A's torchrun restarts its worker; the group re-forms
    # (no deadlock of the shared rendezvous store) and trains again, from a checkpoint.
    wait_for(lambda: len(pair.resumes()) > resumes, 150, "a new 2-node group resuming", 0.2, detail=pair.detail)
    resumed = pair.resumes()[-1]
    wait_for(lambda: max(int(s) for x, m in ((a, mark[0]), (b, mark[1]))
                         for s in STEP_RE.findall(x.log()[m:]) or ["0"]) > resumed, 60,
             "both nodes training again after the crash", 0.2, detail=pair.detail)
    t_both = time.monotonic() - t0
    st = b.d.status(JOB)
    assert st["restarts"] >= 1, st
    print(f"\nnetns crash: orphan killed in {t_orphan:.2f} s; both nodes training again {t_both:.1f} s "
          f"after the SIGKILL (resumed from step {resumed})")
    assert t_both < 120
    # No worker survives its job: stop both nodes' jobs; nothing with the marker remains.
    # A's stop saves (its rank agrees the save with B's, rank 0 commits, both ranks stop);
    # B's rank then exits to rejoin and B has no rank left to save: stop it without a save.
    t1 = time.monotonic()
    for n, how in ((a, ()), (b, ("--no-save",))):
        r = n.d.cli("stop", *how, JOB, timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
    wait_for(lambda: not pair.marked(), 20, "no process of the job left after `trainsup stop` on both nodes",
             detail=lambda: f"left: {pair.marked()}")
    print(f"netns stop: both nodes stopped, nothing of the job left, {time.monotonic() - t1:.1f} s")
