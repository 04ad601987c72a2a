"""The chart's monitoring: ServiceMonitor, PrometheusRule and the Grafana dashboard, rendered by real helm.

- ServiceMonitor and PrometheusRule render when the cluster has the Prometheus Operator CRDs (helm
  ``--api-versions``) and not without, unless the values force them either way.
- The rules of the rendered PrometheusRule pass ``promtool check rules`` (Debian's prometheus package).
- Every PromQL expression of dashboards/sts.json is valid (promtool, as a throwaway recording rule)
  and names only the metrics the STS exports (METRICS, what sts /metrics serves).
- kubernetes-validate has no schema for the monitoring.coreos.com kinds: their structure is checked
  here against the fields the Prometheus Operator defines; the dashboard ConfigMap validates strictly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import CHART, CI_FILES, NAMESPACE, RELEASE, helm, validate_manifest

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
CRDS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
# What sts /metrics exports (histograms also as _bucket, _sum, _count), and Prometheus's own `up`.
METRICS = {
    "sts_token_exchanges_total",
    "sts_token_exchange_duration_seconds",
    "sts_policy_decisions_total",
    "sts_trust_bundle_age_seconds",
    "sts_trust_bundle_sequence",
    "sts_store_operation_errors_total",
    "sts_tasks_active",
    "sts_tokens_issued_total",
    "sts_revocations_total",
    "sts_break_glass_active",
    "sts_rate_limited_total",
    "sts_build_info",
}
HISTOGRAMS = {"sts_token_exchange_duration_seconds"}
KNOWN = METRICS | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")} | {"up"}
DASHBOARD = CHART / "dashboards" / "sts.json"
# Leaves serviceMonitor and prometheusRule to the CRD detection (ha-redis-values.yaml forces them on).
SQLITE_VALUES = next(f for f in CI_FILES if f.name == "single-sqlite-values.yaml")


def render(tmp: Path, *args: str) -> list[dict[str, Any]]:
    result = helm(
        tmp, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(SQLITE_VALUES), *args
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def with_crds() -> list[str]:
    return [arg for crd in CRDS for arg in ("--api-versions", crd)]


def kinds(documents: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in documents}


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def promtool_rules(tmp: Path, groups: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    return subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False, timeout=60
    )


# Words of a PromQL expression that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "absent", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "time", "clamp_min",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Identifiers of ``expr`` outside strings, label matchers, ranges and grouping clauses."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if w not in PROMQL_WORDS}


def test_metric_names_of_an_expression():
    """The extraction the dashboard test relies on, including what it must not take for a name."""
    assert metric_names('sum by (le) (rate(a_b_bucket{job="x",le="y"}[5m])) / on(job) up') == {
        "a_b_bucket",
        "up",
    }


def test_without_the_crds_neither_object_renders(tmp_path):
    assert not kinds(render(tmp_path)) & {"ServiceMonitor", "PrometheusRule"}


def test_with_the_crds_both_render_and_scrape_metrics(tmp_path):
    documents = render(tmp_path, *with_crds())
    monitor = one(documents, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    service = one(documents, "Service")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["port"] in port_names, "the API port, by name"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert "PrometheusRule" in kinds(documents)
    for document in documents:
        assert document["metadata"]["name"].startswith(RELEASE)
        if document["apiVersion"] != "monitoring.coreos.com/v1":
            validate_manifest(document)


@pytest.mark.parametrize(
    ("args", "monitor", "rule"),
    [
        (
            ["--set", "serviceMonitor.enabled=false", "--set", "prometheusRule.enabled=false", *with_crds()],
            0,
            0,
        ),
        (["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"], 1, 1),
        (["--set", "prometheusRule.enabled=false", *with_crds()], 1, 0),
    ],
)
def test_values_override_the_crd_detection(tmp_path, args, monitor, rule):
    documents = render(tmp_path, *args)
    assert [d["kind"] for d in documents].count("ServiceMonitor") == monitor
    assert [d["kind"] for d in documents].count("PrometheusRule") == rule


def test_tls_scrape_is_https(tmp_path):
    documents = render(tmp_path, *with_crds(), "--set", "config.listen.tls.certificate=workload-api")
    (endpoint,) = one(documents, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"


def test_prometheus_rule_passes_promtool(tmp_path):
    rule = one(
        render(tmp_path, *with_crds(), "--set", "prometheusRule.alertLabels.team=identity"), "PrometheusRule"
    )
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    groups = rule["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(alerts) == {"StsDown", "StsTrustBundleStale", "StsStoreErrors", "StsRefusalSpike"}
    for name, alert in alerts.items():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert alert["labels"]["team"] == "identity" and alert["labels"]["severity"] in (
            "warning",
            "critical",
        )
        assert metric_names(alert["expr"]) <= KNOWN, name
        assert f'namespace="{NAMESPACE}"' in alert["expr"], "this release's series only"
    assert "> 240" in alerts["StsTrustBundleStale"]["expr"]
    assert 'result="refused"' in alerts["StsRefusalSpike"]["expr"]
    checked = promtool_rules(tmp_path, groups)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_does_reject_a_bad_rule(tmp_path):
    """The check above can fail: promtool refuses a broken expression."""
    checked = promtool_rules(
        tmp_path, [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]
    )
    assert checked.returncode != 0


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_the_operators_questions():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("by result", "p50", "p99", "by error", "bundle age", "active tasks", "store"):
        assert topic in titles
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_exprs_are_valid_promql_on_sts_metrics_only(tmp_path):
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        unknown = metric_names(expr) - KNOWN
        assert not unknown, f"{expr}: {unknown} is not an sts metric"
    rules = [{"record": f"sts:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)]
    checked = promtool_rules(tmp_path, [{"name": "dashboard", "rules": rules}])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_configmap_for_the_grafana_sidecar(tmp_path):
    assert "sts-dashboard" not in {d["metadata"]["name"] for d in render(tmp_path)}, "off by default"
    documents = render(
        tmp_path, "--set", "dashboards.enabled=true", "--set", "dashboards.namespace=monitoring"
    )
    (configmap,) = [d for d in documents if d["metadata"]["name"] == f"{RELEASE}-dashboard"]
    validate_manifest(configmap)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert json.loads(configmap["data"]["sts.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
