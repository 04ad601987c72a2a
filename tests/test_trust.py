"""Trust bundles: the SPIFFE bundle format, PEM and Workload API JWKS parsers, file reloads, the trust store."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sts.errors import TemporarilyUnavailable
from sts.spiffeid import TrustDomain
from sts.trust import (
    BundleError,
    FileBundleSource,
    TrustBundle,
    TrustStore,
    load_json_object,
)
from tests.authority import TestAuthority, public_jwk

TD = TrustDomain("example.org")


@pytest.fixture
def authority() -> TestAuthority:
    return TestAuthority()


def bundle_json(*keys: dict[str, Any], **members: Any) -> bytes:
    return json.dumps({"keys": list(keys), **members}).encode()


def jwt_key(kid: str = "k1", curve: ec.EllipticCurve | None = None) -> dict[str, Any]:
    key = ec.generate_private_key(curve or ec.SECP256R1()).public_key()
    return public_jwk(key) | {"use": "jwt-svid", "kid": kid}


def x509_key(authority: TestAuthority) -> dict[str, Any]:
    return json.loads(authority.spiffe_bundle())["keys"][-1]


# --- SPIFFE bundle format (SPIFFE_Trust_Domain_and_Bundle.md §4) -------------------------------------


def test_spiffe_bundle_splits_keys_by_use(authority: TestAuthority) -> None:
    bundle = TrustBundle.from_spiffe_bundle(TD, authority.spiffe_bundle())
    assert bundle.trust_domain == TD
    assert list(bundle.jwt_authorities) == [authority.kid]
    assert isinstance(bundle.jwt_authorities[authority.kid], EllipticCurvePublicKey)
    assert bundle.x509_authorities == (authority.ca_cert,)
    assert bundle.sequence == 1
    assert bundle.refresh_hint == 300


@pytest.mark.parametrize(
    "alg", ["ES256", "ES384", "ES512", "RS256"], ids=["ec-p256", "ec-p384", "ec-p521", "rsa-2048"]
)
def test_spiffe_bundle_accepts_each_supported_key_type(alg: str) -> None:
    authority = TestAuthority(alg=alg)
    key = TrustBundle.from_spiffe_bundle(TD, authority.spiffe_bundle()).jwt_authorities[authority.kid]
    assert key.public_numbers() == authority.public_key.public_numbers()


def test_spiffe_bundle_keeps_every_key_after_rotation(authority: TestAuthority) -> None:
    old = authority.kid
    new = authority.rotate()
    bundle = authority.bundle()
    assert set(bundle.jwt_authorities) == {old, new}
    assert bundle.sequence == 2


def test_empty_keys_list_is_a_bundle_with_no_authorities() -> None:
    """Bundle §4.1.3: an empty ``keys`` array means every key was revoked; it is valid, not an error."""
    bundle = TrustBundle.from_spiffe_bundle(TD, bundle_json(spiffe_sequence=7))
    assert dict(bundle.jwt_authorities) == {}
    assert bundle.x509_authorities == ()
    assert bundle.sequence == 7
    assert bundle.refresh_hint is None


@pytest.mark.parametrize(
    "ignored",
    [
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "u"},
        {"kty": "EC", "use": "JWT-SVID", "kid": "u"},
        {"kty": "EC", "use": "sig", "kid": "u"},
        {"kty": "EC", "use": "wit-svid", "kid": "u"},
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "use": "jwt-svid",
        },
        {"kty": "future-kty", "use": "jwt-svid", "kid": "u"},
    ],
    ids=[
        "missing-use",
        "use-is-case-sensitive",
        "use-sig-is-not-a-spiffe-use",
        "unknown-use-wit-svid",
        "unknown-kty-okp",
        "unknown-kty",
    ],
)
def test_spiffe_bundle_ignores_entries_of_unknown_use_or_kty(ignored: dict[str, Any]) -> None:
    """Bundle §4.2.1, §4.2.2: such entries are skipped whole (even when otherwise invalid); the rest is kept."""
    bundle = TrustBundle.from_spiffe_bundle(TD, bundle_json(ignored, jwt_key("k1")))
    assert list(bundle.jwt_authorities) == ["k1"]


def _rsa_jwk(bits: int) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), use="jwt-svid", kid="r")


def _private_ec_jwk() -> dict[str, Any]:
    private = ec.generate_private_key(ec.SECP256R1())
    return dict(ECAlgorithm.to_jwk(private, as_dict=True), use="jwt-svid", kid="p")


def _private_rsa_jwk() -> dict[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return dict(RSAAlgorithm.to_jwk(private, as_dict=True), use="jwt-svid", kid="p")


def _x509_with(authority: TestAuthority, **changes: Any) -> dict[str, Any]:
    return x509_key(authority) | changes


BAD_BUNDLES: list[tuple[str, Callable[[TestAuthority], bytes], str]] = [
    ("not-json", lambda a: b"{not json", "not a JSON object"),
    ("not-utf8", lambda a: b'{"keys": []}\xff', "not a JSON object"),
    ("json-array", lambda a: b"[]", "not a JSON object"),
    ("duplicate-member", lambda a: b'{"keys": [], "keys": []}', "not a JSON object"),
    ("deeply-nested-json", lambda a: b'{"keys": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ("missing-keys", lambda a: b'{"spiffe_sequence": 1}', "no 'keys'"),
    ("keys-not-a-list", lambda a: b'{"keys": {}}', "not a list"),
    ("key-not-an-object", lambda a: bundle_json("k"), "not a JSON object"),
    ("missing-kty", lambda a: bundle_json({"use": "jwt-svid", "kid": "k"}), "no 'kty'"),
    (
        "oct-key",
        lambda a: bundle_json({"kty": "oct", "k": "c2VjcmV0", "use": "jwt-svid", "kid": "k"}),
        "symmetric",
    ),
    ("oct-key-with-unknown-use", lambda a: bundle_json({"kty": "oct", "k": "c2VjcmV0"}), "symmetric"),
    ("private-ec-jwk", lambda a: bundle_json(_private_ec_jwk()), "private key material"),
    ("private-rsa-jwk", lambda a: bundle_json(_private_rsa_jwk()), "private key material"),
    ("private-jwk-with-unknown-use", lambda a: bundle_json(_private_ec_jwk() | {"use": "x"}), "private key"),
    ("duplicate-kid", lambda a: bundle_json(jwt_key("k1"), jwt_key("k1")), "duplicate kid"),
    ("jwt-svid-without-kid", lambda a: bundle_json(jwt_key() | {"kid": None}), "no 'kid'"),
    ("jwt-svid-empty-kid", lambda a: bundle_json(jwt_key() | {"kid": ""}), "no 'kid'"),
    ("unsupported-curve", lambda a: bundle_json(jwt_key(curve=ec.SECP256K1())), "unsupported elliptic curve"),
    ("ec-missing-crv", lambda a: bundle_json(jwt_key() | {"crv": None}), "unsupported elliptic curve"),
    (
        "ec-crv-not-a-string",
        lambda a: bundle_json(jwt_key() | {"crv": ["P-256"]}),
        "unsupported elliptic curve",
    ),
    (
        "ec-point-not-on-curve",
        lambda a: bundle_json(jwt_key() | {"y": jwt_key()["y"]}),
        "invalid EC public key",
    ),
    ("rsa-missing-modulus", lambda a: bundle_json(_rsa_jwk(2048) | {"n": None}), "invalid RSA public key"),
    ("rsa-1024-bits", lambda a: bundle_json(_rsa_jwk(1024)), "shorter than 2048 bits"),
    ("x509-x5c-not-a-list", lambda a: bundle_json(_x509_with(a, x5c="AAAA")), "list of base64"),
    ("x509-x5c-of-numbers", lambda a: bundle_json(_x509_with(a, x5c=[1])), "list of base64"),
    ("x509-x5c-not-base64", lambda a: bundle_json(_x509_with(a, x5c=["not base64!"])), "cannot be parsed"),
    ("x509-x5c-not-der", lambda a: bundle_json(_x509_with(a, x5c=["AAAA"])), "cannot be parsed"),
    (
        "x509-key-members-not-a-curve-point",
        lambda a: bundle_json(_x509_with(a, x=jwt_key()["x"], y=jwt_key()["y"])),
        "invalid EC public key",
    ),
    ("sequence-not-integer", lambda a: bundle_json(spiffe_sequence="1"), "spiffe_sequence"),
    ("sequence-bool", lambda a: bundle_json(spiffe_sequence=True), "spiffe_sequence"),
    ("sequence-negative", lambda a: bundle_json(spiffe_sequence=-1), "spiffe_sequence"),
    ("refresh-hint-float", lambda a: bundle_json(spiffe_refresh_hint=1.5), "spiffe_refresh_hint"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD_BUNDLES], ids=[c[0] for c in BAD_BUNDLES])
def test_spiffe_bundle_refuses(
    authority: TestAuthority, make: Callable[[TestAuthority], bytes], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        TrustBundle.from_spiffe_bundle(TD, make(authority))


def test_x509_key_members_must_describe_the_certificate_key(authority: TestAuthority) -> None:
    """RFC 7517 §4.7: a valid key that is not the x5c certificate's key is refused."""
    other = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    entry = _x509_with(authority, x=other["x"], y=other["y"])
    with pytest.raises(BundleError, match="do not match"):
        TrustBundle.from_spiffe_bundle(TD, bundle_json(entry))


