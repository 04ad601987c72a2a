"""Delegation abuse (issue 11): who may be ``subject_token`` or ``actor_token``, with which proof.

Each group is one finding of the outside test and the rule that closes it:

1. A bound token we issued (``cnf``) is a subject or actor only with the proof its ``cnf`` demands on
   this request: a DPoP proof made with the key of ``cnf.jkt`` (RFC 9449 §6, §7), the TLS client
   certificate of ``cnf.x5t#S256`` (RFC 8705 §3).
2. A token we issued is an actor token only when the client authenticates as its subject on this
   request, it is the actor's own (no ``act``, its ``client_id`` is its subject), and its audience is
   the target of this exchange; a JWT-SVID actor token has this issuer as its only audience.
3. Re-exchanging an issued token never crosses token class unless a permit carrying
   ``@allow_class_crossing("<from>-><to>")`` determines the decision; crossings are audited.
4. A malformed ``may_act`` (RFC 8693 §4.4) refuses the exchange instead of being ignored.

In-process through :class:`~sts.exchange.TokenExchange` with the real services (real clock: the
X.509 test CA is valid around now), and over HTTP through the Flask app with the demo policies.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from sts.binding import DpopKey
from sts.callers import Caller
from sts.catalog import TokenClass
from sts.client_auth import CLIENT_ASSERTION_TYPE_JWT_SPIFFE
from sts.config import load_settings
from sts.errors import InvalidRequest, InvalidTarget
from sts.exchange import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    ExchangeRequest,
    IssuedToken,
)
from sts.policy import CedarPolicy, PolicyLoadError, PolicyRequest
from sts.runtime import Services, build_services
from sts.spiffeid import SpiffeId
from sts.web.app import create_app
from tests.authority import TestAuthority
from tests.conftest import write_config
from tests.test_mtls_http import issue

AGENT = "spiffe://example.org/agent/researcher"
HELPER = "spiffe://example.org/agent/helper"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
SEARCH = "spiffe://example.org/tool/web-search"
CALC = "spiffe://example.org/tool/calc"
CRM = "spiffe://example.org/data/crm"
DEMO_POLICIES = Path(__file__).resolve().parent.parent / "sts" / "dev" / "policies"

# An explicit permit for the one crossing the tests open: web search may turn the agent's tool
# token into a CRM read token, nothing else. Without the annotation the same permit opens nothing.
CROSSING_POLICY = """
@id("search-may-read-crm-for-its-caller")
@allow_class_crossing("tool->data")
permit (principal, action == Action::"data:read", resource == Dataset::"data:crm")
when {
  context.subject_token_class == "tool" &&
  context has actor && context.actor == "spiffe://example.org/tool/web-search"
};
"""


@dataclasses.dataclass
class World:
    """The services plus the authority, a clock, and helpers to ask for tokens as a given workload."""

    services: Services
    authority: TestAuthority
    directory: Path
    now: float

    @property
    def issuer(self) -> str:
        return self.services.settings.issuer

    def svid(self, spiffe_id: str, aud: str | list[str] | None = None, *, at: float | None = None) -> str:
        return self.authority.mint(spiffe_id, aud or self.issuer, now=self.now if at is None else at)

    def proof(self, key: DpopKey, *, at: float | None = None) -> str:
        return key.proof("POST", f"{self.issuer}/token", now=self.now if at is None else at)

    def certificate(self, spiffe_id: str, name: str) -> x509.Certificate:
        return issue(self.authority, self.directory, name, uris=(spiffe_id,))[2]

    def request(
        self,
        subject: str,
        *,
        subject_type: str = TOKEN_TYPE_JWT,
        actor: str | None = None,
        actor_type: str = TOKEN_TYPE_JWT,
        client: str | None = None,
        dpop: str | None = None,
        certificate: x509.Certificate | None = None,
        **params: str,
    ) -> ExchangeRequest:
        """One exchange request; ``client`` is a client assertion (a JWT-SVID of the client's own)."""
        form: dict[str, list[str]] = {
            "grant_type": [GRANT_TYPE_TOKEN_EXCHANGE],
            "subject_token": [subject],
            "subject_token_type": [subject_type],
        }
        if actor is not None:
            form |= {"actor_token": [actor], "actor_token_type": [actor_type]}
        if client is not None:
            form |= {
                "client_assertion": [client],
                "client_assertion_type": [CLIENT_ASSERTION_TYPE_JWT_SPIFFE],
            }
        form |= {name: [value] for name, value in params.items()}
        return dataclasses.replace(
            ExchangeRequest.from_form(form),
            dpop_proof=dpop,
            client_certificates=(certificate,) if certificate is not None else (),
        )

    def exchange(
        self, request: ExchangeRequest, *, request_id: str = "r", at: float | None = None
    ) -> IssuedToken:
        return self.services.exchange.exchange(
            request, request_id=request_id, now=self.now if at is None else at
        )

    def own_token(
        self,
        spiffe_id: str,
        audience: str,
        scope: str = "invoke",
        *,
        dpop: DpopKey | None = None,
        certificate: x509.Certificate | None = None,
        **params: str,
    ) -> str:
        """A token of ``spiffe_id`` for itself (no actor), bound as asked."""
        request = self.request(
            self.svid(spiffe_id),
            dpop=self.proof(dpop) if dpop is not None else None,
            certificate=certificate,
            audience=audience,
            scope=scope,
            **params,
        )
        return self.exchange(request).access_token

    def audit(self) -> dict[str, dict[str, Any]]:
        """The audit records by request id (written unbuffered: readable while the log is open)."""
        lines = (self.directory / "audit.jsonl").read_text().splitlines()
        return {record["request_id"]: record for record in map(json.loads, lines)}


def build_world(
    directory: Path, example: TestAuthority, partner: TestAuthority, *, demo: bool = False
) -> World:
    config = write_config(directory, 8443, example, partner)
    if demo:
        config.write_text(
            config.read_text().replace("policy: {dir: policies}", f"policy: {{dir: '{DEMO_POLICIES}'}}")
        )
    return World(
        build_services(load_settings(config, environ={})), example, directory, float(int(time.time()))
    )


@pytest.fixture
def make_world(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[Callable[..., World]]:
    """Builds the world (optionally with the demo policies) once the test has written its policies."""
    built: list[World] = []

    def make(*, demo: bool = False) -> World:
        built.append(build_world(tmp_path, example_org, partner_test, demo=demo))
        return built[-1]

    yield make
    for world in built:
        world.services.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


def create_task(world: World, *targets: tuple[str, list[str]], assignee: str = AGENT) -> str:
    body = {
        "assignee": assignee,
        "targets": [{"target": target, "scopes": scopes} for target, scopes in targets],
        "purpose": "research",
        "ttl_seconds": 600,
    }
    orchestrator = Caller(SpiffeId.parse(ORCHESTRATOR), "spiffe_jwt")
    return world.services.tasks.create(orchestrator, body, request_id="task", now=world.now).id


# 1. Bound tokens need their proof of possession, as subject and as actor.


def test_dpop_bound_actor_token_needs_a_proof_made_with_its_key(world: World) -> None:
    key = DpopKey.generate()
    actor = world.own_token(HELPER, "tool:calc", dpop=key)
    assert claims_of(actor)["cnf"] == {"jkt": key.jkt}

    def delegated(dpop: str | None) -> ExchangeRequest:
        return world.request(
            world.svid(AGENT),
            actor=actor,
            actor_type=TOKEN_TYPE_ACCESS_TOKEN,
            client=world.svid(HELPER),
            dpop=dpop,
            audience="tool:calc",
            scope="invoke",
        )

    with pytest.raises(
        InvalidRequest, match=r"^actor_token: bound to a DPoP key; send a DPoP proof made with that key"
    ):
        world.exchange(delegated(None))
    with pytest.raises(InvalidRequest, match=r"^actor_token: bound to a DPoP key"):
        world.exchange(delegated(world.proof(DpopKey.generate())))
    issued = world.exchange(delegated(world.proof(key)))
    assert claims_of(issued.access_token)["act"] == {"sub": HELPER}
    assert claims_of(issued.access_token)["cnf"] == {"jkt": key.jkt}


def test_mtls_bound_actor_token_needs_its_certificate(world: World) -> None:
    bound_to = world.certificate(HELPER, "helper-1")
    actor = world.own_token(HELPER, "tool:calc", certificate=bound_to)
    assert "x5t#S256" in claims_of(actor)["cnf"]

    def delegated(certificate: x509.Certificate | None) -> ExchangeRequest:
        return world.request(
            world.svid(AGENT),
            actor=actor,
            actor_type=TOKEN_TYPE_ACCESS_TOKEN,
            # Without the certificate the actor still authenticates, by client assertion.
            client=None if certificate is not None else world.svid(HELPER),
            certificate=certificate,
            audience="tool:calc",
            scope="invoke",
        )

    with pytest.raises(InvalidRequest, match=r"^actor_token: bound to a TLS client certificate"):
        world.exchange(delegated(None))
    # Another valid X.509-SVID of the same workload is not the certificate the token is bound to.
    with pytest.raises(InvalidRequest, match=r"^actor_token: bound to a TLS client certificate"):
        world.exchange(delegated(world.certificate(HELPER, "helper-2")))
    issued = world.exchange(delegated(bound_to))
    assert claims_of(issued.access_token)["act"] == {"sub": HELPER}


def test_dpop_bound_subject_token_needs_a_proof_made_with_its_key(world: World) -> None:
    """The calc service received the agent's DPoP-bound token; without the agent's key it is useless."""
    key = DpopKey.generate()
    subject = world.own_token(AGENT, "tool:calc", dpop=key)

    def delegated(dpop: str | None) -> ExchangeRequest:
        return world.request(
            subject,
            subject_type=TOKEN_TYPE_ACCESS_TOKEN,
            actor=world.svid(CALC),
            dpop=dpop,
            audience="tool:web-search",
            scope="invoke",
        )

    with pytest.raises(InvalidRequest, match=r"^subject_token: bound to a DPoP key"):
        world.exchange(delegated(None))
    with pytest.raises(InvalidRequest, match=r"^subject_token: bound to a DPoP key"):
        world.exchange(delegated(world.proof(DpopKey.generate())))
    issued = world.exchange(delegated(world.proof(key)))
    assert claims_of(issued.access_token)["act"] == {"sub": CALC}


def test_mtls_bound_subject_token_needs_its_certificate(world: World) -> None:
    agent_certificate = world.certificate(AGENT, "agent")
    subject = world.own_token(AGENT, "tool:calc", certificate=agent_certificate)

    def delegated(certificate: x509.Certificate | None) -> ExchangeRequest:
        return world.request(
            subject,
            subject_type=TOKEN_TYPE_ACCESS_TOKEN,
            actor=world.svid(CALC),
            certificate=certificate,
            audience="tool:web-search",
            scope="invoke",
        )

    with pytest.raises(InvalidRequest, match=r"^subject_token: bound to a TLS client certificate"):
        world.exchange(delegated(None))
    with pytest.raises(InvalidRequest, match=r"^subject_token: bound to a TLS client certificate"):
        world.exchange(delegated(world.certificate(CALC, "calc")))
    assert world.exchange(delegated(agent_certificate)).access_token


def test_bound_token_refusal_is_audited(world: World) -> None:
    subject = world.own_token(AGENT, "tool:calc", dpop=DpopKey.generate())
    with pytest.raises(InvalidRequest):
        world.exchange(
            world.request(
                subject,
                subject_type=TOKEN_TYPE_ACCESS_TOKEN,
                actor=world.svid(CALC),
                audience="tool:web-search",
                scope="invoke",
            ),
            request_id="unproven",
        )
    record = world.audit()["unproven"]
    assert (record["decision"], record["error"]) == ("deny", "invalid_request")
    assert record["error_description"].startswith("subject_token: bound to a DPoP key")


# 2. An actor token proves that the actor takes part.


def test_own_issued_token_is_an_actor_token_when_its_subject_authenticates(world: World) -> None:
    actor = world.own_token(HELPER, "tool:calc")
    issued = world.exchange(
        world.request(
            world.svid(AGENT),
            actor=actor,
            actor_type=TOKEN_TYPE_ACCESS_TOKEN,
            client=world.svid(HELPER),
            audience="tool:calc",
            scope="invoke",
        )
    )
    claims = claims_of(issued.access_token)
    assert (claims["sub"], claims["act"], claims["client_id"]) == (AGENT, {"sub": HELPER}, HELPER)


def _impersonations(world: World) -> dict[str, tuple[ExchangeRequest, str, float]]:
    """Every way round the actor rule that we know of: (request, refusal text, when)."""
    helper_calc = world.own_token(HELPER, "tool:calc")
    helper_search = world.own_token(HELPER, "tool:web-search")
    # The agent's tool token, as the web-search service received it when the agent called it.
    agent_search = world.own_token(AGENT, "tool:web-search")
    # A delegated token: the helper acted for the orchestrator (its sub is the orchestrator).
    delegated = world.exchange(
        world.request(
            world.svid(ORCHESTRATOR), actor=world.svid(HELPER), audience="tool:calc", scope="invoke"
        )
    ).access_token
    revoked = world.own_token(HELPER, "tool:calc")
    world.services.introspection.revoke(
        Caller(SpiffeId.parse(HELPER), "spiffe_jwt"), revoked, request_id="revoke", now=world.now
    )
    later = world.now + 400  # past every token above (catalog 300 s, policy @ttl 200 s)

    def attempt(
        actor: str, client: str | None, *, subject: str = AGENT, at: float | None = None
    ) -> ExchangeRequest:
        return world.request(
            world.svid(subject, at=at),
            actor=actor,
            actor_type=TOKEN_TYPE_ACCESS_TOKEN,
            client=world.svid(client, at=at) if client else None,
            audience="tool:calc",
            scope="invoke",
        )

    not_the_actor = (
        "actor_token: a token issued by this server is an actor token only when the client authenticates"
    )
    return {
        "token-for-another-audience": (
            attempt(helper_search, HELPER),
            "actor_token: its audience is tool:web-search, not the target of this exchange",
            world.now,
        ),
        "no-client-authentication": (attempt(helper_calc, None), not_the_actor, world.now),
        "client-authenticates-as-the-subject": (attempt(helper_calc, AGENT), not_the_actor, world.now),
        "client-authenticates-as-a-third-party": (
            attempt(helper_calc, ORCHESTRATOR),
            not_the_actor,
            world.now,
        ),
        "service-replays-the-token-it-received": (
            attempt(agent_search, SEARCH, subject=SEARCH),
            not_the_actor,
            world.now,
        ),
        "delegated-token-as-actor": (
            attempt(delegated, ORCHESTRATOR, subject=AGENT),
            "actor_token: must be the actor's own token",
            world.now,
        ),
        "expired-actor-token": (
            attempt(helper_calc, HELPER, at=later),
            "actor_token: not an active token issued by this server",
            later,
        ),
        "revoked-actor-token": (
            attempt(revoked, HELPER),
            "actor_token: not an active token issued by this server",
            world.now,
        ),
    }


IMPERSONATIONS = [
    "token-for-another-audience",
    "no-client-authentication",
    "client-authenticates-as-the-subject",
    "client-authenticates-as-a-third-party",
    "service-replays-the-token-it-received",
    "delegated-token-as-actor",
    "expired-actor-token",
    "revoked-actor-token",
]


@pytest.mark.parametrize("case", IMPERSONATIONS)
def test_issued_actor_token_impersonation_refused(world: World, case: str) -> None:
    cases = _impersonations(world)
    assert sorted(cases) == sorted(IMPERSONATIONS)
    request, text, at = cases[case]
    with pytest.raises(InvalidRequest) as refused:
        world.exchange(request, request_id=case, at=at)
    assert (refused.value.status, refused.value.error) == (400, "invalid_request")
    assert refused.value.description.startswith(text), refused.value.description
    assert world.audit()[case]["decision"] == "deny"


@pytest.mark.parametrize(
    ("audience", "text"),
    [
        ("https://elsewhere.example", "actor_token: audience does not include this server"),
        (
            ["ISSUER", "https://elsewhere.example"],
            "actor_token: a JWT-SVID actor token must have this issuer",
        ),
    ],
    ids=["foreign-audience", "shared-with-a-foreign-audience"],
)
def test_jwt_svid_actor_must_be_addressed_to_this_issuer_only(world: World, audience: Any, text: str) -> None:
    """An SVID that was also sent elsewhere can be replayed from there: it proves nothing of the actor."""
    aud = [world.issuer if a == "ISSUER" else a for a in audience] if isinstance(audience, list) else audience
    request = world.request(
        world.svid(AGENT), actor=world.svid(HELPER, aud), audience="tool:calc", scope="invoke"
    )
    with pytest.raises(InvalidRequest) as refused:
        world.exchange(request)
    assert refused.value.description.startswith(text), refused.value.description


def test_jwt_svid_actor_for_this_issuer_is_accepted(world: World) -> None:
    issued = world.exchange(
        world.request(world.svid(AGENT), actor=world.svid(HELPER), audience="tool:calc", scope="invoke")
    )
    assert claims_of(issued.access_token)["act"] == {"sub": HELPER}


# 3. Token class is never crossed by re-exchange unless policy says so explicitly.


def _tool_token_in_task(world: World) -> tuple[str, str]:
    task = create_task(world, ("tool:web-search", ["invoke"]), ("data:crm", ["read"]))
    return world.own_token(AGENT, "tool:web-search", task_id=task), task


def _search_asks_for_crm(world: World, tool_token: str, task: str) -> ExchangeRequest:
    """The attack: the web-search service exchanges the agent's tool token for a CRM data token."""
    return world.request(
        tool_token,
        subject_type=TOKEN_TYPE_ACCESS_TOKEN,
        actor=world.svid(SEARCH),
        audience="data:crm",
        scope="read",
        task_id=task,
    )


def test_tool_token_never_unlocks_data(world: World) -> None:
    tool_token, task = _tool_token_in_task(world)
    # The agent itself may read the CRM in this task: only the class crossing is refused below.
    assert world.own_token(AGENT, "data:crm", "read", task_id=task)
    with pytest.raises(InvalidTarget) as refused:
        world.exchange(_search_asks_for_crm(world, tool_token, task), request_id="crossing")
    assert (refused.value.status, refused.value.error) == (400, "invalid_target")
    assert "a tool token is not exchanged for a data token" in refused.value.description
    record = world.audit()["crossing"]
    assert (record["decision"], record["class_crossing"]) == ("deny", "tool->data")
    assert record["subject_token_class"] == "tool"


def test_data_token_never_unlocks_a_tool(world: World) -> None:
    data_token = world.own_token(AGENT, "data:crm", "read")
    with pytest.raises(InvalidTarget, match="a data token is not exchanged for a tool token"):
        world.exchange(
            world.request(
                data_token,
                subject_type=TOKEN_TYPE_ACCESS_TOKEN,
                actor=world.svid(CRM),
                audience="tool:calc",
                scope="invoke",
            )
        )


def test_same_class_re_exchange_is_not_a_crossing(world: World) -> None:
    tool_token = world.own_token(AGENT, "tool:web-search")
    issued = world.exchange(
        world.request(
            tool_token,
            subject_type=TOKEN_TYPE_ACCESS_TOKEN,
            actor=world.svid(SEARCH),
            audience="tool:calc",
            scope="invoke",
        ),
        request_id="same-class",
    )
    assert claims_of(issued.access_token)["token_class"] == "tool"
    assert "class_crossing" not in world.audit()["same-class"]


def test_explicit_crossing_permit_allows_it_and_it_is_audited(
    tmp_path: Path, make_world: Callable[..., World]
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "crossing.cedar").write_text(CROSSING_POLICY)
    world = make_world()
    tool_token, task = _tool_token_in_task(world)
    issued = world.exchange(_search_asks_for_crm(world, tool_token, task), request_id="permitted")
    claims = claims_of(issued.access_token)
    assert (claims["token_class"], claims["sub"], claims["act"]) == ("data", AGENT, {"sub": SEARCH})
    record = world.audit()["permitted"]
    assert (record["decision"], record["class_crossing"]) == ("allow", "tool->data")
    assert "search-may-read-crm-for-its-caller" in record["policy_ids"]


def test_crossing_needs_the_annotation_not_just_a_matching_permit(
    tmp_path: Path, make_world: Callable[..., World]
) -> None:
    """A permit that mentions the class but carries no annotation opens nothing (default deny)."""
    (tmp_path / "policies").mkdir()
    unannotated = CROSSING_POLICY.replace('@allow_class_crossing("tool->data")\n', "")
    wrong_way = CROSSING_POLICY.replace('"tool->data"', '"data->tool"').replace("search-may", "wrong-way")
    (tmp_path / "policies" / "crossing.cedar").write_text(unannotated + wrong_way)
    world = make_world()
    tool_token, task = _tool_token_in_task(world)
    with pytest.raises(InvalidTarget, match="tool token is not exchanged for a data token"):
        world.exchange(_search_asks_for_crm(world, tool_token, task))


def test_demo_policies_refuse_the_crossing_over_http(
    make_world: Callable[..., World], example_org: TestAuthority
) -> None:
    """End to end with the policies ``sts dev`` runs: the service authenticates and binds, still refused."""
    world = make_world(demo=True)
    client = create_app(world.services).test_client()
    task = create_task(world, ("tool:web-search", ["invoke"]), ("data:crm", ["read"]))
    url = f"{world.issuer}/token"

    def post(
        subject: str, spiffe_id: str, audience: str, scope: str, *, bind: bool = True, **extra: str
    ) -> Any:
        body = {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": TOKEN_TYPE_JWT,
            "audience": audience,
            "scope": scope,
            "task_id": task,
            "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
            "client_assertion": example_org.mint(spiffe_id, world.issuer),
        } | extra
        headers = {"DPoP": DpopKey.generate().proof("POST", url)} if bind else {}
        return client.post("/token", data=body, headers=headers)

    agent_svid = example_org.mint(AGENT, world.issuer)
    # The honest paths are open: the agent reads the CRM itself (authenticated, DPoP-bound, as the
    # demo policies demand), and gets a plain bearer web-search token that it sends to the service.
    assert post(agent_svid, AGENT, "data:crm", "read").status_code == 200
    tool = post(agent_svid, AGENT, "tool:web-search", "invoke", bind=False)
    assert tool.status_code == 200, tool.get_json()
    attack = post(
        tool.get_json()["access_token"],
        SEARCH,
        "data:crm",
        "read",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        actor_token=example_org.mint(SEARCH, world.issuer),
        actor_token_type=TOKEN_TYPE_JWT,
    )
    assert attack.status_code == 400, attack.get_json()
    assert attack.get_json()["error"] == "invalid_target", attack.get_json()
    assert "tool token is not exchanged for a data token" in attack.get_json()["error_description"]
    refusals = [r for r in world.audit().values() if r.get("class_crossing") == "tool->data"]
    assert [r["decision"] for r in refusals] == ["deny"]


def test_demo_policies_carry_no_crossing_permit(world: World) -> None:
    demo = CedarPolicy.from_directory(DEMO_POLICIES, world.services.settings.catalog)
    assert demo.class_crossings == {}


def test_subject_token_class_reaches_policy(world: World) -> None:
    catalog = world.services.settings.catalog
    source = (
        '@id("tool-subjects") permit (principal, action in [Action::"tool", Action::"data"], resource) '
        'when { context.subject_token_class == "tool" };'
    )
    policy = CedarPolicy.from_sources({"a.cedar": source}, catalog)
    entry = catalog.get("data:crm")
    assert entry is not None
    agent = SpiffeId.parse(AGENT)
    ask = PolicyRequest(agent, entry, frozenset({"read"}), int(world.now), subject_token_class="tool")
    assert policy.decide(ask).allowed
    assert not policy.decide(dataclasses.replace(ask, subject_token_class="svid")).allowed
    with pytest.raises(ValueError, match="subject_token_class"):
        dataclasses.replace(ask, subject_token_class="secret")


def test_crossing_must_be_permitted_for_every_scope(world: World) -> None:
    """One annotated permit for read does not carry a crossing for write permitted elsewhere."""
    catalog = world.services.settings.catalog
    source = (
        '@id("read") @allow_class_crossing("tool->data") permit (principal, action == Action::"data:read", resource);\n'
        '@id("write") permit (principal, action == Action::"data:write", resource);\n'
    )
    policy = CedarPolicy.from_sources({"a.cedar": source}, catalog)
    assert policy.class_crossings == {"read": "tool->data"}
    entry = catalog.get("data:crm")
    assert entry is not None
    ask = PolicyRequest(SpiffeId.parse(AGENT), entry, frozenset({"read"}), 0, subject_token_class="tool")
    assert policy.decide(ask).class_crossings == frozenset({"tool->data"})
    both = policy.decide(dataclasses.replace(ask, scopes=frozenset({"read", "write"})))
    assert both.allowed
    assert both.class_crossings == frozenset()


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ('@allow_class_crossing("tool->data") forbid (principal, action, resource);', "only on permit"),
        (
            '@allow_class_crossing("tool->tool") permit (principal, action, resource);',
            "tool->data or data->tool",
        ),
        ('@allow_class_crossing("") permit (principal, action, resource);', "tool->data or data->tool"),
        ("@allow_class_crossing permit (principal, action, resource);", "tool->data or data->tool"),
    ],
    ids=["on-forbid", "not-a-crossing", "empty", "no-value"],
)
def test_crossing_annotation_is_checked_at_load(world: World, source: str, problem: str) -> None:
    sources = {
        "a.cedar": source,
        "b.cedar": '@id("ok") permit (principal, action in Action::"tool", resource);',
    }
    with pytest.raises(PolicyLoadError, match=problem):
        CedarPolicy.from_sources(sources, world.services.settings.catalog)


