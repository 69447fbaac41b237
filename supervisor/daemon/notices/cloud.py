"""Cloud preemption notices: AWS IMDSv2, GCP metadata, Azure Scheduled Events (SPEC section 7).

Each provider is a small class whose `poll_once()` reads the metadata service once and
returns the notices pending right now; `CloudPoller` runs it on a daemon thread, reports
each notice once, and never dies of a metadata error (they are logged once per kind of
error and retried on the next interval).

Only urllib, with proxies switched off: a metadata address sent through an
`http_proxy` from the environment would ask the proxy's cloud, not ours.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from . import Notice

log = logging.getLogger("trainsup.notices.cloud")

PROVIDERS = ("aws", "gcp", "azure")

# GCP documents "about 30 seconds" between the preemption notice and the stop.
GCP_NOTICE_LEAD = 30.0
# AWS gives two minutes; used only when instance-action's `time` cannot be read.
AWS_NOTICE_LEAD = 120.0

_OPENER = None     # urllib.request (with ssl, email, http): imported at the first request, not by every daemon


class MetadataError(Exception):
    """A metadata request failed. `kind` groups failures so each is logged once."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _request(method: str, url: str, headers: dict, *, timeout: float,
             data: bytes | None = None) -> tuple[int, bytes, dict]:
    """One HTTP exchange. Any status comes back; only no answer at all raises."""
    global _OPENER
    import http.client
    import urllib.error
    import urllib.request
    if _OPENER is None:
        _OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        try:
            body = e.read()
        except (OSError, http.client.HTTPException):
            body = b""
        return e.code, body, dict(e.headers or {})
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise MetadataError("timeout", f"{method} {url}: no answer within {timeout:g}s") from e
        if isinstance(reason, ConnectionRefusedError):
            raise MetadataError("connection refused", f"{method} {url}: connection refused") from e
        raise MetadataError("unreachable", f"{method} {url}: {reason}") from e
    except TimeoutError as e:
        raise MetadataError("timeout", f"{method} {url}: no answer within {timeout:g}s") from e
    except (http.client.HTTPException, OSError) as e:
        raise MetadataError("broken response", f"{method} {url}: {e or type(e).__name__}") from e


def _status_error(method: str, url: str, status: int) -> MetadataError:
    return MetadataError(f"HTTP {status}", f"{method} {url}: HTTP {status}")