@pytest.mark.parametrize("x5c", [None, []], ids=["absent", "empty"])
def test_x509_entry_without_x5c_is_ignored_and_the_rest_kept(authority: TestAuthority, x5c: Any) -> None:
    """X509-SVID.md §6.2 (issue 12 #7): such an entry MUST be ignored, not refuse the whole bundle."""
    entry = x509_key(authority)
    broken = {k: v for k, v in entry.items() if k != "x5c"} | ({} if x5c is None else {"x5c": x5c})
    bundle = TrustBundle.from_spiffe_bundle(TD, bundle_json(broken, entry, jwt_key()))
    assert bundle.x509_authorities == (authority.ca_cert,)
    assert len(bundle.jwt_authorities) == 1


def test_x509_entry_with_several_x5c_uses_the_first(authority: TestAuthority) -> None:
    """X509-SVID.md §6.2: all but the first x5c value MUST be ignored (even if they are not certificates)."""
    entry = _x509_with(authority, x5c=[*x509_key(authority)["x5c"], "not a certificate"])
    assert TrustBundle.from_spiffe_bundle(TD, bundle_json(entry)).x509_authorities == (authority.ca_cert,)


def test_x509_entry_without_key_members_uses_the_certificate(authority: TestAuthority) -> None:
    """Only ``x5c`` matters for an X.509 authority; key members are optional."""
    entry = {"kty": "EC", "use": "x509-svid", "x5c": x509_key(authority)["x5c"]}
    assert TrustBundle.from_spiffe_bundle(TD, bundle_json(entry)).x509_authorities == (authority.ca_cert,)


