"""RFC 8693 request abuse at ``POST /token``: grants, repeated parameters, token types, targets, scopes,
sizes, media types, query strings, encodings, methods, client authentication and tasks.

Every request carries a genuine JWT-SVID unless the case is about its absence, so each refusal
comes from the rule under attack (RFC 6749 §3.2, §3.3, §5.2; RFC 8693 §2.1, §2.2.2; RFC 8707 §2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.hostile.attacker import (
    AGENT,
    JWT_SPIFFE,
    JWT_TYPE,
    ORCHESTRATOR,
    OTHER_AGENT,
    PARTNER_AGENT,
    form,
    http,
    refused,
)
from tests.hostile.conftest import World

LIMIT = 64 * 1024


@dataclass(frozen=True)
class Req:
    data: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    query: str = ""
    json_body: Any = None


def body(w: World, **extra: Any) -> Req:
    """A genuine agent exchange for tool:calc, changed by ``extra`` (None drops a parameter)."""
    fields: dict[str, Any] = form(w.svid(AGENT), audience="tool:calc", scope="invoke") | extra
    return Req({k: v for k, v in fields.items() if v is not None})


def pairs(w: World, *extra: tuple[str, str]) -> Req:
    """A genuine exchange as a list of pairs, with ``extra`` appended (repeats stay repeats)."""
    base = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token_type", JWT_TYPE),
        ("subject_token", w.svid(AGENT)),
        ("audience", "tool:calc"),
        ("scope", "invoke"),
    ]
    return Req(base + list(extra))


def encoded(w: World) -> str:
    """The genuine form body as text (for media-type and encoding cases)."""
    return urlencode(form(w.svid(AGENT), audience="tool:calc", scope="invoke"))


def raw_body(data: bytes, content_type: str | None = "application/x-www-form-urlencoded") -> Req:
    return Req(data, {"Content-Type": content_type} if content_type else {})


def _chunks(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        piece = min(8192, size - sent)
        yield b"a" * piece
        sent += piece


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[World], Req]
    status: int
    error: str


def C(case_id: str, build: Callable[[World], Req], status: int = 400, error: str = "invalid_request") -> Any:
    return pytest.param(Case(case_id, build, status, error), id=case_id)


TARGET = "invalid_target"
SCOPE = "invalid_scope"
GRANT = "unsupported_grant_type"
CLIENT = "invalid_client"

CASES = [
    # --- grant_type ---
    C("grant-missing", lambda w: body(w, grant_type=None)),
    C("grant-empty", lambda w: body(w, grant_type="")),
    *[
        C(f"grant-{name}", lambda w, value=value: body(w, grant_type=value), 400, GRANT)
        for name, value in [
            ("client-credentials", "client_credentials"),
            ("authorization-code", "authorization_code"),
            ("password", "password"),
            ("refresh-token", "refresh_token"),
            ("jwt-bearer", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("saml2-bearer", "urn:ietf:params:oauth:grant-type:saml2-bearer"),
            ("device-code", "urn:ietf:params:oauth:grant-type:device_code"),
            ("uppercase", "URN:IETF:PARAMS:OAUTH:GRANT-TYPE:TOKEN-EXCHANGE"),
            ("trailing-space", "urn:ietf:params:oauth:grant-type:token-exchange "),
            ("leading-space", " urn:ietf:params:oauth:grant-type:token-exchange"),
            ("nul-suffix", "urn:ietf:params:oauth:grant-type:token-exchange\u0000"),
            ("prefix-only", "urn:ietf:params:oauth:grant-type:"),
            ("huge", "g" * 5000),
        ]
    ],
    C("grant-repeated-same", lambda w: pairs(w, ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"))),
    C("grant-repeated-other", lambda w: pairs(w, ("grant_type", "client_credentials"))),
    # --- repeated parameters (RFC 6749 §3.2) ---
    C("subject-token-repeated", lambda w: pairs(w, ("subject_token", w.svid(AGENT)))),
    C("subject-token-type-repeated", lambda w: pairs(w, ("subject_token_type", JWT_TYPE))),
    C("scope-repeated", lambda w: pairs(w, ("scope", "invoke"))),
    C("requested-token-type-repeated", lambda w: pairs(w, ("requested_token_type", JWT_TYPE), ("requested_token_type", JWT_TYPE))),
    C("actor-token-repeated", lambda w: pairs(w, ("actor_token", w.svid(AGENT)), ("actor_token", w.svid(AGENT)), ("actor_token_type", JWT_TYPE))),
    C("task-id-repeated", lambda w: pairs(w, ("task_id", "t1"), ("task_id", "t2"))),
    C("client-id-repeated", lambda w: pairs(w, ("client_id", AGENT), ("client_id", AGENT))),
    C("client-assertion-repeated", lambda w: pairs(w, ("client_assertion_type", JWT_SPIFFE), ("client_assertion", w.svid(AGENT)), ("client_assertion", w.svid(AGENT)))),
    C("unknown-parameter-repeated", lambda w: pairs(w, ("x", "1"), ("x", "2"))),
    C("thousands-of-repeats", lambda w: pairs(w, *[("scope", "invoke")] * 3000)),
    # --- token types ---
    *[
        C(f"subject-token-type-{name}", lambda w, value=value: body(w, subject_token_type=value))
        for name, value in [
            ("saml2", "urn:ietf:params:oauth:token-type:saml2"),
            ("saml1", "urn:ietf:params:oauth:token-type:saml1"),
            ("id-token", "urn:ietf:params:oauth:token-type:id_token"),
            ("refresh-token", "urn:ietf:params:oauth:token-type:refresh_token"),
            ("unknown-urn", "urn:x:y"),
            ("uppercase", JWT_TYPE.upper()),
            ("trailing-space", JWT_TYPE + " "),
            ("bare-jwt", "jwt"),
            ("missing", None),
        ]
    ],
    *[
        C(f"requested-token-type-{name}", lambda w, value=value: body(w, requested_token_type=value))
        for name, value in [
            ("saml2", "urn:ietf:params:oauth:token-type:saml2"),
            ("refresh-token", "urn:ietf:params:oauth:token-type:refresh_token"),
            ("id-token", "urn:ietf:params:oauth:token-type:id_token"),
            ("trailing-space", JWT_TYPE + " "),
            ("garbage", "bearer"),
        ]
    ],
    C("actor-token-type-alone", lambda w: body(w, actor_token_type=JWT_TYPE)),
    C("actor-token-alone", lambda w: body(w, actor_token=w.svid(AGENT))),
    C("actor-token-type-saml2", lambda w: body(w, actor_token=w.svid(AGENT), actor_token_type="urn:ietf:params:oauth:token-type:saml2")),
    C("subject-token-missing", lambda w: Req(form(None, audience="tool:calc", scope="invoke"))),
    C("subject-token-empty", lambda w: body(w, subject_token="")),
    # --- targets (RFC 8707, RFC 8693 §2.1) ---
    C("no-target", lambda w: body(w, audience=None)),
    C("audience-and-resource", lambda w: body(w, resource="https://search.internal/"), 400, TARGET),
    C("two-audiences", lambda w: body(w, audience=["tool:calc", "tool:web-search"]), 400, TARGET),
    C("same-audience-twice", lambda w: body(w, audience=["tool:calc", "tool:calc"]), 400, TARGET),
    C("two-resources", lambda w: body(w, audience=None, resource=["https://search.internal/", "https://search.internal/"]), 400, TARGET),
    C("five-hundred-audiences", lambda w: body(w, audience=["tool:calc"] * 500), 400, TARGET),
    *[
        C(f"audience-{name}", lambda w, value=value: body(w, audience=value(w)), 400, TARGET)
        for name, value in [
            ("unknown", lambda w: "tool:nope"),
            ("uppercase", lambda w: "TOOL:CALC"),
            ("trailing-space", lambda w: "tool:calc "),
            ("leading-space", lambda w: " tool:calc"),
            ("wildcard", lambda w: "tool:*"),
            ("star", lambda w: "*"),
            ("issuer", lambda w: w.issuer),
            ("spiffe-id", lambda w: "spiffe://example.org/tool/calc"),
            ("nul-suffix", lambda w: "tool:calc\u0000"),
            ("newline-suffix", lambda w: "tool:calc\n"),
            ("resource-uri-as-audience", lambda w: "https://search.internal/"),
        ]
    ],
    *[
        C(f"resource-{name}", lambda w, value=value: body(w, audience=None, resource=value), 400, TARGET)
        for name, value in [
            ("unknown", "https://nope.internal/"),
            ("ipv6-unclosed", "http://[::1"),
            ("ipv6-unclosed-path", "http://[::1/token"),
            ("ipv6-bad-port", "http://[::1]:99999/"),
            ("bracket-only", "http://["),
            ("ipvfuture", "http://[v7.zz]/"),
            ("port-not-numeric", "https://search.internal:bad/"),
            ("port-huge", "https://search.internal:99999999999999999999/"),
            ("no-trailing-slash", "https://search.internal"),
            ("fragment", "https://search.internal/#frag"),
            ("query", "https://search.internal/?q=1"),
            ("uppercase", "HTTPS://SEARCH.INTERNAL/"),
            ("relative", "/search"),
            ("no-scheme", "search.internal"),
            ("javascript", "javascript:alert(1)"),
            ("userinfo", "https://user@search.internal/"),
            ("nul", "https://search.internal/\u0000"),
            ("catalog-id-as-resource", "tool:calc"),
        ]
    ],
    # --- scope (RFC 6749 §3.3) ---
    *[
        C(f"scope-{name}", lambda w, value=value: body(w, scope=value), 400, SCOPE)
        for name, value in [
            ("missing", None),
            ("empty", ""),
            ("spaces", "   "),
            ("not-offered", "invoke admin"),
            ("other", "admin"),
            ("quote", 'invoke"'),
            ("backslash", "invoke\\"),
            ("non-ascii", "invöke"),
            ("tab", "invoke\tinvoke"),
            ("newline", "invoke\nadmin"),
            ("nul", "invoke\u0000"),
            ("data-scope-on-tool", "read"),
            ("case", "INVOKE"),
        ]
    ],
    C("scope-tool-on-data", lambda w: body(w, audience="data:crm", scope="invoke"), 400, SCOPE),
    C("policy-write-refused", lambda w: body(w, audience="data:crm", scope="write"), 400, TARGET),
    C("policy-restricted-refused", lambda w: body(w, audience="data:vault", scope="read"), 400, TARGET),
    C("policy-partner-data", lambda w: Req(form(w.svid(PARTNER_AGENT), audience="data:crm", scope="read")), 400, TARGET),
    C("policy-unknown-path", lambda w: Req(form(w.svid("spiffe://example.org/batch/job"), audience="tool:calc", scope="invoke")), 400, TARGET),
    # --- sizes ---
    *[
        C(f"huge-{name}", lambda w, name=name: body(w, **{name: "x" * 3000}))
        for name in ("audience", "resource", "scope", "client_id")
    ],
    C("huge-task-id", lambda w: body(w, task_id="t" * 300)),
    C("huge-subject-token", lambda w: body(w, subject_token="e" * 30000)),
    C("body-over-limit", lambda w: raw_body(encoded(w).encode() + b"&pad=" + b"p" * LIMIT), 413),
    C("body-one-over-limit", lambda w: raw_body(b"p" * (LIMIT + 1)), 413),
    C("body-over-limit-chunked", lambda w: raw_body(_chunks(LIMIT * 2)), 413),  # type: ignore[arg-type]
    C("content-length-declares-a-gigabyte", lambda w: Req(b"", {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(10**9)}), 413),
    # --- media type and where parameters travel ---
    C("json-body", lambda w: Req(json_body=form(w.svid(AGENT), audience="tool:calc", scope="invoke"))),
    C("text-plain", lambda w: raw_body(encoded(w).encode(), "text/plain")),
    C("multipart", lambda w: raw_body(b"--b\r\nContent-Disposition: form-data; name=grant_type\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")),
    C("no-content-type", lambda w: raw_body(encoded(w).encode(), None)),
    C("content-type-suffix", lambda w: raw_body(encoded(w).encode(), "application/x-www-form-urlencodedx")),
    C("content-type-xml", lambda w: raw_body(b"<grant_type/>", "application/xml")),
    C("parameters-in-query", lambda w: Req(None, query="?" + encoded(w))),
    C("query-with-body", lambda w: Req(body(w).data, query="?x=1")),
    # --- encodings ---
    C("body-not-utf8", lambda w: raw_body(encoded(w).encode() + b"&x=\xff\xfe")),
    C("body-invalid-sequence", lambda w: raw_body(b"grant_type=\xc3\x28")),
    C("body-overlong-slash", lambda w: raw_body(encoded(w).encode() + b"&x=\xc0\xaf")),
    C("body-surrogate-bytes", lambda w: raw_body(encoded(w).encode() + b"&x=\xed\xa0\x80")),
    C("body-utf16", lambda w: raw_body(encoded(w).encode("utf-16"))),
    C("body-latin1-token", lambda w: raw_body(encoded(w).encode().replace(b"subject_token=", b"subject_token=\xe9", 1))),
    C("percent-encoded-invalid-utf8-token", lambda w: raw_body(encoded(w).replace("subject_token=", "subject_token=%ff%fe", 1).encode())),
    # --- shapes of the body ---
    C("empty-body", lambda w: raw_body(b"")),
    C("empty-body-no-type", lambda w: raw_body(b"", None)),
    C("only-ampersands", lambda w: raw_body(b"&&&&&&")),
    C("only-equals", lambda w: raw_body(b"=")),
    C("name-without-value", lambda w: raw_body(b"grant_type")),
    C("parameter-name-case", lambda w: raw_body(encoded(w).replace("grant_type=", "Grant_Type=").encode())),
    # parse_qsl splits on '&' only: the whole body is one grant_type value.
    C("semicolon-separators", lambda w: raw_body(encoded(w).replace("&", ";").encode()), 400, GRANT),
    # --- methods ---
    *[C(f"method-{m.lower()}", lambda w, m=m: Req(None, method=m), 405) for m in ("GET", "PUT", "DELETE", "PATCH")],
    # --- client authentication ---
    C("client-assertion-type-wrong", lambda w: body(w, client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer", client_assertion=w.svid(AGENT)), 401, CLIENT),
    C("client-assertion-without-type", lambda w: body(w, client_assertion=w.svid(AGENT)), 401, CLIENT),
    C("client-assertion-type-without-assertion", lambda w: body(w, client_assertion_type=JWT_SPIFFE), 401, CLIENT),
    C("client-assertion-is-the-subject-token", lambda w: _assertion_is_subject(w.svid(AGENT)), 401, CLIENT),
    C("client-assertion-extra-audience", lambda w: body(w, client_assertion_type=JWT_SPIFFE, client_assertion=w.svid(AGENT, [w.issuer, "https://x.example"])), 401, CLIENT),
    C("client-assertion-of-a-stranger", lambda w: body(w, client_assertion_type=JWT_SPIFFE, client_assertion=w.svid(OTHER_AGENT)), 401, CLIENT),
    C("client-assertion-expired", lambda w: body(w, client_assertion_type=JWT_SPIFFE, client_assertion=w.svid(AGENT, ttl=60, now=1_000_000)), 401, CLIENT),
    C("client-id-mismatch", lambda w: body(w, client_id=OTHER_AGENT), 401, CLIENT),
    C("client-id-not-spiffe", lambda w: body(w, client_id="agent"), 401, CLIENT),
    C("client-id-trailing-slash", lambda w: body(w, client_id=AGENT + "/"), 401, CLIENT),
    C("client-id-uppercase", lambda w: body(w, client_id=AGENT.upper()), 401, CLIENT),
    C("client-id-other-than-assertion", lambda w: body(w, client_assertion_type=JWT_SPIFFE, client_assertion=w.svid(AGENT), client_id=OTHER_AGENT), 401, CLIENT),
    # --- tasks ---
    C("task-unknown", lambda w: body(w, task_id="task_nope")),
    C("task-of-another-workload", lambda w: body(w, task_id=w.task(OTHER_AGENT))),
    C("task-target-outside", lambda w: body(w, audience="tool:web-search", task_id=w.task(AGENT)), 400, TARGET),
    C("task-scope-outside", lambda w: body(w, audience="data:crm", scope="write", task_id=w.task(AGENT, {"data:crm": ["read"]})), 400, SCOPE),
    C("task-completed", lambda w: body(w, task_id=_completed_task(w))),
    C("task-id-injection", lambda w: body(w, task_id="task_x' OR '1'='1")),
    C("task-id-nul", lambda w: body(w, task_id="task_\u0000")),
]


def _assertion_is_subject(token: str) -> Req:
    return Req(form(token, audience="tool:calc", scope="invoke", client_assertion_type=JWT_SPIFFE, client_assertion=token))


def _completed_task(w: World) -> str:
    task_id = w.task(AGENT)
    answer = http("POST", f"{w.url}/tasks/{task_id}/complete", json_body={}, headers=w.bearer(ORCHESTRATOR))
    assert answer.status == 200, answer.text
    return task_id


@pytest.mark.parametrize("case", CASES)
def test_malformed_exchange_is_refused(world: World, case: Case) -> None:
    request = case.build(world)
    answer = http(
        request.method,
        f"{world.url}/token{request.query}",
        data=request.data,
        json_body=request.json_body,
        headers=request.headers,
        session=world.session,
    )
    refused(answer, case.status, case.error)
