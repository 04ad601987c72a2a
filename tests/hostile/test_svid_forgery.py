"""JWT-SVID forgery: every token here must be refused wherever a JWT-SVID is accepted.

Each forged token is tried in four places, each its own code path: as ``subject_token`` (400
``invalid_request``, RFC 8693 §2.2.2), as a ``jwt-spiffe`` ``client_assertion`` (401 ``invalid_client``),
as ``actor_token`` (400 ``invalid_request``) and as the bearer JWT-SVID of ``POST /tasks`` (401
``invalid_token``, RFC 6750 §3.1). The honest version of each is a control in ``test_controls.py``.

The categories: algorithm confusion (HS* keyed with the public key, RS/ES/PS mismatches), ``none``,
``kid`` games, embedded keys (``jwk``/``x5c``/``jku``/``x5u``), ``crit``, JSON serialization, JWE,
duplicate member names, numeric edge cases, encoding tricks, splicing, oversize, ``sub`` shapes,
``aud`` and time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.authority import TestAuthority, public_jwk
from tests.hostile.attacker import (
    ACCESS_TYPE,
    ADMIN,
    AGENT,
    JWT_SPIFFE,
    JWT_TYPE,
    ORCHESTRATOR,
    RSA_AGENT,
    b64,
    der,
    form,
    http,
    jws,
    now,
    part,
    pem,
    refused,
    sign,
    unsigned,
)
from tests.hostile.conftest import World

_DROP = object()


def claims(w: World, **override: Any) -> dict[str, Any]:
    """The claims of a genuine agent SVID for this issuer; ``_DROP`` removes a claim."""
    base: dict[str, Any] = {"sub": AGENT, "aud": [w.issuer], "exp": now() + 300, "iat": now()}
    base |= override
    return {k: v for k, v in base.items() if v is not _DROP}


def header(authority: TestAuthority, **override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"alg": authority.alg, "kid": authority.kid, "typ": "JWT"}
    base |= override
    return {k: v for k, v in base.items() if v is not _DROP}


def signed(
    w: World,
    *,
    head: dict[str, Any] | str | None = None,
    body: dict[str, Any] | str | bytes | None = None,
    authority: TestAuthority | None = None,
) -> str:
    """Signed for real by ``authority`` (default example.org) over exactly this header and payload."""
    signer = authority or w.auth.example
    return jws(
        header(signer) if head is None else head,
        claims(w) if body is None else body,
        signer.private_key,
        signer.alg,
    )


def raw_claims(w: World, **literal: str) -> str:
    """Claims as exact JSON text, so a value can be ``NaN`` or ``1e400`` or a 400-digit integer."""
    members = {
        "sub": json.dumps(AGENT),
        "aud": json.dumps([w.issuer]),
        "exp": str(now() + 300),
        "iat": str(now()),
    } | literal
    return "{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}"


def genuine(w: World) -> str:
    return w.svid(AGENT)


def _with_base64url_punctuation(w: World) -> str:
    """A genuine token whose base64url text holds '-' or '_' (ECDSA is randomised: re-sign until so)."""
    for _ in range(200):
        token = genuine(w)
        if "-" in token or "_" in token:
            return token
    raise AssertionError("no token with base64url punctuation")


def _non_canonical_signature(w: World) -> str:
    """Same signature bytes, but the unused trailing bits of the last base64url character set."""
    token = genuine(w)
    head, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(signature[-1])
    twin = alphabet[(index & ~0b1111) | ((index + 1) & 0b1111)]
    return f"{head}.{payload}.{signature[:-1]}{twin}"


def _der_signature(w: World) -> str:
    token = genuine(w)
    head, payload, signature = token.split(".")
    raw_signature = base64.urlsafe_b64decode(signature + "==")
    r, s = int.from_bytes(raw_signature[:32], "big"), int.from_bytes(raw_signature[32:], "big")
    return f"{head}.{payload}.{b64(encode_dss_signature(r, s))}"


def _zero_r(w: World) -> str:
    token = genuine(w)
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{b64(bytes(64))}"


def _splice(w: World, donor: str, take: tuple[int, int, int]) -> str:
    """Parts from the genuine token (0) and the donor (1), in the order ``take`` says."""
    sources = (genuine(w).split("."), donor.split("."))
    return ".".join(sources[which][index] for index, which in enumerate(take))


def _hmac_with(secret: Callable[[World], bytes], alg: str = "HS256", authority: str = "example") -> Callable[[World], str]:
    def build(w: World) -> str:
        signer: TestAuthority = getattr(w.auth, authority)
        sub = RSA_AGENT if authority == "rsa" else AGENT
        head = {"alg": alg, "kid": signer.kid, "typ": "JWT"}
        signing_input = f"{part(head)}.{part(claims(w, sub=sub))}"
        return f"{signing_input}.{b64(sign(alg, secret(w), signing_input.encode()))}"

    return build


def _claimed_alg(alg: str, *, authority: str = "example", sub: str = AGENT) -> Callable[[World], str]:
    """Header names ``alg``; the signature is the authority's own algorithm (a mismatch)."""

    def build(w: World) -> str:
        signer: TestAuthority = getattr(w.auth, authority)
        head = header(signer, alg=alg)
        signing_input = f"{part(head)}.{part(claims(w, sub=sub))}"
        return f"{signing_input}.{b64(sign(signer.alg, signer.private_key, signing_input.encode()))}"

    return build


