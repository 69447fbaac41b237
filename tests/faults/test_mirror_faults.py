"""The mirror under the store's and the network's faults (a loopback proxy in front of moto,
tests/helpers/stores.py), and bad settings at load. What a user checks each time: nothing
lost (every checkpoint stays on local disk until the store has it), nothing half-restored
offered for resume, the job trains on, and status says what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, DaemonProc, _kill_recorded, wait_for

sys.path.insert(0, str(REPO / "tests" / "helpers"))
sys.path.insert(0, str(REPO / "tests" / "integration"))
import stores  # noqa: E402
from test_mirror_s3 import events, job  # noqa: E402

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
    name = f"faults-{_n[0]}-{int(time.time())}"
    stores.make_bucket(moto.endpoint, name)
    return name


@pytest.fixture
def proxy(moto):
    p = stores.FaultProxy(moto.port)
    yield p
    p.close()


@pytest.fixture
def machine(tmp_path):
    made = []

    def make(label="a"):
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


def _saves(d, name):
    return [r for r in d.records(name) if r["event"] == "saved"]


@pytest.mark.parametrize("fault", ["throttle", "5xx", "full", "stall"])
def test_store_failing_keeps_training_and_every_checkpoint_then_catches_up(proxy, machine, moto, bucket, fault):
    """Throttling, 5xx, a full store (MinIO's 507) and a stalled server: the job trains on,
    status warns with the store's error, rotation keeps the not-uploaded checkpoints (keep_last
    1 would otherwise delete them), and once the store is back everything newest is uploaded."""
    proxy.mode = fault
    d = machine()
    job(d, "f", f"s3://{bucket}/{{job}}", proxy.endpoint, flags="--catch-usr1 --every 0.3",
        ck_extra="keep_last: 1", mirror_extra="keep_last: 3")
    d.start(env=stores.S3_ENV)
    # a fresh machine tries the store a few times before its first launch
    wait_for(lambda: len(_saves(d, "f")) >= 4, 120, "four saves while the store fails")
    st = wait_for(lambda: (s := d.status("f"))["mirror"]["error"] and s, 60, "the store error in status")
    assert st["state"] == "running" and st["mirror"]["pending"] >= 1, st
    assert any(w.startswith("mirror: store failing") for w in st["warnings"]), st["warnings"]
    if fault == "full":
        assert "store full" in st["mirror"]["error"], st["mirror"]
    # nothing lost: the not-uploaded checkpoints stay (keep_last: 1 alone would leave one)
    saved = {r["step"] for r in _saves(d, "f")}

    def valid() -> list[dict]:
        return [c for c in d.request("checkpoints", "f")["result"] if c["valid"]]
    # every save is still on disk (keep_last: 1 alone would have left one): the daemon's
    # index lists each (a save the job just made may take a moment to be indexed)
    # and a rotation pass has kept what keep_last would delete because it is not uploaded
    # (passes run behind the saves on a loaded machine: the test waits for one)
    def all_listed() -> list[dict] | None:
        v = valid()
        return v if saved <= {c["step"] for c in v} and any(c["kept"] == "not-uploaded" for c in v) else None
    wait_for(all_listed, 60, f"saves {sorted(saved)} all listed, some kept as not-uploaded")
    assert events(d, "f", "upload-failed"), "the first failure is in history"
    proxy.mode = None                               # the store recovers
    newest = max(r["step"] for r in _saves(d, "f"))
    wait_for(lambda: (d.status("f")["mirror"]["uploaded_step"] or 0) >= newest, 120, "uploads to catch up")
    assert d.status("f")["mirror"]["error"] is None
    assert events(d, "f", "mirror-recovered")


def test_connection_reset_mid_upload_retries_and_the_store_gets_a_whole_checkpoint(proxy, machine, moto, bucket):
    """A 12 MiB checkpoint; the connection is reset after 4 MiB went up. The retry uploads
    it whole (the commit object lists each file's hash; the store has those bytes)."""
    proxy.mode, proxy.reset_after, proxy.resets = "reset", 4 << 20, 1
    d = machine()
    ck = d.root / "big-ckpt"
    from trainsup.checkpoint import write_checkpoint
    payload = os.urandom(12 << 20)
    write_checkpoint(ck, 5, {"state.bin": payload, "state.json": b'{"step": 5}'})
    job(d, "big", f"s3://{bucket}/{{job}}", proxy.endpoint, flags="--catch-usr1")
    (d.jobs / "big.yaml").write_text((d.jobs / "big.yaml").read_text().replace(str(d.root / "big-ckpt"), str(ck)))
    d.start(env=stores.S3_ENV)
    up = wait_for(lambda: [e for e in events(d, "big", "upload") if e["step"] == 5], 120, "the upload after the reset")
    assert proxy.resets == 0, "the proxy never reset a connection"
    import s3fs
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto.endpoint})
    got = fs.cat(f"{bucket}/big/data/{up[0]['key']}/step-00000005/state.bin")
    assert got == payload