# 4. A malformed may_act fails closed.

MALFORMED_MAY_ACT: list[Any] = [
    HELPER,
    [{"sub": HELPER}],
    None,
    {},
    {"sub": 5},
    {"sub": "helper"},
    {"sub": "spiffe://example.org/agent/../helper"},
    {"sub": HELPER, "iss": "https://elsewhere.example"},
]
MALFORMED_IDS = ["string", "list", "null", "empty", "number", "not-spiffe", "dot-segment", "extra-member"]


@pytest.mark.parametrize("may_act", MALFORMED_MAY_ACT, ids=MALFORMED_IDS)
def test_malformed_may_act_in_a_jwt_svid_refuses(world: World, may_act: Any) -> None:
    subject = world.authority.mint(
        ORCHESTRATOR, world.issuer, now=world.now, extra_claims={"may_act": may_act}
    )
    for actor in (world.svid(HELPER), None):
        request = world.request(subject, actor=actor, audience="tool:calc", scope="invoke")
        with pytest.raises(InvalidRequest, match=r"^subject_token: may_act must be an object"):
            world.exchange(request)


def test_malformed_may_act_in_the_actor_svid_refuses(world: World) -> None:
    actor = world.authority.mint(HELPER, world.issuer, now=world.now, extra_claims={"may_act": "anyone"})
    with pytest.raises(InvalidRequest, match=r"^actor_token: may_act must be an object"):
        world.exchange(world.request(world.svid(AGENT), actor=actor, audience="tool:calc", scope="invoke"))


