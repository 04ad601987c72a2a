"""Cedar policy: decisions (default deny, forbid wins, every scope, fail closed) and load errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sts import policy as policy_module
from sts.catalog import Catalog, CatalogEntry, Sensitivity, TokenClass
from sts.errors import ConfigError
from sts.policy import (
    CedarPolicy,
    Decision,
    PolicyLoadError,
    PolicyRequest,
    TaskFacts,
    explain,
    schema_for_catalog,
)
from sts.spiffeid import SpiffeId

EXAMPLES = Path(__file__).resolve().parent.parent / "sts" / "dev" / "policies"
NOW = 1_700_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday

WEB_SEARCH = CatalogEntry(
    "tool:web-search",
    TokenClass.TOOL,
    frozenset({"invoke"}),
    Sensitivity.INTERNAL,
    "https://search.internal/",
    300,
)
CRM = CatalogEntry(
    "data:crm", TokenClass.DATA, frozenset({"read", "write"}), Sensitivity.CONFIDENTIAL, None, 120
)
VAULT = CatalogEntry("data:vault", TokenClass.DATA, frozenset({"read"}), Sensitivity.RESTRICTED)
DEMO_CATALOG = Catalog([WEB_SEARCH, CRM])
CATALOG = Catalog([WEB_SEARCH, CRM, VAULT])


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


TASK = TaskFacts("task-1", "quarterly research", sid("spiffe://example.org/orchestrator"), NOW + 600)
EXPIRED_TASK = TaskFacts("task-0", "old research", sid("spiffe://example.org/orchestrator"), NOW - 1)


def request(
    principal: str,
    target: CatalogEntry,
    *scopes: str,
    task: TaskFacts | None = None,
    binding: str = "none",
    client_auth: str = "none",
    actor: str | None = None,
    now: int = NOW,
) -> PolicyRequest:
    return PolicyRequest(
        principal=sid(principal),
        target=target,
        scopes=frozenset(scopes),
        now=now,
        client_auth=client_auth,
        binding=binding,
        task=task,
        actor=sid(actor) if actor else None,
    )


# The policy set the decision table runs against. "extra.cedar" has a policy without @id on line 2,
# whose id is therefore "extra.cedar:2".
TEST_POLICIES = {
    "a.cedar": """
// Agents of example.org may invoke tools.
@id("agents-invoke")
@ttl("300")
permit (principal, action in Action::"tool", resource)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

@id("fast-agent-search")
@ttl("60")
permit (principal, action == Action::"tool:invoke", resource == Tool::"tool:web-search")
when { principal.path == "/agent/fast" };

@id("read-in-task")
@ttl("120")
permit (principal, action == Action::"data:read", resource)
when { context has task && resource.sensitivity_rank <= 2 };

@id("write-when-mtls-bound")
permit (principal, action == Action::"data:write", resource)
when { context.binding == "mtls" };

@id("no-foreign-data")
forbid (principal, action in Action::"data", resource)
unless { principal.trust_domain == "example.org" };

@id("no-banned")
forbid (principal, action, resource)
when { principal.path like "/agent/banned*" };
""",
    "extra.cedar": """// no @id: shown as file:line
