"""``sts demo``: the whole agent story against a running ``sts dev``, one printed step at a time.

The orchestrator hands the agent a task; the agent calls a tool with a tool token; the data service
refuses that token; the agent gets a DPoP-bound data token (authenticating with a client assertion)
and reads; a stolen copy of the bound token is useless; the task completes and both tokens die at
once; no new token is issued for the ended task. Every step states what should happen and checks
that it did; the exit code is 0 only if all of them behaved.

Each party uses the libraries a real one would: :class:`sts.client.TokenClient` over its own
Workload API socket from ``dev.json``, and :class:`sts.verify.TokenVerifier` in the two demo
services (``sts.dev.services``). Without ``--state-dir`` a private ``sts dev`` is started in a
temporary directory and stopped at the end.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from spiffe.errors import PySpiffeError

from sts.binding import DpopKey
from sts.client import AccessToken, RequestsTokenAuth, TokenClient, TokenRequest
from sts.dev.services import LoopbackService, data_app, tool_app
from sts.errors import InvalidRequest, StsError
from sts.verify import TokenVerifier

EXIT_OK, EXIT_FAILED, EXIT_NO_ENVIRONMENT = 0, 1, 2
DEV_START_TIMEOUT_SECONDS = 60.0
TOOL, DATA = "tool:web-search", "data:crm"
# What a step may fail with without being a bug in the demo itself: it is then reported, not raised.
EXPECTED_FAILURES = (StsError, requests.RequestException, PySpiffeError, OSError, ValueError, KeyError)


class StepFailed(Exception):
    """A step did not behave as the story says it must; the message says what happened instead."""


@dataclass
class Story:
    """The steps played so far; prints each as it ends."""

    out: Callable[[str], None]
    results: list[bool] = field(default_factory=list)

    def step(self, title: str, play: Callable[[], str]) -> bool:
        number = len(self.results) + 1
        try:
            outcome, ok = play(), True
        except StepFailed as e:
            outcome, ok = str(e), False
        except EXPECTED_FAILURES as e:
            outcome, ok = f"{type(e).__name__}: {e}", False
        self.results.append(ok)
        first, *more = outcome.splitlines() or [""]
        lines = [f"{number:2d}. {title}", f"    {'ok  ' if ok else 'FAIL'} {first}"]
        self.out("\n".join(lines + [f"         {line}" for line in more]))
        return ok


@dataclass
class _Cast:
    """Everyone in the story, and what they hold between steps."""

    dev: dict[str, Any]
    orchestrator: TokenClient
    agent: TokenClient
    tool_url: str
    data_url: str
    dpop_key: DpopKey = field(default_factory=DpopKey.generate)
    task_id: str = ""
    tool_token: AccessToken | None = None
    data_token: AccessToken | None = None

    def spiffe_id(self, workload: str) -> str:
        return str(self.dev["workloads"][workload]["spiffe_id"])


def run(state_dir: Path | None, *, out: Callable[[str], None] = print) -> int:
    """Play the story against ``state_dir/dev.json`` (or a private ``sts dev``); the exit code."""
    with ExitStack() as stack:
        if state_dir is None:
            out("starting a private sts dev for the demo ...")
            try:
                state_dir = stack.enter_context(_private_dev())
            except StepFailed as e:
                out(f"sts demo: {e}")
                return EXIT_NO_ENVIRONMENT
        description = state_dir / "dev.json"
        try:
            dev = json.loads(description.read_text())
        except (OSError, ValueError) as e:
            out(f"sts demo: cannot read {description} ({e}); is `sts dev --state-dir {state_dir}` running?")
            return EXIT_NO_ENVIRONMENT
        return _play(dev, description, stack, out)
    raise AssertionError("unreachable")  # pragma: no cover (ExitStack does not swallow)


def _play(dev: dict[str, Any], description: Path, stack: ExitStack, out: Callable[[str], None]) -> int:
    issuer = dev["issuer"]
    workloads = dev["workloads"]
    out(f"sts demo against {issuer} ({description})\n")

    def verifier(workload: str, audience: str, token_class: str) -> TokenVerifier:
        # Introspect on every request, so that the demo shows revocation without waiting out a cache.
        return TokenVerifier(
            issuer=issuer,
            audience=audience,
            token_class=token_class,
            socket=workloads[workload]["socket"],
            introspection_cache_seconds=0.0,
        )

    tool = stack.enter_context(LoopbackService(tool_app(verifier("tool", TOOL, "tool"))))
    data = stack.enter_context(LoopbackService(data_app(verifier("data", DATA, "data"))))
    cast = _Cast(
        dev=dev,
        orchestrator=stack.enter_context(TokenClient(issuer, socket=workloads["orchestrator"]["socket"])),
        agent=stack.enter_context(TokenClient(issuer, socket=workloads["agent"]["socket"])),
        tool_url=f"{tool.url}/search",
        data_url=f"{data.url}/customers",
    )
    story = Story(out)
    steps: list[tuple[str, Callable[[_Cast], str]]] = [
        ("the orchestrator creates a task for the agent", _create_task),
        ("the agent gets a tool token and calls the web-search tool", _call_tool),
        ("the data service refuses that same tool token", _tool_token_at_data),
        ("the agent gets a DPoP-bound data token (client assertion) and reads the CRM", _read_data),
        ("a stolen copy of the bound data token is refused", _stolen_copy),
        ("the task completes", _complete_task),
        ("both tokens are refused at once", _both_refused),
        ("a new exchange for the ended task is refused", _no_new_token),
    ]
    for title, play in steps:
        if not story.step(title, functools.partial(play, cast)):
            break  # later steps build on this one
    passed = sum(story.results)
    if passed == len(steps):
        out(f"\nall {len(steps)} steps behaved as expected")
        return EXIT_OK
    out(f"\n{passed} of {len(steps)} steps behaved as expected")
    return EXIT_FAILED


# --- the steps --------------------------------------------------------------------------------


def _create_task(cast: _Cast) -> str:
    task = cast.orchestrator.create_task(
        cast.spiffe_id("agent"),
        {TOOL: ["invoke"], DATA: ["read"]},
        purpose="research the quarterly numbers",
        ttl_seconds=300,
    )
    cast.task_id = task["task_id"]
    return f"{cast.task_id} for {task['assignee']}: {TOOL} invoke, {DATA} read, 300 s"


def _call_tool(cast: _Cast) -> str:
    auth = RequestsTokenAuth(cast.agent, audience=TOOL, scope="invoke", task_id=cast.task_id)
    response = requests.get(cast.tool_url, params={"q": "quarterly numbers"}, auth=auth, timeout=10)
    _expect(response, 200)
    cast.tool_token = cast.agent.token(audience=TOOL, scope="invoke", task_id=cast.task_id)  # the cached one
    return f"200 from the tool: {len(response.json()['results'])} results for {response.json()['caller']}"


def _tool_token_at_data(cast: _Cast) -> str:
    token = _held(cast.tool_token)
    response = requests.get(cast.data_url, headers=token.headers("GET", cast.data_url), timeout=10)
    return "refused: " + _expect_refusal(response, 401, "invalid_token")


def _read_data(cast: _Cast) -> str:
    want = TokenRequest.of(
        audience=DATA, scope="read", task_id=cast.task_id, dpop=cast.dpop_key, client_assertion=True
    )
    response = requests.get(cast.data_url, auth=RequestsTokenAuth(cast.agent, want), timeout=10)
    _expect(response, 200)
    cast.data_token = cast.agent.get(want)  # the cached one
    body = response.json()
    if body["binding"] != "dpop":
        raise StepFailed(f"the data service saw binding {body['binding']!r}, not dpop")
    return f"200 from the CRM: {len(body['customers'])} customers; token_type DPoP, cnf.jkt = the agent's key"


def _stolen_copy(cast: _Cast) -> str:
    token = _held(cast.data_token)
    as_bearer = requests.get(cast.data_url, headers={"Authorization": f"Bearer {token.value}"}, timeout=10)
    bearer = _expect_refusal(as_bearer, 401, "invalid_token")
    thief = DpopKey.generate()
    proof = thief.proof("GET", cast.data_url, access_token=token.value)
    with_own_key = requests.get(
        cast.data_url, headers={"Authorization": f"DPoP {token.value}", "DPoP": proof}, timeout=10
    )
    dpop = _expect_refusal(with_own_key, 401, "invalid_dpop_proof")
    return f"sent as Bearer: {bearer}\nwith the thief's own DPoP proof: {dpop}"


def _complete_task(cast: _Cast) -> str:
    task = cast.agent.complete_task(cast.task_id)
    if task.get("status") != "completed":
        raise StepFailed(f"the task is {task.get('status')!r}, not completed")
    return f"{cast.task_id} completed by {task['completed_by']}"


def _both_refused(cast: _Cast) -> str:
    tool_token, data_token = _held(cast.tool_token), _held(cast.data_token)
    at_tool = requests.get(cast.tool_url, headers=tool_token.headers("GET", cast.tool_url), timeout=10)
    at_data = requests.get(cast.data_url, headers=data_token.headers("GET", cast.data_url), timeout=10)
    tool = _expect_refusal(at_tool, 401, "invalid_token")
    data = _expect_refusal(at_data, 401, "invalid_token")
    return f"tool token at the tool: {tool}\ndata token (valid proof) at the CRM: {data}"


def _no_new_token(cast: _Cast) -> str:
    try:
        cast.agent.token(audience=TOOL, scope="invoke", task_id=cast.task_id)
    except InvalidRequest as e:
        return f"the STS answered {e.error}: {e.description}"
    raise StepFailed("the STS issued a token for an ended task")


def _held(token: AccessToken | None) -> AccessToken:
    if token is None:
        raise StepFailed("an earlier step did not leave its token")
    return token


def _expect(response: requests.Response, status: int) -> None:
    if response.status_code != status:
        raise StepFailed(f"expected {status}, got {response.status_code}: {response.text[:200]}")


def _expect_refusal(response: requests.Response, status: int, error: str) -> str:
    """The refusal as the service gave it; anything else (above all a 200) fails the step."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    got = body.get("error") if isinstance(body, dict) else None
    if response.status_code != status or got != error:
        raise StepFailed(
            f"expected {status} {error}, got {response.status_code} {got}: {response.text[:200]}"
        )
    return f"{status} {error} ({body.get('error_description', '')})"


# --- a private sts dev --------------------------------------------------------------------------


@contextmanager
def _private_dev() -> Iterator[Path]:
    """``sts dev`` in a temporary directory as a child process, stopped (SIGINT) when the block ends."""
    with tempfile.TemporaryDirectory(prefix="sts-demo-") as directory:
        state_dir = Path(directory)
        log_path = state_dir / "dev.log"
        with log_path.open("wb") as log:
            command = [sys.executable, "-m", "sts.cli", "dev", "--state-dir", str(state_dir)]
            process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [*command, "--port", str(free_port_pair())], stdout=log, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + DEV_START_TIMEOUT_SECONDS
                while not (state_dir / "dev.json").exists():
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise StepFailed(f"sts dev did not start:\n{tail}")
                    time.sleep(0.1)
                yield state_dir
            finally:
                _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port_pair() -> int:
    """A loopback port P with P+1 free too (``sts dev`` puts its TLS listener there)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise StepFailed("no two adjacent free loopback ports for sts dev")
