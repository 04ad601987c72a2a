"""``/metrics`` in-process (create_app, no multiprocess directory): counts, access, bounded labels, outages.

The counters are per process, so every test compares before and after its own requests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

import sts
from sts.config import load_settings
from sts.runtime import Services, build_services
from sts.store import ExceptionGrant, StoreUnavailable
from sts.web.app import create_app
from tests.authority import TestAuthority
from tests.conftest import ADMIN, write_config

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"
ISSUER = "http://127.0.0.1:8443"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(found: Samples, name: str, label: str) -> set[str]:
    return {dict(key[1])[label] for key in found if key[0] == name and label in dict(key[1])}


def form(subject_token: str, **extra: str) -> dict[str, str]:
    return {"grant_type": GRANT, "subject_token": subject_token, "subject_token_type": JWT_TYPE, **extra}


def make_services(
    tmp_path: Path, example: TestAuthority, partner: TestAuthority, extra: str = ""
) -> Services:
    config = write_config(tmp_path, 8443, example, partner)
    if extra:
        config.write_text(config.read_text() + extra)
    return build_services(load_settings(config, environ={}))


@pytest.fixture
def services(tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority) -> Iterator[Services]:
    built = make_services(tmp_path, example_org, partner_test)
    yield built
    built.close()


def scrape(app: Flask) -> Samples:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200, response.data
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return samples(response.get_data(as_text=True))


def test_exchanges_are_counted_as_the_audit_log_records_them(
    services: Services, example_org: TestAuthority
) -> None:
    app = create_app(services)
    client = app.test_client()
    before = scrape(app)
    svid = example_org.mint(AGENT, ISSUER)
    for _ in range(3):
        assert (
            client.post("/token", data=form(svid, audience="tool:web-search", scope="invoke")).status_code
            == 200
        )
    assert client.post("/token", data=form(svid, audience="data:crm", scope="read")).status_code == 200
    assert client.post("/token", data=form(svid, audience="data:vault", scope="read")).status_code == 400
    assert (
        client.post("/token", data=form("not-a-jwt", audience="tool:calc", scope="invoke")).status_code == 400
    )
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    issued = {"result": "issued", "error": "", "binding": "none"}
    assert delta("sts_token_exchanges_total", **issued, token_class="tool") == 3
    assert delta("sts_token_exchanges_total", **issued, token_class="data") == 1
    refused = sum(
        after[k] - before.get(k, 0.0)
        for k in after
        if k[0] == "sts_token_exchanges_total" and dict(k[1])["result"] == "refused"
    )
    assert refused == 2
    assert delta("sts_tokens_issued_total", target="tool:web-search") == 3
    assert delta("sts_tokens_issued_total", target="data:crm") == 1
    assert delta("sts_token_exchange_duration_seconds_count") == 6
    assert delta("sts_policy_decisions_total", decision="allow", policy_id="agents-invoke-tools") == 3
    assert delta("sts_policy_decisions_total", decision="deny", policy_id="no-restricted-data") == 1
    assert value(after, "sts_build_info", version=sts.__version__) == 1
    assert value(after, "sts_break_glass_active") == 0
    assert value(after, "sts_trust_bundle_sequence", trust_domain="example.org") >= 0
    assert ("sts_trust_bundle_age_seconds", (("source", "file"), ("trust_domain", "example.org"))) in after
    # Every refused exchange's error label is one of the codes the audit log recorded.
    codes = {
        r["error"]
        for r in map(json.loads, Path(services.settings.audit_path).read_text().splitlines())
        if r.get("event") == "token_exchange" and r["decision"] == "deny"
    }
    # The registry is the process's: earlier tests in this process counted other codes, so only the
    # series this test moved are compared.
    moved = {
        dict(k[1])["error"]
        for k in after
        if k[0] == "sts_token_exchanges_total" and after[k] != before.get(k, 0.0)
    }
    assert moved - {""} <= codes
    assert len(moved - {""}) == 2  # invalid_target (policy), invalid_request (not a JWT)


def test_hostile_inputs_do_not_create_label_values(services: Services, example_org: TestAuthority) -> None:
    app = create_app(services)
    client = app.test_client()
    svid = example_org.mint(AGENT, ISSUER)
    before = scrape(app)
    hostile = [
        form(svid, audience="tool:" + "9" * 400, scope="invoke"),
        form(svid, audience="spiffe://example.org/agent/evil", scope="x" * 300),
        form(svid, audience="tool:web-search", scope="invoke", requested_token_type="9" * 400),
        form("9" * 400, audience="tool:calc", scope="invoke"),
        {"grant_type": 'error\n"}weird', "subject_token": svid, "subject_token_type": "1" * 400},
        form(svid, audience="tool:web-search", scope="invoke", task_id="9" * 400),
    ]
    for body in hostile:
        assert client.post("/token", data=body).status_code >= 400
    # The observer bounds what the code path could not: a forged event changes no label set.
    metrics = services.metrics
    assert metrics is not None
    metrics.observe(
        {
            "event": "token_exchange",
            "decision": "allow",
            "target": "9" * 400,
            "token_class": "weird",
            "binding": "x" * 50,
            "policy_ids": ["spiffe://example.org/agent/x"],
        }
    )
    metrics.observe({"event": "token_exchange", "decision": "deny", "error": "weird error text\n"})
    metrics.observe({"event": "admin_revocation", "revoked": "jti-abc"})
    after = scrape(app)
    new = {key for key in after if key not in before}
    allowed_values = {
        "",
        "issued",
        "refused",
        "other",
        "none",
        "tool",
        "data",
        "allow",
        "deny",
        "error",
        "default",
        *services.policy.policy_ids,
        *(entry.id for entry in services.settings.catalog),
        *(str(t) for t in services.trust.trust_domains),
        "file",
        "invalid_request",
        "invalid_target",
        "invalid_scope",
        "invalid_grant",
        "invalid_client",
        "invalid_token",
        "unsupported_grant_type",
        "server_error",
        "jti",
        "task",
        "subject",
        "token",
        sts.__version__,
    }
    for _, labels in new:
        for label, text in labels:
            if label == "le":
                continue
            assert text in allowed_values, (label, text)
            assert len(text) < 64
    assert (
        value(after, "sts_tokens_issued_total", target="other")
        == value(before, "sts_tokens_issued_total", target="other") + 1
    )
    assert value(after, "sts_revocations_total", kind="other") >= 1


def test_disabled_metrics_are_not_found_and_not_counted(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    services = make_services(tmp_path, example_org, partner_test, "metrics: {enabled: false}\n")
    try:
        assert services.metrics is None
        response = create_app(services).test_client().get("/metrics")
        assert response.status_code == 404
    finally:
        services.close()


def test_a_source_outside_allow_is_forbidden(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    services = make_services(tmp_path, example_org, partner_test, "metrics: {allow: [10.0.0.0/8, '::1']}\n")
    try:
        client = create_app(services).test_client()
        refused = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
        assert refused.status_code == 403
        assert refused.json is not None and refused.json["error"] == "access_denied"
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 200
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::ffff:10.1.2.3"}).status_code == 200
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    finally:
        services.close()


class DownStore:
    """The real store with every read failing as an unreachable backend does."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            error = StoreUnavailable("connection refused")
            error.backend = "redis"  # type: ignore[attr-defined]
            error.operation = name  # type: ignore[attr-defined]
            raise error

        if name == "close":
            return self._store.close
        return down


