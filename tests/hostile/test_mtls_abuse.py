"""mTLS abuse on the TLS listener (RFC 8705, X509-SVID.md): certificates that must not authenticate anyone.

A certificate that does not chain to a configured trust domain (unknown CA, expired, not yet valid,
self-signed) is refused in the TLS handshake: the connection closes without an HTTP answer. One that
chains but is not a valid X.509-SVID of its own trust domain (a CA certificate, several or no URI
SANs, a leaf allowed to sign certificates, another domain's CA vouching for our IDs) or whose SPIFFE
ID is not the ``client_id`` is ``invalid_client`` (401) at ``/token`` and ``invalid_token`` (401) at
the JSON endpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sts.binding import DpopKey
from tests.hostile.attacker import (
    AGENT,
    JWT_SPIFFE,
    OTHER_AGENT,
    Answer,
    Ca,
    closed,
    form,
    http,
    inactive,
    issue,
    now,
    refused,
    self_signed_ca,
    write_pair,
)
from tests.hostile.conftest import World

Pair = tuple[Path, Path]


def make(world: World, ca: Ca, name: str, **shape: Any) -> Pair:
    cert, key, _ = issue(ca, world.directory, f"mtls-{name}", **shape)
    return cert, key


def ca_pair(world: World, ca: Ca, name: str) -> Pair:
    return write_pair(world.directory, f"mtls-ca-{name}", ca.cert, ca.key)


def token(world: World, cert: Pair | None, *, sub: str = AGENT, subject: str | None = None, verify: bool = True, **extra: str) -> Answer:
    body = form(subject or world.svid(sub), audience="tool:calc", scope="invoke", **extra)
    return http("POST", f"{world.tls_url}/token", data=body, cert=cert, verify=str(world.ca_file) if verify else False)


Case = Callable[[World], Answer]


def M(case_id: str, build: Case, status: int | None = 401, error: str | None = "invalid_client") -> Any:
    return pytest.param(build, status, error, id=case_id)


def _attacker(world: World) -> Ca:
    return self_signed_ca("attacker.test")


def _self_signed_leaf(world: World) -> Pair:
    """A leaf signed by its own key, naming the agent: no authority vouches for it."""
    own = self_signed_ca("example.org")
    return make(world, own, "self-signed-leaf")


CASES = [
    # --- refused in the handshake ---
    M("certificate-from-unconfigured-ca", lambda w: token(w, make(w, _attacker(w), "unknown-ca")), None, None),
    M("certificate-from-untrusted-trust-domain", lambda w: token(w, make(w, Ca(w.auth.stranger.ca_key, w.auth.stranger.ca_cert), "stranger", uris=("spiffe://stranger.test/agent",))), None, None),
    M("certificate-from-impostor-ca-same-name", lambda w: token(w, make(w, Ca(w.auth.impostor.ca_key, w.auth.impostor.ca_cert), "impostor")), None, None),
    M("certificate-expired", lambda w: token(w, make(w, w.auth.example_ca, "expired", lifetime=(-7200, -3600))), None, None),
    M("certificate-not-yet-valid", lambda w: token(w, make(w, w.auth.example_ca, "future", lifetime=(3600, 7200))), None, None),
    M("self-signed-leaf", lambda w: token(w, _self_signed_leaf(w)), None, None),
    # --- chains, but is not a valid X.509-SVID of its own trust domain ---
    # A CA certificate has no digitalSignature key usage: OpenSSL refuses it for TLS client auth.
    M("ca-certificate-as-client-certificate", lambda w: token(w, ca_pair(w, w.auth.example_ca, "example")), None, None),
    M("partner-ca-certificate-as-client-certificate", lambda w: token(w, ca_pair(w, w.auth.partner_ca, "partner")), None, None),
    M("leaf-marked-ca", lambda w: token(w, make(w, w.auth.example_ca, "leaf-ca", is_ca=True))),
    M("leaf-allowed-to-sign-certificates", lambda w: token(w, make(w, w.auth.example_ca, "cert-sign", cert_sign=True))),
    M("two-uri-sans", lambda w: token(w, make(w, w.auth.example_ca, "two-uris", uris=(AGENT, OTHER_AGENT)))),
    M("trust-domain-only-id", lambda w: token(w, make(w, w.auth.example_ca, "td-only", uris=("spiffe://example.org",)))),
    M("no-uri-san", lambda w: token(w, make(w, w.auth.example_ca, "dns-only", uris=(), dns=("agent.example.org",)))),
    M("https-uri-san", lambda w: token(w, make(w, w.auth.example_ca, "https-uri", uris=("https://example.org/agent/researcher",)))),
    M("uppercase-trust-domain-uri", lambda w: token(w, make(w, w.auth.example_ca, "upper", uris=("spiffe://EXAMPLE.org/agent/researcher",)))),
    M("dot-dot-uri", lambda w: token(w, make(w, w.auth.example_ca, "dotdot", uris=("spiffe://example.org/agent/../ops/sts-admin",)))),
    M("partner-ca-vouches-for-example-org", lambda w: token(w, make(w, w.auth.partner_ca, "cross-domain"))),
    M("example-ca-vouches-for-partner", lambda w: token(w, make(w, w.auth.example_ca, "cross-domain-2", uris=("spiffe://partner.test/agent/summarizer",)), sub="spiffe://partner.test/agent/summarizer")),
    # --- the certificate is fine; the request around it is not ---
    M("client-id-mismatch", lambda w: token(w, make(w, w.auth.example_ca, "agent-1"), client_id=OTHER_AGENT)),
    M("client-id-not-spiffe", lambda w: token(w, make(w, w.auth.example_ca, "agent-2"), client_id="agent")),
    M("client-id-trust-domain", lambda w: token(w, make(w, w.auth.example_ca, "agent-3"), client_id="spiffe://example.org")),
    M("client-id-trailing-slash", lambda w: token(w, make(w, w.auth.example_ca, "agent-4"), client_id=AGENT + "/")),
    M("certificate-of-another-workload", lambda w: token(w, make(w, w.auth.example_ca, "other", uris=(OTHER_AGENT,)))),
    M("certificate-and-client-assertion", lambda w: token(w, make(w, w.auth.example_ca, "agent-5"), client_assertion_type=JWT_SPIFFE, client_assertion=w.svid(AGENT)), 400, "invalid_request"),
    M("certificate-and-bad-dpop-proof", lambda w: http("POST", f"{w.tls_url}/token", data=form(w.svid(AGENT), audience="tool:calc", scope="invoke"), headers={"DPoP": DpopKey.generate().proof("POST", "https://elsewhere.example/token")}, cert=make(w, w.auth.example_ca, "agent-6"), verify=str(w.ca_file)), 400, "invalid_dpop_proof"),
    M("certificate-with-expired-subject", lambda w: token(w, make(w, w.auth.example_ca, "agent-7"), subject=w.svid(AGENT, ttl=60, now=now() - 3600)), 400, "invalid_request"),
    # --- JSON endpoints over mTLS ---
    M("tasks-with-ca-certificate", lambda w: http("GET", f"{w.tls_url}/tasks/task_x", cert=ca_pair(w, w.auth.example_ca, "example-2"), verify=str(w.ca_file)), None, None),
    M("admin-with-ca-certificate", lambda w: http("GET", f"{w.tls_url}/admin/exceptions", cert=ca_pair(w, w.auth.example_ca, "example-3"), verify=str(w.ca_file)), None, None),
    M("tasks-with-leaf-marked-ca", lambda w: http("GET", f"{w.tls_url}/tasks/task_x", cert=make(w, w.auth.example_ca, "leaf-ca-2", is_ca=True), verify=str(w.ca_file)), 401, "invalid_token"),
    M("admin-with-cross-domain-certificate", lambda w: http("GET", f"{w.tls_url}/admin/exceptions", cert=make(w, w.auth.partner_ca, "cross-admin", uris=("spiffe://example.org/ops/sts-admin",)), verify=str(w.ca_file)), 401, "invalid_token"),
    M("introspect-with-two-uri-certificate", lambda w: http("POST", f"{w.tls_url}/introspect", data={"token": "x"}, cert=make(w, w.auth.example_ca, "two-uris-2", uris=(AGENT, OTHER_AGENT)), verify=str(w.ca_file)), 401, "invalid_token"),
    M("admin-with-agent-certificate", lambda w: http("GET", f"{w.tls_url}/admin/exceptions", cert=make(w, w.auth.example_ca, "agent-8"), verify=str(w.ca_file)), 403, "access_denied"),
    M("task-of-another-workload-over-mtls", lambda w: http("GET", f"{w.tls_url}/tasks/{w.task(AGENT)}", cert=make(w, w.auth.example_ca, "other-2", uris=(OTHER_AGENT,)), verify=str(w.ca_file)), 404, "not_found"),
]


@pytest.mark.parametrize(("build", "status", "error"), CASES)
def test_mtls_abuse_is_refused(world: World, build: Case, status: int | None, error: str | None) -> None:
    answer = build(world)
    if status is None:
        closed(answer)
    else:
        refused(answer, status, error)


def test_introspection_over_mtls_by_a_non_resource_server(world: World) -> None:
    token_to_check = world.issued(AGENT)
    cert = make(world, world.auth.example_ca, "agent-introspects")
    inactive(http("POST", f"{world.tls_url}/introspect", data={"token": token_to_check}, cert=cert, verify=str(world.ca_file)))
