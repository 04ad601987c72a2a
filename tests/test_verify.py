"""``sts.verify.TokenVerifier`` against a real ``sts dev``: keys by class, claims, binding, revocation, Flask.

Forged tokens are signed with the development keys in the environment's state directory, so each
refusal is the rule under test and not merely an unknown key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from flask import Flask

from sts.binding import DpopKey, b64url
from sts.client import CachedJwtSvid, TokenClient, WorkloadApiSvids
from sts.dev.services import LoopbackService, tool_app
from sts.errors import TemporarilyUnavailable
from sts.keys import thumbprint
from sts.verify import (
    NOT_OURS,
    DpopProofRefused,
    InsufficientScope,
    Introspection,
    InvalidAccessToken,
    TokenVerifier,
    WorkloadApiUnavailable,
)
from tests.test_client import DATA, TOOL, Dev, RequestLog, claims_of, running_dev


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


@pytest.fixture(scope="module")
def agent(sts_dev: Dev) -> Iterator[TokenClient]:
    with sts_dev.client() as client:
        yield client


@pytest.fixture(scope="module")
def tool_verifier(sts_dev: Dev) -> TokenVerifier:
    return sts_dev.verifier(TOOL, "tool")


def signing_key(dev: Dev, token_class: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    path = sorted((dev.state_dir / "keys" / token_class).glob("*.pem"))[-1]
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, f"{token_class}-{thumbprint(key.public_key())}"


def forge(
    dev: Dev,
    *,
    key_class: str = "tool",
    claims: dict[str, Any] | None = None,
    header: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """A token signed with a real key of the STS, with the given changes."""
    key, kid = signing_key(dev, key_class)
    now = int(time.time())
    body = {
        "iss": dev.issuer,
        "sub": dev.spiffe_id("agent"),
        "aud": TOOL,
        "client_id": dev.spiffe_id("agent"),
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": f"forged-{time.monotonic_ns()}",
        "scope": "invoke",
        "token_class": "tool",
    } | (claims or {})
    for name in drop:
        del body[name]
    headers = {"typ": "at+jwt", "kid": kid} | (header or {})
    return jwt.encode(body, key, algorithm="ES256", headers=headers)


def resign(token: str, header: dict[str, Any], sign: Any) -> str:
    """The token's payload under a new header, signed by ``sign(signing_input) -> bytes``."""
    payload = token.split(".")[1]
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    return f"{head}.{payload}.{b64url(sign(f'{head}.{payload}'.encode()))}"


# --- the checks ------------------------------------------------------------------------------------


def test_a_good_token_is_accepted(sts_dev: Dev, agent: TokenClient, tool_verifier: TokenVerifier) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    verified = tool_verifier.verify(token.value, scope="invoke")
    assert verified.subject == sts_dev.spiffe_id("agent")
    assert verified.scopes == {"invoke"} and verified.token_class == "tool" and verified.binding == "none"
    assert "invoke" not in repr(verified.token)  # the repr does not leak the token
    assert token.value not in repr(verified)


def test_insufficient_scope(agent: TokenClient, tool_verifier: TokenVerifier) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    with pytest.raises(InsufficientScope) as refused:
        tool_verifier.verify(token.value, scope="admin")
    assert refused.value.status == 403
    assert 'scope="admin"' in refused.value.headers()["WWW-Authenticate"]


def hs256_with_public_key(dev: Dev, token: str) -> str:
    """The algorithm-confusion attack: HMAC keyed with the verifier's public key."""
    key, kid = signing_key(dev, "tool")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": kid}
    return resign(token, header, lambda data: hmac.new(public, data, hashlib.sha256).digest())


def es384_header(dev: Dev, token: str) -> str:
    """A valid ES256 signature under a header that claims another algorithm."""
    key, kid = signing_key(dev, "tool")

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return resign(token, {"alg": "ES384", "typ": "at+jwt", "kid": kid}, sign)


