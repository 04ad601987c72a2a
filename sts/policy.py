"""Policy as code: the :class:`Policy` seam and its Cedar implementation (step 6 of an exchange).

Owns the policy request and decision values, the built-in Cedar schema (``schema.cedarschema``
plus one action per ``<class>:<scope>`` in the catalog), loading and validating ``*.cedar``
files at start (errors name file and line), and evaluating one exchange as one Cedar request per
requested scope. Rules: default deny; every scope must be allowed; any evaluation error denies
(fail closed); policy text and schema are parsed once, at load, never per request.

Token class crossing (re-exchanging a ``tool`` token for a ``data`` token or the reverse) is a second
default deny on top of Cedar's: policy sees the subject token's class (``context.subject_token_class``),
and a crossing is permitted only when, for every requested scope, a permit that determined the
decision carries ``@allow_class_crossing("tool->data")`` (or ``"data->tool"``). A permit without the
annotation never opens a crossing, whatever its conditions say, so no existing or careless policy can.

Imports only ``sts.errors``, ``sts.spiffeid``, ``sts.catalog`` and ``cedarpy``; never Flask or
web code, never the store or the keys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cedarpy

from sts.catalog import Catalog, CatalogEntry, TokenClass
from sts.errors import ConfigError
from sts.spiffeid import SpiffeId

__all__ = [
    "BINDINGS",
    "CLASS_CROSSINGS",
    "CLIENT_AUTH_METHODS",
    "SUBJECT_TOKEN_CLASSES",
    "SVID_SUBJECT",
    "CedarPolicy",
    "Decision",
    "Policy",
    "PolicyLoadError",
    "PolicyRequest",
    "TaskCreateRequest",
    "TaskFacts",
    "base_schema_text",
    "explain",
    "refused_crossing",
    "schema_for_catalog",
]

CLIENT_AUTH_METHODS = frozenset({"none", "spiffe_x509", "spiffe_jwt"})
BINDINGS = frozenset({"none", "mtls", "dpop"})
# What the subject token is: a JWT-SVID, or a token we issued of one class (``context.subject_token_class``).
SVID_SUBJECT = "svid"
SUBJECT_TOKEN_CLASSES = frozenset({SVID_SUBJECT, *(token_class.value for token_class in TokenClass)})
# The crossings a permit may open with @allow_class_crossing("<from>-><to>").
CLASS_CROSSINGS = frozenset(f"{a.value}->{b.value}" for a in TokenClass for b in TokenClass if a != b)
CLASS_CROSSING_ANNOTATION = "allow_class_crossing"

TASK_CREATE_ACTION = "task:create"
MEMO_ENTRIES = 4096  # distinct requests remembered within one second, per process
POLICY_SUFFIX = ".cedar"
SCHEMA_RESOURCE = "schema.cedarschema"

# Cedar entity type of the resource, per token class (the schema declares both).
_ENTITY_TYPE = {TokenClass.TOOL: "Tool", TokenClass.DATA: "Dataset"}
# Validation messages start with Cedar's own positional id; we name the file and line instead.
_CEDAR_ID_PREFIX = "for policy `policy0`, "


class PolicyLoadError(ConfigError):
    """The policy directory cannot be loaded; each problem names ``file:line`` of the policy."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("policy load failed:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What policy may know of the task an exchange names (``context.task``)."""

    id: str
    purpose: str
    creator: SpiffeId
    deadline: int


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One exchange as policy sees it; built by the exchange from verified inputs only."""

    principal: SpiffeId
    target: CatalogEntry
    scopes: frozenset[str]
    now: int
    client_auth: str = "none"
    binding: str = "none"
    task: TaskFacts | None = None
    actor: SpiffeId | None = None
    actors: frozenset[str] = frozenset()
    break_glass: bool = False
    subject_token_class: str = SVID_SUBJECT

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH_METHODS:
            raise ValueError(f"client_auth must be one of {sorted(CLIENT_AUTH_METHODS)}")
        if self.binding not in BINDINGS:
            raise ValueError(f"binding must be one of {sorted(BINDINGS)}")
        if self.subject_token_class not in SUBJECT_TOKEN_CLASSES:
            raise ValueError(f"subject_token_class must be one of {sorted(SUBJECT_TOKEN_CLASSES)}")

    @property
    def class_crossing(self) -> str | None:
        """``"tool->data"`` when the subject is a token of another class than the target's, else None."""
        target = self.target.token_class.value
        if self.subject_token_class in (SVID_SUBJECT, target):
            return None
        return f"{self.subject_token_class}->{target}"

    @property
    def actions(self) -> tuple[str, ...]:
        """The Cedar action ids asked, one per scope, sorted so evaluation order is fixed."""
        prefix = self.target.action_prefix
        return tuple(f"{prefix}:{scope}" for scope in sorted(self.scopes))


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome and the policies behind it, for the token (TTL) and the audit log (ids).

    ``class_crossings`` holds the crossings an allow explicitly opens: those named by an
    ``@allow_class_crossing`` permit among the determining policies of every requested scope.
    """

    allowed: bool
    policy_ids: tuple[str, ...]
    ttl_seconds: int | None
    errors: tuple[str, ...]
    denied_scopes: tuple[str, ...] = ()
    class_crossings: frozenset[str] = frozenset()

    @property
    def reason(self) -> str:
        """One sentence for logs and the CLI; never sent to the client (it names policies)."""
        if self.allowed:
            ttl = f" (ttl {self.ttl_seconds}s)" if self.ttl_seconds is not None else ""
            return f"allowed by {', '.join(self.policy_ids)}{ttl}"
        if self.errors:
            return f"denied: policy evaluation error: {'; '.join(self.errors)}"
        scopes = f" for scope {' '.join(self.denied_scopes)}" if self.denied_scopes else ""
        if self.policy_ids:
            return f"denied by forbid {', '.join(self.policy_ids)}{scopes}"
        return f"denied: no policy permits (default deny){scopes}"


@dataclass(frozen=True, slots=True)
class TaskCreateRequest:
    """Creating a task as policy sees it: who asks, for whom, which targets, for how long."""

    creator: SpiffeId
    assignee: SpiffeId
    targets: frozenset[str]
    purpose: str
    ttl_seconds: int
    now: int
    client_auth: str = "none"


class Policy(Protocol):
    """Decides exchanges and task creation; deterministic, and denies whenever it cannot decide."""

    def decide(self, request: PolicyRequest) -> Decision: ...

    def decide_task(self, request: TaskCreateRequest) -> Decision: ...


def explain(
    decision: Decision, request: PolicyRequest | None = None, origins: Mapping[str, str] | None = None
) -> str:
    """A few lines saying what was asked and why it was decided so (``sts policy check``).

    ``origins`` (:attr:`CedarPolicy.origins`) adds where each deciding policy is written. A class
    crossing the exchange refuses (:func:`refused_crossing`) is a DENY even where Cedar allowed.
    """
    lines: list[str] = []
    if request is not None:
        lines.append(f"principal: {request.principal}")
        lines.append(
            f"target:    {request.target.id} ({request.target.token_class.value}, "
            f"{request.target.sensitivity.label})"
        )
        lines.append(f"actions:   {', '.join(request.actions) or '(none)'}")
        if request.task is not None:
            purpose = f" ({request.task.purpose})" if request.task.purpose else ""
            lines.append(f"task:      {request.task.id}{purpose}")
        if request.actor is not None:
            lines.append(f"actor:     {request.actor}")
        earlier = sorted(request.actors - {str(request.actor)})
        if earlier:
            lines.append(f"actors:    {', '.join(earlier)} (earlier in the delegation chain)")
        lines.append(
            f"context:   client_auth={request.client_auth} binding={request.binding} "
            f"break_glass={str(request.break_glass).lower()} "
            f"subject_token_class={request.subject_token_class}"
        )
        crossing = request.class_crossing
        if crossing is not None:
            opened = (
                "permitted" if crossing in decision.class_crossings else "refused: no @allow_class_crossing"
            )
            lines.append(f"crossing:  {crossing} ({opened})")
    refused = refused_crossing(decision, request) if request is not None else None
    lines.append(f"decision:  {'ALLOW' if decision.allowed and refused is None else 'DENY'}")
    if refused is None:
        lines.append(f"reason:    {decision.reason}")
    else:
        lines.append(
            f"reason:    the {refused} crossing is not opened by an @allow_class_crossing permit "
            f"(Cedar alone: {decision.reason})"
        )
    origins = origins or {}
    lines.extend(
        f"policy:    {policy_id}" + (f"  ({origins[policy_id]})" if policy_id in origins else "")
        for policy_id in decision.policy_ids
    )
    if decision.ttl_seconds is not None and refused is None:
        lines.append(f"ttl:       {decision.ttl_seconds}s")
    lines.extend(f"error:     {error}" for error in decision.errors)
    return "\n".join(lines)


def refused_crossing(decision: Decision, request: PolicyRequest) -> str | None:
    """The class crossing (``"tool->data"``) the exchange refuses although Cedar allowed, else None.

    The exchange's second default deny (see the module docstring): an allow opens a crossing only
    if it is in :attr:`Decision.class_crossings`. ``sts policy check`` reports the same outcome.
    """
    crossing = request.class_crossing
    if decision.allowed and crossing is not None and crossing not in decision.class_crossings:
        return crossing
    return None


def base_schema_text() -> str:
    """The packaged base schema (entity types, context, action groups) without catalog actions."""
    # Shipped next to this module as package-data (pyproject: sts = ["*.cedarschema"]).
    return Path(__file__).with_name(SCHEMA_RESOURCE).read_text(encoding="utf-8")


def schema_for_catalog(catalog: Catalog) -> str:
    """Base schema plus one action per ``<class>:<scope>`` the catalog offers.

    Generated so that a policy naming an action no target offers fails validation. Scopes hold
    no ``"`` or ``\\`` (the catalog checks), so they are safe inside a Cedar string literal.
    """
    actions = sorted({(entry.token_class, scope) for entry in catalog for scope in entry.scopes})
    declarations = [
        f'action "{token_class.value}:{scope}" in ["{token_class.value}"] appliesTo '
        f"{{ principal: Workload, resource: {_ENTITY_TYPE[token_class]}, context: RequestContext }};"
        for token_class, scope in actions
    ]
    generated = "\n// Generated from the catalog: one action per <class>:<scope>.\n"
    return base_schema_text() + generated + "\n".join(declarations) + "\n"


@dataclass(frozen=True, slots=True)
class _Statement:
    """One policy statement cut from a file, with the line it starts on (1-based)."""

    text: str
    line: int


def _split_statements(source: str) -> list[_Statement]:
    """Cut Cedar policy text at top-level ``;``, respecting ``"…"`` (with escapes) and ``//``.

    Cedar's parse errors carry no position, so we parse statement by statement and name the line
    where the failing one starts. Trailing text without ``;`` becomes a statement of its own, so
    the parser reports it (``unexpected end of input``) instead of it vanishing.
    """
    statements: list[_Statement] = []
    start = 0
    start_line = 0  # 0: no significant character seen yet in the current statement
    line = 1
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        if char == "\n":
            line += 1
        elif char == "/" and source.startswith("//", i):
            end = source.find("\n", i)
            i = n if end < 0 else end
            continue
        elif not char.isspace():
            if start_line == 0:
                start_line = line
            if char == '"':
                i += 1
                while i < n and source[i] != '"':
                    if source[i] == "\\":
                        i += 1
                    elif source[i] == "\n":
                        line += 1
                    i += 1
            elif char == ";":
                statements.append(_Statement(source[start : i + 1], start_line))
                start = i + 1
                start_line = 0
        i += 1
    if start_line:
        statements.append(_Statement(source[start:], start_line))
    return statements


@dataclass(frozen=True, slots=True)
class _LoadedPolicy:
    """One parsed, validated policy: its shown id, ``file:line``, JSON (EST) form, ``@ttl`` and the
    class crossing its ``@allow_class_crossing`` opens."""

    policy_id: str
    origin: str
    est: dict[str, Any]
    ttl_seconds: int | None
    class_crossing: str | None = None


def _parse_ttl(value: str) -> int:
    if not value.isascii() or not value.isdigit() or int(value) <= 0:
        raise ValueError(f"@ttl must be a positive whole number of seconds, got {value!r}")
    return int(value)


def _load_statement(
    statement: _Statement, name: str, origin: str, schema: cedarpy.Schema, problems: list[str]
) -> _LoadedPolicy | None:
    """Parse and validate one statement; on failure append ``origin: problem`` and return None."""
    try:
        document = json.loads(cedarpy.policies_to_json_str(statement.text))
    except ValueError as err:
        problems.append(f"{origin}: syntax error: {err}")
        return None
    if document.get("templates"):
        problems.append(f"{origin}: templates (?principal / ?resource slots) are not supported")
        return None
    static = list(document["staticPolicies"].values())
    if len(static) != 1:
        problems.append(f"{origin}: expected one policy, found {len(static)}")
        return None
    est: dict[str, Any] = static[0]
    annotations: dict[str, str | None] = est.get("annotations", {})
    result = cedarpy.validate_policies(statement.text, schema)
    if not result.validation_passed:
        for error in result.errors:
            message = error.error.removeprefix(_CEDAR_ID_PREFIX)
            problems.append(f"{origin}: validation error: {message}")
        return None
    ttl_seconds: int | None = None
    if "ttl" in annotations:
        if est["effect"] != "permit":
            problems.append(f"{origin}: @ttl is meaningful only on permit policies")
            return None
        try:
            ttl_seconds = _parse_ttl(annotations["ttl"] or "")
        except ValueError as err:
            problems.append(f"{origin}: {err}")
            return None
    class_crossing: str | None = None
    if CLASS_CROSSING_ANNOTATION in annotations:
        if est["effect"] != "permit":
            problems.append(f"{origin}: @{CLASS_CROSSING_ANNOTATION} is meaningful only on permit policies")
            return None
        class_crossing = annotations[CLASS_CROSSING_ANNOTATION]
        if class_crossing not in CLASS_CROSSINGS:
            problems.append(
                f"{origin}: @{CLASS_CROSSING_ANNOTATION} must name one crossing, "
                f"{' or '.join(sorted(CLASS_CROSSINGS, reverse=True))}; got {class_crossing!r}"
            )
            return None
    policy_id = annotations.get("id", f"{name}:{statement.line}")
    if not policy_id:
        problems.append(f'{origin}: @id must not be empty (write @id("…") or leave it out)')
        return None
    return _LoadedPolicy(policy_id, origin, est, ttl_seconds, class_crossing)


class CedarPolicy:
    """Cedar policies validated against the catalog's schema, evaluated with default deny.

    Immutable after construction: the policy set, schema and resource entities are parsed once;
    :meth:`decide` only builds the principal entity and the context.
    """

    def __init__(self, catalog: Catalog, policies: Sequence[_LoadedPolicy], schema_text: str) -> None:
        """Build from already validated policies; use :meth:`from_directory` or :meth:`from_sources`."""
        self._catalog = {entry.id: entry for entry in catalog}
        self._schema_text = schema_text
        self._policy_ids = tuple(policy.policy_id for policy in policies)
        self._origins = {policy.policy_id: policy.origin for policy in policies}
        self._order = {policy_id: index for index, policy_id in enumerate(self._policy_ids)}
        self._ttl = {p.policy_id: p.ttl_seconds for p in policies if p.ttl_seconds is not None}
        self._crossings = {p.policy_id: p.class_crossing for p in policies if p.class_crossing is not None}
        self._memo = _Memo(-1)
        document = {
            "staticPolicies": {policy.policy_id: policy.est for policy in policies},
            "templates": {},
            "templateLinks": [],
        }
        try:
            schema = cedarpy.Schema.from_str(schema_text)
            self._policy_set = cedarpy.PolicySet.from_json_str(json.dumps(document))
            # Built WITH the schema so the action entities and their groups (tool, data) are in
            # the set: requests are then evaluated without re-validating against the schema.
            self._entities = cedarpy.Entities.from_json_str(
                json.dumps([_resource_entity(entry) for entry in catalog]), schema
            )
        except ValueError as err:
            raise PolicyLoadError([f"building the policy set: {err}"]) from err
        self._self_test(catalog, schema)

    @classmethod
    def from_directory(cls, path: Path, catalog: Catalog) -> CedarPolicy:
        """Load every ``*.cedar`` file in ``path`` (sorted); no policy files at all is an error.

        A ``*.cedarschema`` in the directory is refused rather than ignored: the schema is built
        in and generated from the catalog (extension schemas are not supported).
        """
        if not path.is_dir():
            raise PolicyLoadError([f"{path}: not a directory"])
        extensions = sorted(p.name for p in path.glob("*.cedarschema"))
        if extensions:
            raise PolicyLoadError(
                [
                    f"{path / name}: schema extensions are not supported; the schema is built in "
                    "(sts/schema.cedarschema) plus one action per catalog <class>:<scope>"
                    for name in extensions
                ]
            )
        files = sorted(p for p in path.glob(f"*{POLICY_SUFFIX}") if p.is_file())
        if not files:
            raise PolicyLoadError([f"{path}: no *{POLICY_SUFFIX} files (nothing would ever be allowed)"])
        sources: list[tuple[str, str, str]] = []
        for file in files:
            try:
                sources.append((file.name, str(file), file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as err:
                raise PolicyLoadError([f"{file}: cannot read: {err}"]) from err
        return cls._load(sources, catalog)

    @classmethod
    def from_sources(cls, sources: Mapping[str, str], catalog: Catalog) -> CedarPolicy:
        """Load policy texts keyed by file name (ids and messages use the name), in name order."""
        if not sources:
            raise PolicyLoadError(["no policy sources (nothing would ever be allowed)"])
        return cls._load([(name, name, sources[name]) for name in sorted(sources)], catalog)

    @classmethod
    def _load(cls, sources: Iterable[tuple[str, str, str]], catalog: Catalog) -> CedarPolicy:
        """Parse, validate and index every statement; gather all problems before refusing."""
        schema_text = schema_for_catalog(catalog)
        try:
            schema = cedarpy.Schema.from_str(schema_text)
        except ValueError as err:
            raise PolicyLoadError([f"built-in schema with the catalog's actions: {err}"]) from err
        problems: list[str] = []
        loaded: list[_LoadedPolicy] = []
        seen: dict[str, str] = {}
        for name, display, text in sources:
            for statement in _split_statements(text):
                origin = f"{display}:{statement.line}"
                policy = _load_statement(statement, name, origin, schema, problems)
                if policy is None:
                    continue
                if policy.policy_id in seen:
                    problems.append(
                        f"{origin}: duplicate policy id {policy.policy_id!r} "
                        f"(first at {seen[policy.policy_id]}); give each policy its own @id, "
                        "and put policies without @id on lines of their own"
                    )
                    continue
                seen[policy.policy_id] = origin
                loaded.append(policy)
        if not problems and not any(policy.est["effect"] == "permit" for policy in loaded):
            problems.append("no permit policy in any file (nothing would ever be allowed)")
        if problems:
            raise PolicyLoadError(problems)
        return cls(catalog, loaded, schema_text)

    def _self_test(self, catalog: Catalog, schema: cedarpy.Schema) -> None:
        """Check, once at start, that the requests :meth:`decide` builds conform to the schema.

        ``decide`` skips Cedar's per-request schema check (it costs ~20 µs a scope); this proves
        instead that our principal entity and context (with and without task and actor) have the
        declared shape for every catalog action, so a drift between code and schema stops start-up.
        """
        sample = SpiffeId.parse("spiffe://self-test.invalid/agent/self-test")
        task = TaskFacts("self-test", "self-test", sample, 1)
        problems: list[str] = []
        for entry in catalog:
            for request in (
                PolicyRequest(sample, entry, entry.scopes, 0),
                PolicyRequest(sample, entry, entry.scopes, 0, task=task, actor=sample),
                *(
                    PolicyRequest(sample, entry, entry.scopes, 0, actor=sample, subject_token_class=c.value)
                    for c in TokenClass
                ),
            ):
                try:
                    results = self._evaluate(request, request.actions, schema)
                except ValueError as err:
                    problems.append(f"self-test for {entry.id}: {err}")
                    continue
                problems.extend(
                    f"self-test for {entry.id}: {error}"
                    for result in results
                    for error in result.diagnostics.errors
                    if error.startswith("failed to build request")
                )
        if problems:
            raise PolicyLoadError(problems)

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """Every loaded policy's id in load order (file name order, then position in the file)."""
        return self._policy_ids

    @property
    def class_crossings(self) -> Mapping[str, str]:
        """The policies that carry ``@allow_class_crossing``, by id, with the crossing each opens."""
        return dict(self._crossings)

    @property
    def origins(self) -> Mapping[str, str]:
        """Where each policy id was written, as ``file:line`` (for ``explain`` and the audit log)."""
        return dict(self._origins)

    @property
    def schema_text(self) -> str:
        """The full Cedar schema policies were validated against (base plus catalog actions)."""
        return self._schema_text

    def decide(self, request: PolicyRequest) -> Decision:
        """Allow only if every requested scope is permitted, none forbidden and nothing errored.

        Agents repeat the same exchange many times a second, so decisions are memoized for the current
        second only: the key is the whole request (``now`` included), the policy set is immutable, so a
        hit returns exactly what Cedar would; the memo is dropped when the second changes.
        """
        memo = self._memo
        if memo.second != request.now:
            memo = self._memo = _Memo(request.now)
        decision = memo.decisions.get(request)
        if decision is None:
            decision = self._decide(request)
            if len(memo.decisions) < MEMO_ENTRIES:
                memo.decisions[request] = decision
        return decision

    def _decide(self, request: PolicyRequest) -> Decision:
        entry = self._catalog.get(request.target.id)
        if entry is None or (entry is not request.target and entry != request.target):
            return _refusal(f"target {request.target.id} is not in the catalog the policy was loaded with")
        if not request.scopes:
            return _refusal("no scope requested")
        unknown = request.scopes - entry.scopes
        if unknown:
            return _refusal(f"scope not offered by {entry.id}: {' '.join(sorted(unknown))}")
        actions = request.actions
        try:
            results = self._evaluate(request, actions)
        except ValueError as err:
            return _refusal(f"cedar refused the request: {err}")
        return self._combine(actions, results)

    def decide_task(self, request: TaskCreateRequest) -> Decision:
        """Action ``task:create``: principal the creator, resource the assignee; default deny."""
        clock = time.gmtime(request.now)
        context = {
            "trust_domain": request.creator.trust_domain.name,
            "now": request.now,
            "hour_utc": clock.tm_hour,
            "weekday_utc": clock.tm_wday,
            "client_auth": request.client_auth,
            "targets": sorted(request.targets),
            "purpose": request.purpose,
            "ttl_seconds": request.ttl_seconds,
        }
        cedar_request = {
            "principal": {"type": "Workload", "id": str(request.creator)},
            "action": {"type": "Action", "id": TASK_CREATE_ACTION},
            "resource": {"type": "Workload", "id": str(request.assignee)},
            "context": context,
        }
        workloads = {request.creator, request.assignee}
        try:
            entities = self._entities.with_added_json_str(
                json.dumps([_principal_entity(w) for w in sorted(workloads, key=str)])
            )
            result = cedarpy.is_authorized(cedar_request, self._policy_set, entities)
        except ValueError as err:
            return _refusal(f"cedar refused the request: {err}")
        return self._combine([TASK_CREATE_ACTION], [result])

    def _evaluate(
        self, request: PolicyRequest, actions: Sequence[str], schema: cedarpy.Schema | None = None
    ) -> list[cedarpy.AuthzResult]:
        """One Cedar request per scope, in one batch call; ``schema`` makes Cedar check the shapes."""
        principal = {"type": "Workload", "id": str(request.principal)}
        resource = {"type": _ENTITY_TYPE[request.target.token_class], "id": request.target.id}
        # One JSON text for the whole batch: cedarpy would otherwise dump the dict once per scope.
        context = json.dumps(_context(request))
        cedar_requests = [
            {
                "principal": principal,
                "action": {"type": "Action", "id": action},
                "resource": resource,
                "context": context,
            }
            for action in actions
        ]
        entities = self._entities.with_added_json_str(_principal_entity_json(request.principal), schema)
        results: list[cedarpy.AuthzResult] = cedarpy.is_authorized_batch(
            cedar_requests, self._policy_set, entities, schema
        )
        return results

    def _combine(self, actions: Sequence[str], results: Sequence[cedarpy.AuthzResult]) -> Decision:
        """Fold per-scope answers: all must allow; errors anywhere deny; ids in load order.

        A class crossing is open only if every scope's determining permits name it: one annotated
        permit for ``read`` does not carry a ``write`` that an unannotated permit allowed.
        """
        permits: set[str] = set()
        forbids: set[str] = set()
        errors: list[str] = []
        denied: list[str] = []
        crossings: frozenset[str] | None = None
        for action, result in zip(actions, results, strict=True):
            diagnostics = result.diagnostics
            errors.extend(f"{action}: {error}" for error in diagnostics.errors)
            if result.allowed:
                permits.update(diagnostics.reasons)
                opened = frozenset(self._crossings[p] for p in diagnostics.reasons if p in self._crossings)
                crossings = opened if crossings is None else crossings & opened
            else:
                denied.append(action.partition(":")[2])
                forbids.update(diagnostics.reasons)
        if errors or denied:
            return Decision(False, self._in_order(forbids), None, tuple(errors), tuple(denied))
        policy_ids = self._in_order(permits)
        ttls = [self._ttl[p] for p in policy_ids if p in self._ttl]
        return Decision(True, policy_ids, min(ttls) if ttls else None, (), (), crossings or frozenset())

    def _in_order(self, policy_ids: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(policy_ids, key=lambda p: self._order.get(p, len(self._order))))


