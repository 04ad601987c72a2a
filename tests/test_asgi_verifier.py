"""``sts.asgi_verifier`` in real servers: a FastAPI app and a Starlette app under uvicorn, verifying real
tokens of a real ``sts dev`` (as the ``tool`` workload, introspecting uncached).

Each refusal is checked where a client sees it: the status, the ``WWW-Authenticate`` challenge (RFC
6750 §3, RFC 9449 §7.1, with ``resource_metadata`` of RFC 9728 §5.1) and the JSON body naming the
verifier's rule. Forged tokens are signed with the environment's own keys (``tests.test_verify.forge``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import requests
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sts.asgi_verifier import STATE_KEY, TokenAuth, TokenMiddleware
from sts.binding import DpopKey
from sts.client import AccessToken, TokenClient
from sts.verify import TokenVerifier, VerifiedToken
from tests.asgi_server import parameters, serving
from tests.test_client import DATA, TOOL, Dev, running_dev
from tests.test_verify import forge

RESOURCE = "https://search.internal/"  # the catalog URI of tool:web-search in sts dev
METADATA_PATH = "/.well-known/oauth-protected-resource"
METADATA_URL = f"https://search.internal{METADATA_PATH}"


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


@pytest.fixture(scope="module")
def agent(sts_dev: Dev) -> Iterator[TokenClient]:
    with sts_dev.client() as client:
        yield client


def tool_verifier(sts_dev: Dev, **settings: Any) -> TokenVerifier:
    return sts_dev.verifier(
        TOOL, "tool", introspection_cache_seconds=0, resource=RESOURCE, scopes=["invoke"], **settings
    )


def fastapi_app(auth: TokenAuth) -> FastAPI:
    app = FastAPI()
    auth.install(app)
    invoke, administer = auth.require("invoke"), auth.require("invoke admin")

    @app.get("/search")
    async def search(q: str = "", token: VerifiedToken = Depends(invoke)) -> dict[str, Any]:
        return {"query": q, "caller": token.subject, "binding": token.binding, "jti": token.jti}

    @app.post("/admin")
    async def admin(token: VerifiedToken = Depends(administer)) -> dict[str, Any]:
        return {"caller": token.subject}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def starlette_app(auth: TokenAuth) -> Starlette:
    """The middleware guards everything (scope invoke) but /healthz; /admin wants admin on top."""

    async def search(request: Request) -> Response:
        token: VerifiedToken = getattr(request.state, STATE_KEY)
        return JSONResponse({"caller": token.subject, "binding": token.binding})

    @auth.requires("admin")
    async def admin(request: Request) -> Response:
        return JSONResponse({"caller": request.state.sts_token.subject})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/search", search), Route("/admin", admin, methods=["POST"]), Route("/healthz", healthz)],
        middleware=[Middleware(TokenMiddleware, auth=auth, scope="invoke", exempt=["/healthz"])],
    )


@pytest.fixture(scope="module", params=["fastapi", "starlette"])
def service(request: pytest.FixtureRequest, sts_dev: Dev) -> Iterator[str]:
    auth = TokenAuth(tool_verifier(sts_dev))
    app = fastapi_app(auth) if request.param == "fastapi" else starlette_app(auth)
    with serving(app) as url:
        yield url


def call(url: str, token: AccessToken | str | None, *, method: str = "GET", **headers: str) -> httpx.Response:
    if isinstance(token, AccessToken):
        headers = token.headers(method, url) | headers
    elif token is not None:
        headers = {"Authorization": f"Bearer {token}"} | headers
    return httpx.request(method, url, headers=headers, timeout=10)


def challenges(response: httpx.Response) -> list[dict[str, str]]:
    return [parameters(value) for value in response.headers.get_list("www-authenticate")]


def refused(response: httpx.Response, status: int, error: str, rule: str, scheme: str = "Bearer") -> dict[str, str]:
    """One challenge of ``scheme`` with ``error``, the rule in its description and in the JSON body."""
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    (challenge,) = response.headers.get_list("www-authenticate")
    assert challenge.startswith(f'{scheme} error="{error}"'), challenge
    described = parameters(challenge)
    assert described["error_description"].endswith(f"(rule: {rule})"), described
    assert described["resource_metadata"] == METADATA_URL
    body = response.json()
    assert body["error"] == error and body["error_description"].endswith(f"(rule: {rule})"), body
    return described


# --- accepted ---------------------------------------------------------------------------------------


def test_a_bearer_token_reaches_the_handler(sts_dev: Dev, agent: TokenClient, service: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    response = call(f"{service}/search?q=quarterly", token)
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == sts_dev.spiffe_id("agent")
    assert response.json()["binding"] == "none"


def test_a_dpop_bound_token_with_its_proof(sts_dev: Dev, agent: TokenClient, service: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate())
    for _ in range(2):  # the same token twice, a fresh proof each time (the query is not part of htu)
        response = call(f"{service}/search?q=x", token)
        assert response.status_code == 200, response.text
        assert response.json()["binding"] == "dpop"


def test_exempt_paths_and_the_metadata_need_no_token(service: str) -> None:
    assert call(f"{service}/healthz", None).status_code == 200
    response = call(f"{service}{METADATA_PATH}", None)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.json() == {
        "resource": RESOURCE,
        "authorization_servers": [response.json()["authorization_servers"][0]],
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA", "Ed25519"],
        "dpop_bound_access_tokens_required": False,
        "scopes_supported": ["invoke"],
    }


def test_the_metadata_names_our_issuer(sts_dev: Dev, service: str) -> None:
    document = call(f"{service}{METADATA_PATH}", None).json()
    assert document["authorization_servers"] == [sts_dev.issuer]
    issuer = requests.get(f"{sts_dev.issuer}/.well-known/oauth-authorization-server", timeout=10).json()
    assert issuer["issuer"] == sts_dev.issuer  # where a client goes next: our RFC 8414 metadata


# --- refused ----------------------------------------------------------------------------------------


def test_no_token_gets_both_challenges_pointing_at_the_metadata(service: str) -> None:
    response = call(f"{service}/search", None)
    assert response.status_code == 401
    assert challenges(response) == [
        {"resource_metadata": METADATA_URL},
        {"algs": "ES256 EdDSA Ed25519", "resource_metadata": METADATA_URL},
    ]
    assert [c.split(" ")[0] for c in response.headers.get_list("www-authenticate")] == ["Bearer", "DPoP"]
    assert response.json()["error_description"].endswith("(rule: missing)")


def test_a_data_token_is_the_wrong_class(sts_dev: Dev, agent: TokenClient, service: str) -> None:
    # The demo policies hand out confidential data bound and to authenticated clients only.
    task_id = sts_dev.new_task()
    data = agent.token(audience=DATA, scope="read", task_id=task_id, dpop=DpopKey.generate(), client_assertion=True)
    refused(call(f"{service}/search", data), 401, "invalid_token", "key", scheme="DPoP")


def test_a_token_for_another_audience(sts_dev: Dev, service: str) -> None:
    refused(call(f"{service}/search", forge(sts_dev, claims={"aud": "tool:calc"})), 401, "invalid_token", "audience")


def test_an_expired_token(sts_dev: Dev, service: str) -> None:
    expired = forge(sts_dev, claims={"exp": int(time.time()) - 60})
    refused(call(f"{service}/search", expired), 401, "invalid_token", "expired")


def test_a_revoked_token(agent: TokenClient, service: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    assert call(f"{service}/search", token).status_code == 200
    agent.revoke(token.value)
    refused(call(f"{service}/search", token), 401, "invalid_token", "revoked")


def test_a_token_of_a_completed_task(sts_dev: Dev, agent: TokenClient, service: str) -> None:
    task_id = sts_dev.new_task()
    token = agent.token(audience=TOOL, scope="invoke", task_id=task_id)
    assert call(f"{service}/search", token).status_code == 200
    with sts_dev.client("orchestrator") as orchestrator:
        orchestrator.complete_task(task_id)
    refused(call(f"{service}/search", token), 401, "invalid_token", "revoked")


def test_a_missing_scope_is_403_naming_it(agent: TokenClient, service: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    described = refused(call(f"{service}/admin", token, method="POST"), 403, "insufficient_scope", "scope")
    assert described["scope"] in ("admin", "admin invoke")


def test_a_dpop_bound_token_as_bearer_and_a_stolen_proof(agent: TokenClient, service: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate())
    refused(call(f"{service}/search", token.value), 401, "invalid_token", "scheme", scheme="DPoP")
    proof = token.headers("GET", f"{service}/search")
    assert call(f"{service}/search", None, **proof).status_code == 200
    replayed = call(f"{service}/search", None, **proof)
    refused(replayed, 401, "invalid_dpop_proof", "dpop_proof", scheme="DPoP")


# --- DPoP required, replicas, the event loop --------------------------------------------------------


def test_a_dpop_only_service_says_so_and_refuses_bearer_tokens(sts_dev: Dev, agent: TokenClient) -> None:
    auth = TokenAuth(tool_verifier(sts_dev, require_dpop=True))
    with serving(fastapi_app(auth)) as url:
        assert call(f"{url}{METADATA_PATH}", None).json()["dpop_bound_access_tokens_required"] is True
        nothing = call(f"{url}/search", None)
        assert [c.split(" ")[0] for c in nothing.headers.get_list("www-authenticate")] == ["DPoP"]
        bearer = agent.token(audience=TOOL, scope="invoke")
        refused(call(f"{url}/search", bearer), 401, "invalid_token", "unbound", scheme="DPoP")
        bound = agent.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate())
        assert call(f"{url}/search", bound).status_code == 200


def test_without_install_fastapi_still_answers_with_the_challenge(sts_dev: Dev) -> None:
    """``require`` raises an HTTPException: FastAPI's own handler keeps the status and challenge."""
    auth = TokenAuth(tool_verifier(sts_dev))
    app = FastAPI()
    invoke = auth.require("invoke")

    @app.get("/search")
    async def search(token: VerifiedToken = Depends(invoke)) -> dict[str, str]:
        return {"caller": token.subject}

    with serving(app) as url:
        response = call(f"{url}/search", "not-a-token")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert response.json()["detail"].endswith("(rule: malformed)")


