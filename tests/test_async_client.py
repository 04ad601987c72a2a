"""``sts.client.AsyncTokenClient`` against a real ``sts dev``: the cache rules of ``TokenClient`` under
asyncio concurrency (one exchange in flight per key), tasks, mTLS, retries, and ``HttpxTokenAuth`` on
``httpx.AsyncClient`` in front of a real FastAPI resource server."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import requests
from fastapi import Depends, FastAPI

from sts.asgi_verifier import TokenAuth
from sts.binding import DpopKey
from sts.client import AsyncTokenClient, HttpxTokenAuth, TokenRequest
from sts.errors import InvalidRequest, RateLimited, TemporarilyUnavailable
from sts.verify import VerifiedToken
from tests.asgi_server import serving
from tests.test_client import DATA, TOOL, Dev, FixedSvids, claims_of, running_dev


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


class Exchanges:
    """Counts the requests an ``httpx.AsyncClient`` sent, by path."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def hook(self, response: httpx.Response) -> None:
        self.paths.append(response.request.url.path)

    def count(self, path: str = "/token") -> int:
        return self.paths.count(path)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=10, event_hooks={"response": [self.hook]})


def agent(dev: Dev, http: httpx.AsyncClient | None = None, **settings: Any) -> AsyncTokenClient:
    return AsyncTokenClient(
        dev.issuer,
        socket=dev.socket("agent"),
        mtls_token_endpoint=dev.description["mtls_token_endpoint"],
        server_ca=dev.description["server_ca"],
        http=http,
        **settings,
    )


def run(test: Callable[[], Awaitable[None]]) -> None:
    anyio.run(test)


async def gather(*calls: Awaitable[Any]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def one(index: int, call: Awaitable[Any]) -> None:
        results[index] = await call

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(one, index, call)
    return results


def test_one_exchange_in_flight_per_key_under_concurrency(sts_dev: Dev) -> None:
    async def test() -> None:
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http) as client:
            tokens = await gather(*(client.token(audience=TOOL, scope="invoke") for _ in range(25)))
            assert len({t.value for t in tokens}) == 1
            assert calls.count() == 1
            key = DpopKey.generate()  # another binding is another key: one more exchange, shared again
            bound = await gather(*(client.token(audience=TOOL, scope="invoke", dpop=key) for _ in range(10)))
            assert len({t.value for t in bound}) == 1 and bound[0].value != tokens[0].value
            assert calls.count() == 2
            assert await client.token(audience=TOOL, scope="invoke") is tokens[0]  # from the cache
            assert calls.count() == 2

    run(test)


def test_tokens_of_a_task_it_completed_are_dropped_at_once(sts_dev: Dev) -> None:
    async def test() -> None:
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http) as client:
            orchestrator = AsyncTokenClient(sts_dev.issuer, socket=sts_dev.socket("orchestrator"))
            async with orchestrator:
                task = await orchestrator.create_task(
                    sts_dev.spiffe_id("agent"), {TOOL: ["invoke"]}, purpose="test", ttl_seconds=300
                )
            task_id = task["task_id"]
            token = await client.token(audience=TOOL, scope="invoke", task_id=task_id)
            assert claims_of(token.value)["task_id"] == task_id
            # The agent completes its own task: its tokens are gone before the STS is even asked.
            completed = await client.complete_task(task_id)
            assert completed["status"] == "completed"
            with pytest.raises(InvalidRequest, match="completed"):
                await client.token(audience=TOOL, scope="invoke", task_id=task_id)
            assert calls.count() == 2  # the second exchange was asked for, and refused by the STS

    run(test)


def test_a_known_task_deadline_ends_its_cached_tokens(sts_dev: Dev) -> None:
    async def test() -> None:
        now = [time.time()]
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http, clock=lambda: now[0]) as client:
            task = await client_task(sts_dev, ttl_seconds=120)
            first = await client.token(audience=TOOL, scope="invoke", task_id=task["task_id"])
            reading = await client.task(task["task_id"])  # the assignee reads its task: deadline noted
            assert reading["expires_at"] == task["expires_at"]
            assert await client.token(audience=TOOL, scope="invoke", task_id=task["task_id"]) is first
            now[0] = task["expires_at"] + 1  # past the deadline: not handed out again
            assert client._cached(client._key(TokenRequest.of(audience=TOOL, scope="invoke", task_id=task["task_id"]))) is None
            assert calls.count() == 1

    run(test)


async def client_task(dev: Dev, *, ttl_seconds: int = 300) -> dict[str, Any]:
    async with AsyncTokenClient(dev.issuer, socket=dev.socket("orchestrator")) as orchestrator:
        return await orchestrator.create_task(
            dev.spiffe_id("agent"), {TOOL: ["invoke"], DATA: ["read"]}, purpose="test", ttl_seconds=ttl_seconds
        )


def test_a_task_ended_behind_its_back_is_learned_by_reading_it(sts_dev: Dev) -> None:
    async def test() -> None:
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http) as client:
            task_id = (await client_task(sts_dev))["task_id"]
            await client.token(audience=TOOL, scope="invoke", task_id=task_id)
            async with AsyncTokenClient(sts_dev.issuer, socket=sts_dev.socket("orchestrator")) as orchestrator:
                await orchestrator.complete_task(task_id)
            assert (await client.task(task_id))["status"] == "completed"  # tokens dropped here
            with pytest.raises(InvalidRequest):
                await client.token(audience=TOOL, scope="invoke", task_id=task_id)

    run(test)


