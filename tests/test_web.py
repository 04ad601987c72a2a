"""The HTTP layer's own rules, in-process: faults that cannot be produced for real through the server."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from sts.config import load_settings
from sts.runtime import build_services
from sts.web.app import create_app
from tests.authority import TestAuthority
from tests.conftest import write_config


class ExplodingExchange:
    """Stands in for a bug deep in the core: the one fault a real request cannot trigger."""

    def exchange(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail: key=abc")


def test_unexpected_error_is_generic_server_error(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    services = build_services(
        load_settings(write_config(tmp_path, 8443, example_org, partner_test), environ={})
    )
    app = create_app(dataclasses.replace(services, exchange=ExplodingExchange()))  # type: ignore[arg-type]
    body = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": "x",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
    }
    with caplog.at_level(logging.ERROR):
        response = app.test_client().post("/token", data=body)
    assert response.status_code == 500
    assert response.json == {"error": "server_error", "error_description": "internal error"}
    assert response.headers["Cache-Control"] == "no-store"
    assert "secret internal detail" in caplog.text


def test_readiness_reports_a_trust_domain_without_jwt_keys(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    config = write_config(tmp_path, 8443, example_org, partner_test)
    (tmp_path / "partner.test.json").write_text('{"keys": []}')
    services = build_services(load_settings(config, environ={}))
    response = create_app(services).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json is not None
    assert response.json["problems"] == ["trust domain partner.test: no JWT authorities"]


def test_readiness_without_any_trust_domain_is_not_ready(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.cedar").write_text('@id("p") permit(principal, action, resource);\n')
    config = tmp_path / "sts.yaml"
    config.write_text(
        f"keys: {{dir: {tmp_path / 'keys'}}}\nstore: {{url: 'memory://'}}\npolicy: {{dir: policies}}\n"
        "catalog:\n  - {id: tool:calc, class: tool, scopes: [invoke]}\n"
    )
    services = build_services(load_settings(config, environ={}))
    response = create_app(services).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json is not None
    assert response.json["problems"] == ["no trust domains are configured (trust_domains): no SVID can be verified"]