def _json(url: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise MetadataError("bad JSON", f"GET {url}: not JSON: {body[:80]!r}") from e


def parse_iso_utc(text: str) -> float:
    """'2026-11-25T17:00:00Z' -> epoch seconds. Python 3.10's fromisoformat rejects 'Z'."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_rfc1123(text: str) -> float:
    """'Mon, 19 Sep 2016 18:29:47 GMT' -> epoch seconds."""
    import email.utils
    dt = email.utils.parsedate_to_datetime(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


# --- AWS -------------------------------------------------------------------------------

def aws_instance_action_notice(doc: Any, now: float) -> Notice:
    """instance-action JSON -> preempt notice. terminate, stop and hibernate all take the
    machine away from the job, so they are one kind."""
    if not isinstance(doc, dict) or "action" not in doc:
        raise MetadataError("bad JSON", f"spot/instance-action: no 'action' in {doc!r:.80}")
    action = str(doc["action"])
    when = doc.get("time")
    try:
        deadline = parse_iso_utc(str(when))
    except (TypeError, ValueError):
        deadline = now + AWS_NOTICE_LEAD
    return Notice(source="aws", kind="preempt", deadline=deadline,
                  detail=f"spot instance-action {action} at {when}")


def aws_rebalance_notice(doc: Any) -> Notice:
    when = doc.get("noticeTime") if isinstance(doc, dict) else None
    return Notice(source="aws", kind="warning", deadline=None,
                  detail=f"rebalance recommendation at {when}")


class AwsImds:
    """AWS instance metadata, IMDSv2 (session token required)."""

    source = "aws"
    DEFAULT_BASE = "http://169.254.169.254"
    TOKEN_TTL = 21600
    ACTION = "/latest/meta-data/spot/instance-action"
    REBALANCE = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self, base: str | None = None, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.base = (base or self.DEFAULT_BASE).rstrip("/")
        self.timeout = timeout
        self._clock = clock
        self._token: str | None = None
        self._token_until = 0.0          # monotonic

    def _fetch_token(self) -> str:
        url = self.base + "/latest/api/token"
        status, body, _ = _request(
            "PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL)},
            timeout=self.timeout, data=b"")
        if status != 200:
            raise _status_error("PUT", url, status)
        self._token = body.decode("ascii", "replace").strip()
        # Renew a minute early so a token never expires between check and use.
        self._token_until = time.monotonic() + self.TOKEN_TTL - 60
        return self._token

    def _get(self, path: str) -> tuple[int, bytes]:
        url = self.base + path
        token = self._token if (self._token and time.monotonic() < self._token_until) \
            else self._fetch_token()
        status, body, _ = _request("GET", url, {"X-aws-ec2-metadata-token": token},
                                   timeout=self.timeout)
        if status == 401:
            # The token was revoked or the instance restarted its IMDS: one fresh try.
            status, body, _ = _request("GET", url,
                                       {"X-aws-ec2-metadata-token": self._fetch_token()},
                                       timeout=self.timeout)
        if status not in (200, 404):
            raise _status_error("GET", url, status)
        return status, body

    def poll_once(self) -> list[Notice]:
        now = self._clock()
        notices = []
        status, body = self._get(self.ACTION)
        if status == 200:
            notices.append(aws_instance_action_notice(_json(self.base + self.ACTION, body), now))
        status, body = self._get(self.REBALANCE)
        if status == 200:
            notices.append(aws_rebalance_notice(_json(self.base + self.REBALANCE, body)))
        return notices


# --- GCP -------------------------------------------------------------------------------

def gcp_notices(values: dict, now: float) -> list[Notice]:
    """{'preempted': 'TRUE'|'FALSE', 'maintenance-event': ...} -> notices."""
    out = []
    if str(values.get("preempted") or "").strip().upper() == "TRUE":
        out.append(Notice(source="gcp", kind="preempt", deadline=now + GCP_NOTICE_LEAD,
                          detail="instance/preempted=TRUE"))
    event = str(values.get("maintenance-event") or "NONE").strip().upper()
    if event == "NONE" or not event:
        pass
    elif event.startswith("TERMINATE"):
        out.append(Notice(source="gcp", kind="maintenance", deadline=now + GCP_NOTICE_LEAD,
                          detail=f"instance/maintenance-event={event}"))
    else:
        # MIGRATE_ON_HOST_MAINTENANCE: a live migration, the job keeps running; also
        # any value this code does not know yet.
        out.append(Notice(source="gcp", kind="warning", deadline=None,
                          detail=f"instance/maintenance-event={event}"))
    return out


class GcpMetadata:
    """GCE metadata server. `read(key, wait=True)` long-polls one key."""

    source = "gcp"
    DEFAULT_BASE = "http://metadata.google.internal"
    KEYS = ("preempted", "maintenance-event")

    def __init__(self, base: str | None = None, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.base = (base or self.DEFAULT_BASE).rstrip("/")
        self.timeout = timeout
        self._clock = clock

    def url(self, key: str) -> str:
        return f"{self.base}/computeMetadata/v1/instance/{key}"

    def read(self, key: str, *, wait: bool = False, last_etag: str | None = None,
             timeout_sec: int = 60) -> tuple[str, str | None]:
        """(value, ETag). 404 reads as 'NONE': the key is absent on this machine type."""
        url = self.url(key)
        http_timeout = self.timeout
        if wait:
            url += f"?wait_for_change=true&timeout_sec={int(timeout_sec)}"
            if last_etag:
                url += f"&last_etag={last_etag}"
            http_timeout += timeout_sec
        status, body, headers = _request("GET", url, {"Metadata-Flavor": "Google"},
                                         timeout=http_timeout)
        if status == 404:
            return "NONE", None
        if status != 200:
            raise _status_error("GET", url, status)
        etag = next((v for k, v in headers.items() if k.lower() == "etag"), None)
        return body.decode("utf-8", "replace").strip(), etag

    def poll_once(self) -> list[Notice]:
        values = {key: self.read(key)[0] for key in self.KEYS}
        return gcp_notices(values, self._clock())


# --- Azure -----------------------------------------------------------------------------

AZURE_KINDS = {"Preempt": "preempt", "Terminate": "preempt",
               "Reboot": "maintenance", "Redeploy": "maintenance", "Freeze": "warning"}


def azure_notices(doc: Any, vm_name: str | None, now: float) -> list[Notice]:
    """Scheduled Events document -> notices for this VM.

    The document lists events of every VM in the availability set; `Resources` names the
    VMs each one hits, so a neighbour's reboot must not stop our jobs.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("Events", []), list):
        raise MetadataError("bad JSON", f"scheduledevents: no 'Events' list in {doc!r:.80}")
    out = []
    for ev in doc.get("Events", []):
        if not isinstance(ev, dict):
            continue
        kind = AZURE_KINDS.get(str(ev.get("EventType")))
        if kind is None:
            continue
        resources = ev.get("Resources") or []
        if vm_name and resources and vm_name not in resources:
            continue
        not_before = str(ev.get("NotBefore") or "")
        try:
            deadline = parse_rfc1123(not_before)
        except (TypeError, ValueError, IndexError):
            deadline = now          # empty NotBefore: the event has started
        out.append(Notice(
            source="azure", kind=kind, deadline=deadline, event_id=str(ev.get("EventId")),
            detail=(f"scheduled event {ev.get('EventType')} ({ev.get('EventStatus')}) "
                    f"not before {not_before or 'now'}")))
    return out


class AzureScheduledEvents:
    """Azure Instance Metadata Service, Scheduled Events."""

    source = "azure"
    DEFAULT_BASE = "http://169.254.169.254"
    EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
    VM_NAME = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    _UNKNOWN = object()

    def __init__(self, base: str | None = None, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time, vm_name: Any = _UNKNOWN) -> None:
        self.base = (base or self.DEFAULT_BASE).rstrip("/")
        self.timeout = timeout
        self._clock = clock
        self.vm_name = vm_name

    def _vm_name(self) -> str | None:
        if self.vm_name is self._UNKNOWN:
            url = self.base + self.VM_NAME
            status, body, _ = _request("GET", url, {"Metadata": "true"}, timeout=self.timeout)
            if status >= 500:
                raise _status_error("GET", url, status)
            # Any definite answer is kept; without a name every event counts.
            name = body.decode("utf-8", "replace").strip() if status == 200 else ""
            self.vm_name = name or None
        return self.vm_name

    def poll_once(self) -> list[Notice]:
        url = self.base + self.EVENTS
        vm_name = self._vm_name()
        status, body, _ = _request("GET", url, {"Metadata": "true"}, timeout=self.timeout)
        if status != 200:
            raise _status_error("GET", url, status)
        return azure_notices(_json(url, body), vm_name, self._clock())

    def acknowledge(self, notice: Notice) -> None:
        """Tell Azure the VM is ready: the event may start before NotBefore. Blocking."""
        if not notice.event_id:
            return
        url = self.base + self.EVENTS
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        status, _, _ = _request("POST", url, {"Metadata": "true",
                                              "Content-Type": "application/json"},
                                timeout=self.timeout, data=body)
        if status != 200:
            raise _status_error("POST", url, status)


def make_provider(name: str, metadata_url: str | None = None, timeout: float = 2.0) -> Any:
    classes = {"aws": AwsImds, "gcp": GcpMetadata, "azure": AzureScheduledEvents}
    if name not in classes:
        raise ValueError(f"preemption.provider: unknown provider {name!r} "
                         f"(expected one of {', '.join(PROVIDERS)})")
    return classes[name](metadata_url, timeout)


# --- polling ---------------------------------------------------------------------------

def fresh_notices(seen: frozenset, current: Iterable[Notice]) -> tuple[list[Notice], frozenset]:
    """Which of `current` were not pending at the last successful poll.

    `seen` is replaced, not grown: a notice that goes away and comes back (a second
    maintenance event) is new again.
    """
    fresh, now_seen = [], set()
    for n in current:
        key = n.identity()
        if key not in seen and key not in now_seen:
            fresh.append(n)
        now_seen.add(key)
    return fresh, frozenset(now_seen)


class ErrorLog:
    """Logs each kind of failure once until the service answers again."""

    def __init__(self, what: str, retry: float, logger: logging.Logger = log,
                 on_health: Callable[[bool, str], None] | None = None):
        self.what, self.retry, self.log = what, retry, logger
        self.on_health = on_health        # (ok, error) on each change: `status` shows it
        self._kinds: set[str] = set()

    def failed(self, err: MetadataError) -> None:
        if err.kind not in self._kinds:
            if not self._kinds and self.on_health is not None:
                unreachable = err.kind in ("timeout", "connection refused", "unreachable")
                self.on_health(False, f"metadata unreachable ({err.kind})" if unreachable
                               else f"metadata answers badly ({err.kind})")
            self._kinds.add(err.kind)
            self.log.warning("%s: %s; retrying every %gs (logged once until it answers)",
                             self.what, err, self.retry)

    def recovered(self) -> None:
        if self._kinds:
            self.log.info("%s: answering again after %s", self.what,
                          ", ".join(sorted(self._kinds)))
            self._kinds.clear()
            if self.on_health is not None:
                self.on_health(True, "")


class CloudPoller:
    """Polls one provider on daemon threads; calls `on_notice` once per new notice.

    `on_notice` runs on the poller's thread: the daemon passes a function that only posts
    to its loop. GCP long-polls each key (`wait_for_change`), so a change is seen when it
    happens; a server that answers at once falls back to plain polls every `poll`.
    """

    def __init__(self, provider: str | Any, on_notice: Callable[[Notice], None], *, poll: float = 5.0,
                 metadata_url: str | None = None, timeout: float = 2.0,
                 long_poll: int = 60):
        self.provider = make_provider(provider, metadata_url, timeout) \
            if isinstance(provider, str) else provider
        self.on_notice = on_notice
        self.poll = poll
        self.long_poll = long_poll
        self._stop = threading.Event()
        # Guards _seen and _values between GCP threads; reentrant so a callback may call stop().
        self._lock = threading.RLock()
        self._seen: frozenset = frozenset()
        self._values: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self.on_health: Callable[[bool, str], None] | None = None   # posts to the daemon's loop

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        targets: list[tuple[Callable[..., None], tuple]]
        if isinstance(self.provider, GcpMetadata):
            targets = [(self._watch_gcp_key, (key,)) for key in GcpMetadata.KEYS]
        else:
            targets = [(self._poll_loop, ())]
        for fn, args in targets:
            t = threading.Thread(target=fn, args=args, daemon=True,
                                 name=f"trainsup-notices-{self.provider.source}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """No callback happens after this returns. A GCP long poll in flight is not
        waited for (its thread is a daemon and exits when the request ends)."""
        self._stop.set()
        with self._lock:       # a report in progress finishes before stop() returns
            pass
        deadline = time.monotonic() + 0.5
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []

    def acknowledge(self, notice: Notice) -> None:
        ack = getattr(self.provider, "acknowledge", None)
        if ack is not None:
            ack(notice)

    def _report(self, current: list[Notice]) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            fresh, self._seen = fresh_notices(self._seen, current)
            for n in fresh:
                try:
                    self.on_notice(n)
                except Exception:   # the callback's bug must not end the watch
                    log.exception("notice callback failed for %s", n)

    def _poll_loop(self) -> None:
        errors = ErrorLog(f"{self.provider.source} metadata {self.provider.base}", self.poll,
                          on_health=self.on_health)
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                current = self.provider.poll_once()
            except MetadataError as e:
                errors.failed(e)
            else:
                errors.recovered()
                self._report(current)
            next_at = max(next_at + self.poll, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def _watch_gcp_key(self, key: str) -> None:
        provider: GcpMetadata = self.provider
        errors = ErrorLog(f"gcp metadata {provider.url(key)}", self.poll, on_health=self.on_health)
        etag, value, first = None, None, True
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # The first read does not wait: a notice pending at start counts at once.
                new_value, new_etag = provider.read(key, wait=not first, last_etag=etag,
                                                    timeout_sec=self.long_poll)
            except MetadataError as e:
                errors.failed(e)
                first = True
                self._stop.wait(self.poll)
                continue
            errors.recovered()
            unchanged = (new_etag, new_value) == (etag, value)
            etag, value = new_etag, new_value
            with self._lock:
                self._values[key] = value
                values = dict(self._values)
            self._report(gcp_notices(values, provider._clock()))
            if unchanged and not first and time.monotonic() - started < self.poll:
                # The server answered without waiting for a change: poll plainly.
                self._stop.wait(self.poll)
            first = False
