"""Property tests of every parser at the edge (issue 11): arbitrary input is a typed refusal, never a crash.

For each parser the property is the same: whatever hypothesis generates (arbitrary text, arbitrary
JSON with NaN, huge integers, surrogates and deep nesting, tokens and proofs *signed with a real key*
so that the claims are actually reached), the answer is a result or the parser's own refusal: an
:class:`~sts.errors.StsError` subclass (``invalid_request``, ``invalid_token``, ``invalid_dpop_proof``
…), :class:`~sts.spiffeid.SpiffeIdError`, :class:`~sts.trust.BundleError` or
:class:`~sts.errors.ConfigError`. Anything else would be a 500 (or a failed start) in production.

Examples are bounded (``max_examples``), there is no deadline and no example database, so the
file runs in seconds and the same way on every machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from sts import strict_json
from sts.admin import Admin
from sts.audit import AuditLog
from sts.binding import DpopVerifier, InvalidDpopProof
from sts.catalog import Catalog, CatalogEntry, TokenClass
from sts.config import KeySettings, load_settings
from sts.errors import ConfigError, StsError
from sts.exchange import ExchangeRequest
from sts.keys import KeyRing
from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from sts.store.memory import MemoryStore
from sts.svid import JwtSvidVerifier
from sts.tasks import TaskRequest
from sts.trust import BundleError, TrustBundle
from sts.verify import InvalidAccessToken, TokenVerifier
from tests.authority import TestAuthority, b64url, trust_store
from tests.test_numeric_edges import (
    ADMIN_CALLER,
    AUDIENCE,
    CATALOG,
    ISSUER,
    NOW,
    SUBJECT,
    SVID_AUDIENCE,
    TOKEN_URL,
    FakeSts,
    _issued,
    access_token,
    json_object,
    sign_es256,
)

PROPERTY = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- strategies --------------------------------------------------------------------------------------

# Raw JSON literals, including every edge the outside tester used and some that are not JSON at all.
EDGE_LITERALS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1" + "0" * 400,
    "-" + "9" * 30,
    "9" * 5000,
    "9223372036854775808",
    "253402300800",
    "-1",
    "0",
    "-0",
    "1.5",
    "1e-400",
    "true",
    "false",
    "null",
    '"\\ud800"',
    '"\\udc00x"',
    '"http://[::1"',
    '"https://sts.example/to\\nken"',
    "[" * 70 + "]" * 70,
    '{"a": 1, "a": 2}',
    "",
    "{",
]
CLAIM_NAMES = [
    "exp", "nbf", "iat", "sub", "aud", "iss", "jti", "htm", "htu", "ath", "cnf", "scope", "client_id",
    "token_class", "task_id", "kid", "alg", "typ", "jwk", "crit", "x", "y", "kty", "crv", "keys", "use",
]  # fmt: skip

scalar_text = st.one_of(
    st.sampled_from(EDGE_LITERALS),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=20).map(json.dumps),
)
json_text: st.SearchStrategy[str] = st.recursive(
    scalar_text,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.dictionaries(
            st.one_of(st.sampled_from(CLAIM_NAMES), st.text(max_size=8)), children, max_size=5
        ).map(json_object),
    ),
    max_leaves=12,
)
members = st.builds(
    lambda named, times: named | times,
    st.dictionaries(st.sampled_from(CLAIM_NAMES), json_text, max_size=4),
    st.dictionaries(st.sampled_from(["exp", "nbf", "iat"]), scalar_text, max_size=2),
)
"""Raw-JSON overrides of well-known members: each property starts from a valid document and breaks it
(time claims are drawn apart, so the numeric edges meet ``exp``, ``nbf`` and ``iat`` often)."""

json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
"""Python values as a JSON body parser that is not strict (``json.loads``) could hand over."""

arbitrary_token = st.one_of(
    st.text(max_size=200),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=40),
             min_size=1, max_size=6).map(".".join),
    st.tuples(json_text, json_text, st.binary(max_size=80)).map(
        lambda parts: f"{b64url(parts[0].encode())}.{b64url(parts[1].encode())}.{b64url(parts[2])}"
    ),
)  # fmt: skip


URIS = [
    "http://[::1",
    "https://[::1]:99999/",
    "https://search.internal:x/",
    "https://search.internal/\n",
    "https://search.internal/",
    "https://search.internal/#f",
    "//search.internal/",
    "https://[v1.x]/",
    "https://a]b/",
]


# --- RFC 8693 form body ------------------------------------------------------------------------------

FORM_NAMES = [
    "grant_type", "subject_token", "subject_token_type", "audience", "resource", "scope", "task_id",
    "requested_token_type", "actor_token", "actor_token_type", "client_id", "client_assertion",
    "client_assertion_type",
]  # fmt: skip


@PROPERTY
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(FORM_NAMES), st.text(max_size=10)),
        # What the form parser hands over: one or more values per name (never an empty list).
        st.lists(st.one_of(st.text(max_size=30), st.text(max_size=3000)), min_size=1, max_size=3),
        max_size=8,
    )
)
def test_form_body_is_a_request_or_a_refusal(form: dict[str, list[str]]) -> None:
    with contextlib.suppress(StsError):
        ExchangeRequest.from_form(form)


@PROPERTY
@given(
    st.lists(st.text(max_size=40), max_size=2),
    st.lists(st.one_of(st.text(max_size=40), st.sampled_from(URIS)), max_size=2),
)
def test_catalog_target_is_an_entry_or_a_refusal(audiences: list[str], resources: list[str]) -> None:
    catalog = Catalog(
        [CatalogEntry("tool:s", TokenClass.TOOL, frozenset({"invoke"}), resource="https://search.internal/")]
    )
    with contextlib.suppress(StsError):
        catalog.resolve(audiences, resources)


# --- JWT-SVIDs (compact JWS parsing, time claims) ----------------------------------------------------

AUTHORITY = TestAuthority("example.org")
SVID_VERIFIER = JwtSvidVerifier(trust_store(AUTHORITY), SVID_AUDIENCE)


@PROPERTY
@given(arbitrary_token)
def test_svid_parsing_of_any_string_is_invalid_token(token: str) -> None:
    with pytest.raises(StsError):
        SVID_VERIFIER.verify(token, now=NOW)


@PROPERTY
@given(members, members)
def test_signed_svid_with_any_claims_verifies_or_is_invalid_token(
    header: dict[str, str], claims: dict[str, str]
) -> None:
    full_header = {"alg": '"ES256"', "kid": json.dumps(AUTHORITY.kid), "typ": '"JWT"'} | header
    base = {
        "sub": json.dumps(SUBJECT),
        "aud": json.dumps(SVID_AUDIENCE),
        "exp": str(NOW + 60),
        "iat": str(NOW),
    }
    signing_input = (
        f"{b64url(json_object(full_header).encode())}.{b64url(json_object(base | claims).encode())}"
    )
    assert isinstance(AUTHORITY.private_key, ec.EllipticCurvePrivateKey)
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), AUTHORITY.private_key)
    with contextlib.suppress(StsError):
        SVID_VERIFIER.verify(f"{signing_input}.{b64url(signature)}", now=NOW)


# --- DPoP proofs -------------------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_JWK = ECAlgorithm.to_jwk(_KEY.public_key(), as_dict=True)


def _dpop() -> DpopVerifier:
    return DpopVerifier(use_once=lambda key, expires_at: True)


@PROPERTY
@given(arbitrary_token)
def test_dpop_proof_of_any_string_is_invalid_dpop_proof(proof: str) -> None:
    with pytest.raises(InvalidDpopProof):
        _dpop().verify(proof, method="POST", urls=(TOKEN_URL,), now=float(NOW))


@PROPERTY
@given(
    st.dictionaries(st.sampled_from(["typ", "alg", "crit", "kid", "x5c", "z"]), json_values, max_size=3),
    members,
    st.one_of(st.none(), st.text(max_size=30)),
)
def test_signed_dpop_proof_with_any_claims_verifies_or_is_invalid_dpop_proof(
    header: dict[str, Any], claims: dict[str, str], access_token: str | None
) -> None:
    full_header: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256", "jwk": _JWK} | header
    base = {"jti": '"p"', "htm": '"POST"', "htu": json.dumps(TOKEN_URL), "iat": str(NOW)}
    proof = sign_es256(_KEY, full_header, json_object(base | claims))
    with contextlib.suppress(InvalidDpopProof):
        _dpop().verify(proof, method="POST", urls=(TOKEN_URL,), access_token=access_token, now=float(NOW))


# --- the resource server's verifier and our own tokens parsed back ----------------------------------

_AT_VERIFIER = TokenVerifier.without_revocation_check(
    issuer=ISSUER, audience=AUDIENCE, token_class="tool", session=FakeSts(), clock=lambda: NOW
)


@PROPERTY
@given(
    arbitrary_token,
    st.sampled_from(["Bearer", "DPoP", "bearer", "Basic", ""]),
    st.lists(arbitrary_token, max_size=2),
)
def test_access_token_of_any_string_is_invalid_access_token(
    token: str, scheme: str, proofs: list[str]
) -> None:
    with pytest.raises(InvalidAccessToken):
        _AT_VERIFIER.verify_request(
            authorization=f"{scheme} {token}", dpop=proofs, method="GET", url="https://calc.example/x"
        )


@PROPERTY
@given(members, arbitrary_token)
def test_signed_access_token_with_any_claims_verifies_or_is_refused(
    claims: dict[str, str], proof: str
) -> None:
    token = access_token(claims)
    for scheme in ("Bearer", "DPoP"):
        with contextlib.suppress(StsError):
            _AT_VERIFIER.verify(token, scheme=scheme, dpop_proof=proof, url="https://calc.example/x", now=NOW)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    return KeyRing.load_or_create(KeySettings(dir=tmp_path_factory.mktemp("keys")), now=NOW)


@PROPERTY
@given(token=arbitrary_token)
def test_issued_token_parsing_of_any_string_is_none(ring: KeyRing, token: str) -> None:
    assert ring.verify_issued(token, issuer=ISSUER, now=NOW) is None


@PROPERTY
@given(claims=members)
def test_signed_issued_token_with_any_claims_is_claims_or_none(ring: KeyRing, claims: dict[str, str]) -> None:
    result = ring.verify_issued(_issued(ring, claims), issuer=ISSUER, now=NOW)
    if result is not None:  # whatever passed is what introspection and the exchange rely on
        assert all(isinstance(result[name], str) for name in ("jti", "sub", "aud", "token_class"))
        assert all(strict_json.numeric_date(result[name]) is not None for name in ("exp", "iat", "nbf"))


# --- SPIFFE IDs --------------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(st.text(max_size=60), st.text(max_size=60).map(lambda t: "spiffe://" + t), json_values))
def test_spiffe_id_is_canonical_or_a_spiffe_id_error(text: Any) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError:
        pass
    else:
        assert str(spiffe_id) == text  # canonical form only: nothing is normalised
    with contextlib.suppress(SpiffeIdError):
        TrustDomain.parse(text)


# --- trust bundles -----------------------------------------------------------------------------------

jwk_text = st.fixed_dictionaries(
    {
        "kty": st.sampled_from(['"EC"', '"RSA"', '"OKP"', "1"]),
        "use": st.sampled_from(['"jwt-svid"', '"x509-svid"', '"sig"']),
        "kid": st.sampled_from(['"k"', '"k2"', "7"]),
        "crv": st.sampled_from(['"P-256"', '"P-384"', '"P-257"', "null"]),
    },
    optional=dict.fromkeys(("x", "y", "n", "e", "x5c", "d"), json_text),
).map(json_object)


@PROPERTY
@given(
    st.one_of(
        st.binary(max_size=100),
        json_text.map(str.encode),
        st.tuples(st.lists(jwk_text, max_size=3), members).map(
            lambda parts: json_object({"keys": "[" + ",".join(parts[0]) + "]"} | parts[1]).encode()
        ),
    )
)
def test_bundle_is_a_bundle_or_a_bundle_error(document: bytes) -> None:
    domain = TrustDomain("example.org")
    for parse in (TrustBundle.from_spiffe_bundle, TrustBundle.from_jwt_jwks):
        with contextlib.suppress(BundleError):
            parse(domain, document)


# --- JSON bodies of /tasks and /admin ----------------------------------------------------------------


@PROPERTY
@given(st.one_of(json_text, st.text(max_size=50)))
def test_strict_json_is_a_value_or_a_json_error(text: str) -> None:
    with contextlib.suppress(strict_json.JsonError):
        strict_json.loads(text)


def _outcome(parse: Any, text: str) -> tuple[str, Any]:
    """What a parse gives: its value, or its error's text, member and range flag."""
    try:
        return "value", parse(text)
    except strict_json.JsonError as e:
        return "error", (str(e), e.member, e.out_of_range)