REFUSALS: list[tuple[str, Any, str]] = [
    ("wrong-issuer", lambda d: forge(d, claims={"iss": "http://evil.test"}), "issuer"),
    ("expired", lambda d: forge(d, claims={"exp": int(time.time()) - 60}), "expired"),
    ("not-yet-valid", lambda d: forge(d, claims={"nbf": int(time.time()) + 600}), "not_yet_valid"),
    ("wrong-audience", lambda d: forge(d, claims={"aud": "tool:calc"}), "audience"),
    ("audience-list-of-two", lambda d: forge(d, claims={"aud": [TOOL, "tool:calc"]}), "audience"),
    ("typ-jwt", lambda d: forge(d, header={"typ": "JWT"}), "typ"),
    ("no-typ", lambda d: forge(d, header={"typ": None}), "typ"),
    ("crit-header", lambda d: forge(d, header={"crit": ["exp"]}), "crit"),
    ("no-jti", lambda d: forge(d, drop=("jti",)), "claims"),
    ("no-exp", lambda d: forge(d, drop=("exp",)), "claims"),
    ("no-client-id", lambda d: forge(d, drop=("client_id",)), "claims"),
    ("alg-none", lambda d: resign(forge(d), {"alg": "none", "typ": "at+jwt"}, lambda _: b""), "alg"),
    ("alg-hs256-public-key", lambda d: hs256_with_public_key(d, forge(d)), "alg"),
    ("alg-es384-in-header", lambda d: es384_header(d, forge(d)), "alg"),
    ("unknown-kid", lambda d: forge(d, header={"kid": "tool-unknown"}), "key"),
    ("tampered-payload", lambda d: tamper(forge(d)), "signature"),
    ("data-key-claims-tool", lambda d: forge(d, key_class="data"), "key"),
    ("tool-key-claims-data-kid", lambda d: forge(d, header={"kid": signing_key(d, "data")[1]}), "key"),
    ("token-class-data", lambda d: forge(d, claims={"token_class": "data"}), "token_class"),
    ("not-a-jws", lambda d: "not-a-token", "malformed"),
    ("bad-base64", lambda d: "***.e30.e30", "malformed"),
]


def tamper(token: str) -> str:
    head, payload, signature = token.split(".")
    claims = jwt.utils.base64url_decode(payload)
    changed = claims.replace(b'"invoke"', b'"admin!"')
    return f"{head}.{b64url(changed)}.{signature}"


def error_description(challenge: str) -> str:
    found = re.search(r'error_description="([^"]*)"', challenge)
    assert found, challenge
    return found.group(1)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("access token refused")]