def test_slow_link_1mb_s_uploads_in_the_background_and_status_shows_bytes_pending(proxy, machine, moto, bucket):
    proxy.mode, proxy.rate = "rate", 1 << 20
    d = machine()
    ck = d.root / "slow-ckpt"
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(ck, 3, {"state.bin": os.urandom(3 << 20), "state.json": b'{"step": 3}'})
    job(d, "slow", f"s3://{bucket}/{{job}}", proxy.endpoint, flags="--catch-usr1")
    d.start(env=stores.S3_ENV)
    t0 = time.monotonic()
    # the job runs while its checkpoint is still going up
    wait_for(lambda: (s := d.status("slow"))["state"] == "running" and s["mirror"]["bytes_pending"] > 0
             and s["mirror"]["uploaded_step"] is None, 30, "the job running with bytes pending")
    wait_for(lambda: d.status("slow")["mirror"]["uploaded_step"] == 3, 60, "the upload over the slow link")
    took = time.monotonic() - t0
    assert took >= 1.5, f"3 MiB over a 1 MiB/s link took {took:.1f}s"


def test_wrong_credentials_and_missing_bucket_are_one_line_at_load(tmp_path, moto, bucket, proxy):
    proxy.mode = "denied"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name, url, ep in (("creds", f"s3://{bucket}/{{job}}", proxy.endpoint),
                          ("nobucket", "s3://no-such-bucket-here/{job}", moto.endpoint)):
        (jobs / f"{name}.yaml").write_text(
            f"name: {name}\ncommand: [sleep, '1']\ncheckpoint:\n  dir: {tmp_path / name}\n"
            f"  mirror:\n    url: {url}\n    options: {{endpoint_url: \"{ep}\"}}\n")
    env = {**os.environ, **stores.S3_ENV, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "trainsup", "validate", *sorted(map(str, jobs.iterdir()))],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines() + r.stdout.strip().splitlines()
    lines = [line for line in lines if ".yaml:" in line]
    assert len(lines) == 2 and "Traceback" not in r.stderr, r.stderr
    assert any("creds.yaml:6: checkpoint.mirror.url: " in line and "credentials refused" in line for line in lines), lines
    assert any("nobucket.yaml:6: checkpoint.mirror.url: " in line and "bucket does not exist" in line
               for line in lines), lines