def test_a_store_outage_leaves_metrics_answering(services: Services, example_org: TestAuthority) -> None:
    down = dataclasses.replace(services, store=DownStore(services.store))
    app = create_app(down)
    before = scrape(app)
    after = scrape(app)
    assert ("sts_break_glass_active", ()) not in after  # skipped, never a guess
    errors = "sts_store_operation_errors_total"
    assert value(after, errors, backend="redis", operation="exceptions") == (
        value(before, errors, backend="redis", operation="exceptions") + 1
    )
    assert value(after, "sts_build_info", version=sts.__version__) == 1


def test_a_store_outage_answered_503_is_counted(services: Services, example_org: TestAuthority) -> None:
    down = DownStore(services.store)
    services.exchange.store = down  # the exchange's own reads fail too
    app = create_app(dataclasses.replace(services, store=down))
    before = scrape(app)
    svid = example_org.mint(AGENT, ISSUER)
    response = app.test_client().post("/token", data=form(svid, audience="tool:calc", scope="invoke"))
    assert response.status_code == 503
    after = scrape(app)

    def grown(name: str, **labels: str) -> float:
        return sum(
            v - before.get(k, 0.0)
            for k, v in after.items()
            if k[0] == name and labels.items() <= dict(k[1]).items()
        )

    # The 503 (whatever operation the exchange met first) and this scrape's two failed reads
    # (active_task_count and exceptions).
    assert grown("sts_store_operation_errors_total", backend="redis") == 3
    assert grown("sts_store_operation_errors_total", backend="redis", operation="active_task_count") == 1
    assert grown("sts_store_operation_errors_total", backend="redis", operation="exceptions") == 1
    assert grown("sts_token_exchanges_total", result="refused", error="temporarily_unavailable") == 1