def _checked_parse(text: str) -> Any:
    """loads() with its fast parse left out: the depth check, then the parse that checks each member."""
    strict_json._check_depth(text)
    return strict_json._loads_checked(text)


objects_with_repeats = st.lists(
    st.tuples(st.sampled_from(["exp", "a", "b"]), json_text), max_size=5
).map(lambda pairs: "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in pairs) + "}")


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_text, objects_with_repeats, st.text(max_size=50)))
def test_strict_json_fast_parse_answers_as_the_checked_parse(text: str) -> None:
    """The decoder built once gives the value, or the very error, of the parse that checks each member."""
    fast, checked = _outcome(strict_json.loads, text), _outcome(_checked_parse, text)
    if fast[0] == "value" and checked[0] == "value":
        # NaN is refused, so values compare equal; -0.0 == 0.0, so compare their text too.
        assert json.dumps(fast[1]) == json.dumps(checked[1])
    else:
        assert fast == checked


def _b64url_decode_by_reencoding(part: str) -> bytes:
    """The definition of canonical base64url: decodes, and encodes back to the very same text."""
    if re.fullmatch(r"[A-Za-z0-9_-]*", part) is None or len(part) % 4 == 1:
        raise ValueError("not base64url without padding")
    decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != part.encode("ascii"):
        raise ValueError("not canonical base64url")
    return decoded