class SlowKeys(requests.Session):
    """The STS as seen over a slow link: every GET (metadata, key set) takes a second."""

    def get(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        time.sleep(1.0)
        return super().get(url, *args, **kwargs)


def test_a_slow_key_fetch_does_not_block_the_event_loop(sts_dev: Dev, agent: TokenClient) -> None:
    """While one request waits for the key set (1 s), the same event loop answers another at once."""
    auth = TokenAuth(tool_verifier(sts_dev, session=SlowKeys()))
    token = agent.token(audience=TOOL, scope="invoke")
    with serving(fastapi_app(auth)) as url:
        results: dict[str, float] = {}

        def slow() -> None:
            started = time.monotonic()
            assert call(f"{url}/search", token).status_code == 200
            results["slow"] = time.monotonic() - started

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.2)  # the first request is now waiting for the key set
        started = time.monotonic()
        assert call(f"{url}/healthz", None).status_code == 200
        results["fast"] = time.monotonic() - started
        thread.join()
    assert results["slow"] >= 1.0
    assert results["fast"] < 0.5, results


def test_concurrent_requests_from_an_async_client(sts_dev: Dev, service: str) -> None:
    """Twenty requests at once through ``HttpxTokenAuth`` on ``httpx.AsyncClient``: all verified."""
    from sts.client import AsyncTokenClient, HttpxTokenAuth

    async def burst() -> list[int]:
        async with (
            AsyncTokenClient(sts_dev.issuer, socket=sts_dev.socket("agent")) as client,
            httpx.AsyncClient(timeout=10) as http,
        ):
            auth = HttpxTokenAuth(client, audience=TOOL, scope="invoke", dpop=DpopKey.generate())
            responses = await _gather([http.get(f"{service}/search", auth=auth) for _ in range(20)])
            return [r.status_code for r in responses]

    assert anyio.run(burst) == [200] * 20


async def _gather(calls: list[Any]) -> list[httpx.Response]:
    results: list[httpx.Response] = [None] * len(calls)  # type: ignore[list-item]

    async def one(index: int, awaitable: Any) -> None:
        results[index] = await awaitable

    async with anyio.create_task_group() as group:
        for index, awaitable in enumerate(calls):
            group.start_soon(one, index, awaitable)
    return results
