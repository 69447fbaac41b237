"""The metrics book (fed events on the loop) and what a scrape of its snapshot shows."""

from prometheus_client.parser import text_string_to_metric_families
from trainsup.daemon.metrics import Histogram, MetricsBook, MetricsServer


def _samples(book):
    server = MetricsServer("127.0.0.1:0", book, started_wall=1.0)
    text = server.scrape().decode()      # parsed by prometheus_client's own parser below
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_restarts_by_reason_notices_and_saves_are_counted_from_events():
    book = MetricsBook()
    book.on_event("a", "launch", {"reason": "first"})
    book.on_event("a", "launch", {"reason": "crash"})
    book.on_event("a", "launch", {"reason": "crash", "steps_lost": 40})
    book.on_event("a", "launch", {"reason": "manual"})
    book.on_event("a", "notice", {"source": "aws", "outcome": "saved"})
    book.on_event("a", "checkpoint", {"step": 5, "took_s": 1.5})
    book.on_event("a", "checkpoint", {"step": 6})                 # periodic: not a save duration
    book.publish({})
    s = _samples(book)
    assert s[("trainsup_job_restarts_total", (("job", "a"), ("reason", "crash")))] == 2
    assert s[("trainsup_job_restarts_total", (("job", "a"), ("reason", "manual")))] == 1
    assert ("trainsup_job_restarts_total", (("job", "a"), ("reason", "first"))) not in s
    assert s[("trainsup_notices_total", (("job", "a"), ("outcome", "saved"), ("source", "aws")))] == 1
    assert s[("trainsup_job_save_duration_seconds_count", (("job", "a"),))] == 1
    assert s[("trainsup_job_save_duration_seconds_bucket", (("job", "a"), ("le", "2.0")))] == 1
    assert s[("trainsup_job_save_duration_seconds_bucket", (("job", "a"), ("le", "1.0")))] == 0
    assert s[("trainsup_job_steps_lost_sum", (("job", "a"),))] == 40
    from trainsup import __version__
    assert [v for (name, labels), v in s.items()
            if name == "trainsup_build_info" and ("version", __version__) in labels] == [1]


def test_invalid_jobs_are_exported_as_state_invalid():
    book = MetricsBook()
    book.publish({}, invalid=["broken"])
    s = _samples(book)
    assert s[("trainsup_job_state", (("job", "broken"), ("state", "invalid")))] == 1
    assert ("trainsup_job_state", (("job", "broken"), ("state", "running"))) not in s


def test_histogram_buckets_are_cumulative():
    h = Histogram((1, 10)).observe(0.5).observe(5).observe(50)
    assert h.cumulative() == [("1.0", 1), ("10.0", 2), ("+Inf", 3)]
    assert h.total == 55.5


def test_label_values_are_escaped_and_the_text_parses():
    book = MetricsBook()
    book.on_event("j", "notice", {"source": 'odd "src"\\x', "outcome": "line\nbreak"})
    book.publish({})
    s = _samples(book)
    assert s[("trainsup_notices_total", (("job", "j"), ("outcome", "line\nbreak"), ("source", 'odd "src"\\x')))] == 1


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
    parts = {p: s[("trainsup_job_goodput_seconds", (("job", "g"), ("part", p)))] for p in ALL}
    assert parts["productive"] == 27 and parts["resume"] == 2 and parts["restart"] == 1   # up to the scrape
    assert sum(parts.values()) == 30                                                       # = since the first launch
    assert s[("trainsup_job_goodput_ratio", (("job", "g"),))] == 27 / 30
    assert not [k for k in s if k[1] and ("job", "never") in k[1] and "goodput" in k[0]]  # never launched: none
