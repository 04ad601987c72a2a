"""Unmodified third-party npm clients against the real server (issue 12): panva's oauth4webapi,
openid-client, jose and dpop, pinned in ``tests/interop/package-lock.json``.

Each test mints what its scenario needs here, runs ``node tests/interop/<client>.mjs`` with one JSON
object on stdin, and asserts on the one JSON object the script prints: per step, what the library
returned or the error it threw. The scripts use each library as its documentation shows; where a
library cannot do something our server needs, the test says so and asserts the exact limitation.

Nothing here is skipped: without node or ``tests/interop/node_modules`` every test fails and says to
run ``make node-deps``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.authority import TestAuthority
from tests.interop.conftest import AGENT, RESOURCE_SERVER, Interop
from tests.test_mtls_http import issue

HERE = Path(__file__).parent
NODE_TIMEOUT_SECONDS = 30
MIN_NODE = (20, 18, 1)  # undici 7 (engines)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
DPOP_ALGS = ["ES256", "Ed25519"]


def _fail_setup(reason: str) -> NoReturn:
    node = ".".join(map(str, MIN_NODE))
    pytest.fail(f"{reason}: install Node.js >= {node} with npm, then run `make node-deps`")


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, once the pinned npm clients are installed exactly as locked."""
    executable = shutil.which("node")
    if executable is None:
        _fail_setup("node is not on PATH")
    version = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if found < MIN_NODE:
        _fail_setup(f"node {version} is too old")
    lock = json.loads((HERE / "package-lock.json").read_text())
    for name, pinned in json.loads((HERE / "package.json").read_text())["dependencies"].items():
        manifest = HERE / "node_modules" / name / "package.json"
        if not manifest.is_file():
            _fail_setup(f"the npm package {name} is not installed in {HERE / 'node_modules'}")
        installed = json.loads(manifest.read_text())["version"]
        locked = lock["packages"][f"node_modules/{name}"]["version"]
        if not installed == pinned == locked:
            _fail_setup(f"{name} {installed} is installed but {pinned} is pinned ({locked} locked)")
    return executable


@dataclass(frozen=True)
class Steps:
    """One script run: each named step's outcome as the client library reported it."""

    script: str
    feature: str
    steps: dict[str, dict[str, Any]]

    def value(self, name: str) -> Any:
        """What the library returned at step ``name``; the test fails if it threw."""
        outcome = self._outcome(name)
        assert outcome["ok"], f"{self.script} {self.feature}/{name} threw: {json.dumps(outcome['error'])}"
        return outcome["value"]

    def error(self, name: str) -> dict[str, Any]:
        """The error the library threw at step ``name``; the test fails if it returned."""
        outcome = self._outcome(name)
        assert not outcome["ok"], (
            f"{self.script} {self.feature}/{name} returned: {json.dumps(outcome['value'])}"
        )
        error: dict[str, Any] = outcome["error"]
        return error

    def _outcome(self, name: str) -> dict[str, Any]:
        assert name in self.steps, f"{self.script} {self.feature} did not reach step {name}: {self.steps}"
        return self.steps[name]