@dataclass(slots=True)
class _Memo:
    """Decisions of one second (``PolicyRequest.now``); replaced, never mutated across seconds."""

    second: int
    decisions: dict[PolicyRequest, Decision] = field(default_factory=dict)


def _refusal(error: str) -> Decision:
    """A deny that Cedar never saw: the request itself cannot be evaluated (fail closed)."""
    return Decision(False, (), None, (error,))


def _resource_entity(entry: CatalogEntry) -> dict[str, Any]:
    return {
        "uid": {"type": _ENTITY_TYPE[entry.token_class], "id": entry.id},
        "attrs": {
            "id": entry.id,
            "resource": entry.resource or "",
            "sensitivity": entry.sensitivity.label,
            "sensitivity_rank": int(entry.sensitivity),
            "scopes": sorted(entry.scopes),
        },
        "parents": [],
    }


def _principal_entity(principal: SpiffeId) -> dict[str, Any]:
    spiffe_id = str(principal)
    return {
        "uid": {"type": "Workload", "id": spiffe_id},
        "attrs": {
            "spiffe_id": spiffe_id,
            "trust_domain": principal.trust_domain.name,
            "path": principal.path,
            "segments": list(principal.segments),
        },
        "parents": [],
    }


def _principal_entity_json(principal: SpiffeId) -> str:
    return json.dumps([_principal_entity(principal)])


def _context(request: PolicyRequest) -> dict[str, Any]:
    """The ``RequestContext`` record; ``trust_domain`` is the principal's (whose bundle verified it)."""
    clock = time.gmtime(request.now)
    context: dict[str, Any] = {
        "trust_domain": request.principal.trust_domain.name,
        "scopes": sorted(request.scopes),
        "now": request.now,
        "hour_utc": clock.tm_hour,
        "weekday_utc": clock.tm_wday,
        "client_auth": request.client_auth,
        "binding": request.binding,
        "break_glass": request.break_glass,
        "actors": sorted(request.actors),
        "subject_token_class": request.subject_token_class,
    }
    if request.task is not None:
        task = request.task
        context["task"] = {
            "id": task.id,
            "purpose": task.purpose,
            "creator": str(task.creator),
            "deadline": task.deadline,
        }
    if request.actor is not None:
        context["actor"] = str(request.actor)
    return context