def test_bundle_errors_never_echo_private_key_material() -> None:
    private = _private_ec_jwk()
    with pytest.raises(BundleError) as excinfo:
        TrustBundle.from_spiffe_bundle(TD, bundle_json(private))
    chain = [excinfo.value, excinfo.value.__cause__, excinfo.value.__context__]
    assert not any(private["d"] in str(e) for e in chain if e is not None)


# --- PEM and Workload API JWKS -------------------------------------------------------------------------


def test_pem_bundle_has_x509_authorities_only() -> None:
    first, second = TestAuthority(), TestAuthority()
    bundle = TrustBundle.from_pem(TD, first.ca_pem() + b"\n" + second.ca_pem())
    assert bundle.x509_authorities == (first.ca_cert, second.ca_cert)
    assert dict(bundle.jwt_authorities) == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no certificate"),
        (b"just text", "no certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be parsed"),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "private key",
        ),
    ],
    ids=["empty", "no-pem-block", "corrupt-certificate", "private-key-pem"],
)
def test_pem_bundle_refuses(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        TrustBundle.from_pem(TD, data)


def test_jwt_jwks_takes_every_key_without_use(authority: TestAuthority) -> None:
    old = authority.kid
    authority.rotate()
    bundle = TrustBundle.from_jwt_jwks(TD, authority.jwt_jwks())
    assert set(bundle.jwt_authorities) == {old, authority.kid}
    assert bundle.x509_authorities == ()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([jwt_key() | {"use": None, "kid": None}], "no 'kid'"),
        ([jwt_key() | {"use": "x509-svid"}], "only JWT signing keys"),
        ([jwt_key("a"), jwt_key("a")], "duplicate kid"),
        ([_private_ec_jwk()], "private key material"),
    ],
    ids=["missing-kid", "x509-use", "duplicate-kid", "private-key"],
)
def test_jwt_jwks_refuses(keys: list[dict[str, Any]], message: str) -> None:
    cleaned = [{k: v for k, v in key.items() if v is not None} for key in keys]
    with pytest.raises(BundleError, match=message):
        TrustBundle.from_jwt_jwks(TD, bundle_json(*cleaned))