permit (principal, action == Action::"tool:invoke", resource) when { principal.path == "/agent/noid" };
""",
}


@pytest.fixture(scope="module")
def cedar() -> CedarPolicy:
    return CedarPolicy.from_sources(TEST_POLICIES, CATALOG)


@dataclass(frozen=True)
class Expect:
    allowed: bool
    policy_ids: tuple[str, ...] = ()
    ttl: int | None = None
    denied_scopes: tuple[str, ...] = ()
    reason_starts: str = field(default="")


AGENT = "spiffe://example.org/agent/researcher"
DECISIONS = [
    (
        "allow-by-permit",
        request(AGENT, WEB_SEARCH, "invoke"),
        Expect(True, ("agents-invoke",), 300, reason_starts="allowed by agents-invoke"),
    ),
    (
        "ttl-is-minimum-of-deciding-permits",
        request("spiffe://example.org/agent/fast", WEB_SEARCH, "invoke"),
        Expect(True, ("agents-invoke", "fast-agent-search"), 60),
    ),
    (
        "default-deny-non-agent",
        request("spiffe://example.org/orchestrator", WEB_SEARCH, "invoke"),
        Expect(False, denied_scopes=("invoke",), reason_starts="denied: no policy permits (default deny)"),
    ),
    (
        "forbid-wins-over-permit",
        request("spiffe://example.org/agent/banned-one", WEB_SEARCH, "invoke"),
        Expect(False, ("no-banned",), denied_scopes=("invoke",), reason_starts="denied by forbid no-banned"),
    ),
    (
        "policy-without-id-named-file-line",
        request("spiffe://example.org/agent/noid", WEB_SEARCH, "invoke"),
        Expect(True, ("agents-invoke", "extra.cedar:2"), 300),
    ),
    (
        "task-absent-denies-read",
        request(AGENT, CRM, "read"),
        Expect(False, denied_scopes=("read",), reason_starts="denied: no policy permits"),
    ),
    (
        "task-present-allows-read",
        request(AGENT, CRM, "read", task=TASK),
        Expect(True, ("read-in-task",), 120),
    ),
    (
        "trust-domain-forbid",
        request("spiffe://partner.test/agent/x", CRM, "read", task=TASK),
        Expect(False, ("no-foreign-data",), denied_scopes=("read",)),
    ),
    (
        "sensitivity-rank-restricted-not-permitted",
        request(AGENT, VAULT, "read", task=TASK),
        Expect(False, denied_scopes=("read",)),
    ),
    (
        "one-scope-denied-denies-all",
        request(AGENT, CRM, "read", "write", task=TASK),
        Expect(
            False,
            denied_scopes=("write",),
            reason_starts="denied: no policy permits (default deny) for scope write",
        ),
    ),
    (
        "every-scope-permitted",
        request(AGENT, CRM, "read", "write", task=TASK, binding="mtls"),
        Expect(True, ("read-in-task", "write-when-mtls-bound"), 120),
    ),
    (
        "forbid-on-every-scope",
        request("spiffe://partner.test/agent/x", CRM, "read", "write", binding="mtls"),
        Expect(False, ("no-foreign-data",), denied_scopes=("read", "write")),
    ),
]


@pytest.mark.parametrize(("req", "expect"), [c[1:] for c in DECISIONS], ids=[c[0] for c in DECISIONS])
def test_decision_table(cedar: CedarPolicy, req: PolicyRequest, expect: Expect) -> None:
    decision = cedar.decide(req)
    assert decision.allowed is expect.allowed, decision.reason
    assert decision.policy_ids == expect.policy_ids
    assert decision.ttl_seconds == expect.ttl
    assert decision.denied_scopes == expect.denied_scopes
    assert decision.errors == ()
    assert decision.reason.startswith(expect.reason_starts)


@pytest.mark.parametrize(("req", "expect"), [c[1:] for c in DECISIONS], ids=[c[0] for c in DECISIONS])
def test_deterministic(req: PolicyRequest, expect: Expect) -> None:
    """Same request twice, and on a second load of the same text: equal decisions (no hidden state)."""
    first = CedarPolicy.from_sources(TEST_POLICIES, CATALOG)
    second = CedarPolicy.from_sources(TEST_POLICIES, CATALOG)
    assert first.decide(req) == first.decide(req) == second.decide(req)


REFUSALS = [
    ("no-scope", request(AGENT, WEB_SEARCH), "no scope requested"),
    ("scope-not-offered", request(AGENT, WEB_SEARCH, "admin"), "scope not offered by tool:web-search: admin"),
    (
        "target-not-in-loaded-catalog",
        PolicyRequest(
            sid(AGENT),
            CatalogEntry("tool:other", TokenClass.TOOL, frozenset({"invoke"})),
            frozenset({"invoke"}),
            NOW,
        ),
        "not in the catalog",
    ),
    (
        "same-id-different-entry",
        PolicyRequest(
            sid(AGENT),
            CatalogEntry("tool:web-search", TokenClass.TOOL, frozenset({"invoke", "x"})),
            frozenset({"invoke"}),
            NOW,
        ),
        "not in the catalog",
    ),
]


@pytest.mark.parametrize(("req", "error"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_requests_cedar_cannot_evaluate_are_denied(
    cedar: CedarPolicy, req: PolicyRequest, error: str
) -> None:
    decision = cedar.decide(req)
    assert not decision.allowed
    assert error in decision.errors[0]
    assert decision.reason.startswith("denied: policy evaluation error")


# Long overflow is a runtime error the validator cannot see: now (~1.7e9) * 1e12 > 2^63.
OVERFLOW = "context.now * 1000000000000 > 0"
ERROR_CASES = [
    (
        "erroring-forbid-does-not-become-allow",
        f"""
