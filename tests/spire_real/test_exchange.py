"""The STS against a real SPIRE agent: bundles, attestation by gid, exchanges, SPIRE's JWT-SVID cache,
client assertions and ``/readyz`` (issue 14, scenarios 1, 2 and 9)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import jwt
import requests
from cryptography import x509

from tests.spire_real.harness import (
    PARTNER,
    STS_ID,
    TRUST_DOMAIN,
    Deployment,
    HarnessError,
    Sts,
    run_as,
    tls_peer_chain,
    wait_for,
)

TOOL, DATA = "tool:web-search", "data:crm"
UNREGISTERED_STS_GID = 1500
TWIN_GID = 1010
STS2_GID = 1600


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def verified(sts: Sts, token: str, token_class: str, audience: str) -> dict[str, Any]:
    """The claims of an issued token, its signature checked with the class's JWKS of the STS."""
    keys = jwt.PyJWKClient(f"{sts.url}/jwks/{token_class}.json")
    key = keys.get_signing_key_from_jwt(token)
    decoded: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256", "EdDSA", "RS256"], audience=audience, issuer=sts.issuer
    )
    return decoded


def audit_records(sts: Sts) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sts.directory / "audit.jsonl").read_text().splitlines()]


def test_sts_takes_its_bundles_from_the_agent_and_becomes_ready(sts: Sts) -> None:
    status, body = sts.readyz()
    assert status == 200, body
    example = body["trust_domains"][TRUST_DOMAIN]
    assert example["source"] == "workload-api"
    assert example["available"] is True
    assert example["jwt_authorities"] == 1
    assert example["x509_authorities"] == 1
    assert body["problems"] == []


def test_each_gid_is_attested_as_its_own_spiffe_id(spire: Deployment) -> None:
    assert spire.agent.served_ids(0) == [STS_ID]
    for workload in spire.workloads.values():
        assert workload.run("ids") == {"ids": [workload.spiffe_id]}
    unregistered = spire.agent.served_ids(1999)
    assert unregistered == []


def test_an_unregistered_gid_gets_no_identity(spire: Deployment) -> None:
    answer = run_as(1999, "jwt", "--audience", "anything", "--socket", spire.socket)
    assert "no identity issued" in answer["error"]


def test_agent_jwt_svid_is_exchanged_for_a_tool_token(spire: Deployment, sts: Sts) -> None:
    researcher = spire.workloads["researcher"]
    [svid] = researcher.jwt(sts.issuer)
    header = jwt.get_unverified_header(svid)
    assert re.fullmatch(r"[A-Za-z0-9]{32}", header["kid"]), header  # SPIRE's kid shape
    assert claims_of(svid)["aud"] == [sts.issuer]
    assert "iss" not in claims_of(svid)  # no jwt_issuer configured

    response = sts.exchange(svid, audience=TOOL, scope="invoke")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    claims = verified(sts, body["access_token"], "tool", TOOL)
    assert claims["sub"] == researcher.spiffe_id
    assert claims["token_class"] == "tool"
    assert claims["scope"] == "invoke"
    assert claims["exp"] <= claims_of(svid)["exp"]


def test_a_workloads_task_scoped_data_token_through_token_client(spire: Deployment, sts: Sts) -> None:
    orchestrator, researcher = spire.workloads["orchestrator"], spire.workloads["researcher"]
    task = orchestrator.run(
        "task",
        "--issuer",
        sts.issuer,
        "--assignee",
        researcher.spiffe_id,
        "--target",
        f"{DATA}=read",
        "--target",
        f"{TOOL}=invoke",
    )
    assert "task_id" in task, task
    task_id = task["task_id"]

    tool = researcher.token(sts.issuer, audience=TOOL, scope="invoke", task_id=task_id)
    assert "access_token" in tool, tool
    data = researcher.token(sts.issuer, audience=DATA, scope="read", task_id=task_id)
    assert "access_token" in data, data
    claims = verified(sts, data["access_token"], "data", DATA)
    assert (claims["sub"], claims["task_id"], claims["token_class"]) == (
        researcher.spiffe_id,
        task_id,
        "data",
    )
    # A token for a tool never unlocks data: it is not even signed with a data key.
    data_kids = {k["kid"] for k in requests.get(f"{sts.url}/jwks/data.json", timeout=5).json()["keys"]}
    assert jwt.get_unverified_header(tool["access_token"])["kid"] not in data_kids

    outside = researcher.token(sts.issuer, audience=DATA, scope="write", task_id=task_id)
    assert outside["error"] == "invalid_scope", outside