@pytest.mark.parametrize("use", ["jwt-svid", "sig"], ids=["use-jwt-svid", "use-sig"])
def test_jwt_jwks_accepts_signing_uses(use: str) -> None:
    bundle = TrustBundle.from_jwt_jwks(TD, bundle_json(jwt_key("k") | {"use": use}))
    assert list(bundle.jwt_authorities) == ["k"]


# --- The bundle value ----------------------------------------------------------------------------------


def test_bundle_is_immutable_and_owns_its_containers() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    authorities: dict[str, RSAPublicKey | EllipticCurvePublicKey] = {"k": key}
    bundle = TrustBundle(TD, authorities)
    authorities["evil"] = key
    assert list(bundle.jwt_authorities) == ["k"]
    with pytest.raises(TypeError):
        bundle.jwt_authorities["evil"] = key  # type: ignore[index]
    with pytest.raises(AttributeError):
        bundle.sequence = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate JSON member"),
        ('{"exp": NaN}', "NaN is not valid JSON"),
        ('{"exp": -Infinity}', "Infinity is not valid JSON"),
        ("[]", "not a JSON object"),
        ('"x"', "not a JSON object"),
        (b'{"a": "\xff"}', "utf-8"),
    ],
    ids=["duplicate-member", "nan", "infinity", "array", "string", "not-utf8"],
)
def test_load_json_object_is_strict(text: str | bytes, message: str) -> None:
    """RFC 7515 §4 / RFC 7517 §4: duplicate names refused; NaN/Infinity are not JSON; objects only."""
    with pytest.raises(ValueError, match=message):
        load_json_object(text)