@pytest.mark.parametrize(("make", "rule"), [(m, r) for _, m, r in REFUSALS], ids=[i for i, _, _ in REFUSALS])
def test_refusals(
    sts_dev: Dev, tool_verifier: TokenVerifier, make: Any, rule: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal names its rule where a resource server's developer looks: str, challenge, log."""
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        tool_verifier.verify(make(sts_dev), scope="invoke")
    assert refused.value.rule == rule
    assert refused.value.status == 401
    challenge = refused.value.headers()["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token"')
    assert str(refused.value).endswith(f"(rule: {rule})")
    assert error_description(challenge).endswith(f"(rule: {rule})")
    assert [line for line in refusal_lines(caplog) if f"(rule: {rule})" in line]
    for expected in (sts_dev.issuer, TOOL, "tool-"):  # no oracle: neither the expected values nor the kid
        assert expected not in challenge


def test_a_token_for_another_service_says_so_only_by_its_rule(
    sts_dev: Dev, agent: TokenClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A real tool token at a tool verifier for another audience: only the rule says it was the aud."""
    token = agent.token(audience=TOOL, scope="invoke").value
    elsewhere = sts_dev.verifier(DATA, "tool")  # class matches; the audience does not
    with caplog.at_level(logging.INFO, logger="sts.verify"), pytest.raises(InvalidAccessToken) as refused:
        elsewhere.verify(token)
    assert str(refused.value) == f"{NOT_OURS} (rule: audience)"
    challenge = refused.value.headers()["WWW-Authenticate"]
    assert DATA not in challenge and TOOL not in challenge and sts_dev.issuer not in challenge
    (line,) = [line for line in refusal_lines(caplog) if "(rule: audience)" in line]
    assert f"aud '{TOOL}', expected '{DATA}'" in line  # the server-side log says what and why


def test_construction_with_a_dev_socket_fetches_the_first_svid(sts_dev: Dev) -> None:
    sts_dev.verifier(TOOL, "tool", timeout=1)  # reachable: no error
    with pytest.raises(WorkloadApiUnavailable, match="does not exist"):
        TokenVerifier(
            issuer=sts_dev.issuer,
            audience=TOOL,
            token_class="tool",
            socket=sts_dev.socket("tool") + ".gone",
            timeout=1,
        )


def test_forged_token_with_every_rule_kept_is_accepted(sts_dev: Dev) -> None:
    """The forgery helper itself is sound: the refusals above come from the change, not the helper."""
    verifier = TokenVerifier.without_revocation_check(
        issuer=sts_dev.issuer, audience=TOOL, token_class="tool"
    )
    assert verifier.verify(forge(sts_dev), scope="invoke").scopes == {"invoke"}


def test_tool_token_is_refused_by_a_data_verifier_even_with_the_audience_forced(
    sts_dev: Dev, agent: TokenClient
) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    forced = sts_dev.verifier(TOOL, "data")  # audience matches; only the class differs
    with pytest.raises(InvalidAccessToken) as refused:
        forced.verify(token.value)
    assert refused.value.rule == "key"


def test_expiry_with_leeway_on_an_injected_clock(sts_dev: Dev, agent: TokenClient) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    exp = claims_of(token.value)["exp"]
    verifier = sts_dev.verifier(TOOL, "tool", leeway=5)
    verifier.verify(token.value, now=exp + 4)  # within the leeway
    with pytest.raises(InvalidAccessToken) as refused:
        verifier.verify(token.value, now=exp + 5)
    assert refused.value.rule == "expired"


# --- revocation ------------------------------------------------------------------------------------


def test_revoked_token_is_refused_within_the_cache_bound(sts_dev: Dev) -> None:
    now = [time.time()]
    verifier = sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=2, clock=lambda: now[0])
    with sts_dev.client() as holder:
        token = holder.token(audience=TOOL, scope="invoke").value
        verifier.verify(token)
        holder.revoke(token)
    verifier.verify(token)  # the active answer is still within its 2 s
    now[0] += 2
    with pytest.raises(InvalidAccessToken) as refused:
        verifier.verify(token)
    assert refused.value.rule == "revoked"


def test_task_completion_refuses_the_tasks_tokens(sts_dev: Dev, agent: TokenClient) -> None:
    task_id = sts_dev.new_task()
    tool = agent.token(audience=TOOL, scope="invoke", task_id=task_id).value
    key = DpopKey.generate()  # confidential data: bound and client-authenticated (demo guardrail policy)
    data = agent.token(audience=DATA, scope="read", task_id=task_id, dpop=key, client_assertion=True).value
    tool_verifier = sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=0)
    data_verifier = sts_dev.verifier(DATA, "data", introspection_cache_seconds=0)
    url = "https://data.example/customers"

    def read_data() -> None:
        proof = key.proof("GET", url, access_token=data)
        data_verifier.verify(data, scheme="DPoP", scope="read", dpop_proof=proof, method="GET", url=url)

    assert tool_verifier.verify(tool).task_id == task_id
    read_data()
    agent.complete_task(task_id)
    with pytest.raises(InvalidAccessToken, match="revoked"):
        tool_verifier.verify(tool)
    with pytest.raises(InvalidAccessToken, match="revoked"):
        read_data()


def test_introspection_by_a_server_not_serving_the_audience_is_refused(
    sts_dev: Dev, agent: TokenClient
) -> None:
    """The data workload is not in tool:web-search's resource_servers: the STS says inactive."""
    token = agent.token(audience=TOOL, scope="invoke").value
    impostor = TokenVerifier(
        issuer=sts_dev.issuer, audience=TOOL, token_class="tool", socket=sts_dev.socket("data")
    )
    with pytest.raises(InvalidAccessToken, match="revoked"):
        impostor.verify(token)


class SwitchableSession(requests.Session):
    """A session whose network can be cut."""

    down = False

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.down:
            raise requests.ConnectionError("cut by the test")
        return super().request(*args, **kwargs)


def test_fails_closed_when_the_sts_stays_unreachable(sts_dev: Dev, agent: TokenClient) -> None:
    now = [time.time()]
    session = SwitchableSession()
    with WorkloadApiSvids(sts_dev.socket("tool")) as tool_workload:
        introspection = Introspection(
            f"{sts_dev.issuer}/introspect",
            CachedJwtSvid(tool_workload, sts_dev.issuer).get,
            session=session,
            cache_seconds=1,
            unreachable_grace=3,
        )
        verifier = sts_dev.verifier(TOOL, "tool", revocation=introspection, clock=lambda: now[0])
        token = agent.token(audience=TOOL, scope="invoke").value
        verifier.verify(token)
        session.down = True
        now[0] += 3.5  # past the cache, within the grace: the last answer still counts
        verifier.verify(token)
        now[0] += 1  # past cache + grace: refused, and said to be temporary
        with pytest.raises(TemporarilyUnavailable):
            verifier.verify(token)
        fresh = agent.token(audience=TOOL, scope="invoke", client_assertion=True).value
        with pytest.raises(TemporarilyUnavailable):  # never seen: nothing to fall back on
            verifier.verify(fresh)
        session.down = False
        now[0] += 1  # the STS is asked again once retry_after_failure (1 s) has passed
        verifier.verify(token)


# --- keys ------------------------------------------------------------------------------------------


def test_unknown_kid_refreshes_keys_at_most_once_per_interval(sts_dev: Dev, agent: TokenClient) -> None:
    now = [time.time()]
    calls = RequestLog()
    verifier = sts_dev.verifier(
        TOOL, "tool", session=calls.session(), key_refresh_interval=30, clock=lambda: now[0]
    )
    verifier.verify(agent.token(audience=TOOL, scope="invoke").value)
    assert calls.count("/jwks/tool.json") == 1
    assert calls.count("/jwks.json") == 0  # only the class's own set is fetched
    unknown = forge(sts_dev, header={"kid": "tool-rotated-away"})
    start = now[0]
    for offset in (0, 1, 31, 32):  # one fetch at 31 s, none at 1 s or 32 s
        now[0] = start + offset
        with pytest.raises(InvalidAccessToken):
            verifier.verify(unknown)
    assert calls.count("/jwks/tool.json") == 2


def test_warm_path_does_no_io(sts_dev: Dev, agent: TokenClient) -> None:
    """A warm verify makes no request to the STS. Its cost is measured in bench/, never asserted here."""
    calls = RequestLog()
    verifier = sts_dev.verifier(TOOL, "tool", session=calls.session(), introspection_cache_seconds=3600)
    token = agent.token(audience=TOOL, scope="invoke").value
    verifier.verify(token)
    requests_before = len(calls.paths)
    for _ in range(50):
        verifier.verify(token)
    assert len(calls.paths) == requests_before


# --- binding ---------------------------------------------------------------------------------------


URL = "https://tool.test/search"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "Ed25519"])  # Ed25519: RFC 9864 (issue 12 #4)
def test_dpop_bound_token_with_a_valid_proof(sts_dev: Dev, agent: TokenClient, alg: str) -> None:
    key = DpopKey.generate(alg)
    token = agent.token(audience=TOOL, scope="invoke", dpop=key)
    verifier = sts_dev.verifier(TOOL, "tool")
    headers = token.headers("GET", URL + "?q=1")
    verified = verifier.verify_request(
        authorization=headers["Authorization"], dpop=[headers["DPoP"]], method="GET", url=URL
    )
    assert verified.binding == "dpop"


def dpop_refusal(verifier: TokenVerifier, token: str, proof: str | None, *, scheme: str = "DPoP") -> Any:
    with pytest.raises(InvalidAccessToken) as refused:
        verifier.verify_request(
            authorization=f"{scheme} {token}", dpop=[proof] if proof else [], method="GET", url=URL
        )
    return refused.value


def test_dpop_refusals(sts_dev: Dev, agent: TokenClient) -> None:
    key = DpopKey.generate()
    token = agent.token(audience=TOOL, scope="invoke", dpop=key).value
    verifier = sts_dev.verifier(TOOL, "tool")

    another_key = dpop_refusal(verifier, token, DpopKey.generate().proof("GET", URL, access_token=token))
    assert isinstance(another_key, DpopProofRefused) and "key" in another_key.description

    proof = key.proof("GET", URL, access_token=token)
    verifier.verify_request(authorization=f"DPoP {token}", dpop=[proof], method="GET", url=URL)
    replayed = dpop_refusal(verifier, token, proof)
    assert isinstance(replayed, DpopProofRefused) and "used before" in replayed.description

    cases = {
        "no proof": None,
        "other url": key.proof("GET", "https://other.test/search", access_token=token),
        "other method": key.proof("POST", URL, access_token=token),
        "no ath": key.proof("GET", URL),
        "ath of another token": key.proof("GET", URL, access_token="x.y.z"),
        "stale": key.proof("GET", URL, access_token=token, now=time.time() - 600),
    }
    for case, bad in cases.items():
        assert isinstance(dpop_refusal(verifier, token, bad), DpopProofRefused), case

    as_bearer = dpop_refusal(verifier, token, None, scheme="Bearer")
    assert as_bearer.rule == "scheme"
    challenge = as_bearer.headers()["WWW-Authenticate"]
    assert challenge.startswith('DPoP error="invalid_token"') and 'algs="ES256 EdDSA Ed25519"' in challenge


def test_unbound_token_sent_with_the_dpop_scheme_is_refused(sts_dev: Dev, agent: TokenClient) -> None:
    token = agent.token(audience=TOOL, scope="invoke").value
    key = DpopKey.generate()
    refused = dpop_refusal(sts_dev.verifier(TOOL, "tool"), token, key.proof("GET", URL, access_token=token))
    assert refused.rule == "scheme"


def test_mtls_bound_token_needs_its_certificate(sts_dev: Dev, agent: TokenClient) -> None:
    token = agent.token(audience=TOOL, scope="invoke", mtls=True).value
    cert_file, _ = agent.client_certificate_files()
    own = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[0]
    with sts_dev.client("orchestrator") as other:
        foreign = x509.load_pem_x509_certificates(Path(other.client_certificate_files()[0]).read_bytes())[0]
    verifier = sts_dev.verifier(TOOL, "tool")
    assert verifier.verify(token, client_certificate=own).binding == "mtls"
    for certificate in (None, foreign):
        with pytest.raises(InvalidAccessToken) as refused:
            verifier.verify(token, client_certificate=certificate)
        assert refused.value.rule == "mtls"


# --- Flask decorator over HTTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_service(sts_dev: Dev) -> Iterator[str]:
    with LoopbackService(tool_app(sts_dev.verifier(TOOL, "tool"))) as service:
        yield f"{service.url}/search"


def test_flask_challenges(sts_dev: Dev, agent: TokenClient, tool_service: str) -> None:
    none = requests.get(tool_service, timeout=5)
    assert none.status_code == 401
    assert none.headers["WWW-Authenticate"] == 'Bearer, DPoP algs="ES256 EdDSA Ed25519"'  # both schemes, no error

    bad = requests.get(tool_service, headers={"Authorization": "Bearer x.y.z"}, timeout=5)
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_token"
    assert bad.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token", error_description=')
    assert error_description(bad.headers["WWW-Authenticate"]).endswith("(rule: malformed)")
    assert bad.json()["error_description"].endswith("(rule: malformed)")

    bound = agent.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate()).value
    as_bearer = requests.get(tool_service, headers={"Authorization": f"Bearer {bound}"}, timeout=5)
    assert as_bearer.status_code == 401
    assert as_bearer.headers["WWW-Authenticate"].startswith('DPoP error="invalid_token"')
    assert error_description(as_bearer.headers["WWW-Authenticate"]).endswith("(rule: scheme)")

    good = agent.token(audience=TOOL, scope="invoke")
    response = requests.get(tool_service, headers=good.headers("GET", tool_service), timeout=5)
    assert response.status_code == 200 and response.json()["caller"] == sts_dev.spiffe_id("agent")


