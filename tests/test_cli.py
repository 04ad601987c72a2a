"""The ``sts`` command: exit codes and messages a person reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sts.audit import AuditLog
from sts.cli import main
from tests.authority import TestAuthority
from tests.conftest import RunningServer, write_config

AGENT = "spiffe://example.org/agent/researcher"


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