def test_well_formed_may_act_names_the_only_actor(world: World) -> None:
    subject = world.authority.mint(
        ORCHESTRATOR, world.issuer, now=world.now, extra_claims={"may_act": {"sub": HELPER}}
    )
    issued = world.exchange(
        world.request(subject, actor=world.svid(HELPER), audience="tool:calc", scope="invoke")
    )
    assert claims_of(issued.access_token)["act"] == {"sub": HELPER}
    with pytest.raises(InvalidRequest, match="may_act does not name this actor"):
        world.exchange(world.request(subject, actor=world.svid(AGENT), audience="tool:calc", scope="invoke"))


@pytest.mark.parametrize("may_act", [HELPER, {"sub": 5}], ids=["string", "number"])
def test_malformed_may_act_in_our_own_token_refuses(world: World, may_act: Any) -> None:
    """We never mint may_act; should one ever be signed (an older release, a bug), it fails closed too."""
    claims = claims_of(world.own_token(AGENT, "tool:web-search"))
    forged = world.services.keys.sign(TokenClass.TOOL, claims | {"may_act": may_act, "jti": "with-may-act"})
    request = world.request(
        forged,
        subject_type=TOKEN_TYPE_ACCESS_TOKEN,
        actor=world.svid(SEARCH),
        audience="tool:calc",
        scope="invoke",
    )
    with pytest.raises(InvalidRequest, match=r"^subject_token: may_act must be an object"):
        world.exchange(request)
