"""Fuzzed job YAML: config.load_job_file never raises and every error is one FILE:LINE line;
a live daemon reloading such files never dies and keeps answering."""

from __future__ import annotations

import re
import time

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainsup import config
from trainsup.spec import InvalidJob, JobSpec

KEYS = ["name", "command", "workdir", "env", "user", "group", "autostart", "stop_timeout", "checkpoint",
        "restart", "emergency_save", "memory", "hang", "schedule", "dir", "format", "keep_last", "quota",
        "policy", "backoff", "initial", "max", "factor", "grace", "limit", "timeout", "checkpoint_every",
        "preempt_cron", "resume_args", "unknown_key", "metric", "mode", "signal"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["5m", "1h30m", "-1s", "10GiB", "0x10", "SIGUSR1",
                                                           "* * * * *", "nobody", "~", ".inf", "1e400"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()), inner, max_size=5)),
    max_leaves=25)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=10)

# Hand-made shapes the generator does not reach: aliases (bombs), tags, duplicates, nesting.
SPECIALS = [
    "a: &a [1, 2]\nb: *a\n",
    "a: &a ['x','x']\nb: &b [*a,*a]\nc: &c [*b,*b]\nname: bomb\ncommand: [*c]\n",
    "name: x\nname: y\ncommand: [a]\n",
    "name: !!python/object/apply:os.system ['true']\ncommand: [a]\n",
    "!!binary aGVsbG8=\n",
    "name: x\ncommand: [a]\n<<: {stop_timeout: 1s}\n",
    "[" * 5000 + "]" * 5000,
    "{" * 5000,
    "name: x\ncommand: " + "[" * 200 + "a" + "]" * 200 + "\n",
    "\x00\xff\xfe",
    "---\nname: a\n---\nname: b\n",
    "name: x\ncommand: [a]\ncheckpoint: {dir: /etc, keep_last: 99999999999999999999999}\n",
]
ERROR_LINE = re.compile(r"^.+:\d+: .+: .+$")


def _check(path) -> None:
    out = config.load_job_file(path, is_root=True)
    assert isinstance(out, (JobSpec, InvalidJob))
    if isinstance(out, InvalidJob):
        assert out.errors
        for line in out.errors:
            assert "\n" not in line and ERROR_LINE.match(line), repr(line)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, raw=st.booleans(), noise=st.text(max_size=30))
def test_load_job_file_never_raises(tmp_path, doc, raw, noise):
    p = tmp_path / "job.yaml"
    text = yaml.safe_dump(doc, allow_unicode=True) if not raw else noise + yaml.safe_dump(doc)
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(p)


def test_special_shapes_never_raise(tmp_path):
    for i, text in enumerate(SPECIALS):
        p = tmp_path / f"s{i}.yaml"
        p.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        _check(p)
    big = tmp_path / "big.yaml"
    big.write_text("name: big\ncommand: [a]\n#" + "x" * (2 << 20) + "\n")
    _check(big)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, slot=st.integers(0, 4))
def test_live_daemon_survives_reloading_fuzzed_files(daemon, doc, slot):
    # One daemon for every example (the fixture is shared across them): it must outlive all.
    if daemon.proc is None:
        daemon.fakejob("anchor", "--catch-usr1", ckpt=False)
        daemon.start()
        daemon.wait_state("anchor", "running")
        for i, text in enumerate(SPECIALS):
            (daemon.jobs / f"special{i}.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    (daemon.jobs / f"fuzz{slot}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8", errors="surrogatepass")
    r = daemon.request("reload", timeout=30)
    assert r["ok"], r
    t0 = time.monotonic()
    assert daemon.status("anchor")["state"] == "running"
    assert time.monotonic() - t0 < 1.0
    assert daemon.proc.poll() is None
    r = daemon.request("status")
    assert r["ok"] and any(j["state"] == "invalid" for j in r["result"]["jobs"])
