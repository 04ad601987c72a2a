"""SpiffeId/TrustDomain agree with every case of the shared SPIFFE-ID vectors (SPIFFE-ID.md §2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

CASES = json.loads((Path(__file__).parent / "vectors" / "spiffe_ids.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector(case: dict) -> None:
    if case["valid"]:
        spiffe_id = SpiffeId.parse(case["id"])
        assert spiffe_id.trust_domain.name == case["trust_domain"]
        assert spiffe_id.path == case["path"]
        assert str(spiffe_id) == case["id"]
    else:
        with pytest.raises(SpiffeIdError):
            SpiffeId.parse(case["id"])


def test_values_compare_and_hash() -> None:
    a = SpiffeId.parse("spiffe://example.org/agent/researcher")
    b = SpiffeId.parse("spiffe://example.org/agent/researcher")
    assert a == b
    assert hash(a) == hash(b)
    assert a.segments == ("agent", "researcher")
    assert a.member_of(TrustDomain("example.org"))
    assert not a.member_of(TrustDomain("other.org"))
    with pytest.raises(AttributeError):
        a.path = "/x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "name"),
    [("example.org", "example.org"), ("spiffe://example.org", "example.org")],
    ids=["bare-name", "trust-domain-id"],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    assert TrustDomain.parse(text).name == name
    assert TrustDomain.parse(text).id == "spiffe://example.org"


@pytest.mark.parametrize(
    "text",
    ["spiffe://example.org/path", "Example.org", "", "example.org:443", "example.org\n"],
    ids=["id-with-path", "uppercase", "empty", "port", "trailing-newline"],
)
def test_trust_domain_rejects(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(text)


def test_not_a_string() -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(b"spiffe://example.org/x")  # type: ignore[arg-type]
