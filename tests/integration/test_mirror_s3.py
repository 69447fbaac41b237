"""The checkpoint mirror against S3 (moto in server mode on loopback): uploads of each valid
checkpoint with their commit objects, status / history / `checkpoints` fields, remote
retention, a restore on a fresh machine, the lease between two daemons, and the store's
faults through a loopback proxy (tests/helpers/stores.py). Real daemons, real fake jobs
(tests/helpers/fakejob.py writes real trainsup checkpoints)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import REPO, DaemonProc, _kill_recorded, wait_for

sys.path.insert(0, str(REPO / "tests" / "helpers"))
import stores  # noqa: E402

pytestmark = pytest.mark.skipif(stores.moto_missing() is not None, reason=stores.moto_missing() or "")


@pytest.fixture(scope="module")
def moto():
    srv = stores.start_moto()
    try:
        yield srv
    finally:
        srv.stop()


_n = [0]


@pytest.fixture
def bucket(moto):
    _n[0] += 1
    name = f"ckpts-{_n[0]}-{int(time.time())}"
    stores.make_bucket(moto.endpoint, name)
    return name


def s3(endpoint: str):
    import s3fs
    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


def mirror_yaml(url: str, endpoint: str, extra: str = "") -> str:
    return (f"  mirror:\n    url: {url}\n    options: {{endpoint_url: \"{endpoint}\"}}\n"
            + "".join(f"    {line}\n" for line in extra.splitlines() if line))


def job(d: DaemonProc, name: str, url: str, endpoint: str, flags: str = "--catch-usr1 --every 0.4",
        mirror_extra: str = "", ck_extra: str = "") -> None:
    d.fakejob(name, flags)
    path = d.jobs / f"{name}.yaml"
    text = path.read_text().rstrip("\n") + "\n" + "".join(f"  {line}\n" for line in ck_extra.splitlines() if line)
    path.write_text(text + mirror_yaml(url, endpoint, mirror_extra))


def events(d: DaemonProc, name: str, kind: str) -> list[dict]:
    return [e for e in d.history(name) if e["kind"] == kind]


@pytest.fixture
def machines(tmp_path):
    made: list[DaemonProc] = []

    def make(label: str) -> DaemonProc:
        d = DaemonProc(tmp_path / label)
        made.append(d)
        return d
    yield make
    for d in made:
        try:
            d.terminate(timeout=60)
        except AssertionError:
            pass
        _kill_recorded(d.root)
        if getattr(d, "out_f", None):
            d.out_f.close()


def test_uploads_each_valid_checkpoint_with_a_commit_object_and_shows_it(machines, moto, bucket):
    d = machines("a")
    url = f"s3://{bucket}/runs/{{job}}"
    job(d, "m1", url, moto.endpoint, mirror_extra="keep_last: 2")
    (d.root / "trainsup.yaml").write_text("metrics:\n  listen: 127.0.0.1:0\n")
    d.start("--config", str(d.root / "trainsup.yaml"), env=stores.S3_ENV)
    up = wait_for(lambda: len(u := events(d, "m1", "upload")) >= 4 and u, 60, "four uploads")
    fs = s3(moto.endpoint)
    commits = fs.ls(f"{bucket}/runs/m1/commits")
    assert commits, "no commit objects"
    # remote retention: the store keeps its own keep_last (2), never fewer
    wait_for(lambda: len(fs.ls(f"{bucket}/runs/m1/commits", refresh=True)) <= 3, 30, "remote retention")
    body = json.loads(fs.cat(sorted(fs.ls(f"{bucket}/runs/m1/commits", refresh=True))[-1]))
    assert body["format"] == "trainsup-mirror/1" and body["files"], body
    f0 = body["files"][0]
    assert fs.size(f"{bucket}/runs/m1/data/{body['key']}/{f0['path']}") == f0["size"]
    st = wait_for(lambda: (s := d.status("m1"))["mirror"]["uploaded_step"] is not None and s, 30, "status")
    m = st["mirror"]
    assert m["url"] == f"s3://{bucket}/runs/m1" and m["error"] is None
    assert m["uploaded_step"] >= up[0]["step"] and m["lag_s"] >= 0 and m["bytes_pending"] >= 0
    cks = d.request("checkpoints", "m1")["result"]
    assert any(c.get("mirrored") == "yes" for c in cks), cks
    out = d.cli("checkpoints", "m1")
    assert "MIRROR" in out.stdout and "yes" in out.stdout, out.stdout
    # metrics export them
    import urllib.request
    listen = d.request("status")["result"]["daemon"]["metrics"]

    def scraped() -> str:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as r:
            return r.read().decode()
    body = wait_for(lambda: 'trainsup_job_mirror_uploaded_step{name="m1"}' in (b := scraped()) and b,
                    30, "the mirror's metrics")
    assert 'trainsup_job_mirror_failing{name="m1"} 0' in body, body
    ups = [line for line in body.splitlines()
           if line.startswith('trainsup_job_mirror_events_total{name="m1",event="upload"}')]
    assert ups and float(ups[0].split()[-1]) >= 4, ups


def test_fresh_machine_restores_the_newest_complete_checkpoint_before_launch(machines, moto, bucket):
    url = f"s3://{bucket}/{{job}}"
    a = machines("a")
    job(a, "r1", url, moto.endpoint)
    a.start(env=stores.S3_ENV)
    wait_for(lambda: len(events(a, "r1", "upload")) >= 2, 60, "uploads on A")
    assert a.request("stop", "r1")["ok"]
    a.wait_state("r1", "stopped", timeout=30)
    newest = max(e["step"] for e in events(a, "r1", "upload"))
    a.terminate()
    # Machine B: fresh state dir, fresh (empty) checkpoint dir, the same job and store.
    b = machines("b")
    job(b, "r1", url, moto.endpoint)
    b.start(env=stores.S3_ENV)
    rec = wait_for(lambda: [r for r in b.records("r1") if r["event"] == "start"], 60, "B's job to start")[0]
    assert rec["resumed_step"] == newest and rec["resume_ok"], rec
    assert rec["resume"].startswith(str(b.root / "r1-ckpt")), rec
    (restored,) = events(b, "r1", "restore")
    assert restored["step"] == newest and restored["uploaded_by"]
    # nothing of the temp dir is left, and the restored entry is an ordinary valid checkpoint
    assert not [p for p in (b.root / "r1-ckpt").iterdir() if p.name.startswith(".trainsup-restore")]


def test_a_second_machine_waits_for_the_lease_and_names_the_holder(machines, moto, bucket):
    url = f"s3://{bucket}/{{job}}"
    a, c = machines("a"), machines("c")
    for d in (a, c):
        job(d, "l1", url, moto.endpoint, mirror_extra="lease: true\nlease_ttl: 4s")
    a.start(env=stores.S3_ENV)
    a.wait_state("l1", "running", timeout=30)
    c.start(env=stores.S3_ENV)
    st = wait_for(lambda: (s := c.status("l1"))["mirror"]["lease"]["waiting_for"] and s, 30, "C waiting")
    assert str(a.state) in st["mirror"]["lease"]["waiting_for"], st
    assert any("held by" in w for w in st["warnings"]), st["warnings"]
    out = c.cli("status")
    assert "waiting for the lease" in out.stdout and str(a.state) in out.stdout, out.stdout
    # A renews: C keeps waiting past the ttl, and never starts the job
    time.sleep(0)
    wait_for(lambda: len([e for e in a.history("l1") if e["kind"] == "lease"]) >= 1, 10, "A's lease event")
    t_end = time.monotonic() + 8
    while time.monotonic() < t_end:
        assert c.status("l1")["pid"] is None, "C started while A holds the lease"
        time.sleep(0.5)
    # A stops: it hands the lease back, and C takes it at once
    assert a.request("stop", "l1")["ok"]
    wait_for(lambda: c.status("l1")["state"] == "running", 40, "C to take the lease and run")
    taken = [e for e in events(c, "l1", "lease") if e["action"] == "taken"]
    assert taken and taken[-1]["generation"] >= 2


def test_a_job_taken_over_after_a_crash_stops_when_another_machine_took_its_lease(machines, moto, bucket):
    """Found: a daemon restarted after a crash took over its still-running job and let it
    train on while another machine had taken the job's lease meanwhile (the lease expired
    while no daemon renewed it): two trainers of one job. The job taken over stops, saying
    who holds the lease; the other machine trains on."""
    url = f"s3://{bucket}/{{job}}"
    a, c = machines("a"), machines("c")
    for d in (a, c):
        job(d, "l2", url, moto.endpoint, mirror_extra="lease: true\nlease_ttl: 3s")
    a.start(env=stores.S3_ENV)
    pid = a.wait_state("l2", "running", timeout=30)["pid"]
    a.kill()                    # the daemon dies; its job trains on under its shim
    c.start(env=stores.S3_ENV)
    wait_for(lambda: c.status("l2")["state"] == "running", 60, "C to take the expired lease and run")
    assert any(e["action"] == "taken" and e.get("expired_holder") for e in events(c, "l2", "lease"))
    a.start(env=stores.S3_ENV)  # A's daemon comes back and takes its running job over
    lost = wait_for(lambda: [e for e in events(a, "l2", "lease") if e["action"] == "lost"], 30,
                    "A to find its lease taken")
    assert str(c.state) in lost[0]["holder"], lost
    wait_for(lambda: a.status("l2")["state"] == "stopped", 60, "A's job stopped")
    wait_for(lambda: not _alive(pid), 30, "A's job process gone")
    assert any(e["kind"] == "adopted" for e in a.history("l2")), "A did not take its job over first"
    st = c.status("l2")
    assert st["state"] == "running" and st["mirror"]["lease"]["held"], st


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
