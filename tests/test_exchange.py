"""The grant in-process with frozen time: request parsing, lifetimes, and the audit trail of refusals."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest

from sts.config import load_settings
from sts.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    RateLimited,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from sts.exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_JWT, ExchangeRequest
from sts.runtime import Services, build_services
from tests.authority import TestAuthority
from tests.conftest import write_config

NOW = 1_900_000_000
AGENT = "spiffe://example.org/agent/researcher"


@pytest.fixture
def services(tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority) -> Services:
    config = write_config(tmp_path, 8443, example_org, partner_test)
    return build_services(load_settings(config, environ={}))


def request(token: str, **extra: str) -> ExchangeRequest:
    form = {
        "grant_type": [GRANT_TYPE_TOKEN_EXCHANGE],
        "subject_token": [token],
        "subject_token_type": [TOKEN_TYPE_JWT],
    }
    form.update({k: [v] for k, v in extra.items()})
    return ExchangeRequest.from_form(form)


def test_form_parsing_rules() -> None:
    parsed = ExchangeRequest.from_form(
        {
            "grant_type": [GRANT_TYPE_TOKEN_EXCHANGE],
            "audience": ["a", "b"],
            "scope": ["read  write"],
            "actor_token": [""],
            "unknown_extension": ["ignored"],
        }
    )
    assert parsed.audiences == ("a", "b")
    assert parsed.scope == "read  write"  # split and checked inside the grant, after grant_type
    assert parsed.actor_token is None  # an empty value counts as omitted (RFC 6749 §3.1)


@pytest.mark.parametrize(
    ("form", "error", "text"),
    [
        ({"grant_type": ["x", "x"]}, InvalidRequest, "repeated"),
        (
            {"grant_type": [GRANT_TYPE_TOKEN_EXCHANGE], "task_id": ["t" * 257]},
            InvalidRequest,
            "longer than 256",
        ),
        ({"scope": ["x"]}, InvalidRequest, "grant_type"),
    ],
    ids=["repeated-parameter", "task-id-too-long", "no-grant-type"],
)
def test_form_refusals(form: dict[str, list[str]], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        ExchangeRequest.from_form(form)


def test_exp_is_the_smallest_bound(services: Services, example_org: TestAuthority) -> None:
    issuer = services.settings.issuer
    svid = example_org.mint(AGENT, issuer, now=NOW, ttl=100)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW
    )
    assert issued.expires_in == 100  # SVID (100) < policy @ttl (200) < catalog (300)
    issued = services.exchange.exchange(
        request(svid, audience="data:crm", scope="read"), request_id="r", now=NOW
    )
    assert issued.expires_in == 60  # policy @ttl("60") < SVID < catalog 120


def test_svid_inside_leeway_but_past_exp_issues_nothing(
    services: Services, example_org: TestAuthority
) -> None:
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW - 100, ttl=95)  # expired 5 s ago
    with pytest.raises(InvalidRequest, match="expires too soon"):
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW
        )


def test_refusal_is_audited_with_rule(services: Services, example_org: TestAuthority, tmp_path: Path) -> None:
    svid = example_org.mint(AGENT, "https://elsewhere.example", now=NOW)
    with pytest.raises(InvalidRequest):
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="r-aud", now=NOW
        )
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    with pytest.raises(InvalidTarget):
        services.exchange.exchange(
            request(svid, audience="data:crm", scope="write"), request_id="r-deny", now=NOW
        )
    services.audit.close()
    records = {
        r["request_id"]: r for r in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())
    }
    assert records["r-aud"]["rule"] == "aud"
    assert records["r-aud"]["error"] == "invalid_request"
    assert records["r-deny"]["spiffe_id"] == AGENT
    assert records["r-deny"]["policy_ids"] == []
    assert records["r-deny"]["error"] == "invalid_target"


def test_same_request_same_decision(services: Services, example_org: TestAuthority) -> None:
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    first = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="a", now=NOW
    )
    second = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="b", now=NOW
    )
    assert first.expires_in == second.expires_in
    assert first.jti != second.jti


def test_policy_that_cannot_be_evaluated_refuses_with_503(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    """A forbid that overflows at run time must not let the permit through (Cedar skips erroring policies)."""
    config = write_config(tmp_path, 8443, example_org, partner_test)
    (tmp_path / "policies" / "overflow.cedar").write_text(
        '@id("overflowing-forbid")\nforbid(principal, action, resource) when { context.now * 1000000000000 > 0 };\n'
    )
    services = build_services(load_settings(config, environ={}))
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    with pytest.raises(TemporarilyUnavailable, match="policy could not be evaluated") as caught:
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW
        )
    assert caught.value.status == 503
    assert "overflow" in (caught.value.detail or "")


def test_scope_characters_checked_after_the_grant_type(
    services: Services, example_org: TestAuthority
) -> None:
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    with pytest.raises(InvalidScope, match="RFC 6749"):
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope='in"voke'), request_id="r", now=NOW
        )
    wrong_grant = ExchangeRequest.from_form({"grant_type": ["password"], "scope": ['a"b']})
    with pytest.raises(UnsupportedGrantType):
        services.exchange.exchange(wrong_grant, request_id="r", now=NOW)


def test_delegated_token_lives_no_longer_than_the_actor(
    services: Services, example_org: TestAuthority
) -> None:
    subject = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    actor = example_org.mint("spiffe://example.org/orchestrator", services.settings.issuer, now=NOW, ttl=10)
    issued = services.exchange.exchange(
        request(
            subject, audience="tool:calc", scope="invoke", actor_token=actor, actor_token_type=TOKEN_TYPE_JWT
        ),
        request_id="r",
        now=NOW,
    )
    assert issued.expires_in == 10


def test_actor_cannot_plant_a_delegation_chain(services: Services, example_org: TestAuthority) -> None:
    subject = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    actor = example_org.mint(
        "spiffe://example.org/orchestrator",
        services.settings.issuer,
        now=NOW,
        extra_claims={"act": {"sub": "spiffe://example.org/ops/sts-admin"}},
    )
    issued = services.exchange.exchange(
        request(
            subject, audience="tool:calc", scope="invoke", actor_token=actor, actor_token_type=TOKEN_TYPE_JWT
        ),
        request_id="r",
        now=NOW,
    )
    claims = jwt.decode(issued.access_token, options={"verify_signature": False})
    assert claims["act"] == {"sub": "spiffe://example.org/orchestrator"}


def test_subject_token_reused_as_client_assertion_is_refused(
    services: Services, example_org: TestAuthority
) -> None:
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    reused = request(
        svid,
        audience="tool:calc",
        scope="invoke",
        client_assertion=svid,
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
    )
    with pytest.raises(InvalidClient, match="of its own"):
        services.exchange.exchange(reused, request_id="r", now=NOW)


def test_requested_jwt_type_is_reported(services: Services, example_org: TestAuthority) -> None:
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke", requested_token_type=TOKEN_TYPE_JWT),
        request_id="r",
        now=NOW,
    )
    assert issued.to_json()["issued_token_type"] == TOKEN_TYPE_JWT


def test_unexpected_failure_still_leaves_an_audit_line(
    services: Services, example_org: TestAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_sign(*args: object, **kwargs: object) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(services.keys, "sign", broken_sign)
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    with pytest.raises(RuntimeError):
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="boom", now=NOW
        )
    services.audit.close()
    records = {
        r["request_id"]: r for r in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())
    }
    assert records["boom"]["error"] == "server_error"
    assert "jti" not in records["boom"]


def test_deadline_passing_ends_the_task_and_its_tokens(
    services: Services, example_org: TestAuthority
) -> None:
    """The same effect as completing it, with the clock moved instead (injected time)."""
    from sts.callers import Caller
    from sts.spiffeid import SpiffeId

    orchestrator = Caller(SpiffeId.parse("spiffe://example.org/orchestrator"), "spiffe_jwt")
    body = {
        "assignee": AGENT,
        "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
        "purpose": "p",
        "ttl_seconds": 100,
    }
    task = services.tasks.create(orchestrator, body, request_id="t", now=NOW)
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW, ttl=3600)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke", task_id=task.id), request_id="r", now=NOW
    )
    assert issued.expires_in == 100  # bounded by the task deadline
    assert services.introspection.active_claims(issued.access_token, NOW + 50) is not None
    later = NOW + 100
    assert services.introspection.active_claims(issued.access_token, later - 1) is not None
    with pytest.raises(InvalidRequest, match="expired"):
        services.exchange.exchange(
            request(
                example_org.mint(AGENT, services.settings.issuer, now=later),
                audience="tool:calc",
                scope="invoke",
                task_id=task.id,
            ),
            request_id="r",
            now=later,
        )


def test_rate_limit_per_workload(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    config = write_config(tmp_path, 8443, example_org, partner_test)
    config.write_text(
        config.read_text().replace("per_workload_per_second: 1000", "per_workload_per_second: 5")
    )
    services = build_services(load_settings(config, environ={}))
    svid = example_org.mint(AGENT, services.settings.issuer, now=NOW)
    for _ in range(5):
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW
        )
    with pytest.raises(RateLimited) as limited:
        services.exchange.exchange(
            request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW
        )
    assert limited.value.status == 429
    assert limited.value.headers() == {"Retry-After": "1"}
    other = example_org.mint("spiffe://example.org/agent/other", services.settings.issuer, now=NOW)
    services.exchange.exchange(request(other, audience="tool:calc", scope="invoke"), request_id="r", now=NOW)
    services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=NOW + 1
    )
