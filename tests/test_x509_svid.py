"""X.509-SVID client certificates (X509-SVID.md §4-5), checked in-process: every rule refuses on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from sts.errors import InvalidToken
from sts.svid import X509_RULES, X509SvidVerifier
from tests.authority import TestAuthority, trust_store
from tests.test_mtls_http import AGENT, issue


@pytest.fixture
def verifier(example_org: TestAuthority) -> X509SvidVerifier:
    return X509SvidVerifier(trust_store(example_org))


def test_a_valid_svid(verifier: X509SvidVerifier, example_org: TestAuthority, tmp_path: Path) -> None:
    _, _, certificate = issue(example_org, tmp_path, "ok")
    assert str(verifier.verify([certificate]).spiffe_id) == AGENT


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        ("two-uri-sans", "x509_san"),
        ("no-uri-san", "x509_san"),
        ("trust-domain-only", "x509_san"),
        ("ca-certificate", "x509_leaf"),
        ("other-trust-domain", "trust_domain"),
        ("expired", "x509_chain"),
        ("signed-by-a-stranger-for-our-domain", "x509_chain"),
    ],
)
def test_refusals(
    verifier: X509SvidVerifier, example_org: TestAuthority, tmp_path: Path, case: str, rule: str
) -> None:
    stranger = TestAuthority("stranger.test")
    certificate = {
        "two-uri-sans": lambda: issue(example_org, tmp_path, case, uris=(AGENT, AGENT + "2"))[2],
        "no-uri-san": lambda: issue(example_org, tmp_path, case, uris=(), dns=("agent.example.org",))[2],
        "trust-domain-only": lambda: issue(example_org, tmp_path, case, uris=("spiffe://example.org",))[2],
        "ca-certificate": lambda: issue(example_org, tmp_path, case, ca=True)[2],
        "other-trust-domain": lambda: issue(stranger, tmp_path, case, uris=("spiffe://stranger.test/agent",))[
            2
        ],
        "expired": lambda: issue(example_org, tmp_path, case, lifetime=(-7200, -3600))[2],
        "signed-by-a-stranger-for-our-domain": lambda: issue(stranger, tmp_path, case)[2],
    }[case]()
    with pytest.raises(InvalidToken) as refused:
        verifier.verify([certificate])
    assert refused.value.rule == rule
    assert rule in X509_RULES