# --- FileBundleSource ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rewrite(path: Path, data: bytes) -> None:
    """Write and move mtime forward, so the change is seen even on coarse-mtime file systems."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_file_source_loads_spiffe_bundle(tmp_path: Path, authority: TestAuthority) -> None:
    source = FileBundleSource(TD, authority.write_bundle(tmp_path / "bundle.json"))
    assert source.trust_domain == TD
    assert list(source.current().jwt_authorities) == [authority.kid]


def test_file_source_loads_pem(tmp_path: Path, authority: TestAuthority) -> None:
    path = tmp_path / "bundle.pem"
    path.write_bytes(authority.ca_pem())
    assert FileBundleSource(TD, path).current().x509_authorities == (authority.ca_cert,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read bundle file"),
        (b"hello", "neither a SPIFFE bundle"),
        (b'{"keys": 1}', "not a list"),
        (b"[]", "neither a SPIFFE bundle"),
    ],
    ids=["missing-file", "neither-format", "invalid-spiffe-bundle", "json-array"],
)
def test_file_source_fails_start_up_on_a_bad_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "bundle"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BundleError, match=message):
        FileBundleSource(TD, path)


def test_file_source_reloads_after_the_file_changes(tmp_path: Path, authority: TestAuthority) -> None:
    clock = Clock()
    path = authority.write_bundle(tmp_path / "bundle.json")
    source = FileBundleSource(TD, path, now=clock, recheck_seconds=5)
    first = source.current()
    old = authority.kid
    authority.rotate()
    rewrite(path, authority.spiffe_bundle())

    clock.now += 4.9
    assert source.current() is first, "checked again before recheck_seconds passed"
    clock.now += 0.1
    assert set(source.current().jwt_authorities) == {old, authority.kid}


def test_file_source_does_not_reparse_an_unchanged_file(tmp_path: Path, authority: TestAuthority) -> None:
    clock = Clock()
    source = FileBundleSource(TD, authority.write_bundle(tmp_path / "b.json"), now=clock)
    first = source.current()
    clock.now += 60
    assert source.current() is first


def test_file_source_keeps_last_good_bundle_when_reload_fails(
    tmp_path: Path, authority: TestAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    path = authority.write_bundle(tmp_path / "bundle.json")
    source = FileBundleSource(TD, path, now=clock)
    good = source.current()

    rewrite(path, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "use": "jwt-svid", "kid": "x"}]}')
    clock.now += 5
    with caplog.at_level(logging.ERROR, logger="sts.trust"):
        assert source.current() is good
    assert "keeping the last good trust bundle" in caplog.text

    path.unlink()
    clock.now += 5
    assert source.current() is good, "a vanished file keeps the last good bundle too"

    authority.rotate()
    rewrite(path, authority.spiffe_bundle())
    clock.now += 5
    assert authority.kid in source.current().jwt_authorities, "a fixed file is picked up again"


# --- TrustStore ----------------------------------------------------------------------------------------


class StaticSource:
    def __init__(self, bundle: TrustBundle, trust_domain: TrustDomain | None = None) -> None:
        self.bundle = bundle
        self._trust_domain = trust_domain or bundle.trust_domain

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    def current(self) -> TrustBundle:
        return self.bundle


class DownSource:
    trust_domain = TrustDomain("down.test")

    def current(self) -> TrustBundle:
        raise TemporarilyUnavailable("Workload API stream is not connected")


def test_store_answers_only_for_configured_trust_domains(authority: TestAuthority) -> None:
    bundle = authority.bundle()
    store = TrustStore([StaticSource(bundle)])
    assert store.trust_domains == frozenset({TD})
    assert store.bundle_for(TD) is bundle
    assert store.bundle_for(TrustDomain("unknown.test")) is None
    assert store.readiness() == []


def test_store_refuses_two_sources_for_one_trust_domain(authority: TestAuthority) -> None:
    with pytest.raises(ValueError, match="more than one bundle source"):
        TrustStore([StaticSource(authority.bundle()), StaticSource(authority.bundle())])


def test_store_propagates_unavailable_source_and_reports_it_in_readiness(authority: TestAuthority) -> None:
    store = TrustStore([StaticSource(authority.bundle()), DownSource()])
    with pytest.raises(TemporarilyUnavailable):
        store.bundle_for(TrustDomain("down.test"))
    assert store.readiness() == [
        "trust bundle for down.test is unavailable: Workload API stream is not connected"
    ]


def test_store_refuses_a_bundle_of_another_trust_domain(authority: TestAuthority) -> None:
    """Workload API §4.6: a faulty source can never make one domain's keys verify another's SVIDs."""
    store = TrustStore([StaticSource(authority.bundle(), trust_domain=TrustDomain("other.test"))])
    with pytest.raises(TemporarilyUnavailable):
        store.bundle_for(TrustDomain("other.test"))
