"""Pure parts of the cloud notices: response documents -> notices, dedupe, error logging."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from trainsup.daemon.notices import Notice
from trainsup.daemon.notices.cloud import (
    ErrorLog,
    MetadataError,
    aws_instance_action_notice,
    aws_rebalance_notice,
    azure_notices,
    fresh_notices,
    gcp_notices,
    make_provider,
    parse_iso_utc,
    parse_rfc1123,
)

T17 = datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("doc,deadline,word", [
    ({"action": "terminate", "time": "2026-11-25T17:00:00Z"}, T17, "terminate"),
    ({"action": "stop", "time": "2026-11-25T17:00:00.000Z"}, T17, "stop"),
    ({"action": "hibernate", "time": "2026-11-25T17:00:00+00:00"}, T17, "hibernate"),
    ({"action": "terminate", "time": "soon"}, 1000.0 + 120, "terminate"),   # AWS's 2 min
    ({"action": "terminate"}, 1000.0 + 120, "terminate"),
])
def test_aws_instance_action(doc, deadline, word):
    n = aws_instance_action_notice(doc, now=1000.0)
    assert (n.source, n.kind, n.deadline) == ("aws", "preempt", deadline)
    assert word in n.detail


@pytest.mark.parametrize("doc", [[], "terminate", {"time": "2026-11-25T17:00:00Z"}, None])
def test_aws_instance_action_malformed(doc):
    with pytest.raises(MetadataError) as err:
        aws_instance_action_notice(doc, now=0.0)
    assert err.value.kind == "bad JSON"


def test_aws_rebalance_is_a_warning_without_deadline():
    n = aws_rebalance_notice({"noticeTime": "2026-11-25T16:50:00Z"})
    assert (n.kind, n.deadline) == ("warning", None) and "16:50" in n.detail


@pytest.mark.parametrize("values,expected", [
    ({}, []),
    ({"preempted": "FALSE", "maintenance-event": "NONE"}, []),
    ({"preempted": "TRUE", "maintenance-event": "NONE"}, [("preempt", 1030.0)]),
    ({"preempted": "true\n"}, [("preempt", 1030.0)]),
    ({"maintenance-event": "TERMINATE_ON_HOST_MAINTENANCE"}, [("maintenance", 1030.0)]),
    ({"maintenance-event": "MIGRATE_ON_HOST_MAINTENANCE"}, [("warning", None)]),
    ({"maintenance-event": "SOMETHING_NEW"}, [("warning", None)]),
    ({"preempted": "TRUE", "maintenance-event": "TERMINATE_ON_HOST_MAINTENANCE"},
     [("preempt", 1030.0), ("maintenance", 1030.0)]),
])
def test_gcp_values(values, expected):
    assert [(n.kind, n.deadline) for n in gcp_notices(values, now=1000.0)] == expected


def ev(eid, kind, resources=("vm-a",), not_before="Mon, 19 Sep 2016 18:29:47 GMT"):
    return {"EventId": eid, "EventType": kind, "Resources": list(resources),
            "EventStatus": "Scheduled", "NotBefore": not_before}


NB = datetime(2016, 9, 19, 18, 29, 47, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("events,vm,expected", [
    ([], "vm-a", []),
    ([ev("1", "Preempt")], "vm-a", [("preempt", "1", NB)]),
    ([ev("1", "Terminate")], "vm-a", [("preempt", "1", NB)]),
    ([ev("1", "Reboot"), ev("2", "Redeploy")], "vm-a",
     [("maintenance", "1", NB), ("maintenance", "2", NB)]),
    ([ev("1", "Freeze")], "vm-a", [("warning", "1", NB)]),
    ([ev("1", "Preempt", ["vm-b"])], "vm-a", []),                  # a neighbour's event
    ([ev("1", "Preempt", ["vm-b"])], None, [("preempt", "1", NB)]),  # name unknown: count it
    ([ev("1", "Preempt", [])], "vm-a", [("preempt", "1", NB)]),
    ([ev("1", "Preempt", not_before="")], "vm-a", [("preempt", "1", 500.0)]),   # started
    ([ev("1", "UnknownType")], "vm-a", []),
])
def test_azure_events(events, vm, expected):
    doc = {"DocumentIncarnation": 3, "Events": events}
    got = azure_notices(doc, vm, now=500.0)
    assert [(n.kind, n.event_id, n.deadline) for n in got] == expected


@pytest.mark.parametrize("doc", [[], "x", {"Events": "nope"}])
def test_azure_malformed(doc):
    with pytest.raises(MetadataError):
        azure_notices(doc, None, now=0.0)


def N(detail, deadline=None, event_id=None, kind="preempt", source="gcp"):
    return Notice(source=source, kind=kind, deadline=deadline, detail=detail,
                  event_id=event_id)


@pytest.mark.parametrize("seen,current,fresh", [
    ([], [], []),
    ([], [N("a")], ["a"]),
    ([N("a")], [N("a", deadline=99.0)], []),          # GCP's moving deadline: same notice
    ([N("a")], [N("a"), N("b")], ["b"]),
    ([N("a")], [], []),
    ([], [N("a"), N("a")], ["a"]),
    ([N("x", event_id="E1")], [N("y", event_id="E1")], []),   # Azure: identity is the id
])
def test_fresh_notices(seen, current, fresh):
    seen_set = frozenset(n.identity() for n in seen)
    got, new_seen = fresh_notices(seen_set, current)
    assert [n.detail for n in got] == fresh
    assert new_seen == frozenset(n.identity() for n in current)


def test_a_notice_that_goes_away_and_returns_is_new_again():
    seen = frozenset()
    _, seen = fresh_notices(seen, [N("maintenance")])
    _, seen = fresh_notices(seen, [])
    got, _ = fresh_notices(seen, [N("maintenance")])
    assert len(got) == 1


def test_error_log_once_per_kind_until_recovered(caplog):
    logger = logging.getLogger("test.errorlog")
    caplog.set_level(logging.INFO, logger="test.errorlog")
    errors = ErrorLog("aws metadata", retry=5.0, logger=logger)
    for kind in ["timeout", "timeout", "HTTP 500", "timeout", "HTTP 500"]:
        errors.failed(MetadataError(kind, f"GET x: {kind}"))
    errors.recovered()
    errors.recovered()
    errors.failed(MetadataError("timeout", "GET x: timeout"))
    levels = [(r.levelname, r.getMessage().split(":")[1].strip()) for r in caplog.records]
    assert [lv for lv, _ in levels] == ["WARNING", "WARNING", "INFO", "WARNING"]


def test_time_parsers():
    assert parse_iso_utc("2026-11-25T17:00:00Z") == T17
    assert parse_rfc1123("Mon, 19 Sep 2016 18:29:47 GMT") == NB


def test_unknown_provider_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"preemption.provider: unknown provider 'ibm'"):
        make_provider("ibm")
