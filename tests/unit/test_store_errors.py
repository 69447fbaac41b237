"""What a store's error means (objectstore.classify), read from the error's own words.

Found in CI: tests/unit/test_mirror_backoff.py failed about one run in six. Its store's
prefix is random (memory://backoff-<uuid4 hex>/job), and a listing of a prefix with nothing
in it yet raises FileNotFoundError(path). When the hex held the digits 503 ("...335037"),
the path was read as an HTTP 503: a listing that was merely empty became a store outage,
the mirror backed off, and the emergency upload missed its deadline. Numeric statuses
count only standing alone, never inside a path, a word or a number."""

from __future__ import annotations

import uuid

import pytest
from trainsup.checkpoint.objectstore import Store, classify


@pytest.mark.parametrize("path", [
    "/backoff-75c14ba236d84b9398f30c0218335037/job/commits",    # the prefix of the CI failure
    "/bucket/run-503/job/commits", "/bucket/exp403/commits", "/b/ckpt_500.pt", "/b/v1.429/x",
    "/b/412/commits", "/b/507-runs/job",
])
def test_a_path_holding_a_status_number_is_not_that_status(path):
    assert classify(FileNotFoundError(path), "listing commits").kind == "not-found"


@pytest.mark.parametrize("text, kind", [
    ("503 Slow Down", "transient"),
    ("Server returned 502 Bad Gateway", "transient"),
    ("An error occurred (403) when calling the ListObjectsV2 operation: Forbidden", "denied"),
    ("{'ResponseMetadata': {'HTTPStatusCode': 429}}", "transient"),
    ("507 Insufficient Storage", "full"),
    ("status=500", "transient"),
])
def test_a_status_standing_alone_is_read(text, kind):
    assert classify(RuntimeError(text), "listing commits").kind == kind


def test_listing_an_empty_prefix_whose_name_holds_503_is_empty_not_an_outage():
    # the way it was found: a real (in-memory) fsspec store, a prefix with "503" in it
    store = Store(f"memory://backoff-{uuid.uuid4().hex[:8]}335037/job")
    assert store.listdir("commits") == []