def test_flask_insufficient_scope(sts_dev: Dev, agent: TokenClient) -> None:
    verifier = sts_dev.verifier(TOOL, "tool")
    app = Flask("writer")

    @app.post("/customers")
    @verifier.require_token(scope="write")
    def write() -> str:
        return "written"

    token = agent.token(audience=TOOL, scope="invoke")
    with LoopbackService(app) as service:
        url = f"{service.url}/customers"
        response = requests.post(url, headers=token.headers("POST", url), timeout=5)
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="insufficient_scope"')
    assert 'scope="write"' in response.headers["WWW-Authenticate"]
    assert error_description(response.headers["WWW-Authenticate"]).endswith("(rule: scope)")


# --- several replicas: the DPoP replay cache in Redis ------------------------------------------------


def test_replicas_sharing_a_redis_replay_cache_refuse_a_proof_used_at_another(
    sts_dev: Dev, agent: TokenClient, tmp_path: Path
) -> None:
    """Two replicas of one resource server share ``RedisReplayCache`` (a real redis-server): a proof
    accepted by one is replayed at the other and refused there; without Redis a proof is a 503."""
    from sts.verify import RedisReplayCache
    from tests.redis_server import RedisServer

    url = "https://search.internal/search"
    with RedisServer(tmp_path / "redis") as redis:
        replicas = [sts_dev.verifier(TOOL, "tool", replay=RedisReplayCache(redis.url).use_once) for _ in range(2)]
        token = agent.token(audience=TOOL, scope="invoke", dpop=(key := DpopKey.generate()))
        headers = token.headers("GET", url)
        first = replicas[0].verify_request(authorization=headers["Authorization"], dpop=[headers["DPoP"]], method="GET", url=url)
        assert first.binding == "dpop"
        with pytest.raises(DpopProofRefused) as replayed:
            replicas[1].verify_request(authorization=headers["Authorization"], dpop=[headers["DPoP"]], method="GET", url=url)
        assert replayed.value.rule == "dpop_proof" and "replayed" in (replayed.value.detail or "")
        fresh = key.proof("GET", url, access_token=token.value)
        assert replicas[1].verify_request(authorization=headers["Authorization"], dpop=[fresh], method="GET", url=url)
        redis.stop()
        with pytest.raises(TemporarilyUnavailable, match="replay store"):
            replicas[0].verify_request(
                authorization=headers["Authorization"], dpop=[key.proof("GET", url, access_token=token.value)], method="GET", url=url
            )


