"""The documentation the repository owns (``docs/*.md``) cannot drift from the code (issue 13, item 8).

``docs/configuration.md`` is held to ``sts/config.py``:

* **Every setting the loader reads is documented, and every documented setting is read.** The real
  loader runs on a configuration that opens every branch (``listen.tls``, ``mtls_url``, one trust
  domain, one catalog entry) while ``sts.config._Section`` is instrumented: every key it is asked for
  (``raw``, through which ``get``, ``positive``, ``duration``, ``path_value`` and ``section`` all read,
  and ``has``) is recorded as a dotted key, catalog indexes as ``catalog[*]`` and the trust domain as
  ``trust_domains.<td>``. The leaves of that tree must be exactly the first column of the settings
  tables (rows whose header is ``Key | Type | Default | Env | Example | Rule``). A second, static
  look at ``config.py`` (its ``ast``) catches a key read only on a branch the configuration does not
  take: every string literal handed to one of those methods must name a documented key or section.
* **The same environment variables**: each row's *Env* column against ``ENV_OVERRIDES``.
* **The same defaults**: a *Default* cell that is one literal (`` `20` ``, optionally followed by a
  parenthesis) must equal the default the loader passed when it read that key, and every field of
  the settings dataclasses with a plain default (``ServerSettings.threads = 1``) must be documented
  with that literal. Derived defaults are written as words (``derived: …``, ``the number of CPUs``).
* **The examples are accepted**: every ``yaml`` block of ``docs/configuration.md`` loads.

And every relative link in ``docs/*.md`` points at a file that exists (and, for ``#anchor``, at a
heading there). Each failure names the key, variable, link or line to fix.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import sts.config
from sts.config import (
    ENV_OVERRIDES,
    KeySettings,
    LimitSettings,
    ListenSettings,
    ServerSettings,
    Settings,
    TaskSettings,
    TlsSettings,
    TokenSettings,
    WorkloadApiSettings,
    _Section,
    load_settings,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
SETTINGS_HEADER = ("Key", "Type", "Default", "Env", "Example", "Rule")
NO_ENV = {"", "—", "-"}

TRUST_DOMAIN = "td.example"
# Opens every branch of the loader: listen.tls (so its keys are read), mtls_url (read only when
# present), one trust domain and one catalog entry (their keys are read per entry). Every other
# section's keys are read whether or not they are set; they are set here to values that pass.
EVERY_BRANCH = f"""
issuer: https://sts.example.org
mtls_url: https://sts.example.org:8444
listen:
  host: 127.0.0.1
  port: 8444
  tls: {{cert: tls/server.pem, key: tls/server.key, public_url: "https://sts.example.org:8444"}}
trust_domains:
  {TRUST_DOMAIN}: {{bundle_file: bundles/td.json}}