def test_the_agent_hands_out_its_cached_jwt_svid_for_the_same_audience(spire: Deployment, sts: Sts) -> None:
    """SPIRE's cache (one JWT-SVID per SPIFFE ID and audience set, renewed at half its life): the same
    token twice in one process, and again in another process of the same workload."""
    researcher = spire.workloads["researcher"]
    first, second = researcher.jwt(sts.issuer, count=2)
    assert first == second
    assert researcher.jwt(sts.issuer) == [first]
    [other_audience] = researcher.jwt(sts.issuer, f"{sts.issuer}/token")
    assert other_audience != first


def test_client_assertion_with_spires_cached_svid(spire: Deployment, sts: Sts) -> None:
    """``TokenClient(..., client_assertion=True)`` asks for the assertion with the token endpoint as
    audience, so the agent hands out a JWT-SVID distinct from the (cached) subject token."""
    researcher = spire.workloads["researcher"]
    answer = researcher.token(sts.issuer, audience=TOOL, scope="invoke", client_assertion=True)
    assert "access_token" in answer, answer
    claims = claims_of(answer["access_token"])
    assert claims["client_id"] == researcher.spiffe_id
    record = next(
        r
        for r in reversed(audit_records(sts))
        if r.get("event") == "token_exchange" and r.get("jti") == claims["jti"]
    )
    assert record["client_auth"] == "spiffe_jwt", record


def test_the_cached_subject_token_is_refused_as_its_own_client_assertion(spire: Deployment, sts: Sts) -> None:
    """With SPIRE the same audience gives the same token: the server must not take it as a second
    proof (the client therefore asks for the assertion with another audience)."""
    researcher = spire.workloads["researcher"]
    [svid] = researcher.jwt(sts.issuer)
    response = sts.exchange(
        svid,
        audience=TOOL,
        scope="invoke",
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
        client_assertion=svid,
    )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), response.text


def test_readyz_warns_about_a_configured_trust_domain_the_agent_does_not_serve(sts: Sts) -> None:
    status, body = sts.readyz()
    assert status == 200, body
    assert body["workload_api_serves"] == [TRUST_DOMAIN]
    assert body["trust_domains"][PARTNER]["jwt_authorities"] == 0
    assert any(PARTNER in warning and "does not serve" in warning for warning in body["warnings"]), body


def test_an_sts_without_an_entry_is_not_ready_until_it_is_registered(spire: Deployment) -> None:
    """An STS whose process matches no entry gets PermissionDenied from the agent: not ready, and
    ``/readyz`` says so; registering it later makes it ready without a restart."""
    late = Sts(spire.directory / "sts-late", spire.socket, gid=UNREGISTERED_STS_GID, start_timeout="2s")
    try:
        for process in late.processes:
            process.start()

        def refused() -> dict[str, Any] | None:
            late.processes[0].check_alive()
            status, body = late.readyz()
            return body if status == 503 and body["problems"] else None

        body = wait_for("/readyz answers 503", refused, timeout=30, interval=0.3)
        assert any("PERMISSION_DENIED" in p for p in body["problems"]), json.dumps(body)
        workload = spire.register("sts-late", f"spiffe://{TRUST_DOMAIN}/sts-late", UNREGISTERED_STS_GID)
        try:
            late.wait_ready(timeout=30)
            [svid] = workload.jwt(late.issuer)
            assert late.exchange(svid).status_code == 400  # it may verify, but policy gives it nothing
        finally:
            spire.server.entry_delete(spire.entries.pop("sts-late").entry_id)
            spire.workloads.pop("sts-late")
    finally:
        late.stop()