@id("allow-tools") permit (principal, action in Action::"tool", resource);
@id("overflowing-forbid") forbid (principal, action, resource) when {{ {OVERFLOW} }};
""",
    ),
    (
        "erroring-permit-denies-even-if-another-permits",
        f"""
@id("allow-tools") permit (principal, action in Action::"tool", resource);
@id("overflowing-permit") permit (principal, action, resource) when {{ {OVERFLOW} }};
""",
    ),
]


@pytest.mark.parametrize("text", [c[1] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_evaluation_error_fails_closed(text: str) -> None:
    cedar = CedarPolicy.from_sources({"p.cedar": text}, CATALOG)
    # Without the error (now = 0 multiplies fine) the same set allows: the error alone denies.
    assert cedar.decide(request(AGENT, WEB_SEARCH, "invoke", now=0)).allowed
    decision = cedar.decide(request(AGENT, WEB_SEARCH, "invoke"))
    assert not decision.allowed
    assert decision.ttl_seconds is None
    assert any("overflow" in error for error in decision.errors), decision.errors
    assert decision.reason.startswith("denied: policy evaluation error")


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


GOOD = '@id("ok") permit (principal, action in Action::"tool", resource);\n'
HEADER = "// line 1\n// line 2\n\n" + GOOD + "\n"  # the next statement starts on line 6

LOAD_ERRORS = [
    (
        "syntax-error-names-file-and-line",
        {"bad.cedar": HEADER + 'permit (principal, action, resource) when { principal.path = = "/x" };\n'},
        ["bad.cedar:6: syntax error"],
    ),
    (
        "syntax-error-after-multiline-policy-with-tricky-strings-and-comments",
        {
            "bad.cedar": (
                '@id("tricky")\n'
                'permit (principal, action in Action::"tool", resource)\n'
                'when { principal.path == "/a;b\\"c//d" }; // a comment; with "quotes\n'
                '// another; comment "\n'
                "\n"
                '@id("broken")\n'
                "permit (principal, action, resource) when { principal.path == };\n"
            )
        },
        ["bad.cedar:6: syntax error"],
    ),
    (
        "missing-final-semicolon",
        {"bad.cedar": HEADER + "permit (principal, action, resource)\n"},
        ["bad.cedar:6: syntax error"],
    ),
    (
        "unknown-attribute",
        {"bad.cedar": HEADER + 'permit (principal, action, resource) when { principal.team == "x" };'},
        ["bad.cedar:6: validation error", "attribute `team`"],
    ),
    (
        "unknown-action",
        {"bad.cedar": HEADER + 'permit (principal, action == Action::"tool:delete", resource);'},
        ["bad.cedar:6: validation error", "tool:delete"],
    ),
    (
        "action-no-catalog-target-offers",
        {"bad.cedar": HEADER + 'permit (principal, action == Action::"data:delete", resource);'},
        ["bad.cedar:6: validation error", "data:delete"],
    ),
    (
        "optional-context-read-without-has-caught-by-validator",
        {"bad.cedar": HEADER + 'permit (principal, action, resource) when { context.task.purpose == "x" };'},
        ["bad.cedar:6: validation error", "optional attribute `task`"],
    ),
    (
        "wrong-type",
        {
            "bad.cedar": HEADER
            + 'permit (principal, action, resource) when { resource.sensitivity_rank == "3" };'
        },
        ["bad.cedar:6: validation error"],
    ),
    (
        "duplicate-id-across-files",
        {"a.cedar": GOOD, "b.cedar": "\n\n" + GOOD},
        ["b.cedar:3: duplicate policy id 'ok'", "a.cedar:1"],
    ),
    (
        "template-refused",
        {"bad.cedar": HEADER + "permit (principal == ?principal, action, resource);"},
        ["bad.cedar:6: templates"],
    ),
    (
        "ttl-on-forbid",
        {"bad.cedar": HEADER + '@ttl("60") forbid (principal, action, resource);'},
        ["bad.cedar:6: @ttl is meaningful only on permit"],
    ),
    (
        "ttl-not-a-number",
        {"bad.cedar": HEADER + '@ttl("1m") permit (principal, action, resource);'},
        ["bad.cedar:6: @ttl must be a positive whole number"],
    ),
    (
        "ttl-zero",
        {"bad.cedar": HEADER + '@ttl("0") permit (principal, action, resource);'},
        ["bad.cedar:6: @ttl must be a positive whole number"],
    ),
    (
        "empty-id",
        {"bad.cedar": HEADER + '@id("") permit (principal, action, resource);'},
        ["bad.cedar:6: @id must not be empty"],
    ),
    (
        "every-problem-reported",
        {
            "a.cedar": "permit (principal, action, resource) when { principal.x };",
            "b.cedar": "\n" + GOOD + "permit (principal, action, resource;",
        },
        ["a.cedar:1: validation error", "b.cedar:3: syntax error"],
    ),
    ("no-files", {}, ["no *.cedar files"]),
    ("only-other-files", {"README.md": "# policies\n", "policy.cedar.bak": GOOD}, ["no *.cedar files"]),
    ("only-comments", {"a.cedar": "// nothing yet\n"}, ["no permit policy"]),
    ("only-forbids", {"a.cedar": "forbid (principal, action, resource);"}, ["no permit policy"]),
    (
        "schema-extension-refused",
        {"a.cedar": GOOD, "schema.cedarschema": "entity Team;"},
        ["schema.cedarschema: schema extensions are not supported"],
    ),
]


@pytest.mark.parametrize(("files", "messages"), [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors_name_file_and_line(tmp_path: Path, files: dict[str, str], messages: list[str]) -> None:
    directory = write(tmp_path / "policies", files)
    with pytest.raises(PolicyLoadError) as caught:
        CedarPolicy.from_directory(directory, CATALOG)
    text = str(caught.value)
    for message in messages:
        assert message in text, text
    # File references carry the full path so the operator can open them.
    if files and "no *.cedar" not in messages[0] and "no permit" not in messages[0]:
        assert str(directory) in text
    assert isinstance(caught.value, ConfigError)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="not a directory"):
        CedarPolicy.from_directory(tmp_path / "absent", CATALOG)


def test_self_test_catches_context_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide() skips Cedar's per-request schema check, so a context/schema drift must stop start-up."""
    original = policy_module._context

    def drifted(req: PolicyRequest) -> dict[str, object]:
        return {**original(req), "tenant": "x"}

    monkeypatch.setattr(policy_module, "_context", drifted)
    with pytest.raises(PolicyLoadError, match=r"self-test for .*tenant"):
        CedarPolicy.from_sources({"a.cedar": GOOD}, CATALOG)