workload_api: {{socket: "unix:///run/spire/agent.sock", max_staleness: 5m, start_timeout: 10s}}
keys: {{dir: keys, algorithm: ES256, rotate_after: 24h, generate: false}}
store: {{url: "memory://"}}
catalog:
  - id: tool:web-search
    class: tool
    scopes: [invoke]
    sensitivity: internal
    resource: https://search.internal/
    max_ttl: 60s
    resource_servers: [spiffe://{TRUST_DOMAIN}/tool/web-search]
policy: {{dir: policies}}
admins: [spiffe://{TRUST_DOMAIN}/ops/admin]
limits: {{per_workload_per_second: 20, tokens_per_task: 200, anonymous_refusals_per_minute: 600}}
tasks: {{max_ttl: 1h}}
tokens: {{max_ttl: 300s, svid_leeway: 30, max_svid_bytes: 8192, max_delegation_depth: 3}}
audit: {{path: audit.jsonl}}
server:
  workers: 2
  threads: 1
  max_body_bytes: 65536
  header_timeout: 5s
  body_timeout: 10s
  handshake_timeout: 5s
  max_connections: 4096
  drain_timeout: 10s
  reuse_port: true
log_level: info
logging: {{format: text}}
"""

# The dataclasses whose fields are the settings of one section, field name = key name.
SECTION_DATACLASSES: dict[type[Any], str] = {
    ListenSettings: "listen",
    TlsSettings: "listen.tls",
    WorkloadApiSettings: "workload_api",
    KeySettings: "keys",
    TokenSettings: "tokens",
    LimitSettings: "limits",
    TaskSettings: "tasks",
    ServerSettings: "server",
}
# Fields of ``Settings`` itself that hold one setting each (the others are sections or not settings).
SETTINGS_FIELDS = {
    "issuer": "issuer",
    "mtls_url": "mtls_url",
    "log_level": "log_level",
    "log_format": "logging.format",
}
READER_METHODS = frozenset({"get", "duration", "positive", "path_value", "raw", "has", "section"})
DEFAULTED_METHODS = ("get", "duration", "positive", "path_value")
NO_DEFAULT = object()  # a key the loader read without passing a default (``raw``: lists)
LITERAL_DEFAULT = re.compile(r"`([^`]+)`(?:\s*\([^()]*\))?")


# ---- the documentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentedSetting:
    key: str
    type: str
    default: str
    env: str | None
    example: str
    rule: str
    line: int

    @property
    def literal_default(self) -> str | None:
        """The default when the cell is one literal (`` `20` ``, `` `300` (5 min) ``), else None."""
        match = LITERAL_DEFAULT.fullmatch(self.default)
        return match.group(1) if match else None


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _code(cell: str) -> str | None:
    """The text of a cell that is exactly one code span, else None."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    return match.group(1) if match else None


def documented_settings() -> dict[str, DocumentedSetting]:
    """Every row of every settings table of ``docs/configuration.md``, by key."""
    lines = CONFIGURATION.read_text(encoding="utf-8").splitlines()
    settings: dict[str, DocumentedSetting] = {}
    problems: list[str] = []
    in_table = False
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if tuple(cells) == SETTINGS_HEADER:
            in_table = True
            continue
        if not in_table or set(line) <= set("|-: "):
            continue
        if len(cells) != len(SETTINGS_HEADER):
            problems.append(
                f"line {number}: {len(cells)} cells, the settings tables have 6 (a '|' in a cell?)"
            )
            continue
        key, kind, default, env, example, rule = cells
        name = _code(key)
        if name is None:
            problems.append(f"line {number}: the first cell must be the dotted key in backticks, got {key!r}")
            continue
        variable = None if env in NO_ENV else _code(env)
        if env not in NO_ENV and variable is None:
            problems.append(f"line {number}: the Env cell of {name} must be `STS_…` or —, got {env!r}")
        if name in settings:
            problems.append(
                f"line {number}: {name} is documented twice (first at line {settings[name].line})"
            )
        settings[name] = DocumentedSetting(name, kind, default, variable, example, rule, number)
    assert not problems, "docs/configuration.md:\n  " + "\n  ".join(problems)
    assert settings, f"no settings table (header {' | '.join(SETTINGS_HEADER)}) in docs/configuration.md"
    return settings


def _segments(key: str) -> set[str]:
    return {part for part in re.split(r"\.|\[\*\]", key) if part}


# ---- what the code reads -------------------------------------------------------------------------


@dataclass
class Reads:
    """The dotted keys the loader asked for, in order, and the default it passed for each."""

    keys: dict[str, None] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def leaves(self) -> list[str]:
        """Keys that are settings, not sections: no other key continues them."""
        return [
            key
            for key in self.keys
            if not any(other.startswith((f"{key}.", f"{key}[")) for other in self.keys)
        ]


def _generic(key: str) -> str:
    key = re.sub(r"\[\d+\]", "[*]", key)
    return key.replace(f"trust_domains.{TRUST_DOMAIN}", "trust_domains.<td>")


def _instrument(monkeypatch: pytest.MonkeyPatch, reads: Reads) -> None:
    def recording(name: str) -> Any:
        original = getattr(_Section, name)

        def method(self: _Section, key: str, *args: Any, **kwargs: Any) -> Any:
            reads.keys.setdefault(_generic(self.key(key)))
            return original(self, key, *args, **kwargs)

        return method

    def defaulting(name: str) -> Any:
        original = getattr(_Section, name)
        signature = inspect.signature(original)

        def method(self: _Section, key: str, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, key, *args, **kwargs)
            bound.apply_defaults()
            # The outermost call counts: positive() calls get() with the same default, path_value()
            # calls get() with "" for "no default".
            reads.defaults.setdefault(_generic(self.key(key)), bound.arguments["default"])
            return original(self, key, *args, **kwargs)

        return method

    for name in ("raw", "has"):
        monkeypatch.setattr(_Section, name, recording(name))
    for name in DEFAULTED_METHODS:
        monkeypatch.setattr(_Section, name, defaulting(name))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Reads:
    config = tmp_path / "sts.yaml"
    config.write_text(EVERY_BRANCH)
    recorded = Reads()
    with monkeypatch.context() as patch:
        _instrument(patch, recorded)
        load_settings(config, environ={})
    assert recorded.keys, "the instrumented loader recorded no key: has sts.config._Section changed?"
    return recorded


def _static_reads() -> Iterator[tuple[str, int, str]]:
    """``(name, line, call)`` for every string literal config.py hands to a section reader."""
    path = Path(sts.config.__file__)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in READER_METHODS:
            receiver = ast.unparse(func.value)
            if receiver in ("env", "environ", "os.environ"):
                continue  # the environment, not the file (SPIFFE_ENDPOINT_SOCKET)
            arguments = node.args[:1]
            call = f"{receiver}.{func.attr}"
        elif isinstance(func, ast.Name) and func.id == "_spiffe_ids":
            arguments, call = node.args[1:2], func.id
        else:
            continue
        for argument in arguments:
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                yield argument.value, node.lineno, call


# ---- the tests -----------------------------------------------------------------------------------


def test_every_setting_the_loader_reads_is_documented_and_nothing_else(reads: Reads) -> None:
    documented = documented_settings()
    read = reads.leaves()
    missing = [key for key in read if key not in documented]
    stale = [f"{key} (line {documented[key].line})" for key in documented if key not in read]
    message = []
    if missing:
        message.append(
            "sts/config.py reads settings docs/configuration.md does not document (add a row to its "
            "section's table): " + ", ".join(missing)
        )
    if stale:
        message.append(
            "docs/configuration.md documents settings sts/config.py does not read (remove or rename "
            "them): " + ", ".join(stale)
        )
    assert not message, "\n".join(message)


def test_no_key_is_read_on_a_branch_the_loader_run_missed() -> None:
    """A key read only under a condition the configuration above does not meet still has a name."""
    known = set().union(*(_segments(key) for key in documented_settings()))
    unknown = [
        f"'{name}' ({call}, sts/config.py line {line})"
        for name, line, call in _static_reads()
        if name not in known
    ]
    assert not unknown, (
        "sts/config.py reads keys that no documented setting or section is named after; document "
        "them in docs/configuration.md (and open their branch in EVERY_BRANCH of tests/test_docs.py): "
        + ", ".join(unknown)
    )


def test_environment_variables_are_the_documented_ones() -> None:
    documented = {s.env: s.key for s in documented_settings().values() if s.env is not None}
    problems = []
    for variable, key in ENV_OVERRIDES.items():
        if variable not in documented:
            problems.append(
                f"ENV_OVERRIDES has {variable} (for {key}); docs/configuration.md names it nowhere"
            )
        elif documented[variable] != key:
            problems.append(
                f"{variable} overrides {key}, but docs/configuration.md names it for {documented[variable]}"
            )
    for variable, key in documented.items():
        if variable not in ENV_OVERRIDES:
            problems.append(
                f"docs/configuration.md names {variable} for {key}; ENV_OVERRIDES has no such variable"
            )
    assert not problems, "\n".join(problems)


def test_the_environment_table_lists_every_override() -> None:
    """The table under "Environment variables" is ENV_OVERRIDES, row for row."""
    text = CONFIGURATION.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(STS_[A-Z_]+)` \| `([a-z_.]+)` \|$", text, flags=re.MULTILINE))
    assert rows == dict(ENV_OVERRIDES), (
        "the environment table of docs/configuration.md differs from ENV_OVERRIDES: missing "
        f"{sorted(set(ENV_OVERRIDES) - set(rows))}, stale {sorted(set(rows) - set(ENV_OVERRIDES))}, "
        f"different {sorted(v for v in rows if v in ENV_OVERRIDES and rows[v] != ENV_OVERRIDES[v])}"
    )


def _same(literal: str, expected: Any) -> bool:
    """Whether the documented literal denotes the code's default (durations may carry a unit)."""
    if isinstance(expected, bool):
        return literal in ("true", "false") and (literal == "true") is expected
    if isinstance(expected, int):
        return parse_duration(literal) == expected
    if isinstance(expected, str):
        try:
            loaded = yaml.safe_load(literal)
        except yaml.YAMLError:
            loaded = None
        return expected != "" and (literal == expected or loaded == expected)
    if isinstance(expected, frozenset | tuple | list):
        try:
            return sorted(map(str, yaml.safe_load(literal) or [])) == sorted(map(str, expected))
        except (yaml.YAMLError, TypeError):
            return False
    return False


def test_documented_defaults_are_the_loaders(reads: Reads) -> None:
    problems = []
    for key, setting in documented_settings().items():
        literal = setting.literal_default
        if literal is None or key not in reads.keys:
            continue  # a derived default, in words; or a key the other test reports
        expected = reads.defaults.get(key, NO_DEFAULT)
        if expected is NO_DEFAULT:
            continue  # read without a default (a list: absent means empty)
        if expected is None or expected == "":
            problems.append(f"{key}: documented default `{literal}`, but the loader has none (write 'none')")
        elif not _same(literal, expected):
            problems.append(
                f"{key}: documented default `{literal}`, the loader's is {expected!r} (line {setting.line})"
            )
    assert not problems, "docs/configuration.md defaults differ from sts/config.py:\n  " + "\n  ".join(
        problems
    )


def _plain(value: Any) -> bool:
    return isinstance(value, bool | int | str)


def test_dataclass_defaults_are_documented_as_literals() -> None:
    documented = documented_settings()
    sections = {section for key in documented for section in _sections(key)}
    problems = []
    fields = [
        (cls, f, f"{prefix}.{f.name}")
        for cls, prefix in SECTION_DATACLASSES.items()
        for f in dataclasses.fields(cls)
    ]
    fields += [
        (Settings, f, SETTINGS_FIELDS[f.name])
        for f in dataclasses.fields(Settings)
        if f.name in SETTINGS_FIELDS
    ]
    for cls, item, key in fields:
        where = f"{cls.__name__}.{item.name}"
        if key not in documented:
            if key not in sections:
                problems.append(f"{where} is a setting, but docs/configuration.md has no row {key}")
            continue
        if item.default is dataclasses.MISSING or not _plain(item.default):
            continue  # no default, a default_factory (workers: the CPUs) or None (derived, in words)
        literal = documented[key].literal_default
        if literal is None:
            problems.append(f"{where} defaults to {item.default!r}; document {key} with that literal")
        elif not _same(literal, item.default):
            problems.append(
                f"{where} defaults to {item.default!r}, docs/configuration.md says `{literal}` for {key}"
            )
    assert not problems, "\n".join(problems)


def _sections(key: str) -> Iterator[str]:
    parts = key.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])


def _yaml_blocks(text: str) -> Iterator[tuple[int, str]]:
    for match in re.finditer(r"^```yaml\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL):
        yield text[: match.start()].count("\n") + 1, match.group(1)


def test_every_configuration_example_is_accepted(tmp_path: Path) -> None:
    blocks = list(_yaml_blocks(CONFIGURATION.read_text(encoding="utf-8")))
    assert blocks, "docs/configuration.md has no yaml example"
    problems = []
    for line, block in blocks:
        config = tmp_path / f"example-{line}.yaml"
        config.write_text(block)
        try:
            load_settings(config, environ={})
        except sts.config.ConfigError as e:
            problems.append(f"the example at docs/configuration.md line {line} is refused: {e}")
    assert not problems, "\n".join(problems)


# ---- links ---------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose_keep_code(path), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _prose_keep_code(path: Path) -> str:
    return re.sub(r"^```.*?^```$", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def test_every_relative_link_in_docs_points_at_something_that_exists() -> None:
    problems = []
    for document in sorted(DOCS.glob("*.md")):
        for target in LINK.findall(_prose(document.read_text(encoding="utf-8"))):
            if SCHEME.match(target):
                continue  # https:, mailto: …: not ours to check offline
            path_part, _, anchor = target.partition("#")
            linked = (document.parent / path_part).resolve() if path_part else document
            name = f"docs/{document.name}: ({target})"
            if not linked.exists():
                problems.append(f"{name} points at {os.path.relpath(linked, ROOT)}, which does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{name}: {linked.name} has no heading with the anchor #{anchor}")
    assert not problems, "\n".join(problems)