@dataclass(frozen=True)
class Clients:
    """Runs the node scenarios against the ``interop`` issuer, minting their JWT-SVIDs."""

    node: str
    interop: Interop
    authority: TestAuthority
    rs_cert: Path
    rs_key: Path

    def run(self, script: str, feature: str, **extra: Any) -> Steps:
        interop = self.interop
        issuer = interop.issuer
        payload = {
            "feature": feature,
            "issuer": issuer,
            "plain_url": interop.plain.url,
            "tls_url": interop.tls.url,
            "ca": str(interop.ca),
            "client_cert": str(interop.client_cert),
            "client_key": str(interop.client_key),
            "rs_cert": str(self.rs_cert),
            "rs_key": str(self.rs_key),
            "agent": AGENT,
            "resource_server": RESOURCE_SERVER,
            "tokens": {
                "subject": self.authority.mint(AGENT, issuer),  # the agent's JWT-SVID (subject_token)
                "holder": self.authority.mint(AGENT, issuer),  # the agent as an OAuth client
                "resource_server": self.authority.mint(RESOURCE_SERVER, issuer),  # tool:calc's server
            },
            **extra,
        }
        environment = {**os.environ, "NODE_NO_WARNINGS": "1"}
        try:
            completed = subprocess.run(
                [self.node, str(HERE / script)],
                input=json.dumps(payload),
                capture_output=True,
                text=True,
                timeout=NODE_TIMEOUT_SECONDS,
                cwd=HERE,
                env=environment,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"node {script} ({feature}) ran over {NODE_TIMEOUT_SECONDS} s: {e.stderr!r}")
        assert completed.returncode == 0, f"node {script} exited {completed.returncode}: {completed.stderr}"
        try:
            result = json.loads(completed.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"node {script} printed no JSON: {completed.stdout!r} {completed.stderr!r}")
        assert "fatal" not in result, f"node {script} ({feature}) failed outside a step: {result['fatal']}"
        return Steps(script, feature, result["steps"])

    def exchange(self, audience: str = "tool:calc", scope: str = "invoke") -> str:
        """A token issued by a plain request (for the verifier-side scenarios)."""
        response = requests.post(
            f"{self.interop.plain.url}/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": self.authority.mint(AGENT, self.interop.issuer),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": audience,
                "scope": scope,
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token


@pytest.fixture(scope="session")
def clients(node: str, interop: Interop, example_org: TestAuthority) -> Clients:
    rs_cert, rs_key, _ = issue(example_org, interop.directory, "calc-server", uris=(RESOURCE_SERVER,))
    return Clients(node, interop, example_org, rs_cert, rs_key)


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def certificate_thumbprint(pem: Path) -> str:
    """RFC 8705 §3.1, computed independently of the server."""
    der = x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def assert_issued(
    response: dict[str, Any], *, token_type: str, audience: str = "tool:calc"
) -> dict[str, Any]:
    """An RFC 8693 §2.2.1 response as the library handed it over; returns the token's claims."""
    assert response["token_type"] == token_type  # both libraries lower-case it (RFC 6749 §7.1)
    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert isinstance(response["expires_in"], int) and response["expires_in"] > 0
    claims = claims_of(response["access_token"])
    assert (claims["sub"], claims["aud"], claims["client_id"]) == (AGENT, audience, AGENT)
    return claims


def assert_body_error(error: dict[str, Any], status: int, code: str, text: str) -> None:
    """The library parsed an RFC 6749 §5.2 error body (not a WWW-Authenticate challenge)."""
    assert error["name"] == "ResponseBodyError", error
    assert (error["status"], error["error"]) == (status, code), error
    assert text in error["error_description"], error


# --- oauth4webapi ---------------------------------------------------------------------------------------


def test_oauth4webapi_discovery(clients: Clients) -> None:
    result = clients.run("oauth4webapi.mjs", "discovery")
    issuer, tls = clients.interop.issuer, clients.interop.tls.url
    metadata = result.value("discovery")
    assert metadata["issuer"] == issuer
    assert metadata["token_endpoint"] == f"{issuer}/token"
    assert metadata["mtls_endpoint_aliases"]["token_endpoint"] == f"{tls}/token"
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    # The library's own rule: http:// needs allowInsecureRequests.
    assert result.error("discovery_without_allowInsecureRequests")["code"] == "OAUTH_HTTP_REQUEST_FORBIDDEN"
    # RFC 8414 §3 (and RFC 8705 §5): the TLS listener names the same issuer in the same document.
    assert result.value("tls_requests") == [f"GET {tls}/.well-known/oauth-authorization-server"]
    assert result.value("discovery_on_tls_listener") == metadata


def test_oauth4webapi_token_exchange(clients: Clients) -> None:
    result = clients.run("oauth4webapi.mjs", "exchange")
    claims = assert_issued(result.value("exchange"), token_type="bearer")
    assert claims["token_class"] == "tool" and "cnf" not in claims
    assert result.value("exchange")["scope"] == "invoke"
    data = assert_issued(result.value("exchange_data"), token_type="bearer", audience="data:crm")
    assert data["token_class"] == "data"


def test_oauth4webapi_error_responses(clients: Clients) -> None:
    result = clients.run("oauth4webapi.mjs", "errors")
    assert_body_error(result.error("unknown_audience"), 400, "invalid_target", "not a known target")
    assert_body_error(result.error("scope_not_offered"), 400, "invalid_scope", "admin")
    # 401 without a challenge (no HTTP auth scheme was used): still a body error to the library.
    assert_body_error(result.error("client_id_not_the_subject"), 401, "invalid_client", "client_id")
    # Limitation of the client: PrivateKeyJwt() always sends client_assertion_type jwt-bearer with a JWT
    # it signs itself; a JWT-SVID as a jwt-spiffe assertion needs a custom ClientAuth (see introspection).
    assert_body_error(
        result.error("private_key_jwt_is_jwt_bearer"),
        401,
        "invalid_client",
        "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
    )


@pytest.mark.parametrize("alg", DPOP_ALGS)
def test_oauth4webapi_dpop(clients: Clients, alg: str) -> None:
    result = clients.run("oauth4webapi.mjs", "dpop", alg=alg)
    claims = assert_issued(result.value("exchange"), token_type="dpop")
    assert claims["cnf"] == {"jkt": result.value("thumbprint")}
    assert result.value("thumbprint") == result.value("thumbprint_jose")
    # The same library as the resource server: RFC 9068 checks plus the DPoP proof (ath, cnf.jkt).
    resource = result.value("resource_request")
    assert resource["authorization_scheme"] == "DPoP" and "ath" in resource["proof_claims"]
    assert result.value("validate_jwt_access_token")["jti"] == claims["jti"]
    introspected = result.value("introspect")
    assert (introspected["active"], introspected["token_type"]) == (True, "DPoP")
    assert introspected["cnf"] == claims["cnf"]


def test_oauth4webapi_mtls_through_endpoint_aliases(clients: Clients) -> None:
    result = clients.run("oauth4webapi.mjs", "mtls")
    claims = assert_issued(result.value("exchange"), token_type="bearer")
    assert result.value("requests") == [f"POST {clients.interop.tls.url}/token"]  # RFC 8705 §5 alias
    thumbprint = certificate_thumbprint(clients.interop.client_cert)
    assert result.value("certificate_thumbprint") == thumbprint
    assert claims["cnf"] == {"x5t#S256": thumbprint}
    # Limitation of the client: validateJwtAccessToken supports only the jkt (DPoP) confirmation method.
    error = result.error("validate_jwt_access_token")
    assert (error["name"], error["message"]) == (
        "UnsupportedOperationError",
        "unsupported JWT Confirmation method",
    )
    introspected = result.value("introspect")
    assert (introspected["active"], introspected["token_type"]) == (True, "Bearer")
    assert introspected["cnf"] == {"x5t#S256": thumbprint}


def test_oauth4webapi_dpop_and_mtls_together(clients: Clients) -> None:
    """A client that sender-constrains both ways at once (DPoP on the mTLS alias).

    RFC 7800 §3.1: "The 'cnf' claim value MUST represent only a single proof-of-possession key".
    A token bound to both the DPoP key and the certificate breaks that rule, and oauth4webapi's
    resource-server check refuses it ("multiple confirmation claims are not supported").
    """
    result = clients.run("oauth4webapi.mjs", "mtls_dpop")
    assert result.value("requests") == [f"POST {clients.interop.tls.url}/token"]
    # This server's choice (README): the certificate authenticates the client, the DPoP key binds.
    cnf = claims_of(result.value("exchange")["access_token"])["cnf"]
    assert cnf == {"jkt": result.value("thumbprint")}
    assert result.value("validate_jwt_access_token")["cnf"] == cnf


def test_oauth4webapi_introspection_and_revocation(clients: Clients) -> None:
    result = clients.run("oauth4webapi.mjs", "introspection")
    for step in ("introspect_bearer", "introspect_client_assertion", "introspect_mtls"):
        answer = result.value(step)
        assert answer["active"] is True, step
        assert (answer["sub"], answer["aud"], answer["token_type"]) == (AGENT, "tool:calc", "Bearer"), step
    assert result.value("mtls_requests") == [f"POST {clients.interop.tls.url}/introspect"]
    # Limitation of the client: options.headers may not carry Authorization (a ClientAuth may set it).
    refused = result.error("introspect_bearer_in_options_headers")
    assert (refused["name"], refused["code"]) == ("TypeError", "ERR_INVALID_ARG_VALUE"), refused
    assert "authorization" in refused["message"]
    unauthenticated = result.error("introspect_unauthenticated")
    assert unauthenticated["status"] == 401, unauthenticated
    assert result.value("revoke_by_holder") is None  # processRevocationResponse: 200, nothing returned
    assert result.value("introspect_after_revocation") == {"active": False}


def test_oauth4webapi_revocation_by_non_holder_is_a_silent_no_op(clients: Clients) -> None:
    """A resource server with valid credentials revokes a token that is not its own: 200 and nothing
    revoked. RFC 7009 §2.1 has the server refuse it; this server answers as §2.2 does for an invalid
    token instead, so that /revoke is no oracle telling a caller whether a token string is live and
    whose it is (a decision of issue 12, item 6; README, HTTP). oauth4webapi reports success."""
    result = clients.run("oauth4webapi.mjs", "revocation_by_non_holder")
    assert result.value("revoke_by_resource_server") is None  # processRevocationResponse: a 200
    assert result.value("introspect_afterwards")["active"] is True  # and nothing was revoked


# --- openid-client ------------------------------------------------------------------------------------


def test_openid_client_discovery(clients: Clients) -> None:
    result = clients.run("openid_client.mjs", "discovery")
    metadata = result.value("server_metadata")
    assert metadata["issuer"] == clients.interop.issuer
    assert metadata["mtls_endpoint_aliases"]["token_endpoint"] == f"{clients.interop.tls.url}/token"
    error = result.error("discovery_without_allowInsecureRequests")
    assert (error["name"], error["code"]) == ("ClientError", "OAUTH_HTTP_REQUEST_FORBIDDEN"), error
    # Not a defect: we publish RFC 8414 metadata only; the library's default looks for an OpenID
    # Provider, so algorithm: 'oauth2' is required with this issuer.
    oidc = result.error("discovery_oidc_default")
    assert (oidc["name"], oidc["code"]) == ("ClientError", "OAUTH_RESPONSE_IS_NOT_CONFORM"), oidc
    assert oidc["cause"]["status"] == 404, oidc


def test_openid_client_token_exchange(clients: Clients) -> None:
    result = clients.run("openid_client.mjs", "exchange")
    response = result.value("exchange")
    claims = assert_issued(response, token_type="bearer")
    assert claims["token_class"] == "tool" and "cnf" not in claims
    assert 0 < response["expiresIn"] <= response["expires_in"]
    assert_issued(result.value("exchange_data"), token_type="bearer", audience="data:crm")


def test_openid_client_error_responses(clients: Clients) -> None:
    result = clients.run("openid_client.mjs", "errors")
    assert_body_error(result.error("unknown_audience"), 400, "invalid_target", "not a known target")
    assert_body_error(result.error("scope_not_offered"), 400, "invalid_scope", "admin")
    assert_body_error(result.error("client_id_not_the_subject"), 401, "invalid_client", "client_id")


@pytest.mark.parametrize("alg", DPOP_ALGS)
def test_openid_client_dpop(clients: Clients, alg: str) -> None:
    result = clients.run("openid_client.mjs", "dpop", alg=alg)
    claims = assert_issued(result.value("exchange"), token_type="dpop")
    assert claims["cnf"] == {"jkt": result.value("thumbprint")}
    assert result.value("thumbprint") == result.value("thumbprint_jose")


def test_openid_client_mtls_through_endpoint_aliases(clients: Clients) -> None:
    result = clients.run("openid_client.mjs", "mtls")
    claims = assert_issued(result.value("exchange"), token_type="bearer")
    issuer, tls = clients.interop.issuer, clients.interop.tls.url
    # Discovery at the issuer, then the token request at the RFC 8705 §5 alias.
    assert result.value("requests") == [
        f"GET {issuer}/.well-known/oauth-authorization-server",
        f"POST {tls}/token",
    ]
    thumbprint = certificate_thumbprint(clients.interop.client_cert)
    assert result.value("certificate_thumbprint") == thumbprint
    assert claims["cnf"] == {"x5t#S256": thumbprint}


def test_openid_client_introspection_and_revocation(clients: Clients) -> None:
    result = clients.run("openid_client.mjs", "introspection")
    for step in ("introspect_bearer", "introspect_client_assertion", "introspect_mtls"):
        answer = result.value(step)
        assert answer["active"] is True, step
        assert (answer["sub"], answer["aud"], answer["token_type"]) == (AGENT, "tool:calc", "Bearer"), step
    assert result.value("mtls_requests")[-1] == f"POST {clients.interop.tls.url}/introspect"
    assert result.error("introspect_unauthenticated")["status"] == 401
    assert result.value("revoke_by_holder") is None
    assert result.value("introspect_after_revocation") == {"active": False}


# --- jose ---------------------------------------------------------------------------------------------


def test_jose_verifies_a_tool_token_with_the_tool_jwks(clients: Clients) -> None:
    tool_token = clients.exchange()
    result = clients.run(
        "jose.mjs", "tool_jwks", tool_token=tool_token, data_token=clients.exchange("data:crm", "read")
    )
    verified = result.value("verify_tool_token")
    assert verified["protectedHeader"]["typ"] == "at+jwt"
    assert verified["payload"] == claims_of(tool_token)
    assert result.value("verify_with_all_keys")["payload"] == claims_of(tool_token)
    assert result.error("verify_data_token")["code"] == "ERR_JWKS_NO_MATCHING_KEY"


def test_jose_data_jwks_refuses_a_tool_token(clients: Clients) -> None:
    result = clients.run(
        "jose.mjs",
        "data_jwks",
        tool_token=clients.exchange(),
        data_token=clients.exchange("data:crm", "read"),
    )
    assert result.value("verify_data_token")["payload"]["aud"] == "data:crm"
    assert result.error("verify_tool_token")["code"] == "ERR_JWKS_NO_MATCHING_KEY"
    count = result.value("data_key_count")
    assert count >= 1
    for index in range(count):
        error = result.error(f"verify_tool_token_with_data_key_{index}")
        assert error["code"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED", error


def test_jose_checks_audience_issuer_and_type(clients: Clients) -> None:
    result = clients.run("jose.mjs", "claims", tool_token=clients.exchange())
    for step, claim in (("wrong_audience", "aud"), ("wrong_issuer", "iss"), ("wrong_typ", "typ")):
        error = result.error(step)
        assert (error["code"], error["claim"]) == ("ERR_JWT_CLAIM_VALIDATION_FAILED", claim), error
    assert result.value("required_claims")["client_id"] == AGENT


# --- dpop ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", DPOP_ALGS)
def test_dpop_library_proofs(clients: Clients, alg: str) -> None:
    result = clients.run("dpop.mjs", "exchange", alg=alg)
    assert result.value("proof_header")["alg"] == alg  # Ed25519: the fully specified name (RFC 9864)
    exchanged = result.value("exchange")
    assert exchanged["status"] == 200, exchanged
    assert exchanged["body"]["token_type"] == "DPoP"
    jkt = result.value("thumbprint_dpop")
    assert jkt == result.value("thumbprint_jose")
    claims = claims_of(exchanged["body"]["access_token"])
    assert claims["cnf"] == {"jkt": jkt}
    proof = result.value("resource_proof")
    assert proof["claims"]["ath"] == proof["expected_ath"]
    assert proof["jwk_thumbprint"] == jkt
    assert result.value("validate_at_resource_server")["jti"] == claims["jti"]
