"""The development Workload API server (``spire/``), exercised over real Unix sockets.

Clients are the UNMODIFIED py-spiffe (``WorkloadApiClient``, ``X509Source``, ``JwtSource``) and, where
py-spiffe checks arguments before sending or ignores the answer, a raw ``grpc`` channel with our
generated messages. Every server runs under pytest's ``tmp_path`` and is stopped by its fixture.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from google.protobuf.message import Message
from spiffe import JwtBundleSet, JwtSource, SpiffeId, WorkloadApiClient, X509Source
from spiffe import TrustDomain as PySpiffeTrustDomain
from spiffe.errors import ArgumentError
from spiffe.workloadapi.errors import FetchJwtSvidError, FetchX509SvidError, ValidateJwtSvidError

from spire import workload_pb2 as pb
from spire.registry import Registry, RegistryError
from spire.server import DevWorkloadApi
from spire.service import SERVICE_NAME, WorkloadApiHandlers, method_handlers
from sts.errors import InvalidToken
from sts.spiffeid import TrustDomain
from sts.svid import JwtSvidVerifier
from sts.trust import TrustBundle, TrustStore

REPO = Path(__file__).resolve().parent.parent
DEMO_REGISTRY = REPO / "spire" / "dev-workloads.yaml"
HEADER = (("workload.spiffe.io", "true"),)
EXAMPLE = TrustDomain("example.org")
PARTNER = TrustDomain("partner.test")
STS_AUDIENCE = "https://sts.example.org"
METHODS = ("FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID", "FetchJWTBundles", "ValidateJWTSVID")

# A registration with short lifetimes, for watching renewal and rotation happen within a test.
SHORT_TTLS = """
trust_domain: example.org
federated_trust_domains: [partner.test]
workloads:
  fast:    {spiffe_id: spiffe://example.org/fast, x509_ttl: 2s, jwt_ttl: 2s}
  partner: {spiffe_id: spiffe://partner.test/fast}
"""


# Fixtures and helpers.


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevWorkloadApi]:
    """The demo registration served read-only for the whole module (tests must not change it)."""
    with DevWorkloadApi(Registry.load(DEMO_REGISTRY), tmp_path_factory.mktemp("demo")) as api:
        yield api


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., DevWorkloadApi]]:
    """Start a private server for a registration text; every server started is stopped afterwards."""
    started: list[DevWorkloadApi] = []

    def _start(text: str = SHORT_TTLS, **options: Any) -> DevWorkloadApi:
        api = DevWorkloadApi(Registry.parse(text), tmp_path / f"s{len(started)}", **options)
        started.append(api)
        api.start()
        return api

    yield _start
    for api in started:
        api.stop()


def client(api: DevWorkloadApi, name: str) -> WorkloadApiClient:
    return WorkloadApiClient(socket_path=api.socket_for(name), default_timeout=5)


def channel(api: DevWorkloadApi, name: str) -> grpc.Channel:
    return grpc.insecure_channel(api.socket_for(name))


def unary(
    chan: grpc.Channel,
    method: str,
    request: Message,
    response: type[Message],
    metadata: tuple[tuple[str, str], ...] = HEADER,
    path: str | None = None,
) -> Any:
    call = chan.unary_unary(
        path or f"/SpiffeWorkloadAPI/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    return call(request, metadata=metadata, timeout=5)


def stream(
    chan: grpc.Channel,
    method: str,
    request: Message,
    response: type[Message],
    metadata: tuple[tuple[str, str], ...] = HEADER,
    path: str | None = None,
    timeout: float = 5,
) -> Any:
    call = chan.unary_stream(
        path or f"/SpiffeWorkloadAPI/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    return call(request, metadata=metadata, timeout=timeout)


def first(chan: grpc.Channel, method: str, request: Message, response: type[Message], **kwargs: Any) -> Any:
    """The first message of a stream, then cancel it (what py-spiffe's one-shot fetches do)."""
    responses = stream(chan, method, request, response, **kwargs)
    try:
        return next(responses)
    finally:
        responses.cancel()


# One call of each RPC, as (method, is_stream, request, response type).
CALLS = (
    ("FetchX509SVID", True, pb.X509SVIDRequest(), pb.X509SVIDResponse),
    ("FetchX509Bundles", True, pb.X509BundlesRequest(), pb.X509BundlesResponse),
    ("FetchJWTSVID", False, pb.JWTSVIDRequest(audience=[STS_AUDIENCE]), pb.JWTSVIDResponse),
    ("FetchJWTBundles", True, pb.JWTBundlesRequest(), pb.JWTBundlesResponse),
    (
        "ValidateJWTSVID",
        False,
        pb.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"),
        pb.ValidateJWTSVIDResponse,
    ),
)


def call_once(
    chan: grpc.Channel, method: str, is_stream: bool, request: Message, response: type[Message], **kw: Any
) -> Any:
    return (first if is_stream else unary)(chan, method, request, response, **kw)


def outcome(action: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns)."""
    try:
        action()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def status_of(action: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        action()
    return caught.value.code()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def trust_store_from(bundles: JwtBundleSet) -> TrustStore:
    """Our trust store over the JWT bundles py-spiffe fetched (keys re-keyed by our TrustDomain)."""
    sources = []
    for bundle in bundles.bundles:
        keys = {
            kid: key
            for kid, key in bundle.jwt_authorities.items()
            if isinstance(key, ec.EllipticCurvePublicKey)
        }
        sources.append(_Fixed(TrustBundle(TrustDomain(bundle.trust_domain.name), keys)))
    return TrustStore(sources)


class _Fixed:
    def __init__(self, bundle: TrustBundle) -> None:
        self.trust_domain = bundle.trust_domain
        self._bundle = bundle

    def current(self) -> TrustBundle:
        return self._bundle


def ski(certificate: x509.Certificate) -> bytes:
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(certificate: x509.Certificate) -> bytes | None:
    return certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


# Protocol surface: paths, header, unknown methods.


def test_the_method_table_matches_our_proto(demo: DevWorkloadApi) -> None:
    service = pb.DESCRIPTOR.services_by_name[SERVICE_NAME]
    assert service.full_name == "sts_spire.workload.SpiffeWorkloadAPI"  # the package keeps py-spiffe's apart
    assert tuple(m.name for m in service.methods) == METHODS
    handlers = method_handlers(WorkloadApiHandlers(demo.state, "agent", max_streams=1))
    assert tuple(handlers) == METHODS
    assert [handlers[m.name].response_streaming for m in service.methods] == [
        m.server_streaming for m in service.methods
    ]


@pytest.mark.parametrize(("method", "is_stream", "request_", "response"), CALLS, ids=[c[0] for c in CALLS])
def test_each_rpc_is_served_at_the_standard_path_only(
    demo: DevWorkloadApi, method: str, is_stream: bool, request_: Message, response: type[Message]
) -> None:
    """Handlers are registered by hand under the bare service name, never under our proto package."""
    qualified = f"/sts_spire.workload.{SERVICE_NAME}/{method}"
    with channel(demo, "agent") as chan:
        # ValidateJWTSVID refuses the dummy token: served all the same.
        assert outcome(lambda: call_once(chan, method, is_stream, request_, response)) in (
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        code = outcome(lambda: call_once(chan, method, is_stream, request_, response, path=qualified))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_messages_are_wire_identical_to_py_spiffes_copy_of_the_standard() -> None:
    """Same message names, field names, numbers, types and labels (only the package differs)."""
    from spiffe._proto import workload_pb2 as theirs  # private module: read here only as a reference

    for name, ours in pb.DESCRIPTOR.message_types_by_name.items():
        reference = theirs.DESCRIPTOR.message_types_by_name[name]
        assert [(f.name, f.number, f.type, f.is_repeated) for f in ours.fields] == [
            (f.name, f.number, f.type, f.is_repeated) for f in reference.fields
        ], name
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(theirs.DESCRIPTOR.message_types_by_name)
    assert theirs.DESCRIPTOR.services_by_name[SERVICE_NAME].full_name == SERVICE_NAME


@pytest.mark.parametrize(
    "metadata",
    [(), (("workload.spiffe.io", "false"),), (("workload.spiffe.io", "TRUE"),), HEADER * 2],
    ids=["missing", "false", "wrong-case", "twice"],
)
@pytest.mark.parametrize(("method", "is_stream", "request_", "response"), CALLS, ids=[c[0] for c in CALLS])
def test_every_call_without_the_security_header_is_invalid_argument(
    demo: DevWorkloadApi,
    metadata: tuple[tuple[str, str], ...],
    method: str,
    is_stream: bool,
    request_: Message,
    response: type[Message],
) -> None:
    """Workload Endpoint §3: exactly one ``workload.spiffe.io: true``, unary and streaming alike."""
    with channel(demo, "agent") as chan:
        code = status_of(lambda: call_once(chan, method, is_stream, request_, response, metadata=metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [HEADER, ()], ids=["with-header", "without-header"])
def test_wit_svid_rpcs_are_unimplemented(demo: DevWorkloadApi, metadata: tuple[tuple[str, str], ...]) -> None:
    """The optional WIT-SVID profile is not served (the spec requires UNIMPLEMENTED), header or not."""
    with channel(demo, "agent") as chan:
        for method in ("FetchWITSVID", "FetchWITBundles"):
            call = functools.partial(
                first, chan, method, pb.X509SVIDRequest(), pb.X509SVIDResponse, metadata=metadata
            )
            assert status_of(call) == grpc.StatusCode.UNIMPLEMENTED


# X.509-SVID profile through py-spiffe.


def test_fetch_x509_svid_gives_a_spiffe_leaf_that_chains_to_the_bundle(demo: DevWorkloadApi) -> None:
    with client(demo, "agent") as c:
        svid = c.fetch_x509_svid()
        context = c.fetch_x509_context()
    assert svid.spiffe_id == SpiffeId("spiffe://example.org/agent/researcher")
    leaf = svid.leaf
    extensions = leaf.extensions
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/agent/researcher"
    ]
    basic = extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(minutes=59) < lifetime <= datetime.timedelta(hours=1, seconds=10)
    assert isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
    spki = PublicFormat.SubjectPublicKeyInfo
    assert svid.private_key.public_key().public_bytes(Encoding.DER, spki) == leaf.public_key().public_bytes(
        Encoding.DER, spki
    )

    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(PySpiffeTrustDomain("example.org"))
    assert bundle is not None
    authorities = list(bundle.x509_authorities)
    assert aki(leaf) in {ski(ca) for ca in authorities}
    verified = PolicyBuilder().store(Store(authorities)).build_client_verifier().verify(leaf, [])
    assert len(verified.chain) == 2  # leaf → dev CA: RFC 5280 path validation by cryptography


def test_the_svid_key_is_unencrypted_pkcs8_der(demo: DevWorkloadApi) -> None:
    with channel(demo, "agent") as chan:
        response = first(chan, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
    (svid,) = response.svids
    assert svid.spiffe_id == "spiffe://example.org/agent/researcher"
    assert svid.x509_svid_key[:4] == b"\x30\x81\x87\x02"  # SEQUENCE, then version 0 of PrivateKeyInfo
    assert isinstance(load_der_private_key(svid.x509_svid_key, None), ec.EllipticCurvePrivateKey)
    assert x509.load_der_x509_certificate(svid.x509_svid).extensions  # one DER leaf, nothing appended
    assert set(response.federated_bundles) == {"spiffe://partner.test"}


def test_fetch_x509_bundles_has_every_trust_domain_with_its_ca(demo: DevWorkloadApi) -> None:
    with client(demo, "tool") as c:
        bundles = c.fetch_x509_bundles()
    by_name = {bundle.trust_domain.name: bundle for bundle in bundles.bundles}
    assert set(by_name) == {"example.org", "partner.test"}
    for name, bundle in by_name.items():
        (ca,) = bundle.x509_authorities
        basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical and basic.value.ca is True
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        uris = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{name}"]


def test_the_partner_workload_gets_its_own_domain_and_the_federated_one(demo: DevWorkloadApi) -> None:
    with client(demo, "partner") as c:
        context = c.fetch_x509_context()
    assert context.default_svid.spiffe_id == SpiffeId("spiffe://partner.test/agent/summarizer")
    partner = context.x509_bundle_set.get_bundle_for_trust_domain(PySpiffeTrustDomain("partner.test"))
    example = context.x509_bundle_set.get_bundle_for_trust_domain(PySpiffeTrustDomain("example.org"))
    assert partner is not None and example is not None
    assert aki(context.default_svid.leaf) in {ski(ca) for ca in partner.x509_authorities}
    with channel(demo, "partner") as chan:
        response = first(chan, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
    assert set(response.federated_bundles) == {"spiffe://example.org"}
    assert response.federated_bundles["spiffe://example.org"] == demo.state.ca(EXAMPLE).x509_bundle_der()


# JWT-SVID profile through py-spiffe.


def test_fetch_jwt_svid_verifies_with_the_fetched_jwt_bundles(demo: DevWorkloadApi) -> None:
    with client(demo, "agent") as c:
        svid = c.fetch_jwt_svid({STS_AUDIENCE})
        bundles = c.fetch_jwt_bundles()
    verified = JwtSvidVerifier(trust_store_from(bundles), STS_AUDIENCE).verify(svid.token)
    assert str(verified.spiffe_id) == "spiffe://example.org/agent/researcher"
    assert jwt.get_unverified_header(svid.token) == {
        "alg": "ES256",
        "kid": jwt.get_unverified_header(svid.token)["kid"],
        "typ": "JWT",
    }
    claims = dict(verified.claims)
    assert set(claims) == {"sub", "aud", "exp", "iat"}
    assert claims["aud"] == [STS_AUDIENCE]
    assert claims["exp"] - claims["iat"] == 300


def test_jwt_bundles_are_jwks_of_jwt_keys_with_kid_for_every_domain(demo: DevWorkloadApi) -> None:
    with channel(demo, "agent") as chan:
        response = first(chan, "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse)
    assert set(response.bundles) == {"spiffe://example.org", "spiffe://partner.test"}
    for key, jwks in response.bundles.items():
        document = json.loads(jwks)
        assert all("kid" in k and "use" not in k and "x5c" not in k for k in document["keys"])
        assert len(TrustBundle.from_jwt_jwks(TrustDomain.parse(key), jwks).jwt_authorities) == 1


def test_validate_jwt_svid_accepts_a_good_token_and_returns_its_claims(demo: DevWorkloadApi) -> None:
    with client(demo, "agent") as agent, client(demo, "sts") as sts:
        token = agent.fetch_jwt_svid({STS_AUDIENCE}).token
        assert sts.validate_jwt_svid(token, STS_AUDIENCE).spiffe_id == SpiffeId(
            "spiffe://example.org/agent/researcher"
        )
    with channel(demo, "sts") as chan:
        response = unary(
            chan,
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience=STS_AUDIENCE, svid=token),
            pb.ValidateJWTSVIDResponse,
        )
    assert response.spiffe_id == "spiffe://example.org/agent/researcher"
    claims = dict(response.claims)
    assert claims["sub"] == "spiffe://example.org/agent/researcher"
    assert list(claims["aud"]) == [STS_AUDIENCE]
    assert claims["exp"] - claims["iat"] == 300.0  # Struct numbers are doubles


def test_validate_jwt_svid_of_a_foreign_domain_passes_only_sub_aud_exp(demo: DevWorkloadApi) -> None:
    with client(demo, "partner") as partner:
        token = partner.fetch_jwt_svid({STS_AUDIENCE}).token
    with channel(demo, "sts") as chan:
        response = unary(
            chan,
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience=STS_AUDIENCE, svid=token),
            pb.ValidateJWTSVIDResponse,
        )
    assert response.spiffe_id == "spiffe://partner.test/agent/summarizer"
    assert set(response.claims.keys()) == {"sub", "aud", "exp"}


@pytest.mark.parametrize(
    ("audience", "mangle", "reason"),
    [
        ("https://other.example.org", lambda t: t, "audience"),
        (STS_AUDIENCE, lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"), "signature"),
        (STS_AUDIENCE, lambda t: t.split(".")[0] + ".e30." + t.split(".")[2], "subject"),
        (STS_AUDIENCE, lambda t: "not-a-jwt", "compact"),
    ],
    ids=["wrong-audience", "bad-signature", "no-subject", "malformed"],
)
def test_validate_jwt_svid_refuses_bad_tokens_with_invalid_argument(
    demo: DevWorkloadApi, audience: str, mangle: Callable[[str], str], reason: str
) -> None:
    with client(demo, "agent") as agent:
        token = mangle(agent.fetch_jwt_svid({STS_AUDIENCE}).token)
        with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
            agent.validate_jwt_svid(token, audience)
    with channel(demo, "agent") as chan:
        request = pb.ValidateJWTSVIDRequest(audience=audience, svid=token)
        with pytest.raises(grpc.RpcError) as caught:
            unary(chan, "ValidateJWTSVID", request, pb.ValidateJWTSVIDResponse)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(caught.value.details())


def test_validate_jwt_svid_refuses_an_expired_token(start: Callable[..., DevWorkloadApi]) -> None:
    """The server's clock is injectable: mint now, validate after the token's expiry."""
    now = [time.time()]
    api = start(clock=lambda: now[0])
    with client(api, "fast") as c:
        token = c.fetch_jwt_svid({STS_AUDIENCE}).token
        c.validate_jwt_svid(token, STS_AUDIENCE)
        now[0] += 3  # jwt_ttl is 2 s
        with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
            c.validate_jwt_svid(token, STS_AUDIENCE)


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (pb.ValidateJWTSVIDRequest(audience="", svid="x.y.z"), "audience must be specified"),
        (pb.ValidateJWTSVIDRequest(audience="a", svid=""), "svid must be specified"),
    ],
    ids=["empty-audience", "empty-svid"],
)
def test_validate_jwt_svid_needs_audience_and_svid(
    demo: DevWorkloadApi, request_: Message, details: str
) -> None:
    with channel(demo, "agent") as chan, pytest.raises(grpc.RpcError) as caught:
        unary(chan, "ValidateJWTSVID", request_, pb.ValidateJWTSVIDResponse)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == details


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (pb.JWTSVIDRequest(), "audience must be specified"),
        (pb.JWTSVIDRequest(audience=[""]), "audience must be specified"),
        (pb.JWTSVIDRequest(audience=["a"], spiffe_id="https://example.org/x"), "invalid requested SPIFFE ID"),
    ],
    ids=["no-audience", "empty-audience", "malformed-id"],
)
def test_fetch_jwt_svid_refuses_bad_requests_with_invalid_argument(
    demo: DevWorkloadApi, request_: Message, details: str
) -> None:
    with channel(demo, "agent") as chan, pytest.raises(grpc.RpcError) as caught:
        unary(chan, "FetchJWTSVID", request_, pb.JWTSVIDResponse)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in str(caught.value.details())


def test_py_spiffe_fetch_jwt_svid_for_its_own_or_another_subject(demo: DevWorkloadApi) -> None:
    with client(demo, "agent") as c:
        own = c.fetch_jwt_svid({STS_AUDIENCE}, subject=SpiffeId("spiffe://example.org/agent/researcher"))
        assert own.spiffe_id == SpiffeId("spiffe://example.org/agent/researcher")
        # Workload API §6.2.1: an identity the caller is not entitled to is PERMISSION_DENIED.
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            c.fetch_jwt_svid({STS_AUDIENCE}, subject=SpiffeId("spiffe://example.org/tool/web-search"))
        with pytest.raises(ArgumentError):  # py-spiffe refuses an empty audience before calling
            c.fetch_jwt_svid(set())


# Unknown workloads.


def test_a_removed_registration_gets_permission_denied_everywhere(
    start: Callable[..., DevWorkloadApi],
) -> None:
    api = start()
    with channel(api, "fast") as chan:
        responses = stream(chan, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
        assert next(responses).svids  # an open stream, then the registration goes away
        api.deregister("fast")
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for method, is_stream, request, response in CALLS:
            with pytest.raises(grpc.RpcError) as caught:
                call_once(chan, method, is_stream, request, response)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert caught.value.details() == "no identity issued"
    with client(api, "fast") as c:
        with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
            c.fetch_x509_svid()
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            c.fetch_jwt_svid({STS_AUDIENCE})
    with client(api, "partner") as c:  # the others are unaffected
        assert c.fetch_x509_svid().spiffe_id == SpiffeId("spiffe://partner.test/fast")


# Streams, renewal and rotation.


def test_x509_source_sees_its_svid_renewed_at_half_life(start: Callable[..., DevWorkloadApi]) -> None:
    api = start()
    updates: list[int] = []
    with X509Source(socket_path=api.socket_for("fast"), timeout_in_seconds=5) as source:
        serial = source.get_x509_context().default_svid.leaf.serial_number
        source.subscribe_for_updates(
            lambda: updates.append(source.get_x509_context().default_svid.leaf.serial_number)
        )
        # x509_ttl is 2 s, so the renewal comes after about 1 s.
        wait_until(lambda: any(s != serial for s in updates), what="a renewed X.509-SVID")


def test_ca_rotation_reaches_x509_and_jwt_sources_then_the_old_authorities_go(
    start: Callable[..., DevWorkloadApi],
) -> None:
    api = start()
    x509_seen: list[tuple[bytes | None, frozenset[bytes]]] = []
    jwt_seen: list[frozenset[str]] = []
    with (
        X509Source(socket_path=api.socket_for("fast"), timeout_in_seconds=5) as x509_source,
        JwtSource(socket_path=api.socket_for("fast"), timeout_in_seconds=5) as jwt_source,
    ):

        def on_x509() -> None:
            context = x509_source.get_x509_context()
            bundle = context.x509_bundle_set.get_bundle_for_trust_domain(PySpiffeTrustDomain("example.org"))
            assert bundle is not None
            x509_seen.append(
                (aki(context.default_svid.leaf), frozenset(ski(c) for c in bundle.x509_authorities))
            )

        def on_jwt() -> None:
            bundle = jwt_source.get_bundle_for_trust_domain(PySpiffeTrustDomain("example.org"))
            assert bundle is not None
            jwt_seen.append(frozenset(bundle.jwt_authorities))

        x509_source.subscribe_for_updates(on_x509)
        jwt_source.subscribe_for_updates(on_jwt)
        old_ca = ski(api.state.ca(EXAMPLE).ca_certificate)
        old_kid = api.state.ca(EXAMPLE).jwt_kid
        jwt_source.fetch_svid({STS_AUDIENCE})  # signed by the old key, so it stays until this token expires
        api.rotate_ca()
        new_ca = ski(api.state.ca(EXAMPLE).ca_certificate)
        new_kid = api.state.ca(EXAMPLE).jwt_kid
        assert new_ca != old_ca and new_kid != old_kid

        # Overlap: both authorities published, new SVIDs already from the new CA.
        wait_until(lambda: (new_ca, frozenset({old_ca, new_ca})) in x509_seen, what="X.509 overlap")
        wait_until(lambda: frozenset({old_kid, new_kid}) in jwt_seen, what="JWT overlap")
        # Every SVID of the old authorities has expired (TTLs are 2 s): they are dropped.
        wait_until(lambda: (new_ca, frozenset({new_ca})) in x509_seen, what="old CA dropped")
        wait_until(lambda: frozenset({new_kid}) in jwt_seen, what="old JWT key dropped")
        assert not x509_source.is_closed() and not jwt_source.is_closed()


def test_rotating_another_trust_domain_and_concurrent_rotations(start: Callable[..., DevWorkloadApi]) -> None:
    """rotate_ca is thread-safe (the ``sts dev`` SIGUSR1 handler calls it from its own thread)."""
    api = start()
    before = api.state.version
    partner_ca = api.state.ca(PARTNER).ca_certificate
    api.rotate_ca(PARTNER)
    assert api.state.ca(PARTNER).ca_certificate != partner_ca
    threads = [threading.Thread(target=api.rotate_ca) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert api.state.version == before + 9
    with client(api, "fast") as c:
        assert c.fetch_x509_svid().spiffe_id == SpiffeId("spiffe://example.org/fast")
    with pytest.raises(ValueError, match="not served"):
        api.rotate_ca(TrustDomain("elsewhere.test"))


def test_a_stream_sends_at_once_and_stays_open_without_changes(demo: DevWorkloadApi) -> None:
    """The first message comes without delay; with nothing changed the stream neither ends nor repeats."""
    with channel(demo, "agent") as chan:
        responses = stream(
            chan, "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse, timeout=1.0
        )
        started = time.monotonic()
        assert next(responses).bundles
        assert time.monotonic() - started < 0.8
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_many_open_sources_do_not_starve_a_unary_call(start: Callable[..., DevWorkloadApi]) -> None:
    api = start()
    socket_path = api.socket_for("fast")
    sources: list[X509Source | JwtSource] = []
    try:
        for _ in range(10):
            sources.append(X509Source(socket_path=socket_path, timeout_in_seconds=5))
            sources.append(JwtSource(socket_path=socket_path, timeout_in_seconds=5))
        started = time.monotonic()
        with client(api, "fast") as c:
            assert c.fetch_jwt_svid({STS_AUDIENCE}, timeout=2).spiffe_id == SpiffeId(
                "spiffe://example.org/fast"
            )
            c.fetch_x509_bundles(timeout=2)
        assert time.monotonic() - started < 2.0
    finally:
        for source in sources:
            source.close()


def test_streams_beyond_the_cap_are_refused_and_unary_calls_still_run(
    start: Callable[..., DevWorkloadApi],
) -> None:
    api = start(max_streams_per_socket=2)
    with channel(api, "fast") as chan:
        open_streams = [
            stream(chan, "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse) for _ in range(2)
        ]
        for responses in open_streams:
            next(responses)
        code = status_of(lambda: first(chan, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert unary(chan, "FetchJWTSVID", pb.JWTSVIDRequest(audience=["a"]), pb.JWTSVIDResponse).svids
        open_streams[0].cancel()
        # The cancelled stream's slot is released, so a new stream is accepted again.
        wait_until(lambda: _stream_opens(chan), timeout=5, what="a freed stream slot")
        open_streams[1].cancel()


def _stream_opens(chan: grpc.Channel) -> bool:
    try:
        first(chan, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
    except grpc.RpcError:
        return False
    return True


# Sockets and lifecycle.


def test_sockets_are_per_workload_stale_ones_replaced_and_removed_on_stop(tmp_path: Path) -> None:
    registry = Registry.parse(SHORT_TTLS)
    socket_dir = tmp_path / "s"
    socket_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_dir / "fast.sock"))  # left behind by a crashed run
    stale.close()
    api = DevWorkloadApi(registry, socket_dir)
    with api:
        assert api.socket_for("fast") == f"unix://{socket_dir}/fast.sock"
        assert api.socket_for("fast").startswith("unix:///")
        with client(api, "fast") as c:
            assert c.fetch_x509_svid().spiffe_id == SpiffeId("spiffe://example.org/fast")
        with pytest.raises(KeyError):
            api.socket_for("nobody")
    assert sorted(os.listdir(socket_dir)) == []


def test_a_file_that_is_not_a_socket_is_never_replaced_and_a_partial_start_is_undone(tmp_path: Path) -> None:
    (tmp_path / "partner.sock").write_text("precious")  # the second workload's socket path
    api = DevWorkloadApi(Registry.parse(SHORT_TTLS), tmp_path)
    with pytest.raises(FileExistsError):
        api.start()
    assert (tmp_path / "partner.sock").read_text() == "precious"
    assert not (tmp_path / "fast.sock").exists()  # the first socket, already bound, was taken down


def test_a_socket_path_too_long_for_a_unix_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="107 bytes"):
        DevWorkloadApi(Registry.parse(SHORT_TTLS), tmp_path / ("d" * 120))


def test_the_spiffe_bundle_export_parses_with_uses(demo: DevWorkloadApi) -> None:
    data = demo.spiffe_bundle()
    document = json.loads(data)
    assert {key["use"] for key in document["keys"]} == {"jwt-svid", "x509-svid"}
    assert isinstance(document["spiffe_sequence"], int)
    bundle = TrustBundle.from_spiffe_bundle(EXAMPLE, data)
    ca = demo.state.ca(EXAMPLE)
    assert set(bundle.jwt_authorities) == {ca.jwt_kid}
    assert bundle.x509_authorities == (ca.ca_certificate,)
    partner = TrustBundle.from_spiffe_bundle(PARTNER, demo.spiffe_bundle(PARTNER))
    token = demo.state.mint_jwt_svid("partner", [STS_AUDIENCE])[1]
    store = TrustStore([_Fixed(bundle), _Fixed(partner)])
    assert (
        str(JwtSvidVerifier(store, STS_AUDIENCE).verify(token).spiffe_id)
        == "spiffe://partner.test/agent/summarizer"
    )
    with pytest.raises(InvalidToken):  # the partner's key is not in example.org's bundle
        JwtSvidVerifier(
            TrustStore([_Fixed(TrustBundle(PARTNER, bundle.jwt_authorities))]), STS_AUDIENCE
        ).verify(token)


def test_serve_runs_until_sigterm_and_rotates_on_sigusr1(tmp_path: Path) -> None:
    """The CLI entry point as its own process: sockets appear, SIGUSR1 rotates, SIGTERM stops cleanly."""
    config = tmp_path / "w.yaml"
    config.write_text(SHORT_TTLS)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from spire.server import serve; "
            "serve(Path(sys.argv[1]), Path(sys.argv[2]))",
            str(config),
            str(tmp_path / "st"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sock = tmp_path / "st" / "sockets" / "fast.sock"
    try:
        wait_until(
            lambda: sock.exists() and (tmp_path / "st" / "sockets" / "partner.sock").exists(), what="sockets"
        )
        with WorkloadApiClient(socket_path=f"unix://{sock}", default_timeout=5) as c:

            def authorities() -> int:
                bundle = c.fetch_x509_bundles().get_bundle_for_trust_domain(
                    PySpiffeTrustDomain("example.org")
                )
                return 0 if bundle is None else len(bundle.x509_authorities)

            assert authorities() == 1
            process.send_signal(signal.SIGUSR1)
            wait_until(lambda: authorities() == 2, what="rotation on SIGUSR1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not sock.exists()


# Registration parsing.

VALID_WORKLOAD = "workloads: {a: {spiffe_id: spiffe://example.org/a}}\n"


def test_the_demo_registration_parses() -> None:
    registry = Registry.load(DEMO_REGISTRY)
    assert registry.trust_domain == EXAMPLE
    assert registry.federated_trust_domains == (PARTNER,)
    assert set(registry.workloads) == {"agent", "orchestrator", "tool", "data", "admin", "partner", "sts"}
    agent = registry.workloads["agent"]
    assert (str(agent.spiffe_id), agent.x509_ttl, agent.jwt_ttl) == (
        "spiffe://example.org/agent/researcher",
        3600,
        300,
    )
    assert registry.workloads["partner"].spiffe_id.trust_domain == PARTNER


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trust_domain: example.org\n" + VALID_WORKLOAD + "extra: 1\n", "line 3: 'extra' is not a known key"),
        (VALID_WORKLOAD, "'trust_domain' is required"),
        ("trust_domain: Example.org\n" + VALID_WORKLOAD, "'trust_domain' is not a valid trust domain"),
        ("trust_domain: example.org\n", "'workloads' is required"),
        ("trust_domain: example.org\nworkloads: {}\n", "'workloads' must register at least one workload"),
        ("trust_domain: example.org\nworkloads: [a]\n", "'workloads' must map workload names"),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a, ttl: 5m}\n",
            "line 3: 'workloads.a.ttl' is not a known key",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: 'spiffe://example.org/a/'}\n",
            "'workloads.a.spiffe_id' is not a valid SPIFFE ID",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org}\n",
            "'workloads.a.spiffe_id' names a trust domain",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://partner.test/a}\n",
            "'workloads.a.spiffe_id' is in trust domain partner.test, which is neither",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {x509_ttl: 1h}\n",
            "'workloads.a.spiffe_id' is required",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a, x509_ttl: 1x}\n",
            "'workloads.a.x509_ttl' is not a duration",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a, jwt_ttl: 0}\n",
            "'workloads.a.jwt_ttl' must be at least 1s",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a, x509_ttl: 1s}\n",
            "'workloads.a.x509_ttl' must be at least 2s",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a, jwt_ttl: true}\n",
            "'workloads.a.jwt_ttl' is not a duration",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  ../x: {spiffe_id: spiffe://example.org/a}\n",
            "'workloads.../x' is not a safe",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a.sock: {spiffe_id: spiffe://example.org/a}\n",
            "is not a safe",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  "
            + "a" * 33
            + ": {spiffe_id: spiffe://example.org/a}\n",
            "is not a safe",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a}\n"
            "  b: {spiffe_id: spiffe://example.org/a}\n",
            "line 4: 'workloads.b.spiffe_id' is already the SPIFFE ID of workload 'a'",
        ),
        (
            "trust_domain: example.org\nworkloads:\n  a: {spiffe_id: spiffe://example.org/a}\n"
            "  a: {spiffe_id: spiffe://example.org/b}\n",
            "line 4: 'workloads.a' appears twice",
        ),
        (
            "trust_domain: example.org\nfederated_trust_domains: partner.test\n" + VALID_WORKLOAD,
            "must be a list",
        ),
        (
            "trust_domain: example.org\nfederated_trust_domains: [example.org]\n" + VALID_WORKLOAD,
            "'federated_trust_domains' must not repeat the main trust domain",
        ),
        (
            "trust_domain: example.org\nfederated_trust_domains: [p.test, p.test]\n" + VALID_WORKLOAD,
            "'federated_trust_domains[1]' repeats trust domain p.test",
        ),
        ("- just\n- a list\n", "the registration must be a mapping"),
        ("trust_domain: [unclosed\n", "not valid YAML"),
    ],
    ids=[
        "unknown-top-key",
        "no-trust-domain",
        "uppercase-trust-domain",
        "no-workloads",
        "empty-workloads",
        "workloads-not-mapping",
        "unknown-workload-key",
        "trailing-slash-id",
        "trust-domain-only-id",
        "undeclared-trust-domain",
        "no-spiffe-id",
        "bad-duration",
        "zero-duration",
        "x509-ttl-too-short",
        "boolean-duration",
        "path-traversal-name",
        "dotted-name",
        "long-name",
        "duplicate-spiffe-id",
        "duplicate-key",
        "federated-not-list",
        "federated-repeats-main",
        "federated-duplicate",
        "not-a-mapping",
        "bad-yaml",
    ],
)
def test_registry_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        Registry.parse(text, "w.yaml")
    assert str(caught.value).startswith("w.yaml")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400)],
    ids=["bare", "s", "m", "h", "d"],
)
def test_registry_durations(value: str, seconds: int) -> None:
    text = f"trust_domain: example.org\nworkloads:\n  a: {{spiffe_id: spiffe://example.org/a, jwt_ttl: {value}}}\n"
    assert Registry.parse(text).workloads["a"].jwt_ttl == seconds