def test_schema_declares_one_action_per_catalog_scope() -> None:
    schema = schema_for_catalog(CATALOG)
    for action in ("tool:invoke", "data:read", "data:write"):
        assert f'action "{action}" in ' in schema
    declared = [
        line
        for line in schema.splitlines()
        if line.startswith('action "tool:') or line.startswith('action "data:')
    ]
    assert len(declared) == 3


CONTEXT_CASES = [
    ("weekday-hour", "context.weekday_utc == 1 && context.hour_utc == 22", {}, True),
    ("scopes-set", 'context.scopes.contains("invoke")', {}, True),
    ("client-auth", 'context.client_auth == "spiffe_jwt"', {"client_auth": "spiffe_jwt"}, True),
    ("client-auth-default-none", 'context.client_auth == "spiffe_jwt"', {}, False),
    (
        "actor",
        'context has actor && context.actor == "spiffe://example.org/orchestrator"',
        {"actor": "spiffe://example.org/orchestrator"},
        True,
    ),
    (
        "task-fields",
        'context has task && context.task.creator == "spiffe://example.org/orchestrator" '
        "&& context.task.deadline > context.now",
        {"task": TASK},
        True,
    ),
    (
        "segments",
        'principal.segments.contains("researcher") && principal.spiffe_id like "spiffe://*"',
        {},
        True,
    ),
    (
        "resource-attrs",
        'resource.resource == "https://search.internal/" && resource.sensitivity == "internal"',
        {},
        True,
    ),
]