def test_credentials_in_the_job_file_are_refused(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text("name: j\ncommand: [sleep, '1']\ncheckpoint:\n  dir: ck\n  mirror:\n    url: memory://b/{job}\n"
                 "    options: {key: AKIA, secret: s3cr3t}\n")
    from trainsup import config
    job = config.load_job_file(f, is_root=False)
    assert [e.split(": ", 2)[1] for e in job.errors] == ["checkpoint.mirror.options.key",
                                                         "checkpoint.mirror.options.secret"], job.errors


def test_local_disk_full_during_restore_offers_nothing_half_restored(machine, moto, bucket, tmp_path):
    """The store has a 6 MiB checkpoint; the fresh machine's checkpoint dir is a 4 MiB tmpfs.
    The restore fails with one line, no temp dir and no partial entry stays, and the job
    starts anyway (from nothing: there is nothing valid locally)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    a = machine("a")
    src = a.root / "d-ckpt"
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(src, 9, {"state.bin": os.urandom(6 << 20), "state.json": b'{"step": 9}'})
    job(a, "d", f"s3://{bucket}/{{job}}", moto.endpoint, flags="--catch-usr1")
    a.start(env=stores.S3_ENV)
    wait_for(lambda: a.status("d")["mirror"]["uploaded_step"] == 9, 60, "A's upload")
    a.request("stop", "d", no_save=True)     # step 9 (6 MiB) stays the store's newest
    a.wait_state("d", "stopped", timeout=30)
    a.terminate()
    b = machine("b")
    small = b.root / "d-ckpt"
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        job(b, "d", f"s3://{bucket}/{{job}}", moto.endpoint, flags="--catch-usr1")
        b.start(env=stores.S3_ENV)
        rec = wait_for(lambda: [r for r in b.records("d") if r["event"] == "start"], 60, "B's job to start")[0]
        assert rec["resume"] == "", rec              # nothing half-restored was offered
        (failed,) = events(b, "d", "restore-failed")
        assert "local disk full" in failed["error"], failed
        assert not [p for p in small.iterdir() if p.name.startswith(".trainsup-restore")]
        assert not (small / "step-00000009").exists()
        assert b.status("d")["state"] == "running"
    finally:
        b.terminate()
        _kill_recorded(b.root)
        subprocess.run(["umount", "-l", str(small)], check=False)


def _with_grace(d, name: str, grace: str) -> None:
    path = d.jobs / f"{name}.yaml"
    path.write_text(path.read_text().replace("checkpoint:\n", f"emergency_save: {{grace: {grace}}}\ncheckpoint:\n", 1))


def _s3fs(endpoint: str):
    import s3fs
    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


def test_max_rate_limits_the_upload_and_the_job_trains_meanwhile(machine, moto, bucket):
    """mirror.max_rate: 1MiB: a 4 MiB checkpoint takes about 4 s to go up (not the
    fraction of a second loopback takes), the job runs and status shows the bytes pending."""
    d = machine()
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(d.root / "rate-ckpt", 3, {"state.bin": os.urandom(4 << 20), "state.json": b'{"step": 3}'})
    job(d, "rate", f"s3://{bucket}/{{job}}", moto.endpoint, flags="--catch-usr1", mirror_extra="max_rate: 1MiB")
    d.start(env=stores.S3_ENV)
    st = wait_for(lambda: (s := d.status("rate"))["state"] == "running" and s["mirror"]["bytes_pending"] > 0
                  and s["mirror"]["uploaded_step"] is None and s, 30, "the job running while its upload goes")
    assert 0 < st["mirror"]["bytes_pending"] <= (4 << 20) + 4096, st["mirror"]
    (up,) = wait_for(lambda: events(d, "rate", "upload"), 60, "the rate-limited upload")
    assert up["step"] == 3 and up["took_s"] >= 3.0, up       # 4 MiB at 1 MiB/s, one chunk of burst


def test_emergency_save_goes_to_the_store_ahead_of_a_slow_upload(machine, moto, bucket):
    """A 6 MiB checkpoint is going up at 1 MiB/s when a preemption with a 20 s deadline
    comes: the emergency save is uploaded first (ahead of the queue, at full speed) and the
    preemption's outcome says it reached the store, and how long after the notice."""
    d = machine()
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(d.root / "e-ckpt", 3, {"state.bin": os.urandom(6 << 20), "state.json": b'{"step": 3}'})
    job(d, "e", f"s3://{bucket}/{{job}}", moto.endpoint, flags="--catch-usr1", mirror_extra="max_rate: 1MiB")
    d.start(env=stores.S3_ENV)
    d.wait_ready("e")
    wait_for(lambda: (s := d.status("e"))["mirror"]["bytes_pending"] > 0 and s["mirror"]["uploaded_step"] is None,
             30, "the slow upload under way")
    out = d.request("preempt", "e", grace=20)["result"]
    assert out["outcome"] == "saved" and out["store"]["uploaded"] is True, (out.get("store"), out, d.history("e")[-12:])
    assert out["store"]["upload_s"] < 4.0, out          # the 6 MiB one alone needs 6 s
    ups = events(d, "e", "upload")
    assert ups[0]["step"] == out["step"] and ups[0].get("emergency"), ups
    assert d.status("e")["state"] == "preempted"


def test_emergency_upload_that_misses_the_deadline_stops_on_time_and_keeps_the_local_copy(
        proxy, machine, moto, bucket):
    """The store stalls (accepts, never answers). A preemption with a 4 s deadline: the job
    saves and stops on time; the outcome says the save is not in the store, and the local
    copy is there, valid, for a resume on this machine."""
    proxy.mode = "stall"
    d = machine()
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(d.root / "s-ckpt", 3, {"state.json": b'{"step": 3}'})
    job(d, "s", f"s3://{bucket}/{{job}}", proxy.endpoint, flags="--catch-usr1")
    d.start(env=stores.S3_ENV)
    d.wait_ready("s", timeout=60)           # a machine with a valid checkpoint waits <= 10 s for the store
    t0 = time.monotonic()
    out = d.request("preempt", "s", grace=4)["result"]
    took = time.monotonic() - t0
    assert out["outcome"] == "saved" and out["store"]["uploaded"] is False, out
    assert "deadline" in out["store"]["why"] and "local copy stays" in out["store"]["why"], out
    assert took < 4 + 3, f"the preemption took {took:.1f}s with a 4 s deadline"
    saved = [c for c in d.request("checkpoints", "s")["result"] if c["step"] == out["step"]]
    assert saved and saved[0]["valid"] and saved[0]["mirrored"] != "yes", saved


def test_daemon_killed_mid_upload_resumes_without_sending_the_finished_files_again(proxy, machine, moto, bucket):
    """Two 1 MiB and two 4 MiB files go up over a 1 MiB/s link; the daemon is SIGKILLed once
    two are in the store. The restarted daemon sends only the rest (resumed_bytes in the
    upload's history), and the store's copy is whole: every file as on disk, the commit
    object last. (Four files of one size went up side by side and ended within moments of
    each other: the upload was sometimes whole before the kill, and nothing was tested.)"""
    proxy.mode, proxy.rate = "rate", 1 << 20
    d = machine()
    from trainsup.checkpoint import write_checkpoint
    files = {f"part{i}.bin": os.urandom((1 if i < 2 else 4) << 20) for i in range(4)}
    write_checkpoint(d.root / "k-ckpt", 3, {**files, "state.json": b'{"step": 3}'})
    job(d, "k", f"s3://{bucket}/{{job}}", proxy.endpoint, flags="--catch-usr1")
    d.start(env=stores.S3_ENV)
    key = "000000000003-step-00000003"
    journal = d.state / "mirror" / "k" / f"{key}.json"

    def sent() -> dict:
        try:
            import json
            return json.loads(journal.read_text())
        except (OSError, ValueError):
            return {}
    wait_for(lambda: sum(1 for r in sent() if r.endswith(".bin")) >= 2, 60, "two large files in the store")
    d.proc.kill()
    d.proc.wait()
    fs = _s3fs(moto.endpoint)
    before = sent()
    assert len(before) < 6, "the upload finished before the kill: nothing tested"
    assert not fs.exists(f"{bucket}/k/commits/{key}.json"), "committed before all its files were up"
    proxy.mode = None
    d.start(env=stores.S3_ENV)
    (up,) = wait_for(lambda: events(d, "k", "upload"), 60, "the resumed upload")
    # the files the journal listed at the kill (each file's identity holds its size) are not sent again
    assert up["resumed_bytes"] >= sum(e["id"][2] for e in before.values()) >= 2 << 20, (up, before)
    for name, data in files.items():
        assert fs.cat(f"{bucket}/k/data/{key}/step-00000003/{name}") == data, name
    assert fs.exists(f"{bucket}/k/commits/{key}.json")
    assert not journal.exists()
