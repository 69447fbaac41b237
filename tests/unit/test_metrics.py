"""The metrics book (fed events on the loop) and what a scrape of its snapshot shows, by
Prometheus' conventions (issue 24: `name` not `job`, counters from 0, every state 0/1,
bounded label values, process_* self-metrics), checked by `promtool check metrics`."""

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from trainsup.daemon.metrics import (
    RESTART_REASONS,
    STATES,
    Histogram,
    JobSample,
    MetricsBook,
    MetricsServer,
)

PROMTOOL = shutil.which("promtool")


def _text(book) -> str:
    return MetricsServer("127.0.0.1:0", book, started_wall=1.0).scrape().decode()


def _samples(book):
    text = _text(book)      # parsed by prometheus_client's own parser below
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _book(*samples: JobSample, invalid=()) -> MetricsBook:
    book = MetricsBook()
    book.publish_samples({s.name: s for s in samples}, invalid)
    return book


def test_counters_start_at_zero_for_every_job_then_count_events():
    # A counter that appears at 1 makes increase() read 0 after the first real crash.
    book = _book(JobSample("a", "running", has_checkpoints=True), JobSample("b", "running"))
    s = _samples(book)
    for job in ("a", "b"):
        for reason in RESTART_REASONS:
            assert s[("trainsup_job_restarts_total", (("name", job), ("reason", reason)))] == 0
    assert s[("trainsup_job_saves_total", (("name", "a"), ("outcome", "failed")))] == 0
    assert s[("trainsup_job_save_duration_seconds_count", (("name", "a"),))] == 0
    assert s[("trainsup_job_steps_lost_count", (("name", "b"),))] == 0

    for reason in ("first", "crash", "crash", "manual"):
        book.on_event("a", "launch", {"reason": reason, **({"steps_lost": 40} if reason == "manual" else {})})
    book.on_event("a", "notice", {"source": "preempt", "outcome": "no save within 5s", "stop_s": 6.0})
    book.on_event("a", "notice", {"source": "stop", "outcome": "saved", "step": 9, "stop_s": 1.0})
    book.on_event("a", "checkpoint", {"step": 5, "took_s": 1.5})
    book.on_event("a", "checkpoint", {"step": 6})                 # periodic: not a save duration
    book.publish_samples({"a": JobSample("a", "running", has_checkpoints=True)})
    s = _samples(book)
    assert s[("trainsup_job_restarts_total", (("name", "a"), ("reason", "crash")))] == 2
    assert s[("trainsup_job_restarts_total", (("name", "a"), ("reason", "manual")))] == 1
    assert not [k for k in s if k[0] == "trainsup_job_restarts_total" and ("reason", "first") in k[1]]
    assert s[("trainsup_job_saves_total", (("name", "a"), ("outcome", "failed")))] == 1
    assert s[("trainsup_job_saves_total", (("name", "a"), ("outcome", "saved")))] == 1
    assert s[("trainsup_job_save_duration_seconds_count", (("name", "a"),))] == 1
    assert s[("trainsup_job_save_duration_seconds_bucket", (("le", "2.0"), ("name", "a")))] == 1
    assert s[("trainsup_job_save_duration_seconds_bucket", (("le", "1.0"), ("name", "a")))] == 0
    assert s[("trainsup_job_steps_lost_sum", (("name", "a"),))] == 40
    from trainsup import __version__
    assert [v for (name, labels), v in s.items()
            if name == "trainsup_build_info" and ("version", __version__) in labels] == [1]


def test_the_job_label_is_name_never_job():
    # `job` is the scrape target's label in Prometheus: ours collided (honor_labels needed).
    s = _samples(_book(JobSample("a", "running")))
    assert not [k for k in s if "job" in dict(k[1])]
    assert s[("trainsup_job_state", (("name", "a"), ("state", "running")))] == 1


def test_every_state_is_exported_zero_or_one():
    s = _samples(_book(JobSample("a", "backoff"), invalid=["broken"]))
    states = {dict(k[1])["state"]: v for k, v in s.items()
              if k[0] == "trainsup_job_state" and ("name", "a") in k[1]}
    assert states == {st: (1 if st == "backoff" else 0) for st in STATES}
    assert s[("trainsup_job_state", (("name", "broken"), ("state", "invalid")))] == 1
    assert s[("trainsup_job_state", (("name", "broken"), ("state", "running")))] == 0
    assert s[("trainsup_invalid_job_files", ())] == 1


def test_exit_code_carries_no_free_text_label():
    # {reason="exit 0"} made one series per distinct text (series churn).
    s = _samples(_book(JobSample("a", "backoff", exit_code=137, exit_reason="signal", exit_at=5.0)))
    assert s[("trainsup_job_last_exit_code", (("name", "a"),))] == 137
    assert s[("trainsup_job_last_exit_reason", (("name", "a"), ("reason", "signal")))] == 1
    assert s[("trainsup_job_last_exit_reason", (("name", "a"), ("reason", "exit")))] == 0
    assert s[("trainsup_job_last_exit_reason", (("name", "a"), ("reason", "oom")))] == 0