def test_end_task_during_an_exchange_keeps_the_result_out_of_the_cache(sts_dev: Dev) -> None:
    async def test() -> None:
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http) as client:
            task_id = (await client_task(sts_dev))["task_id"]
            original = client._exchange

            async def exchange_then_end(want: Any) -> Any:
                token = await original(want)
                client.end_task(task_id)  # as if another task ended it meanwhile
                return token

            client._exchange = exchange_then_end  # type: ignore[method-assign]
            await client.token(audience=TOOL, scope="invoke", task_id=task_id)
            client._exchange = original  # type: ignore[method-assign]
            await client.token(audience=TOOL, scope="invoke", task_id=task_id)
            assert calls.count() == 2

    run(test)


def test_mtls_and_client_assertion_exchanges(sts_dev: Dev) -> None:
    async def test() -> None:
        async with agent(sts_dev) as client:
            bound = await client.token(audience=TOOL, scope="invoke", mtls=True)
            assert "x5t#S256" in claims_of(bound.value)["cnf"]
            cert_file, _ = client.client_certificate_files()
            assert cert_file
            asserted = await client.token(audience=TOOL, scope="invoke", client_assertion=True)
            assert asserted.value != bound.value

    run(test)


def test_the_httpx_auth_drops_a_token_the_resource_server_refuses(sts_dev: Dev) -> None:
    """Revoked at the STS by someone else: the first call is 401, the token is dropped, the next works."""
    verifier = sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=0)
    auth = TokenAuth(verifier)
    app = FastAPI()
    auth.install(app)
    invoke = auth.require("invoke")

    @app.get("/search")
    async def search(token: VerifiedToken = Depends(invoke)) -> dict[str, str]:
        return {"jti": token.jti}

    async def test(url: str) -> None:
        calls = Exchanges()
        async with calls.http() as http, agent(sts_dev, http) as client:
            token_auth = HttpxTokenAuth(client, audience=TOOL, scope="invoke")
            async with httpx.AsyncClient(timeout=10) as api:
                assert (await api.get(f"{url}/search", auth=token_auth)).status_code == 200
                token = await client.token(audience=TOOL, scope="invoke")
                requests.post(  # revoked behind the client's back
                    f"{sts_dev.issuer}/revoke",
                    data={"token": token.value},
                    headers={"Authorization": f"Bearer {sts_dev.svid('agent')}"},
                    timeout=10,
                )
                assert (await api.get(f"{url}/search", auth=token_auth)).status_code == 401
                again = await api.get(f"{url}/search", auth=token_auth)
                assert again.status_code == 200 and again.json()["jti"] != claims_of(token.value)["jti"]
            assert calls.count() == 2

    with serving(app) as url:
        anyio.run(test, url)


def test_an_async_token_client_refuses_the_sync_httpx_client(sts_dev: Dev) -> None:
    async def make() -> AsyncTokenClient:
        return agent(sts_dev)

    client = anyio.run(make)
    with httpx.Client() as http, pytest.raises(TypeError, match="AsyncClient"):
        http.get(f"{sts_dev.issuer}/healthz", auth=HttpxTokenAuth(client, audience=TOOL, scope="invoke"))
    anyio.run(client.aclose)


# --- retries (a scripted STS) -----------------------------------------------------------------------

ISSUED = (200, {}, {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 60, "scope": "invoke"})
BUSY = (503, {"Retry-After": "2"}, {"error": "temporarily_unavailable", "error_description": "store down"})
LIMITED = (429, {"Retry-After": "1"}, {"error": "rate_limited", "error_description": "slow down"})


def scripted(script: list[tuple[int, dict[str, str], dict[str, Any]]], **settings: Any) -> tuple[AsyncTokenClient, list[httpx.Request], list[float]]:
    sent: list[httpx.Request] = []
    waits: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        status, headers, body = script.pop(0)
        return httpx.Response(status, headers=headers, content=json.dumps(body).encode())

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = AsyncTokenClient("http://sts.test", svids=FixedSvids(), http=http, sleep=sleep, **settings)
    return client, sent, waits


def test_429_and_503_are_retried_no_sooner_than_retry_after() -> None:
    async def test() -> None:
        client, sent, waits = scripted([LIMITED, BUSY, ISSUED])
        assert (await client.token(audience=TOOL, scope="invoke")).value == "a.b.c"
        assert len(sent) == 3 and waits[0] >= 1 and waits[1] >= 2

    run(test)


def test_retries_are_bounded_and_long_waits_raised_at_once() -> None:
    async def test() -> None:
        client, sent, waits = scripted([BUSY, BUSY, BUSY], max_attempts=3)
        with pytest.raises(TemporarilyUnavailable, match="store down"):
            await client.token(audience=TOOL, scope="invoke")
        assert len(sent) == 3 and len(waits) == 2
        spent = (429, {"Retry-After": "3600"}, {"error": "rate_limited", "error_description": "budget spent"})
        client, sent, waits = scripted([spent], max_retry_wait=10)
        with pytest.raises(RateLimited):
            await client.token(audience=TOOL, scope="invoke")
        assert waits == [] and len(sent) == 1

    run(test)


def test_each_retry_carries_a_fresh_dpop_proof() -> None:
    async def test() -> None:
        bound = (200, {}, {"access_token": "a.b.c", "token_type": "DPoP", "expires_in": 60, "scope": "invoke"})
        client, sent, _ = scripted([LIMITED, bound])
        await client.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate())
        assert len({r.headers["DPoP"] for r in sent}) == 2

    run(test)
