"""Token class separation through the verifier library (``sts.verify.TokenVerifier``) and introspection.

Tool and data tokens are signed with separate keys; a verifier of one class trusts only that class's
keys, so a tool token never passes a data service, whatever its ``aud`` says (and the reverse), and a
token for another audience passes neither. Every refusal is RFC 6750 ``invalid_token`` (401), a
missing scope ``insufficient_scope`` (403); a raw exception would be a 500 at a resource server.
Introspection by a service that does not serve the token's audience answers ``{"active": false}``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sts.verify import TokenVerifier
from tests.hostile.attacker import (
    AGENT,
    CALC,
    CRM,
    SEARCH,
    b64,
    http,
    inactive,
    jws,
    pem,
    raises,
    sign,
    unsigned,
)
from tests.hostile.conftest import Dev, World


@pytest.fixture(scope="module")
def tokens(world: World) -> dict[str, str]:
    return {
        "tool": world.issued(AGENT, audience="tool:calc"),
        "search": world.issued(AGENT, audience="tool:web-search"),
        "data": world.issued(AGENT, audience="data:crm", scope="read"),
    }


def verifier(world: World, audience: str, token_class: str, issuer: str | None = None) -> TokenVerifier:
    return TokenVerifier.without_revocation_check(
        issuer=issuer or world.issuer, audience=audience, token_class=token_class
    )


def _parts(token: str) -> tuple[str, str, str]:
    head, payload, signature = token.split(".")
    return head, payload, signature


def _decode(segment: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))  # type: ignore[no-any-return]


def _claims_changed(token: str, **change: Any) -> str:
    head, payload, signature = _parts(token)
    return f"{head}.{b64(json.dumps(_decode(payload) | change))}.{signature}"


def _header_changed(token: str, **change: Any) -> str:
    head, payload, signature = _parts(token)
    return f"{b64(json.dumps(_decode(head) | change))}.{payload}.{signature}"


def _hmac_with_data_key(world: World, tool_token: str) -> str:
    """HS256 over the data class's public key (fetched from the server's JWKS) as secret."""
    keys = http("GET", f"{world.url}/jwks/data.json").body["keys"]
    public = ECAlgorithm.from_jwk(json.dumps(keys[0]))
    head = _decode(_parts(tool_token)[0]) | {"alg": "HS256", "kid": keys[0]["kid"]}
    claims = _decode(_parts(tool_token)[1]) | {"aud": "data:crm", "token_class": "data"}
    signing_input = f"{b64(json.dumps(head))}.{b64(json.dumps(claims))}"
    return f"{signing_input}.{b64(sign('HS256', pem(public), signing_input.encode()))}"


def _none_with_data_kid(world: World, tool_token: str) -> str:
    keys = http("GET", f"{world.url}/jwks/data.json").body["keys"]
    head = _decode(_parts(tool_token)[0]) | {"alg": "none", "kid": keys[0]["kid"]}
    claims = _decode(_parts(tool_token)[1]) | {"aud": "data:crm", "token_class": "data"}
    return unsigned(head, claims)


def _signed_by_attacker(tool_token: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    head = _decode(_parts(tool_token)[0]) | {"kid": "data-" + "A" * 43}
    claims = _decode(_parts(tool_token)[1]) | {"aud": "data:crm", "token_class": "data"}
    return jws(head, claims, key, "ES256")


Case = Callable[[World, dict[str, str]], tuple[TokenVerifier, str, dict[str, Any]]]


def V(case_id: str, build: Case, status: int = 401, error: str = "invalid_token") -> Any:
    return pytest.param(build, status, error, id=case_id)


CASES = [
    V("tool-token-at-data-service", lambda w, t: (verifier(w, "data:crm", "data"), t["tool"], {})),
    V("tool-token-at-data-verifier-of-its-own-audience", lambda w, t: (verifier(w, "tool:calc", "data"), t["tool"], {})),
    V("data-token-at-tool-service", lambda w, t: (verifier(w, "tool:calc", "tool"), t["data"], {})),
    V("data-token-at-tool-verifier-of-its-own-audience", lambda w, t: (verifier(w, "data:crm", "tool"), t["data"], {})),
    V("tool-token-for-another-tool", lambda w, t: (verifier(w, "tool:web-search", "tool"), t["tool"], {})),
    V("search-token-at-calc", lambda w, t: (verifier(w, "tool:calc", "tool"), t["search"], {})),
    V("data-token-for-another-data-service", lambda w, t: (verifier(w, "data:vault", "data"), t["data"], {})),
    V("tool-token-relabelled-data", lambda w, t: (verifier(w, "data:crm", "data"), _claims_changed(t["tool"], aud="data:crm", token_class="data"), {})),
    V("tool-token-with-data-kid", lambda w, t: (verifier(w, "tool:calc", "data"), _header_changed(t["tool"], kid="data-" + _decode(_parts(t["tool"])[0])["kid"].split("-", 1)[1]), {})),
    V("tool-token-audience-rewritten", lambda w, t: (verifier(w, "tool:web-search", "tool"), _claims_changed(t["tool"], aud="tool:web-search"), {})),
    V("hs256-keyed-with-data-public-key", lambda w, t: (verifier(w, "data:crm", "data"), _hmac_with_data_key(w, t["tool"]), {})),
    V("alg-none-with-data-kid", lambda w, t: (verifier(w, "data:crm", "data"), _none_with_data_kid(w, t["tool"]), {})),
    V("signed-by-attacker-with-data-kid", lambda w, t: (verifier(w, "data:crm", "data"), _signed_by_attacker(t["tool"]), {})),
    V("jwt-svid-as-access-token", lambda w, t: (verifier(w, "tool:calc", "tool"), w.svid(AGENT, "tool:calc"), {})),
    V("expired", lambda w, t: (verifier(w, "tool:calc", "tool"), t["tool"], {"now": time.time() + 3600})),
    V("not-yet-valid", lambda w, t: (verifier(w, "tool:calc", "tool"), t["tool"], {"now": time.time() - 3600})),
    V("tool-token-sent-as-dpop", lambda w, t: (verifier(w, "tool:calc", "tool"), t["tool"], {"scheme": "DPoP"})),
    V("tool-scope-missing", lambda w, t: (verifier(w, "tool:calc", "tool"), t["tool"], {"scope": "admin"}), 403, "insufficient_scope"),
    V("data-write-with-read-token", lambda w, t: (verifier(w, "data:crm", "data"), t["data"], {"scope": "write"}), 403, "insufficient_scope"),
    V("truncated", lambda w, t: (verifier(w, "tool:calc", "tool"), t["tool"][:-10], {})),
    V("garbage", lambda w, t: (verifier(w, "tool:calc", "tool"), "garbage", {})),
    V("exp-NaN", lambda w, t: (verifier(w, "tool:calc", "tool"), _raw_claims(t["tool"], "exp", "NaN"), {})),
    V("exp-400-digits", lambda w, t: (verifier(w, "tool:calc", "tool"), _raw_claims(t["tool"], "exp", "9" * 400), {})),
]


def _raw_claims(token: str, name: str, literal: str) -> str:
    """The token with one claim replaced by exact JSON text (the signature no longer matches)."""
    head, payload, signature = _parts(token)
    claims = _decode(payload)
    claims[name] = "__X__"
    text = json.dumps(claims).replace('"__X__"', literal)
    return f"{head}.{b64(text)}.{signature}"


@pytest.mark.parametrize(("build", "status", "error"), CASES)
def test_verifier_refuses_the_wrong_class_or_audience(
    world: World, tokens: dict[str, str], build: Case, status: int, error: str
) -> None:
    check, token, options = build(world, tokens)
    raises(lambda: check.verify(token, url="https://service.internal/", **options), status, error)


@pytest.mark.parametrize(
    ("token_name", "caller"),
    [
        ("tool", CRM),
        ("data", CALC),
        ("tool", SEARCH),
        ("search", CALC),
        ("data", SEARCH),
        ("tool", AGENT),
        ("tool", "spiffe://partner.test/agent/summarizer"),
    ],
    ids=[
        "data-service-introspects-tool-token",
        "tool-service-introspects-data-token",
        "search-introspects-calc-token",
        "calc-introspects-search-token",
        "search-introspects-data-token",
        "holder-introspects-its-own-token",
        "partner-introspects-tool-token",
    ],
)
def test_introspection_only_for_the_tokens_own_service(
    world: World, tokens: dict[str, str], token_name: str, caller: str
) -> None:
    inactive(http("POST", f"{world.url}/introspect", data={"token": tokens[token_name]}, headers=world.bearer(caller)))


def test_a_token_of_another_issuer_is_refused(world: World, dev: Dev, tokens: dict[str, str]) -> None:
    """A verifier for ``sts dev``'s issuer never accepts a token of the ``sts serve`` deployment."""
    other = TokenVerifier.without_revocation_check(issuer=dev.issuer, audience="tool:calc", token_class="tool")
    raises(lambda: other.verify(tokens["tool"], url="https://service.internal/"), 401, "invalid_token")
