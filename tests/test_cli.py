"""The ``sts`` command: exit codes and messages a person reads."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from spire.registry import Registry
from spire.server import DevWorkloadApi
from sts.audit import AuditLog
from sts.cli import _parser, main
from tests.authority import TestAuthority
from tests.conftest import RunningServer, write_config

AGENT = "spiffe://example.org/agent/researcher"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
REPO = Path(__file__).resolve().parent.parent
DEMO_POLICIES = REPO / "sts" / "dev" / "policies"
DEMO_REGISTRY = REPO / "spire" / "dev-workloads.yaml"
NOW = 1_760_000_000


@pytest.fixture
def config(tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority) -> Path:
    return write_config(tmp_path, 8443, example_org, partner_test)


def test_serve_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: https://sts.example.org\nlisten:\n  port: 8443\n  hots: 0.0.0.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "line 4: 'listen.hots' is not a known setting (did you mean 'host'?)" in result.stderr


def test_serve_with_broken_policy_exits_2(config: Path) -> None:
    (config.parent / "policies" / "broken.cedar").write_text(
        "\n\npermit(principal, action, resource) when { ;\n"
    )
    assert main(["serve", "--config", str(config)]) == 2


def test_policy_check_allow(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "policy",
            "check",
            "--config",
            str(config),
            "--spiffe-id",
            AGENT,
            "--audience",
            "tool:calc",
            "--scope",
            "invoke",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "decision:  ALLOW" in out
    assert "agents-invoke-tools  (" in out
    assert "policies/test.cedar:3)" in out
    assert "ttl:       200s" in out


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--audience", "data:crm", "--scope", "write"], "DENY"),
        (["--audience", "data:vault", "--scope", "read"], "no-restricted-data"),
        (["--audience", "tool:nope", "--scope", "invoke"], "invalid_target"),
        (["--audience", "tool:calc", "--scope", "delete"], "invalid_scope"),
    ],
    ids=["default-deny", "forbid-named", "unknown-target", "unknown-scope"],
)
def test_policy_check_deny(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], text: str
) -> None:
    code = main(["policy", "check", "--config", str(config), "--spiffe-id", AGENT, *args])
    assert code == 1
    assert text in capsys.readouterr().out


def test_policy_check_bad_spiffe_id(config: Path) -> None:
    args = [
        "policy",
        "check",
        "--config",
        str(config),
        "--spiffe-id",
        "spiffe://EXAMPLE.org/x",
        "--audience",
        "tool:calc",
        "--scope",
        "invoke",
    ]
    assert main(args) == 2


def test_keys_create_and_audit_verify(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--config", str(config)]) == 0
    kids = capsys.readouterr().out.split()
    assert [k.split("-")[0] for k in kids] == ["tool", "data"]
    log = AuditLog(str(tmp_path / "a.jsonl"))
    log.record({"n": 1})
    log.close()
    assert main(["audit", "verify", str(tmp_path / "a.jsonl")]) == 0
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text().replace('"n":1', '"n":2'))
    assert main(["audit", "verify", str(tmp_path / "a.jsonl")]) == 1


def test_serve_refuses_an_address_in_use(server: RunningServer) -> None:
    """A server bound with SO_REUSEPORT would share the port: the probe refuses instead."""
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(server.directory / "sts.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    port = server.url.rsplit(":", 1)[1]
    assert f"listen.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# sts --version and --help


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"sts {importlib.metadata.version('spiffe-sts')}\n"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command line prefix that has its own --help: ``()``, ``("serve",)``, ``("policy", "check")``."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(_parser()))


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "sts" for c in COMMANDS])
def test_every_help_shows_the_defaults(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = _parser()
    for name in command:
        parser = next(a.choices[name] for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in parser._actions:
        if action.default in (None, False, "", argparse.SUPPRESS) or action.required:
            continue
        assert f"(default: {action.default})" in text, (command, action.dest)


def test_dev_help_names_the_tls_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dev", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the TLS (mTLS) listener uses --port + 1 (default: 8443)" in text


# sts config check


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux only")
def test_config_check_says_whether_the_workers_get_a_socket_each(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config.read_text()
    for server, shown in (
        ("{workers: 2, reuse_port: true}", "(2 workers, one listening socket each: server.reuse_port)"),
        ("{workers: 1, reuse_port: true}", "(1 worker, sharing one socket: server.reuse_port needs two workers"),
        ("{workers: 2}", "(2 workers)"),
    ):
        config.write_text(text.replace("server: {workers: 1}", f"server: {server}"))
        assert main(["config", "check", "--config", str(config)]) == 0
        assert f"listener:      plain HTTP on 127.0.0.1:8443 {shown}" in capsys.readouterr().out


def test_config_check_lists_what_serve_would_use(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _files(config.parent)
    assert main(["config", "check", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    out, directory = captured.out, config.parent
    assert captured.err == ""
    assert "issuer:        http://127.0.0.1:8443" in out
    assert "listener:      plain HTTP on 127.0.0.1:8443 (1 worker)" in out
    assert "mtls_url:      none" in out
    assert (
        f"example.org  bundle_file {directory}/example.org.json (1 JWT authority, 1 X.509 authority)" in out
    )
    assert f"partner.test  bundle_file {directory}/partner.test.json" in out
    assert "catalog:       data:crm  class data, scopes read write, max_ttl 120s, confidential" in out
    assert "catalog:       tool:calc  class tool, scopes invoke, max_ttl 300s, internal" in out
    assert f"policies:      {directory}/policies: 8 policies in 1 file" in out
    assert "policy file:   test.cedar (8 policies)" in out
    assert f"store:         sqlite {directory}/sts.db" in out
    assert "admins:        spiffe://example.org/ops/sts-admin" in out
    assert f"keys:          {directory}/keys (generate: true, rotate_after 86400s)" in out
    assert "keys tool:     none yet: sts serve would generate a development key" in out
    assert "warning:       keys.dir: no data key" in out
    assert "result:        OK" in out
    assert _files(directory) == before  # read-only: no key, database or audit log was made

    assert main(["keys", "create", "--config", str(config)]) == 0
    kids = capsys.readouterr().out.split()
    assert main(["config", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"keys tool:     1 key (0 development), active {kids[0]}" in out
    assert f"keys data:     1 key (0 development), active {kids[1]}" in out
    assert "warning:" not in out


def _break(config: Path, what: str) -> str:
    """Break one thing ``sts serve`` checks; returns the text its problem line must hold."""
    directory = config.parent
    if what == "policy":
        (directory / "policies" / "broken.cedar").write_text(
            "\n\npermit(principal, action, resource) when { ;\n"
        )
        return f"policy: {directory}/policies/broken.cedar:3: syntax error"
    if what == "bundle":
        (directory / "partner.test.json").unlink()
        return (
            f"trust_domains.partner.test.bundle_file: cannot read bundle file {directory}/partner.test.json"
        )
    if what == "key":
        bad = directory / "keys" / "tool" / "1700000000-tool-abc.pem"
        bad.parent.mkdir(parents=True)
        bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        bad.chmod(0o600)
        return f"keys: {bad} is not an unencrypted PKCS#8 PEM private key"
    if what == "no-keys":
        config.write_text(
            config.read_text().replace("keys: {dir: keys}", "keys: {dir: keys, generate: false}")
        )
        return "holds no data signing key and keys.generate is false"
    if what == "audit":
        config.write_text(
            config.read_text().replace("audit: {path: audit.jsonl}", "audit: {path: nowhere/a.jsonl}")
        )
        return f"audit.path: cannot open {directory}/nowhere/a.jsonl"
    assert what == "setting"
    config.write_text(config.read_text().replace("keys: {dir: keys}", "keys: {dir: keys, genrate: false}"))
    return "'keys.genrate' is not a known setting (did you mean 'generate'?)"


@pytest.mark.parametrize("what", ["policy", "bundle", "key", "no-keys", "audit", "setting"])
def test_config_check_names_each_problem(config: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    reason = _break(config, what)
    assert main(["config", "check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert any(reason in line for line in problems), err
    assert err.splitlines()[-1].startswith("result:")
    assert "Traceback" not in err


def test_config_check_reports_every_problem_at_once_without_a_traceback(config: Path) -> None:
    reasons = [_break(config, what) for what in ("policy", "bundle", "key", "no-keys")]
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    for reason in reasons:
        assert sum(reason in line for line in problems) == 1, (reason, result.stderr)
    assert "keys data:     none usable (keys.generate is false)" in result.stdout
    assert "4 problems: sts serve would refuse to start" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# sts policy check: every context input the exchange gives Cedar, against the demo policies


@pytest.fixture
def demo_config(config: Path) -> Path:
    """The test configuration (its catalog holds data:crm, confidential) with the demo policies."""
    config.write_text(
        config.read_text().replace("policy: {dir: policies}", f"policy: {{dir: {DEMO_POLICIES}}}")
    )
    return config


def _policy_check(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["policy", "check", "--config", str(config), "--now", str(NOW), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


WRITE_CRM = ["--spiffe-id", AGENT, "--audience", "data:crm", "--scope", "write", "--task", "t-1"]
READ_CRM = ["--spiffe-id", AGENT, "--audience", "data:crm", "--scope", "read"]
BOUND = ["--client-auth", "spiffe_x509", "--binding", "mtls"]


@pytest.mark.parametrize(
    ("denied", "allowed", "forbid", "permit"),
    [
        (
            WRITE_CRM,
            [*WRITE_CRM, *BOUND],
            "forbid-confidential-data-unbound",
            "bound-agents-write-data-in-task",
        ),
        ([*READ_CRM, *BOUND], [*READ_CRM, *BOUND, "--task", "t-1"], None, "agents-read-data-in-task"),
        (
            [*WRITE_CRM, "--client-auth", "spiffe_jwt", "--binding", "dpop", "--task-deadline", "0"],
            [*WRITE_CRM, "--client-auth", "spiffe_jwt", "--binding", "dpop", "--task-deadline", "60"],
            "forbid-expired-task",
            "bound-agents-write-data-in-task",
        ),
        (
            [
                "--spiffe-id",
                "spiffe://partner.test/agent/summarizer",
                "--audience",
                "tool:calc",
                "--scope",
                "invoke",
            ],
            [
                "--spiffe-id",
                "spiffe://partner.test/agent/summarizer",
                "--audience",
                "tool:calc",
                "--scope",
                "invoke",
                "--break-glass",
            ],
            None,
            "break-glass-exception",
        ),
    ],
    ids=["binding-and-client-auth", "task", "task-deadline", "break-glass"],
)
def test_policy_check_context_turns_deny_into_allow(
    demo_config: Path,
    capsys: pytest.CaptureFixture[str],
    denied: list[str],
    allowed: list[str],
    forbid: str | None,
    permit: str,
) -> None:
    code, out = _policy_check(demo_config, capsys, *denied)
    assert code == 1, out
    assert "decision:  DENY" in out
    if forbid:
        assert f"reason:    denied by forbid {forbid}" in out
        assert f"policy:    {forbid}  ({DEMO_POLICIES}/90-guardrails.cedar:" in out
    else:
        assert "reason:    denied: no policy permits (default deny)" in out
    code, out = _policy_check(demo_config, capsys, *allowed)
    assert code == 0, out
    assert "decision:  ALLOW" in out
    assert f"reason:    allowed by {permit}" in out
    assert f"policy:    {permit}  ({DEMO_POLICIES}/" in out


def test_policy_check_shows_the_context_it_assumed(
    demo_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _policy_check(demo_config, capsys, *WRITE_CRM, *BOUND, "--task-purpose", "quarterly report")
    assert code == 0
    assert "task:      t-1 (quarterly report)" in out
    assert "context:   client_auth=spiffe_x509 binding=mtls break_glass=false subject_token_class=svid" in out


def test_policy_check_delegation_forbids_writes(
    demo_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _policy_check(demo_config, capsys, *WRITE_CRM, *BOUND, "--actor", ORCHESTRATOR)
    assert code == 1
    assert f"actor:     {ORCHESTRATOR}" in out
    assert "reason:    denied by forbid forbid-delegated-writes for scope write" in out


def test_policy_check_actor_chain_reaches_context_actors(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test policies forbid any chain through agent/evil (``context.actors``), allow one actor."""
    tool = ["--spiffe-id", ORCHESTRATOR, "--audience", "tool:calc", "--scope", "invoke"]
    code, out = _policy_check(config, capsys, *tool, "--actor", "spiffe://example.org/tool/calc")
    assert code == 0, out
    assert "allowed by delegated-tools" in out
    chain = ["--actor", "spiffe://example.org/tool/calc", "--actor", "spiffe://example.org/agent/evil"]
    code, out = _policy_check(config, capsys, *tool, *chain)
    assert code == 1, out
    assert "actors:    spiffe://example.org/agent/evil (earlier in the delegation chain)" in out
    assert "denied by forbid never-through-evil" in out


