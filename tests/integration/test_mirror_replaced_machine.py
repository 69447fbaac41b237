"""The replaced machine, end to end (issue: checkpoints outlive the machine).

Machine A (its own daemon, state dir and checkpoint dir) trains a real `trainsup.training`
job (jobs/train_mlp.py) with the mirror on S3 (moto on loopback) and the lease. The loopback
metadata server announces a spot interruption: A saves, uploads that save first and stops.
A's dirs are deleted. Machine B (fresh dirs, the same job) restores the emergency save from
the store and resumes from it — 0 steps lost — and finishes with weights bit-identical to
an uninterrupted run. Machine C, started while B holds the lease, waits and names B.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from conftest import REPO, DaemonProc, _kill_recorded, wait_for

sys.path.insert(0, str(REPO / "tests" / "helpers"))
import stores  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(stores.moto_missing() is not None, reason=stores.moto_missing() or "")

from test_cloud_notices import FakeMetadata, Handler  # noqa: E402
from test_e2e_torch import SLOW, assert_same_state, events, job_log, reaper, reference_run, write_mlp_job  # noqa: E402,F401

STEPS = 300
ARGS = ["--steps", str(STEPS), "--every", "40", "--log-every", "1", "--sleep-per-step", "0.03"]


@pytest.fixture
def imds():
    state = FakeMetadata()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"fake": state}))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    with state.cond:
        state.closing = True
    server.shutdown()


def machine(root, name: str, url: str, endpoint: str, imds_url: str | None = None) -> DaemonProc:
    d = DaemonProc(root)
    extra = (f"  mirror:\n    url: {url}\n    options: {{endpoint_url: \"{endpoint}\"}}\n"
             f"    lease: true\n    lease_ttl: 6s\n")
    path = d.jobs / f"{name}.yaml"
    write_mlp_job(d, name, [*ARGS, "--final-out", str(root / "final.pt")])
    text = path.read_text()
    head, _, tail = text.partition("restart:")
    path.write_text(head + extra + "restart:" + tail)
    if imds_url:
        (root / "trainsup.yaml").write_text(f"preemption:\n  provider: aws\n  poll: 0.2s\n  metadata_url: {imds_url}\n")
    return d


def test_replaced_machine_resumes_from_the_store_with_no_step_lost(tmp_path, imds, reaper):
    srv = stores.start_moto()
    started: list[DaemonProc] = []
    try:
        stores.make_bucket(srv.endpoint, "fleet")
        url = "s3://fleet/runs/{job}"
        ref, ref_out, _ = reference_run(tmp_path, ARGS, reaper)

        a = machine(tmp_path / "A", "mlp", url, srv.endpoint, imds.url)
        started.append(a)
        a.start("--config", str(a.root / "trainsup.yaml"), env=stores.S3_ENV)
        wait_for(lambda: any(e["kind"] == "upload" for e in a.history("mlp")), SLOW, "A's first upload")
        # AWS's spot notice: terminate two minutes from now
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
        imds.aws_action = {"action": "terminate", "time": when}
        st = a.wait_state("mlp", "preempted", timeout=SLOW)
        notice = st["last_notice"]
        assert notice["source"] == "aws" and notice["outcome"] == "saved", notice
        assert notice["store"]["uploaded"] is True and notice["store"]["upload_s"] > 0, notice
        saved = notice["step"]
        ups = [e for e in events(a, "mlp", "upload") if e["step"] == saved]
        assert ups and ups[0].get("emergency"), events(a, "mlp", "upload")
        assert a.terminate() == 0
        # the machine is gone, and its disk with it
        shutil.rmtree(a.root / "state")
        shutil.rmtree(a.root / "mlp-ckpt")

        b = machine(tmp_path / "B", "mlp", url, srv.endpoint)
        started.append(b)
        b.start(env=stores.S3_ENV)
        launch = wait_for(lambda: [e for e in events(b, "mlp", "launch")], SLOW, "B's launch")[0]
        (restored,) = events(b, "mlp", "restore")
        assert restored["step"] == saved, (restored, saved)
        assert launch["resume_from"] == str(b.root / "mlp-ckpt" / f"step-{saved:08d}"), launch
        wait_for(lambda: f"resumed from step {saved} " in job_log(b, "mlp"), SLOW, "B's resume line")

        def steps() -> list[int]:
            return [int(line.split()[1]) for line in job_log(b, "mlp").splitlines() if line.startswith("step ")]
        first = wait_for(steps, SLOW, "B's first training step")[0]
        assert first == saved + 1, f"B's first step {first}, saved {saved}: steps lost or redone"

        c = machine(tmp_path / "C", "mlp", url, srv.endpoint)
        started.append(c)
        c.start(env=stores.S3_ENV)
        st = wait_for(lambda: (s := c.status("mlp"))["mirror"]["lease"]["waiting_for"] and s, SLOW, "C waiting")
        assert str(b.state) in st["mirror"]["lease"]["waiting_for"], st["mirror"]
        assert st["pid"] is None and st["state"] == "starting", st
        assert str(b.state) in c.cli("status").stdout

        b.wait_state("mlp", "finished", timeout=SLOW * 3)
        assert ref.wait(SLOW * 3) == 0
        assert_same_state(b.root / "final.pt", ref_out)
        # B finished and handed the lease back: C may now take it (the run is over; its
        # launch restores the final checkpoint)
    finally:
        for d in started:
            try:
                d.terminate(timeout=60)
            except AssertionError:
                pass
            _kill_recorded(d.root)
        srv.stop()