def _eddsa(w: World) -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return jws(header(w.auth.example, alg="EdDSA"), claims(w), key, "EdDSA")


def _es256_signed_with_other_curve(w: World) -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return jws(header(w.auth.example), claims(w), key, "ES384")


def _impostor(w: World, **head: Any) -> str:
    """Signed by the impostor (a key the server never trusted) with the given header members."""
    impostor = w.auth.impostor
    return jws(header(w.auth.example, **head), claims(w), impostor.private_key, "ES256")


def _x5c(w: World) -> str:
    chain = [base64.b64encode(w.auth.impostor.ca_cert.public_bytes(serialization.Encoding.DER)).decode()]
    return _impostor(w, x5c=chain)


def _oversize(w: World) -> str:
    return signed(w, body=claims(w, pad="x" * 9000))


def _duplicate(w: World, text: str) -> str:
    return signed(w, body=text)


def _issued_access_token(w: World) -> str:
    return w.issued(AGENT)


def _trust_domain_signed_by_other(w: World) -> str:
    """A partner.test SVID whose sub claims example.org, signed by partner's key with partner's kid."""
    return signed(w, authority=w.auth.partner)


def _rsa_pss_claimed_pkcs1_signed(w: World) -> str:
    rsa = w.auth.rsa
    head = header(rsa, alg="PS256")
    signing_input = f"{part(head)}.{part(claims(w, sub=RSA_AGENT))}"
    return f"{signing_input}.{b64(sign('RS256', rsa.private_key, signing_input.encode()))}"


def _jwe(w: World, alg: str) -> str:
    protected = part({"alg": alg, "enc": "A256GCM", "kid": w.auth.example.kid})
    return f"{protected}.{b64(b'k' * 32)}.{b64(b'iv' * 6)}.{b64(json.dumps(claims(w)).encode())}.{b64(b't' * 16)}"


def _flattened(w: World, prefix: str = "") -> str:
    head, payload, signature = genuine(w).split(".")
    return prefix + json.dumps({"protected": head, "payload": payload, "signature": signature})


def _general(w: World) -> str:
    head, payload, signature = genuine(w).split(".")
    return json.dumps({"payload": payload, "signatures": [{"protected": head, "signature": signature}]})


def _dup_header(w: World, text: str) -> str:
    example = w.auth.example
    return signed(w, head=text.replace("KID", example.kid))


def _parts(w: World) -> list[str]:
    return genuine(w).split(".")


def _edit(w: World, change: Callable[[str, str, str], tuple[str, str, str]]) -> str:
    """A genuine token with its three parts changed as ``change`` says."""
    head, payload, signature = _parts(w)
    return ".".join(change(head, payload, signature))