@settings(max_examples=1000, deadline=None, database=None)
@given(
    st.one_of(
        st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()),
        st.text(alphabet="AQgwBRhx-_09=+/ .\né\u00a0", max_size=12),
    )
)
def test_b64url_decode_is_exactly_the_canonical_encodings(part: str) -> None:
    """The last-character check refuses exactly the texts that do not encode back to themselves."""
    try:
        expected: bytes | None = _b64url_decode_by_reencoding(part)
    except ValueError:
        expected = None
    try:
        got: bytes | None = strict_json.b64url_decode(part)
    except ValueError:
        got = None
    assert got == expected


task_fields = st.fixed_dictionaries(
    {},
    optional={
        "assignee": st.one_of(st.just(SUBJECT), json_values),
        "targets": st.one_of(st.just([{"target": "tool:calc", "scopes": ["invoke"]}]), json_values),
        "purpose": st.one_of(st.just("p"), json_values),
        "ttl_seconds": st.one_of(st.just(60), json_values),
        "extra": json_values,
    },
)


@PROPERTY
@given(st.one_of(task_fields, json_values))
def test_task_body_is_a_request_or_a_refusal(body: Any) -> None:
    with contextlib.suppress(StsError):
        TaskRequest.from_json(body, CATALOG, 3600)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Admin:
    audit = AuditLog(str(tmp_path_factory.mktemp("audit") / "audit.jsonl"))
    return Admin(store=MemoryStore(), catalog=CATALOG, audit=audit, max_token_ttl=300)


