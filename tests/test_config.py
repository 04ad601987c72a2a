"""Configuration: defaults are safe, every bad key stops start-up with its name and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sts.catalog import Sensitivity, TokenClass
from sts.config import load_settings, parse_duration
from sts.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sts.yaml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.issuer == "https://sts.example.org"
    assert settings.workload_api.socket == "unix:///tmp/spire-agent/public/api.sock"
    assert all(t.workload_api for t in settings.trust_domains)
    web = settings.catalog.get("tool:web-search")
    crm = settings.catalog.get("data:crm")
    assert (
        web is not None and web.token_class is TokenClass.TOOL and web.resource == "https://search.internal/"
    )
    assert crm is not None and crm.sensitivity is Sensitivity.CONFIDENTIAL and crm.max_ttl == 120
    assert settings.keys.dir == EXAMPLE.parent.parent / "state" / "keys"
    assert [str(t.trust_domain) for t in settings.trust_domains] == ["example.org", "partner.test"]


def test_defaults_trust_nothing(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "{}\n"), environ={})
    assert settings.trust_domains == ()
    assert len(settings.catalog) == 0
    assert settings.issuer == "http://127.0.0.1:8443"
    assert settings.audit_path == "-"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("issuer: https://sts.example.org\nbogus: 1\n", "line 2: 'bogus' is not a known setting"),
        (
            "listen: {host: 127.0.0.1, prot: 80}\n",
            "'listen.prot' is not a known setting (did you mean 'port'?)",
        ),
        ("listen:\n  port: eighty\n", "line 2: 'listen.port' must be a whole number"),
        ("listen: {port: 70000}\n", "'listen.port' must be a TCP port"),
        ("server: {reuse_port: 'yes'}\n", "'server.reuse_port' must be true or false"),
        ("issuer: http://sts.example.org\n", "'issuer' must use https"),
        ("issuer: https://sts.example.org/?x=1\n", "'issuer' must be an absolute URL"),
        ("issuer: https://sts.example.org/\n", "'issuer' must not end with '/'"),
        (
            "trust_domains:\n  Example.org: {bundle_file: x.json}\n",
            "'trust_domains.Example.org' is not a trust domain",
        ),
        ("trust_domains:\n  example.org: {}\n", "needs exactly one of"),
        ("trust_domains:\n  example.org: {bundle: magic}\n", "must be 'workload-api'"),
        ("catalog:\n  - {id: t, class: robot, scopes: [x]}\n", "'catalog[0].class' must be 'tool' or 'data'"),
        ("catalog:\n  - {id: t, class: tool, scopes: x}\n", "'catalog[0].scopes' must be a list"),
        ("catalog:\n  - {id: t, class: data, scopes: [r], sensitivity: secret}\n", "unknown sensitivity"),
        (
            "catalog:\n  - {id: t, class: tool, scopes: [x], max_ttl: soon}\n",
            "'catalog[0].max_ttl' must be a positive",
        ),
        ("catalog:\n  - {id: t, class: tool, scopes: [x], resource: /relative}\n", "absolute URI"),
        (
            "catalog:\n  - {id: t, class: tool, scopes: [x]}\n  - {id: t, class: tool, scopes: [y]}\n",
            "appears twice",
        ),
        ("catalog:\n  - {id: t, class: tool, scopes: []}\n", "at least one scope"),
        ("admins: [spiffe://example.org/ok, 'spiffe://EXAMPLE.org/x']\n", "'admins[1]' is not a SPIFFE ID"),
        ("keys: {algorithm: HS256}\n", "'keys.algorithm' must be one of ES256"),
        ("limits: {tokens_per_task: 0}\n", "'limits.tokens_per_task' must be greater than zero"),
        ("store: {url: 'postgres://x'}\n", "'store.url' must be"),
        ("issuer: a\nissuer: b\n", "'issuer' appears twice"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("listen: [1, 2\n", "not valid YAML"),
        ("log_level: loud\n", "'log_level' must be one of"),
        ("trust_domains:\n  example.org: {bundle: workload-api}\n", "'workload_api.socket' is needed"),
        ("workload_api: {socket: /tmp/agent.sock}\n", "'workload_api.socket' must be unix:///"),
        ("listen: {tls: {cert: c.pem}}\n", "'listen.tls' needs either certificate: workload-api or both"),
        ("listen: {tls: {certificate: workload-api}}\n", "workload-api needs workload_api.socket"),
        ("listen: {tls: {certificate: files}}\n", "'listen.tls.certificate' must be workload-api"),
        (
            "trust_domains:\n  example.org: {bundle_file: a.json}\n  spiffe://example.org: {bundle_file: b.json}\n",
            "names trust domain example.org a second time",
        ),
        ("mtls_url: http://localhost:8444\n", "'mtls_url' must be the https URL of the TLS listener"),
        ("mtls_url: https://localhost:8444/\n", "'mtls_url' must not end with '/'"),
        ("mtls_url: 'https://localhost:8444?x=1'\n", "'mtls_url' must be the https URL"),
        (
            "mtls_url: https://a.test:1\nlisten: {tls: {cert: c.pem, key: k.pem, public_url: 'https://b.test:2'}}\n",
            "'mtls_url' must equal listen.tls.public_url (https://b.test:2)",
        ),
    ],
    ids=[
        "unknown-top-key",
        "typo-suggestion",
        "port-not-number",
        "port-range",
        "reuse-port-not-boolean",
        "issuer-http-not-loopback",
        "issuer-query",
        "issuer-trailing-slash",
        "bad-trust-domain",
        "no-bundle-source",
        "bad-bundle-kind",
        "bad-class",
        "scopes-not-list",
        "bad-sensitivity",
        "bad-duration",
        "relative-resource",
        "duplicate-id",
        "no-scopes",
        "bad-admin-id",
        "unsupported-alg",
        "zero-limit",
        "bad-store",
        "duplicate-key",
        "not-mapping",
        "bad-yaml",
        "bad-log-level",
        "workload-api-without-socket",
        "socket-not-unix-uri",
        "tls-cert-without-key",
        "tls-svid-without-socket",
        "tls-bad-certificate-source",
        "same-trust-domain-twice",
        "mtls-url-not-https",
        "mtls-url-trailing-slash",
        "mtls-url-query",
        "mtls-url-not-the-tls-listener",
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert expected in str(caught.value)


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "issuer: https://sts.example.org\nlisten: {port: 8443}\n")
    settings = load_settings(path, environ={"STS_LISTEN_PORT": "9000", "STS_ISSUER": "https://other.example"})
    assert settings.listen.port == 9000
    assert settings.issuer == "https://other.example"


def test_environment_override_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listen\.port"):
        load_settings(write(tmp_path, "{}\n"), environ={"STS_LISTEN_PORT": "many"})


def test_catalog_ttl_capped_by_global_max(tmp_path: Path) -> None:
    text = "tokens: {max_ttl: 60}\ncatalog:\n  - {id: t, class: tool, scopes: [x], max_ttl: 1h}\n"
    entry = load_settings(write(tmp_path, text), environ={}).catalog.get("t")
    assert entry is not None and entry.max_ttl == 60


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30),
        ("30", 30),
        ("30s", 30),
        ("5m", 300),
        ("24h", 86400),
        ("1d", 86400),
        ("x", None),
        (True, None),
    ],
    ids=["int", "digits", "seconds", "minutes", "hours", "days", "word", "bool"],
)
def test_parse_duration(value: object, seconds: int | None) -> None:
    assert parse_duration(value) == seconds


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_bad_environment_override_is_blamed_on_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment STS_ISSUER: 'issuer' must use https"):
        load_settings(write(tmp_path, "{}\n"), environ={"STS_ISSUER": "http://sts.example.org"})


def test_mtls_url_names_the_tls_listener(tmp_path: Path) -> None:
    """RFC 8705 §5 aliases: the plain listener learns the TLS one from mtls_url; the TLS one knows itself."""
    assert load_settings(write(tmp_path, "{}\n"), environ={}).mtls_url is None
    plain = load_settings(write(tmp_path, "mtls_url: https://sts.example.org:8444\n"), environ={})
    assert plain.mtls_url == "https://sts.example.org:8444"
    tls = "listen: {port: 8444, tls: {cert: c.pem, key: k.pem, public_url: 'https://sts.example.org:8444/'}}\n"
    assert load_settings(write(tmp_path, tls), environ={}).mtls_url == "https://sts.example.org:8444"
    from_env = load_settings(write(tmp_path, "{}\n"), environ={"STS_MTLS_URL": "https://m.example.org"})
    assert from_env.mtls_url == "https://m.example.org"