@pytest.mark.parametrize(
    ("condition", "extra", "allowed"), [c[1:] for c in CONTEXT_CASES], ids=[c[0] for c in CONTEXT_CASES]
)
def test_context_and_attributes_reach_policy(condition: str, extra: dict[str, object], allowed: bool) -> None:
    cedar = CedarPolicy.from_sources(
        {
            "p.cedar": f'permit (principal, action in [Action::"tool", Action::"data"], resource) when {{ {condition} }};'
        },
        CATALOG,
    )
    decision = cedar.decide(request(AGENT, WEB_SEARCH, "invoke", **extra))  # type: ignore[arg-type]
    assert decision.allowed is allowed, decision.reason
    assert decision.errors == ()


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (Decision(True, ("a", "b"), 60, ()), "allowed by a, b (ttl 60s)"),
        (Decision(True, ("a",), None, ()), "allowed by a"),
        (Decision(False, ("f",), None, (), ("read",)), "denied by forbid f for scope read"),
        (Decision(False, (), None, ()), "denied: no policy permits (default deny)"),
        (Decision(False, ("f",), None, ("boom",)), "denied: policy evaluation error: boom"),
    ],
    ids=["allow-ttl", "allow-no-ttl", "forbid", "default-deny", "error-wins-over-forbid"],
)
def test_reason(decision: Decision, reason: str) -> None:
    assert decision.reason == reason


def test_explain_names_request_policies_and_origins(cedar: CedarPolicy) -> None:
    req = request("spiffe://example.org/agent/fast", WEB_SEARCH, "invoke")
    text = explain(cedar.decide(req), req, cedar.origins)
    assert "decision:  ALLOW" in text
    assert "actions:   tool:invoke" in text
    assert "policy:    fast-agent-search  (a.cedar:8)" in text
    assert "ttl:       60s" in text


