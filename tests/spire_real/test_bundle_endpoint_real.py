"""Federation over a real SPIRE server's bundle endpoint (issue 15): no agent of the partner's, and
no federation configured on our own SPIRE server.

``partner.test`` is a second ``spire-server`` whose ``federation.bundle_endpoint`` serves its bundle
with the ``https_spiffe`` profile (its own X.509-SVID ``spiffe://partner.test/spire/server``). The
STS trusts ``example.org`` through the shared agent and ``partner.test`` through that endpoint only,
bootstrapped with ``spire-server bundle show -format spiffe``. Then: partner JWT-SVIDs
(``spire-server jwt mint``) are exchanged; a JWT authority rotation on the partner
(``localauthority jwt prepare`` → ``activate``) is followed without a restart; with the partner's
server stopped the last bundle keeps serving, also across a restart of the STS (the persisted copy).

The harness has no federation block for its server configuration: :class:`PartnerServer` adds one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.conftest import free_port
from tests.spire_real.harness import (
    PARTNER,
    TRUST_DOMAIN,
    Deployment,
    HarnessError,
    SpireServer,
    Sts,
    short_tempdir,
    wait_for,
)

PARTNER_AGENT = f"spiffe://{PARTNER}/agent/summarizer"
ENDPOINT_ID = f"spiffe://{PARTNER}/spire/server"
REFRESH_HINT = "5s"  # SPIRE warns below 1 m but serves it; the STS polls at most every 5 s anyway
FOLLOW_TIMEOUT = 40.0


class PartnerServer(SpireServer):
    """A SPIRE server with ``federation.bundle_endpoint`` on loopback (profile https_spiffe)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bundle_port = free_port()

    @property
    def bundle_url(self) -> str:
        return f"https://127.0.0.1:{self.bundle_port}"

    def write_config(self) -> None:
        super().write_config()
        federation = (
            "  federation {\n    bundle_endpoint {\n"
            '      address = "127.0.0.1"\n'
            f"      port = {self.bundle_port}\n"
            f'      refresh_hint = "{REFRESH_HINT}"\n'
            "    }\n  }\n"
        )
        text = self.config.read_text()
        if not text.startswith("server {\n"):
            raise HarnessError("the harness's server configuration changed shape: no leading 'server {'")
        self.config.write_text(text.replace("server {\n", "server {\n" + federation, 1))


@pytest.fixture(scope="module")
def partner(spire_bin_dir: Path) -> Iterator[PartnerServer]:
    server = PartnerServer(spire_bin_dir, short_tempdir("spb-"), PARTNER)
    try:
        server.start()
    except HarnessError as e:
        server.process.kill()
        pytest.fail(f"the partner's SPIRE server did not come up: {e}\n{server.process.tail()}")
    yield server
    server.process.kill()


def endpoint_sts(spire: Deployment, partner: PartnerServer) -> Sts:
    """An STS whose partner.test comes from the partner's bundle endpoint (written into the harness's
    configuration before the STS starts)."""
    directory = spire.directory / f"sts-be-{time.monotonic_ns()}"
    sts = Sts(directory, spire.socket, trust_domains=(TRUST_DOMAIN,))
    bootstrap = directory / "partner.bootstrap.json"
    bootstrap.write_text(partner.bundle_show("spiffe"))
    config = yaml.safe_load(sts.config.read_text())
    config["trust_domains"][PARTNER] = {
        "bundle_endpoint": partner.bundle_url,
        "endpoint_profile": "https_spiffe",
        "endpoint_spiffe_id": ENDPOINT_ID,
        "bootstrap_bundle_file": str(bootstrap),
        "max_staleness": "2m",
        "cache_file": str(directory / "bundles" / f"{PARTNER}.json"),
    }
    sts.config.write_text(yaml.safe_dump(config, sort_keys=False))
    return sts


def partner_state(sts: Sts) -> dict[str, Any]:
    _, body = sts.readyz()
    state: dict[str, Any] = body["trust_domains"][PARTNER]
    return state


def exchanged(sts: Sts, svid: str) -> dict[str, Any]:
    response = sts.exchange(svid, audience="tool:web-search", scope="invoke")
    assert response.status_code == 200, response.text
    claims: dict[str, Any] = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    return claims


def test_the_sts_federates_with_a_real_spire_bundle_endpoint(
    spire: Deployment, partner: PartnerServer
) -> None:
    sts = endpoint_sts(spire, partner)
    try:
        sts.start()
        state = partner_state(sts)
        assert state["source"] == "bundle_endpoint" and state["endpoint_profile"] == "https_spiffe"
        assert state["available"] is True and state["last_error"] is None
        assert (state["jwt_authorities"], state["x509_authorities"]) == (1, 1)
        assert state["refresh_seconds"] == 5.0  # SPIRE's 5 s hint, the STS's floor
        first_sequence = state["sequence"]
        assert isinstance(first_sequence, int)

        claims = exchanged(sts, partner.jwt_mint(PARTNER_AGENT, sts.issuer))
        assert claims["sub"] == PARTNER_AGENT
        refused = sts.exchange(
            partner.jwt_mint(PARTNER_AGENT, sts.issuer), audience="tool:calc", scope="invoke"
        )
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target"), refused.text

        # The partner rotates its JWT authority: prepared keys are published first (a new sequence),
        # then activated; the STS follows through the endpoint, without a restart.
        old = partner.authorities("jwt")["active"]
        prepared = partner.localauthority("jwt", "prepare")["prepared_authority"]["authority_id"]
        wait_for(
            "the prepared JWT authority published to the STS",
            lambda: partner_state(sts)["jwt_authorities"] == 2,
            timeout=FOLLOW_TIMEOUT,
            interval=0.5,
        )
        assert partner_state(sts)["sequence"] > first_sequence
        partner.localauthority("jwt", "activate", prepared)
        rotated = partner.jwt_mint(PARTNER_AGENT, sts.issuer)
        assert jwt.get_unverified_header(rotated)["kid"] == prepared
        assert exchanged(sts, rotated)["sub"] == PARTNER_AGENT
        assert old != prepared

        # The partner's server goes away: the last bundle keeps serving (and says why it is not fresh).
        partner.stop()
        wait_for(
            "the STS noticing the endpoint is down",
            lambda: partner_state(sts)["last_error"],
            timeout=FOLLOW_TIMEOUT,
            interval=0.5,
        )
        state = partner_state(sts)
        assert state["available"] is True and "cannot connect" in state["last_error"]
        assert exchanged(sts, rotated)["sub"] == PARTNER_AGENT

        # A restart of the STS while the partner is down: the persisted bundle serves.
        sts.stop()
        sts.start()
        state = partner_state(sts)
        assert state["available"] is True and state["from_cache"] is True, state
        assert state["jwt_authorities"] == 2
        assert exchanged(sts, rotated)["sub"] == PARTNER_AGENT
    except HarnessError as e:
        pytest.fail(f"{e}\n{sts.logs()}")
    finally:
        sts.stop()