class CountingStore:
    """The real store, plus the ``active_task_count`` the Store protocol is gaining."""

    def __init__(self, store: Any, active: int) -> None:
        self._store = store
        self._active = active
        self.asked: list[float] = []

    def active_task_count(self, now: float) -> int:
        self.asked.append(now)
        return self._active

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_scrape_time_gauges_read_the_store(services: Services) -> None:
    now = int(time.time())
    for grant_id, expires_at in (("exc_a", now + 600), ("exc_b", now + 600), ("exc_old", now - 1)):
        grant = ExceptionGrant(
            grant_id, AGENT, "tool:calc", frozenset({"invoke"}), "INC-1", ADMIN, now - 10, expires_at
        )
        services.store.add_exception(grant)
    store = CountingStore(services.store, 4)
    found = scrape(create_app(dataclasses.replace(services, store=store)))
    assert value(found, "sts_break_glass_active") == 2  # the expired one does not count
    assert value(found, "sts_tasks_active") == 4
    assert len(store.asked) == 1
    # A store without active_task_count (not yet in every backend): the gauge has no sample.
    assert ("sts_tasks_active", ()) not in scrape(create_app(services)) or hasattr(
        services.store, "active_task_count"
    )


def test_revocations_and_rate_limits_are_counted_from_their_audit_events(services: Services) -> None:
    app = create_app(services)
    metrics = services.metrics
    assert metrics is not None
    before = scrape(app)
    events: list[dict[str, Any]] = [
        {"event": "admin_revocation", "decision": "allow", "revoked": "jti", "jti": "abc"},
        {"event": "admin_revocation", "decision": "allow", "revoked": "spiffe_id", "spiffe_id": AGENT},
        {"event": "admin_revocation", "decision": "allow", "revoked": "task_id", "task_id": "t1"},
        {"event": "revoke", "decision": "allow", "jti": "def"},
        {"event": "revoke", "decision": "ignored", "jti": None},
        {"event": "task_complete", "decision": "allow", "task_id": "t2"},
        {"event": "token_exchange", "decision": "deny", "error": "rate_limited"},
        {"event": "api_refusal", "decision": "deny", "error": "rate_limited"},
        {"event": "refusals_suppressed", "decision": "deny", "count": 5},
    ]
    for event in events:
        services.audit.record(event)  # through the audit log, as the code paths record them
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sts_revocations_total", kind="jti") == 1
    assert delta("sts_revocations_total", kind="subject") == 1
    assert delta("sts_revocations_total", kind="task") == 2
    assert delta("sts_revocations_total", kind="token") == 1
    assert delta("sts_rate_limited_total") == 7


def test_a_start_removes_the_metrics_directories_of_runs_that_are_gone(tmp_path: Path) -> None:
    """A SIGKILLed ``sts serve`` cannot remove its directory; the next start does (and only such)."""
    import subprocess
    import sys

    from sts.web.supervisor import multiprocess_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"sts-metrics-{dead.pid}-abc"
    live = tmp_path / f"sts-metrics-{os.getpid()}-def"
    unrelated = tmp_path / "sts-metrics-notapid"
    for directory in (stale, live, unrelated):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"\0" * 16)
    with multiprocess_dir(str(tmp_path)) as directory:
        assert not stale.exists()
        assert live.exists() and unrelated.exists()
        assert Path(directory).name.startswith(f"sts-metrics-{os.getpid()}-")
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert (Path(directory).stat().st_mode & 0o777) == 0o700
    assert not Path(directory).exists()