def test_flask_serves_the_resource_metadata_and_names_it_in_challenges(sts_dev: Dev, agent: TokenClient) -> None:
    verifier = sts_dev.verifier(TOOL, "tool", resource="https://search.internal/", scopes=["invoke"])
    app = Flask("search")
    verifier.init_app(app)

    @app.get("/search")
    @verifier.require_token(scope="invoke")
    def search() -> str:
        return "found"

    with LoopbackService(app) as service:
        document = requests.get(f"{service.url}/.well-known/oauth-protected-resource", timeout=5).json()
        missing = requests.get(f"{service.url}/search", timeout=5)
        data = agent.token(audience=DATA, scope="read", task_id=sts_dev.new_task(), dpop=DpopKey.generate(), client_assertion=True)
        wrong_class = requests.get(f"{service.url}/search", headers={"Authorization": f"DPoP {data.value}"}, timeout=5)
    assert document == {
        "resource": "https://search.internal/",
        "authorization_servers": [sts_dev.issuer],
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA", "Ed25519"],
        "dpop_bound_access_tokens_required": False,
        "scopes_supported": ["invoke"],
    }
    metadata = 'resource_metadata="https://search.internal/.well-known/oauth-protected-resource"'
    assert missing.raw.headers.getlist("WWW-Authenticate") == [
        f"Bearer {metadata}",
        f'DPoP {metadata}, algs="ES256 EdDSA Ed25519"',
    ]
    assert wrong_class.status_code == 401
    assert f"{metadata}, algs=" in wrong_class.headers["WWW-Authenticate"]
    assert error_description(wrong_class.headers["WWW-Authenticate"]).endswith("(rule: key)")