def _raw(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True)
class Forgery:
    id: str
    build: Callable[[World], str]
    in_header: bool = True  # can travel in an Authorization header as is (latin-1, no edge white space)


def F(case_id: str, build: Callable[[World], str], *, in_header: bool = True) -> Forgery:
    return Forgery(case_id, build, in_header)


FORGERIES: list[Forgery] = [
    # --- algorithm confusion ---
    F("hs256-keyed-with-public-pem", _hmac_with(lambda w: pem(w.auth.example.public_key))),
    F("hs256-keyed-with-public-der", _hmac_with(lambda w: der(w.auth.example.public_key))),
    F("hs256-keyed-with-public-jwk", _hmac_with(lambda w: json.dumps(public_jwk(w.auth.example.public_key)).encode())),
    F("hs384-keyed-with-public-pem", _hmac_with(lambda w: pem(w.auth.example.public_key), "HS384")),
    F("hs512-keyed-with-public-pem", _hmac_with(lambda w: pem(w.auth.example.public_key), "HS512")),
    F("hs256-keyed-with-rsa-public-pem", _hmac_with(lambda w: pem(w.auth.rsa.public_key), authority="rsa")),
    F("hs256-keyed-with-empty-secret", _hmac_with(lambda w: b"")),
    F("rs256-claimed-es256-signed", _claimed_alg("RS256")),
    F("ps256-claimed-es256-signed", _claimed_alg("PS256")),
    F("es384-claimed-es256-signed", _claimed_alg("ES384")),
    F("es512-claimed-es256-signed", _claimed_alg("ES512")),
    F("es256-claimed-rs256-signed", _claimed_alg("ES256", authority="rsa", sub=RSA_AGENT)),
    F("ps256-claimed-rs256-signed", _rsa_pss_claimed_pkcs1_signed),
    F("rs512-claimed-rs256-signed", _claimed_alg("RS512", authority="rsa", sub=RSA_AGENT)),
    F("eddsa", _eddsa),
    F("es256-signed-on-p384", _es256_signed_with_other_curve),
    F("alg-lowercase", lambda w: signed(w, head=header(w.auth.example, alg="es256"))),
    F("alg-trailing-space", lambda w: signed(w, head=header(w.auth.example, alg="ES256 "))),
    # --- none ---
    F("alg-none", lambda w: unsigned(header(w.auth.example, alg="none"), claims(w))),
    F("alg-None", lambda w: unsigned(header(w.auth.example, alg="None"), claims(w))),
    F("alg-NONE", lambda w: unsigned(header(w.auth.example, alg="NONE"), claims(w))),
    F("alg-nOnE", lambda w: unsigned(header(w.auth.example, alg="nOnE"), claims(w))),
    F("alg-empty", lambda w: unsigned(header(w.auth.example, alg=""), claims(w))),
    F("alg-missing", lambda w: signed(w, head=header(w.auth.example, alg=_DROP))),
    F("alg-null", lambda w: signed(w, head=header(w.auth.example, alg=None))),
    F("alg-list", lambda w: signed(w, head=header(w.auth.example, alg=["ES256"]))),
    F("alg-number", lambda w: signed(w, head=header(w.auth.example, alg=256))),
    F("alg-none-with-real-signature", lambda w: _splice(w, unsigned(header(w.auth.example, alg="none"), claims(w)), (1, 0, 0))),
    # --- kid games ---
    F("kid-missing", lambda w: signed(w, head=header(w.auth.example, kid=_DROP))),
    F("kid-empty", lambda w: signed(w, head=header(w.auth.example, kid=""))),
    F("kid-unknown", lambda w: signed(w, head=header(w.auth.example, kid="no-such-key"))),
    F("kid-of-partner-signed-by-partner", _trust_domain_signed_by_other),
    F("kid-of-partner-signed-by-example", lambda w: signed(w, head=header(w.auth.example, kid=w.auth.partner.kid))),
    F("kid-of-impostor", lambda w: signed(w, authority=w.auth.impostor)),
    F("kid-path-traversal", lambda w: signed(w, head=header(w.auth.example, kid="../../../../../etc/passwd"))),
    F("kid-sql", lambda w: signed(w, head=header(w.auth.example, kid="' OR '1'='1' --"))),
    F("kid-nul-suffix", lambda w: signed(w, head=header(w.auth.example, kid=w.auth.example.kid + "\u0000"))),
    F("kid-newline-suffix", lambda w: signed(w, head=header(w.auth.example, kid=w.auth.example.kid + "\n"))),
    F("kid-huge", lambda w: signed(w, head=header(w.auth.example, kid="k" * 4000))),
    F("kid-number", lambda w: signed(w, head=header(w.auth.example, kid=1))),
    F("kid-list", lambda w: signed(w, head=header(w.auth.example, kid=[w.auth.example.kid]))),
    F("kid-object", lambda w: signed(w, head=header(w.auth.example, kid={"kid": w.auth.example.kid}))),
    F("kid-of-x509-authority", lambda w: signed(w, head=header(w.auth.example, kid="x509-svid"))),
    # --- embedded keys: the attacker's own key, announced in the header ---
    F("jwk-header-real-kid", lambda w: _impostor(w, jwk=public_jwk(w.auth.impostor.public_key))),
    F("jwk-header-no-kid", lambda w: _impostor(w, kid=_DROP, jwk=public_jwk(w.auth.impostor.public_key))),
    F("jwk-header-of-real-key-impostor-signed", lambda w: _impostor(w, jwk=public_jwk(w.auth.example.public_key))),
    F("x5c-header", _x5c),
    F("jku-header", lambda w: _impostor(w, jku="https://attacker.test/jwks.json")),
    F("jku-header-loopback", lambda w: _impostor(w, kid=_DROP, jku=f"{w.url}/jwks.json")),
    F("x5u-header", lambda w: _impostor(w, x5u="https://attacker.test/ca.pem")),
    # --- crit (signed by the real key: only the extension is wrong) ---
    F("crit-exp", lambda w: signed(w, head=header(w.auth.example, crit=["exp"], exp=1))),
    F("crit-empty-list", lambda w: signed(w, head=header(w.auth.example, crit=[]))),
    F("crit-b64-false", lambda w: signed(w, head=header(w.auth.example, crit=["b64"], b64=False))),
    F("crit-unknown-extension", lambda w: signed(w, head=header(w.auth.example, crit=["x-attack"], **{"x-attack": 1}))),
    F("crit-string", lambda w: signed(w, head=header(w.auth.example, crit="exp"))),
    # --- serializations that are not compact JWS ---
    F("json-flattened", _flattened),
    F("json-flattened-leading-space", lambda w: _flattened(w, " ")),
    F("json-general", _general),
    F("json-array", lambda w: json.dumps(_parts(w))),
    F("jwe-rsa-oaep", lambda w: _jwe(w, "RSA-OAEP")),
    F("jwe-dir", lambda w: _jwe(w, "dir")),
    # --- duplicate member names (the last one is the honest one, for a lenient parser) ---
    F("duplicate-header-alg", lambda w: _dup_header(w, '{"alg":"none","kid":"KID","typ":"JWT","alg":"ES256"}')),
    F("duplicate-header-kid", lambda w: _dup_header(w, '{"alg":"ES256","kid":"other","typ":"JWT","kid":"KID"}')),
    F("duplicate-claims-sub", lambda w: _duplicate(w, raw_claims(w, sub=json.dumps(ADMIN)).replace("{", "{" + f'"sub":{json.dumps(AGENT)},', 1))),
    F("duplicate-claims-aud", lambda w: _duplicate(w, raw_claims(w).replace("{", '{"aud":"https://elsewhere.example",', 1))),
    F("duplicate-claims-exp", lambda w: _duplicate(w, raw_claims(w).replace("{", '{"exp":1,', 1))),
    # --- numeric edge cases in signed claims ---
    *[
        F(f"exp-{name}", lambda w, literal=literal: signed(w, body=raw_claims(w, exp=literal)))
        for name, literal in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("minus-Infinity", "-Infinity"),
            ("1e400", "1e400"),
            ("minus-1e400", "-1e400"),
            ("10e400-int", "1" + "0" * 400),
            ("minus-10e400-int", "-1" + "0" * 400),
            ("minus-1", "-1"),
            ("zero", "0"),
            ("string", '"9999999999"'),
            ("true", "true"),
            ("false", "false"),
            ("null", "null"),
            ("list", "[9999999999]"),
            ("object", '{"v":9999999999}'),
            ("float-past", "1000000000.5"),
        ]
    ],
    *[
        F(f"nbf-{name}", lambda w, literal=literal: signed(w, body=raw_claims(w, nbf=literal)))
        for name, literal in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("1e400", "1e400"),
            ("10e400-int", "1" + "0" * 400),
            ("string", '"0"'),
            ("true", "true"),
            ("null", "null"),
            ("float-future", str(now() + 3600.5)),
        ]
    ],
    *[
        F(f"iat-{name}", lambda w, literal=literal: signed(w, body=raw_claims(w, iat=literal)))
        for name, literal in [
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("minus-Infinity", "-Infinity"),
            ("1e400", "1e400"),
            ("minus-1e400", "-1e400"),
            ("10e400-int", "1" + "0" * 400),
            ("minus-10e400-int", "-1" + "0" * 400),
            ("string", '"now"'),
            ("true", "true"),
            ("false", "false"),
            ("null", "null"),
            ("float-future", str(now() + 3600.5)),
        ]
    ],
    # --- encoding tricks on a genuine token ---
    F("padded-header", lambda w: _edit(w, lambda h, p, s: (h + "=", p, s))),
    F("padded-signature", lambda w: genuine(w) + "=="),
    F("standard-base64-alphabet", lambda w: _with_base64url_punctuation(w).replace("-", "+").replace("_", "/")),
    F("non-canonical-base64-signature", _non_canonical_signature),
    F("leading-space", lambda w: " " + genuine(w), in_header=False),
    F("trailing-newline", lambda w: genuine(w) + "\n", in_header=False),
    F("trailing-tab", lambda w: genuine(w) + "\t", in_header=False),
    F("inner-space", lambda w: genuine(w).replace(".", ". ", 1)),
    F("inner-newline", lambda w: genuine(w).replace(".", ".\n", 1), in_header=False),
    F("bearer-prefix-inside", lambda w: "Bearer " + genuine(w)),
    F("four-parts", lambda w: genuine(w) + "."),
    F("leading-dot", lambda w: "." + genuine(w)),
    F("double-dot", lambda w: genuine(w).replace(".", "..", 1)),
    F("two-parts", lambda w: ".".join(_parts(w)[:2])),
    F("one-part", lambda w: _parts(w)[1]),
    F("empty-signature", lambda w: _edit(w, lambda h, p, s: (h, p, ""))),
    F("non-ascii-suffix", lambda w: genuine(w) + "é"),
    F("unicode-one-dot-leader", lambda w: genuine(w).replace(".", "\u2024"), in_header=False),
    F("zero-width-space", lambda w: genuine(w).replace(".", ".\u200b", 1), in_header=False),
    F("fullwidth-letter", lambda w: "\uff45" + genuine(w)[1:], in_header=False),
    F("header-not-json", lambda w: signed(w, head="not json")),
    F("header-json-array", lambda w: signed(w, head='["ES256"]')),
    F("header-json-string", lambda w: signed(w, head='"ES256"')),
    F("header-with-bom", lambda w: signed(w, head="\ufeff" + json.dumps(header(w.auth.example)))),
    F("payload-json-array", lambda w: signed(w, body="[1,2]")),
    F("payload-json-number", lambda w: signed(w, body="42")),
    F("payload-trailing-garbage", lambda w: signed(w, body=json.dumps(claims(w)) + "x")),
    F("payload-not-utf8", lambda w: signed(w, body=json.dumps(claims(w)).encode().replace(b"researcher", b"r\xffsearcher"))),
    F("payload-utf16", lambda w: f"{part(header(w.auth.example))}.{b64(json.dumps(claims(w)).encode('utf-16'))}.{b64(bytes(64))}"),
    F("payload-deeply-nested", lambda w: signed(w, body=raw_claims(w, deep="[" * 3000 + "]" * 3000))),
    # --- splicing ---
    F("splice-payload-of-admin", lambda w: _splice(w, w.svid(ADMIN), (0, 1, 0))),
    F("splice-signature-of-another-token", lambda w: _splice(w, w.svid(ORCHESTRATOR), (0, 0, 1))),
    F("splice-header-of-partner", lambda w: _splice(w, w.svid("spiffe://partner.test/agent/summarizer"), (1, 0, 0))),
    F("splice-signature-of-partner", lambda w: _splice(w, w.svid("spiffe://partner.test/agent/summarizer"), (0, 0, 1))),
    F("splice-payload-of-expired", lambda w: _splice(w, w.svid(AGENT, ttl=60, now=now() - 3600), (0, 1, 0))),
    F("truncated-signature", lambda w: genuine(w)[:-4]),
    F("extended-signature", lambda w: _edit(w, lambda h, p, s: (h, p, b64(_raw(s) + b"\x00")))),
    F("der-encoded-signature", _der_signature),
    F("zero-signature", _zero_r),
    F("all-ones-signature", lambda w: _edit(w, lambda h, p, s: (h, p, b64(b"\xff" * 64)))),
    F("signature-swapped-r-s", lambda w: _edit(w, lambda h, p, s: (h, p, b64(_raw(s)[32:] + _raw(s)[:32])))),
    # --- oversize ---
    F("oversize-signed", _oversize),
    F("oversize-garbage", lambda w: "a" * 20000, in_header=False),
    # --- sub shapes (signed for real) ---
    *[
        F(f"sub-{name}", lambda w, sub=sub: signed(w, body=claims(w, sub=sub)), in_header=True)
        for name, sub in [
            ("not-spiffe", "agent-researcher"),
            ("https-scheme", "https://example.org/agent/researcher"),
            ("uppercase-scheme", "SPIFFE://example.org/agent/researcher"),
            ("trust-domain-only", "spiffe://example.org"),
            ("trust-domain-slash", "spiffe://example.org/"),
            ("uppercase-trust-domain", "spiffe://EXAMPLE.org/agent/researcher"),
            ("dot-dot", "spiffe://example.org/agent/../ops/sts-admin"),
            ("dot", "spiffe://example.org/agent/./researcher"),
            ("double-slash", "spiffe://example.org//agent/researcher"),
            ("trailing-slash", "spiffe://example.org/agent/researcher/"),
            ("query", "spiffe://example.org/agent/researcher?admin=1"),
            ("fragment", "spiffe://example.org/agent/researcher#x"),
            ("userinfo", "spiffe://admin@example.org/agent/researcher"),
            ("port", "spiffe://example.org:443/agent/researcher"),
            ("percent-encoded", "spiffe://example.org/agent%2F..%2Fops"),
            ("nul", "spiffe://example.org/agent/researcher\u0000"),
            ("newline", "spiffe://example.org/agent/researcher\n"),
            ("other-trust-domain", "spiffe://partner.test/agent/summarizer"),
            ("untrusted-trust-domain", "spiffe://stranger.test/agent/researcher"),
            ("lookalike-trust-domain", "spiffe://example.org.attacker.test/agent/researcher"),
            ("too-long", "spiffe://example.org/" + "a" * 2100),
            ("empty", ""),
            ("number", 42),
            ("list", [AGENT]),
            ("null", None),
            ("missing", _DROP),
        ]
    ],
    # --- audience ---
    *[
        F(f"aud-{name}", lambda w, aud=aud: signed(w, body=claims(w, aud=aud(w))))
        for name, aud in [
            ("missing", lambda w: _DROP),
            ("empty-string", lambda w: ""),
            ("empty-list", lambda w: []),
            ("other-service", lambda w: "https://elsewhere.example"),
            ("other-service-list", lambda w: ["https://elsewhere.example"]),
            ("trailing-slash", lambda w: w.issuer + "/"),
            ("token-endpoint", lambda w: w.issuer + "/token"),
            ("other-port", lambda w: "http://127.0.0.1:1"),
            ("uppercase-host", lambda w: w.issuer.replace("http://", "HTTP://")),
            ("number", lambda w: 1),
            ("null", lambda w: None),
            ("object", lambda w: {"aud": w.issuer}),
            ("nested-list", lambda w: [[w.issuer]]),
            ("mixed-list", lambda w: [w.issuer, 1]),
        ]
    ],
    # --- time ---
    F("expired-an-hour-ago", lambda w: w.svid(AGENT, ttl=60, now=now() - 3600)),
    F("expired-past-leeway", lambda w: signed(w, body=claims(w, exp=now() - 31, iat=now() - 100))),
    F("exp-missing", lambda w: signed(w, body=claims(w, exp=_DROP))),
    F("not-yet-valid", lambda w: signed(w, body=claims(w, nbf=now() + 3600))),
    F("issued-in-the-future", lambda w: signed(w, body=claims(w, iat=now() + 3600))),
    # --- type ---
    F("typ-at+jwt", lambda w: signed(w, head=header(w.auth.example, typ="at+jwt"))),
    F("typ-dpop+jwt", lambda w: signed(w, head=header(w.auth.example, typ="dpop+jwt"))),
    F("typ-number", lambda w: signed(w, head=header(w.auth.example, typ=1))),
    F("access-token-of-this-server-as-svid", _issued_access_token),
]

