"""The shipped alert rules (systemd/prometheus/) pass `promtool check rules` and their own
`promtool test rules` unit tests; the Grafana dashboard asks only for metrics the daemon
exports (issue 24)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from trainsup.daemon.metrics import FAMILIES, JobSample, MetricsBook, MetricsServer

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "systemd" / "prometheus"
DASHBOARD = REPO / "systemd" / "grafana" / "trainsup.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool is absent: apt-get install -y prometheus (.ci/run installs it)")


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    r = subprocess.run([PROMTOOL, "check", "rules", "trainsup-alerts.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", "trainsup-alerts.test.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def _exported() -> set[str]:
    book = MetricsBook()
    book.publish_samples({"a": JobSample("a", "running", has_checkpoints=True)})
    text = MetricsServer("127.0.0.1:0", book, started_wall=1.0).scrape().decode()
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+)", text, re.M)}
    return names | {n + s for n in names for s in ("_bucket", "_sum", "_count")} | set(FAMILIES)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:trainsup|process)_[a-z_]+)", expr))


def test_rules_and_dashboard_use_only_exported_metrics():
    exported = _exported()
    rules = (RULES / "trainsup-alerts.yml").read_text()
    assert _metric_names(rules) <= exported, _metric_names(rules) - exported
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(_metric_names(e) <= exported for e in exprs), [_metric_names(e) - exported for e in exprs]
    assert all('job="' not in e.replace('job="trainsup"', "") for e in exprs), "the job label is `name`"
    assert {p["id"] for p in dash["panels"]} == set(range(1, len(dash["panels"]) + 1))