def test_policy_check_subject_token_class_crossing_is_a_deny(
    demo_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cedar permits the read, but no permit carries @allow_class_crossing("tool->data"): the exchange refuses."""
    args = [*READ_CRM, *BOUND, "--task", "t-1", "--actor", "spiffe://example.org/tool/web-search"]
    code, out = _policy_check(demo_config, capsys, *args, "--subject-token-class", "data")
    assert code == 0, out
    code, out = _policy_check(demo_config, capsys, *args, "--subject-token-class", "tool")
    assert code == 1, out
    assert "crossing:  tool->data (refused: no @allow_class_crossing)" in out
    assert "decision:  DENY" in out
    assert "reason:    the tool->data crossing is not opened by an @allow_class_crossing permit" in out
    assert "ttl:" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task-purpose", "x"], "--task-purpose: only with --task ID"),
        (
            ["--task-deadline", "5", "--task-creator", ORCHESTRATOR],
            "--task-creator, --task-deadline: only with --task",
        ),
        (
            ["--subject-token-class", "tool"],
            "a token issued by this server is a subject only with an actor token",
        ),
        (["--break-glass", "--actor", ORCHESTRATOR], "never applies to a delegated exchange"),
        (["--actor", ORCHESTRATOR] * 4, "longer than tokens.max_delegation_depth (3)"),
        (["--actor", "spiffe://EXAMPLE.org/x"], "sts: --actor: not a SPIFFE ID"),
        (["--task", "t", "--task-creator", "nope"], "sts: --task-creator: not a SPIFFE ID"),
    ],
    ids=[
        "purpose-without-task",
        "task-flags-without-task",
        "issued-without-actor",
        "break-glass-actor",
        "depth",
        "bad-actor",
        "bad-creator",
    ],
)
def test_policy_check_refuses_a_request_no_exchange_makes(
    demo_config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out = _policy_check(demo_config, capsys, *READ_CRM, *args)
    assert code == 2
    assert message in out


# sts svid against the development Workload API


@pytest.fixture(scope="module")
def workload_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevWorkloadApi]:
    with DevWorkloadApi(Registry.load(DEMO_REGISTRY), tmp_path_factory.mktemp("wl")) as api:
        yield api


def _subject(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


def test_svid_takes_the_socket_from_the_environment(
    workload_api: DevWorkloadApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", workload_api.socket_for("agent"))
    assert main(["svid", "--audience", "https://sts.example.org"]) == 0
    assert _subject(capsys.readouterr().out.strip()) == AGENT


def test_svid_socket_option_wins_over_the_environment(
    workload_api: DevWorkloadApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", workload_api.socket_for("agent"))
    socket = workload_api.socket_for("orchestrator")
    assert main(["svid", "--socket", socket, "--audience", "https://sts.example.org"]) == 0
    assert _subject(capsys.readouterr().out.strip()) == ORCHESTRATOR


def test_svid_without_any_socket_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "svid", "--audience", "https://sts.example.org"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "sts svid: no Workload API socket: give --socket unix:///path/to/workload.sock "
        "or set SPIFFE_ENDPOINT_SOCKET\n"
    )


def test_svid_names_the_environment_socket_it_could_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{tmp_path}/absent.sock")
    assert main(["svid", "--audience", "https://sts.example.org"]) == 1
    err = capsys.readouterr().err
    assert f"cannot fetch a JWT-SVID from unix://{tmp_path}/absent.sock (SPIFFE_ENDPOINT_SOCKET)" in err
