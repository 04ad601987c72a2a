"""Controls: the genuine requests the hostile cases are variations of do succeed (not counted as cases).

Without them a refusal could come from a broken fixture rather than from the rule under attack.
"""

from __future__ import annotations

from tests.hostile.attacker import AGENT, JWT_SPIFFE, ORCHESTRATOR, http
from tests.hostile.conftest import Dev, World


def test_plain_exchange_succeeds(world: World) -> None:
    assert world.exchange().status_code == 200


def test_client_assertion_succeeds(world: World) -> None:
    response = world.exchange(client_assertion_type=JWT_SPIFFE, client_assertion=world.svid(AGENT))
    assert response.status_code == 200, response.text


def test_tls_listener_answers(world: World) -> None:
    answer = http("GET", f"{world.tls_url}/healthz", verify=str(world.ca_file))
    assert answer.status == 200


def test_task_creation_succeeds(world: World) -> None:
    answer = http(
        "POST",
        f"{world.url}/tasks",
        json_body={"assignee": AGENT, "targets": [{"target": "tool:calc", "scopes": ["invoke"]}], "purpose": "p", "ttl_seconds": 60},
        headers=world.bearer(ORCHESTRATOR),
    )
    assert answer.status == 201, answer.text


def test_dev_exchange_succeeds(dev: Dev) -> None:
    body = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token": dev.svid("agent"),
        "audience": "tool:web-search",
        "scope": "invoke",
    }
    assert http("POST", dev.token_endpoint, data=body).status == 200


def test_limited_server_answers(limited: World) -> None:
    assert limited.exchange().status_code == 200