def test_sts_svid_command_prints_the_agents_cached_jwt_svid(spire: Deployment, sts: Sts) -> None:
    researcher = spire.workloads["researcher"]
    [cached] = researcher.jwt(sts.issuer)
    done = subprocess.run(
        [sys.executable, "-m", "sts.cli", "svid", "--socket", spire.socket, "--audience", sts.issuer],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        group=researcher.gid,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == cached


def test_a_process_with_two_identities_picks_one_with_spiffe_id(spire: Deployment, sts: Sts) -> None:
    """One process matching two entries gets both SVIDs (ordered by entry ID); ``TokenClient(spiffe_id=…)``
    exchanges as the one it names, by JWT-SVID and by mTLS."""
    first = spire.register("twin-a", f"spiffe://{TRUST_DOMAIN}/agent/twin-a", TWIN_GID, entry_id="twin-a")
    second = spire.register("twin-b", f"spiffe://{TRUST_DOMAIN}/agent/twin-b", TWIN_GID, entry_id="twin-b")
    try:
        wait_for(
            "both identities served",
            lambda: first.run("ids")["ids"] == [first.spiffe_id, second.spiffe_id],
            timeout=30,
            interval=0.3,
        )
        assert sts.tls_url is not None
        for workload in (first, second):
            answer = workload.token(sts.issuer, audience=TOOL, scope="invoke", spiffe_id=workload.spiffe_id)
            assert claims_of(answer["access_token"])["sub"] == workload.spiffe_id, answer
            bound = workload.token(
                sts.issuer,
                audience=TOOL,
                scope="invoke",
                spiffe_id=workload.spiffe_id,
                mtls_endpoint=f"{sts.tls_url}/token",
            )
            assert claims_of(bound["access_token"])["client_id"] == workload.spiffe_id, bound
        default = first.token(sts.issuer, audience=TOOL, scope="invoke")
        assert claims_of(default["access_token"])["sub"] == first.spiffe_id  # the lowest entry ID
    finally:
        for name in ("twin-a", "twin-b"):
            spire.server.entry_delete(spire.entries.pop(name).entry_id)
            spire.workloads.pop(name)


def test_an_sts_matching_two_entries_presents_the_svid_for_its_public_url(spire: Deployment) -> None:
    """SPIRE orders a process's SVIDs by entry ID and the first is merely the "default". An STS whose
    process matches two entries must still serve TLS with a certificate valid for its ``public_url``
    host (``localhost``), not whichever entry sorts first."""
    other = spire.register("sts2-other", f"spiffe://{TRUST_DOMAIN}/sidecar", STS2_GID, entry_id="aaa-sidecar")
    own = spire.register(
        "sts2", f"spiffe://{TRUST_DOMAIN}/sts2", STS2_GID, entry_id="zzz-sts2", dns=["localhost"]
    )
    server = Sts(spire.directory / "sts2", spire.socket, tls=True, gid=STS2_GID)
    try:
        wait_for(
            "both identities served",
            lambda: other.run("ids")["ids"] == [other.spiffe_id, own.spiffe_id],
            timeout=30,
            interval=0.3,
        )
        server.start(server_ca=spire.server.bundle_show(), timeout=10)  # verifies it for localhost
    except HarnessError as e:
        assert server.tls_port is not None
        leaf = x509.load_der_x509_certificate(tls_peer_chain("localhost", server.tls_port)[0])
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in sans]
        raise AssertionError(
            f"the TLS listener presents the SVID of {names}, not {own.spiffe_id}: {e}"
        ) from e
    finally:
        server.stop()
        for name in ("sts2-other", "sts2"):
            spire.server.entry_delete(spire.entries.pop(name).entry_id)
            spire.workloads.pop(name)