admin_fields = st.fixed_dictionaries(
    {"reason": st.one_of(st.just("r"), json_values)},
    optional={
        name: st.one_of(st.just(value), json_values)
        for name, value in {
            "jti": "j",
            "task_id": "t",
            "spiffe_id": SUBJECT,
            "until": NOW + 60,
            "target": "tool:calc",
            "scopes": ["invoke"],
            "expires_at": NOW + 60,
        }.items()
    },
)


@PROPERTY
@given(body=st.one_of(admin_fields, json_values))
def test_admin_body_is_done_or_a_refusal(admin: Admin, body: Any) -> None:
    for action in (admin.revoke, admin.grant_exception):
        with contextlib.suppress(StsError):
            action(ADMIN_CALLER, body, request_id="r", now=NOW)


# --- configuration values ----------------------------------------------------------------------------

CONFIG_KEYS = [
    ("listen", "port"),
    ("server", "workers"),
    ("server", "header_timeout"),
    ("server", "max_connections"),
    ("tokens", "max_ttl"),
    ("tokens", "svid_leeway"),
    ("tasks", "max_ttl"),
    ("keys", "rotate_after"),
    ("limits", "per_workload_per_second"),
]
yaml_values = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats().map(repr),
    st.sampled_from([".nan", ".inf", "-.inf", "9" * 5000, "2024-13-45", "'99999999999999999999d'", "1e999",
                     "!!binary 'AAA'", "!!float x", "[1, 2]", "{a: 1}", "~", "true", "'5m'", "0x7fffffffffff"]),
    st.text(max_size=20),
)  # fmt: skip


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config")


@PROPERTY
@given(key=st.sampled_from(CONFIG_KEYS), value=yaml_values, from_env=st.booleans())
def test_config_value_is_a_setting_or_a_config_error(
    config_dir: Path, key: tuple[str, str], value: str, from_env: bool
) -> None:
    section, name = key
    path = config_dir / "sts.yaml"
    if from_env:
        path.write_text(yaml.safe_dump({}))
        environ = {"STS_WORKERS": value}
    else:
        path.write_text(f"{section}:\n  {name}: {value}\n")
        environ = {}
    with contextlib.suppress(ConfigError):
        load_settings(path, environ=environ)