POSITIONS = ("subject_token", "client_assertion", "actor_token", "bearer")
CASES = [
    pytest.param(f, position, id=f"{position}-{f.id}")
    for position in POSITIONS
    for f in FORGERIES
    if (position != "bearer" or f.in_header)
    # RFC 7523 §3: a client assertion may name the token endpoint URL as its one audience (the
    # forgery that it is elsewhere is the legitimate form there; it stays one at the other positions).
    and not (position == "client_assertion" and f.id == "aud-token-endpoint")
]


@pytest.mark.parametrize(("forgery", "position"), CASES)
def test_forged_svid_is_refused(world: World, forgery: Forgery, position: str) -> None:
    token = forgery.build(world)
    url = f"{world.url}/token"
    if position == "subject_token":
        answer = http("POST", url, data=form(token, audience="tool:calc", scope="invoke"), session=world.session)
        refused(answer, 400, "invalid_request")
    elif position == "client_assertion":
        body = form(
            world.svid(AGENT),
            audience="tool:calc",
            scope="invoke",
            client_assertion_type=JWT_SPIFFE,
            client_assertion=token,
        )
        refused(http("POST", url, data=body, session=world.session), 401, "invalid_client")
    elif position == "actor_token":
        body = form(
            world.svid(ORCHESTRATOR),
            audience="tool:calc",
            scope="invoke",
            actor_token=token,
            actor_token_type=JWT_TYPE,
        )
        refused(http("POST", url, data=body, session=world.session), 400, "invalid_request")
    else:
        task = {
            "assignee": AGENT,
            "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
            "purpose": "hostile",
            "ttl_seconds": 60,
        }
        answer = http(
            "POST",
            f"{world.url}/tasks",
            json_body=task,
            headers={"Authorization": f"Bearer {token}"},
            session=world.session,
        )
        refused(answer, 401, "invalid_token")


def test_access_token_type_does_not_launder_an_svid(world: World) -> None:
    """A genuine JWT-SVID declared as an access token of this server is not one."""
    body = form(world.svid(AGENT), subject_token_type=ACCESS_TYPE, audience="tool:calc", scope="invoke")
    body |= {"actor_token": world.svid("spiffe://example.org/tool/calc"), "actor_token_type": JWT_TYPE}
    refused(http("POST", f"{world.url}/token", data=body), 400, "invalid_request")