def test_per_job_memory_uptime_start_time_and_checkpoint_age():
    s = _samples(_book(JobSample("a", "running", started_at=1000.0, rss=5 << 20, mem_limit=8 << 30,
                                 has_checkpoints=True, step=187, ckpt_mtime=2000.0, ckpt_bytes=10,
                                 quota=100, valid=1)))
    assert s[("trainsup_job_start_time_seconds", (("name", "a"),))] == 1000.0
    assert s[("trainsup_job_uptime_seconds", (("name", "a"),))] > 0
    assert s[("trainsup_job_memory_rss_bytes", (("name", "a"),))] == 5 << 20
    assert s[("trainsup_job_memory_limit_bytes", (("name", "a"),))] == 8 << 30
    assert s[("trainsup_job_checkpoint_step", (("name", "a"),))] == 187
    assert s[("trainsup_job_checkpoint_timestamp_seconds", (("name", "a"),))] == 2000.0
    assert s[("trainsup_job_checkpoint_age_seconds", (("name", "a"),))] > 0
    assert s[("trainsup_job_over_quota", (("name", "a"),))] == 0


def test_process_self_metrics_are_exported():
    s = _samples(_book())
    assert s[("process_resident_memory_bytes", ())] > 0
    assert s[("process_open_fds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in s and ("process_start_time_seconds", ()) in s


def test_histogram_buckets_are_cumulative():
    h = Histogram((1, 10)).observe(0.5).observe(5).observe(50)
    assert h.cumulative() == [("1.0", 1), ("10.0", 2), ("+Inf", 3)]
    assert h.total == 55.5


def test_label_values_are_escaped_and_the_text_parses():
    book = _book(JobSample('odd "job"\\x', "running"))
    book.on_event("-", "notice", {"source": "line\nbreak\x1b[31m"})
    book.publish_samples({'odd "job"\\x': JobSample('odd "job"\\x', "running")})
    s = _samples(book)
    assert s[("trainsup_job_state", (("name", 'odd "job"\\x'), ("state", "running")))] == 1
    assert s[("trainsup_notices_total", (("source", "line_break_[31m"),))] == 1


def test_a_step_beyond_what_prometheus_holds_does_not_break_the_scrape():
    s = _samples(_book(JobSample("a", "running", has_checkpoints=True, step=10 ** 400, ckpt_mtime=1.0)))
    assert s[("trainsup_job_checkpoint_step", (("name", "a"),))] == 2.0 ** 53


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is absent: apt-get install -y prometheus (.ci/run installs it)")
def test_promtool_check_metrics_accepts_a_scrape(tmp_path):
    book = _book(JobSample("a", "running", attempt=3, started_at=1000.0, rss=1 << 20, has_checkpoints=True,
                           step=5, ckpt_mtime=2.0, ckpt_bytes=10, quota=100, valid=2, invalid=1,
                           exit_code=1, exit_reason="exit", exit_at=3.0),
                 JobSample("b", "failed", exit_code=137, exit_reason="signal", exit_at=4.0), invalid=["c"])
    book.on_event("a", "launch", {"reason": "crash", "steps_lost": 3})
    book.on_event("-", "notice", {"source": "aws"})
    book.publish_samples({"a": book.snapshot.jobs[0], "b": book.snapshot.jobs[1]}, ["c"])
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=_text(book), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_goodput_gauges_are_advanced_to_the_scrape_and_sum_to_the_wall_time():
    from trainsup.daemon.goodput import ALL, goodput
    from trainsup.daemon.metrics import JobSample, Snapshot, render
    events = [{"at": 100.0, "kind": "state", "from": "pending", "to": "starting"},
              {"at": 101.0, "kind": "launch", "attempt": 1, "resume_from": None},
              {"at": 101.0, "kind": "state", "from": "starting", "to": "running"},
              {"at": 103.0, "kind": "first-step", "attempt": 1, "step": 1}]
    sampled = goodput(events, 110.0, "running")         # what the loop copied at its last publish
    snap = Snapshot(jobs=(JobSample(name="g", state="running", goodput=sampled),
                          JobSample(name="never", state="stopped")))
    text = render(snap, started_wall=1.0, now=130.0).decode()
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value
         for fam in text_string_to_metric_families(text) for x in fam.samples}
    parts = {p: s[("trainsup_job_goodput_seconds", (("name", "g"), ("part", p)))] for p in ALL}
    assert parts["productive"] == 27 and parts["resume"] == 2 and parts["restart"] == 1   # up to the scrape
    assert sum(parts.values()) == 30                                                       # = since the first launch
    assert s[("trainsup_job_goodput_ratio", (("name", "g"),))] == 27 / 30
    assert not [k for k in s if k[1] and ("name", "never") in k[1] and "goodput" in k[0]]  # never launched: none