@pytest.mark.parametrize(("field_name", "value"), [("client_auth", "mtls"), ("binding", "bearer")])
def test_request_refuses_unknown_methods(field_name: str, value: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        request(AGENT, WEB_SEARCH, "invoke", **{field_name: value})  # type: ignore[arg-type]


# The shipped examples against the demo catalog and the demo workloads.
PARTNER = "spiffe://partner.test/agent/summarizer"
EXAMPLE_CASES = [
    ("agent-invokes-tool", request(AGENT, WEB_SEARCH, "invoke"), True, ("agents-invoke-tools",), 300),
    (
        "agent-reads-crm-in-task",
        request(AGENT, CRM, "read", task=TASK, binding="dpop", client_auth="spiffe_jwt"),
        True,
        ("agents-read-data-in-task",),
        120,
    ),
    (
        "agent-reads-crm-without-task",
        request(AGENT, CRM, "read", binding="dpop", client_auth="spiffe_jwt"),
        False,
        (),
        None,
    ),
    (
        "agent-reads-crm-unbound",
        request(AGENT, CRM, "read", task=TASK),
        False,
        ("forbid-confidential-data-unbound",),
        None,
    ),
    (
        "agent-writes-crm-unbound",
        request(AGENT, CRM, "write", task=TASK),
        False,
        ("forbid-confidential-data-unbound",),
        None,
    ),
    (
        "agent-writes-crm-bound",
        request(AGENT, CRM, "read", "write", task=TASK, binding="mtls", client_auth="spiffe_x509"),
        True,
        ("agents-read-data-in-task", "bound-agents-write-data-in-task"),
        60,
    ),
    (
        "delegated-write-forbidden",
        request(
            AGENT,
            CRM,
            "write",
            task=TASK,
            binding="dpop",
            client_auth="spiffe_jwt",
            actor="spiffe://example.org/orchestrator",
        ),
        False,
        ("forbid-delegated-writes",),
        None,
    ),
    (
        "expired-task-forbidden",
        request(AGENT, CRM, "read", task=EXPIRED_TASK, binding="dpop", client_auth="spiffe_jwt"),
        False,
        ("forbid-expired-task",),
        None,
    ),
    (
        "orchestrator-gets-nothing",
        request("spiffe://example.org/orchestrator", WEB_SEARCH, "invoke"),
        False,
        (),
        None,
    ),
    (
        "tool-workload-gets-no-data",
        request(
            "spiffe://example.org/tool/web-search",
            CRM,
            "read",
            task=TASK,
            binding="mtls",
            client_auth="spiffe_x509",
        ),
        False,
        (),
        None,
    ),
    (
        "data-workload-gets-no-tool",
        request("spiffe://example.org/data/crm", WEB_SEARCH, "invoke"),
        False,
        (),
        None,
    ),
    (
        "admin-gets-no-token",
        request(
            "spiffe://example.org/ops/sts-admin",
            CRM,
            "read",
            task=TASK,
            binding="mtls",
            client_auth="spiffe_x509",
        ),
        False,
        (),
        None,
    ),
    (
        "partner-invokes-web-search",
        request(PARTNER, WEB_SEARCH, "invoke"),
        True,
        ("partner-summarizer-web-search",),
        60,
    ),
    (
        "partner-reads-crm-forbidden",
        request(PARTNER, CRM, "read", task=TASK, binding="mtls", client_auth="spiffe_x509"),
        False,
        ("forbid-foreign-data",),
        None,
    ),
    (
        "other-partner-workload-gets-nothing",
        request("spiffe://partner.test/agent/other", WEB_SEARCH, "invoke"),
        False,
        (),
        None,
    ),
]


@pytest.fixture(scope="module")
def examples() -> CedarPolicy:
    return CedarPolicy.from_directory(EXAMPLES, DEMO_CATALOG)


@pytest.mark.parametrize(
    ("req", "allowed", "policy_ids", "ttl"), [c[1:] for c in EXAMPLE_CASES], ids=[c[0] for c in EXAMPLE_CASES]
)
def test_shipped_examples(
    examples: CedarPolicy, req: PolicyRequest, allowed: bool, policy_ids: tuple[str, ...], ttl: int | None
) -> None:
    decision = examples.decide(req)
    assert (decision.allowed, decision.policy_ids, decision.ttl_seconds) == (allowed, policy_ids, ttl), (
        decision.reason
    )
    assert decision.errors == ()


def test_shipped_examples_all_have_ids(examples: CedarPolicy) -> None:
    assert all(":" not in policy_id for policy_id in examples.policy_ids)
    assert len(examples.policy_ids) >= 6


def test_restricted_example_needs_mtls() -> None:
    """The example guardrail on restricted data, against a catalog that has restricted data."""
    cedar = CedarPolicy.from_directory(EXAMPLES, Catalog([WEB_SEARCH, CRM, VAULT]))
    unbound = cedar.decide(request(AGENT, VAULT, "read", task=TASK))
    assert (unbound.allowed, unbound.policy_ids) == (
        False,
        ("forbid-restricted-data-unbound", "forbid-confidential-data-unbound"),
    )
    assert cedar.decide(
        request(AGENT, VAULT, "read", task=TASK, binding="mtls", client_auth="spiffe_x509")
    ).allowed
