"""Deployment artefacts, checked statically: the container image, the Helm chart, the SPIRE examples.

No Docker daemon, Helm binary or Kubernetes cluster exists where this suite runs, so it checks for real
what can be checked without them, and no more:

- ``Dockerfile`` is read and held to the image rules (multi-stage, wheels only, numeric non-root USER,
  no compiler, no pip cache, HEALTHCHECK with urllib, ENTRYPOINT/CMD); ``.dockerignore`` against a
  model of Docker's matching rules. The image is not built here.
- ``helm/sts``: ``values.yaml`` and each ``ci/*.yaml`` against ``values.schema.json`` (jsonschema), a
  table of bad values, every ``.Values`` path of the templates present in ``values.yaml``, template
  actions balanced, every values key documented, the schema's ``config`` keys in step with
  ``sts.config``. The configuration and policies the ConfigMap carries are loaded by
  ``sts.config.load_settings`` and ``sts.policy.CedarPolicy``, the template's additions being re-made
  in Python (:func:`chart_config`). The init container's key script runs on a kubelet-like Secret
  directory. The ``test_helm_*`` tests render it with the real helm (built from helm/tool/go.mod)
  render and lint it and check every rendered manifest too (skipped otherwise, as in CI).
- ``spire/deploy``: every manifest parses; core kinds validate against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict, for the chart's oldest Kubernetes and the newest the package knows).
  kubernetes-validate has no schema for the spire.spiffe.io CRDs (ClusterSPIFFEID,
  ClusterFederatedTrustDomain): those are checked against a hand-written schema of their fields. The
  SPIRE server/agent HCL parses (pyhcl) and says what the STS expects. Nothing is applied: no cluster.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import fnmatch
import functools
import ipaddress
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import hcl
import jsonschema
import kubernetes_validate
import pytest
import yaml

from sts.catalog import CatalogEntry, TokenClass
from sts.config import (
    KeySettings,
    LimitSettings,
    ListenSettings,
    ServerSettings,
    Settings,
    TaskSettings,
    TokenSettings,
    WorkloadApiSettings,
    load_settings,
    parse_duration,
)
from sts.keys import KeyRing, create_provisioned_keys
from sts.policy import CedarPolicy

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "sts"
DEPLOY = ROOT / "spire" / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
ISSUER = {"config": {"issuer": "https://sts.example.org"}}

# The chart's own paths (templates/_helpers.tpl): where the pod finds what the ConfigMap and volumes hold.
CONFIG_PATH = "/etc/sts/config.yaml"
POLICY_DIR = "/etc/sts/policies"
STATE_DIR = "/var/lib/sts"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def merge_values(base: Any, override: Any) -> Any:
    """Helm's coalescing of a values file over the chart's: maps merge, anything else replaces, null deletes."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_values(out.get(key), value) if key in out else copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return load_yaml(CHART / "values.yaml")


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    """Every violation as 'dotted.path: message', sorted (draft-07, as Helm validates)."""
    validator = jsonschema.Draft7Validator(schema)
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    )


# ---------------------------------------------------------------------------------------------- Dockerfile


@dataclasses.dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each a list of (KEYWORD, arguments) with continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = re.sub(r"--platform=\S+\s+", "", rest).partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base.strip())
            stages.append(Stage(base, name.strip(), []))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


def test_dockerfile_is_multi_stage_on_slim_python_311(dockerfile):
    assert len(dockerfile) >= 2, "a build stage and a runtime stage"
    for stage in dockerfile:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", stage.base), stage.base
    assert dockerfile[0].name, "the build stage is named, so the runtime stage can refer to it"


def test_dockerfile_installs_only_the_wheels_built_in_the_build_stage(dockerfile):
    build, runtime = dockerfile[0], dockerfile[-1]
    assert any("pip wheel" in run and "--wheel-dir" in run for run in build.all("RUN"))
    installs = [run for run in runtime.all("RUN") if "pip install" in run]
    assert len(installs) == 1, installs
    install = installs[0]
    assert f"from={build.name}" in install or any(f"--from={build.name}" in c for c in runtime.all("COPY"))
    assert "--no-index" in install, "nothing but the built wheels may be installed"
    assert re.search(r"\S+\.whl", install), "the project's wheel, not its source tree"
    assert not [c for c in runtime.all("COPY") if "--from" not in c], "no source is copied into the runtime"


def test_dockerfile_never_leaves_a_pip_cache(dockerfile):
    for stage in dockerfile:
        for run in stage.all("RUN"):
            for command in re.findall(r"pip (?:install|wheel)[^&;]*", run):
                assert "--no-cache-dir" in command, command


@pytest.mark.parametrize(
    "tool", ["build-essential", "gcc", "g++", "clang", "make", "cargo", "rustc", "curl", "wget"]
)
def test_dockerfile_runtime_has_no_compiler_and_no_curl(dockerfile, tool):
    runtime = dockerfile[-1]
    for run in runtime.all("RUN"):
        for install in re.findall(r"(?:apt-get|apt|apk) (?:-\S+ )*(?:install|add)([^&;]*)", run):
            assert tool not in install.split(), f"{tool} installed in the runtime stage"
    if tool in ("curl", "wget"):
        assert all(tool not in hc for hc in runtime.all("HEALTHCHECK"))


def test_dockerfile_runs_as_the_charts_numeric_non_root_user(dockerfile, values):
    users = dockerfile[-1].all("USER")
    assert users, "the runtime stage sets USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, "numeric and not root, so runAsNonRoot can check it"
    assert not group or (group.isdigit() and int(group) != 0)
    assert int(user) == values["securityContext"]["runAsUser"]
    assert not group or int(group) == values["securityContext"]["runAsGroup"]


def test_dockerfile_healthcheck_probes_healthz_with_urllib(dockerfile, values):
    runtime = dockerfile[-1]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2] and "HEALTHCHECK_URL" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    port = values["config"]["listen"]["port"]
    assert f"HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz" in runtime.all("ENV")
    assert runtime.all("EXPOSE") == [str(port)]


def test_dockerfile_entrypoint_cmd_and_state_volume(dockerfile):
    runtime = dockerfile[-1]
    assert [json.loads(e) for e in runtime.all("ENTRYPOINT")] == [["sts"]]
    assert [json.loads(c) for c in runtime.all("CMD")] == [["serve", "--config", CONFIG_PATH]]
    volumes = [v for arg in runtime.all("VOLUME") for v in json.loads(arg)]
    assert volumes == [STATE_DIR], "state sits in a volume: the root file system can be read-only"


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; '!' re-includes."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        cleaned = os.path.normpath(pattern.removeprefix("!").strip()).lstrip("/")
        regex = re.escape(cleaned).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", lambda m: "[" + m.group(1).replace("\\", "") + "]", regex)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


DOCKERIGNORE_CASES = [
    (".git/HEAD", True),
    (".venv/bin/python", True),
    ("state/dev/dev.json", True),
    ("state/keys/tool/1-tool-x.pem", True),
    ("certs/dev/example.org.key.pem", True),
    ("tests/test_config.py", True),
    (".pytest_cache/v/cache/nodeids", True),
    (".mypy_cache/3.11/sts/config.data.json", True),
    ("bench/results/run.json", True),
    ("sts/__pycache__/config.cpython-311.pyc", True),
    ("sts.egg-info/PKG-INFO", True),
    ("helm/sts/values.yaml", True),
    ("spire/deploy/spire-values.yaml", True),
    ("pyproject.toml", False),
    ("README.md", False),
    ("sts/cli.py", False),
    ("sts/dev/policies/10-tools.cedar", False),
    ("sts/schema.cedarschema", False),
    ("spire/workload.proto", False),
    ("spire/dev-workloads.yaml", False),
]


@pytest.mark.parametrize(("path", "excluded"), DOCKERIGNORE_CASES, ids=[c[0] for c in DOCKERIGNORE_CASES])
def test_dockerignore_keeps_only_what_the_wheel_needs(path, excluded):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert dockerignore_excludes(patterns, path) is excluded


# ------------------------------------------------------------------------------------ values and schema


def test_schema_is_draft7_with_go_compatible_patterns(schema):
    jsonschema.Draft7Validator.check_schema(schema)
    patterns: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    patterns.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    assert patterns
    for pattern in patterns:
        re.compile(pattern)
        # Helm validates with Go's RE2: no lookaround, no backreferences.
        assert "(?" not in pattern and not re.search(r"\\[1-9]", pattern), pattern


def test_default_values_lack_only_the_issuer(schema, values):
    """config.issuer has no default on purpose (the one required value); all else is valid as shipped."""
    errors = schema_errors(schema, values)
    assert len(errors) == 1 and errors[0].startswith("config.issuer:"), errors
    assert schema_errors(schema, merge_values(values, ISSUER)) == []


CI_FILES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.mark.parametrize("ci_file", CI_FILES, ids=[f.name for f in CI_FILES])
def test_ci_values_validate(schema, values, ci_file):
    assert schema_errors(schema, merge_values(values, load_yaml(ci_file))) == []


def test_ci_value_sets_cover_sqlite_and_redis_scale_out(values):
    merged = [merge_values(values, load_yaml(f)) for f in CI_FILES]
    assert any(
        v["replicaCount"] == 1
        and not v["autoscaling"]["enabled"]
        and not v["redis"]["url"]
        and not v["redis"]["existingSecret"]
        for v in merged
    ), "a single-replica SQLite set"
    assert any(
        v["replicaCount"] >= 3
        and v["autoscaling"]["enabled"]
        and (v["redis"]["url"] or v["redis"]["existingSecret"])
        for v in merged
    ), "a three-replica Redis set with autoscaling"


def _delete(path: str):
    def mutate(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        for part in parents:
            doc = doc[part]
        del doc[leaf]

    return mutate


# (id, overrides merged over values.yaml + issuer, or a function mutating them; a dotted path the error names)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("replicaCount-0", {"replicaCount": 0}, "replicaCount"),
    ("replicaCount-string", {"replicaCount": "2"}, "replicaCount"),
    ("image-tag-number", {"image": {"tag": 1}}, "image.tag"),
    ("image-pullPolicy-unknown", {"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ("issuer-missing", _delete("config.issuer"), "config"),
    ("issuer-empty", {"config": {"issuer": ""}}, "config.issuer"),
    ("issuer-http", {"config": {"issuer": "http://sts.example.org"}}, "config.issuer"),
    ("issuer-trailing-slash", {"config": {"issuer": "https://sts.example.org/"}}, "config.issuer"),
    ("issuer-query", {"config": {"issuer": "https://sts.example.org/?a=b"}}, "config.issuer"),
    ("unknown-top-level-key", {"replicas": 2}, ""),
    ("unknown-config-key", {"config": {"issuer_url": "https://x.example"}}, "config"),
    ("chart-owned-store-url", {"config": {"store": {"url": "memory://"}}}, "config"),
    ("chart-owned-policy-dir", {"config": {"policy": {"dir": "/p"}}}, "config"),
    ("chart-owned-socket", {"config": {"workload_api": {"socket": "unix:///x.sock"}}}, "config.workload_api"),
    ("chart-owned-keys-dir", {"config": {"keys": {"dir": "/k"}}}, "config.keys"),
    ("tls-cert-without-key", {"config": {"listen": {"tls": {"cert": "/tls/tls.crt"}}}}, "config.listen.tls"),
    (
        "tls-two-sources",
        {"config": {"listen": {"tls": {"certificate": "workload-api", "cert": "/c", "key": "/k"}}}},
        "config.listen.tls",
    ),
    (
        "tls-public-url-http",
        {"config": {"listen": {"tls": {"certificate": "workload-api", "public_url": "http://sts"}}}},
        "config.listen.tls",
    ),
    ("listen-host-loopback", {"config": {"listen": {"host": "127.0.0.1"}}}, "config.listen.host"),
    ("listen-port-0", {"config": {"listen": {"port": 0}}}, "config.listen.port"),
    ("replicas-3-without-redis", {"replicaCount": 3}, "redis"),
    ("autoscaling-without-redis", {"autoscaling": {"enabled": True, "maxReplicas": 4}}, "redis"),
    ("redis-url-and-secret", {"redis": {"url": "redis://r:6379/0", "existingSecret": "s"}}, "redis"),
    ("redis-url-not-redis", {"redis": {"url": "http://r:6379"}}, "redis.url"),
    (
        "trust-domain-uppercase",
        {"config": {"trust_domains": {"Example.org": {"bundle": "workload-api"}}}},
        "config.trust_domains",
    ),
    (
        "trust-domain-two-sources",
        {"config": {"trust_domains": {"example.org": {"bundle_file": "/b.json"}}}},
        "config.trust_domains.example.org",
    ),
    (
        "trust-domain-bad-bundle",
        {"config": {"trust_domains": {"example.org": {"bundle": "spire"}}}},
        "config.trust_domains.example.org",
    ),
    (
        "bundle-endpoint-without-profile",
        {"config": {"trust_domains": {"p.test": {"bundle_endpoint": "https://b.p.test"}}}},
        "config.trust_domains.p.test",
    ),
    (
        "catalog-class-unknown",
        {"config": {"catalog": [{"id": "x", "class": "secret", "scopes": ["a"]}]}},
        "config.catalog.0.class",
    ),
    (
        "catalog-scope-with-space",
        {"config": {"catalog": [{"id": "x", "class": "tool", "scopes": ["a b"]}]}},
        "config.catalog.0.scopes.0",
    ),
    (
        "catalog-no-scopes",
        {"config": {"catalog": [{"id": "x", "class": "tool", "scopes": []}]}},
        "config.catalog.0.scopes",
    ),
    (
        "catalog-sensitivity-unknown",
        {"config": {"catalog": [{"id": "x", "class": "data", "scopes": ["r"], "sensitivity": "secret"}]}},
        "config.catalog.0.sensitivity",
    ),
    ("admin-not-a-spiffe-id", {"config": {"admins": ["example.org/ops/admin"]}}, "config.admins.0"),
    ("admin-dot-segment", {"config": {"admins": ["spiffe://example.org/ops/.."]}}, "config.admins.0"),
    ("duration-in-words", {"config": {"tasks": {"max_ttl": "5 minutes"}}}, "config.tasks.max_ttl"),
    ("duration-zero", {"config": {"tokens": {"max_ttl": "0s"}}}, "config.tokens.max_ttl"),
    ("svid-leeway-too-large", {"config": {"tokens": {"svid_leeway": 301}}}, "config.tokens.svid_leeway"),
    ("workers-zero", {"config": {"server": {"workers": 0}}}, "config.server.workers"),
    ("reuse-port-string", {"config": {"server": {"reuse_port": "yes"}}}, "config.server.reuse_port"),
    ("algorithm-rs256", {"config": {"keys": {"algorithm": "RS256"}}}, "config.keys.algorithm"),
    ("log-level-trace", {"config": {"log_level": "TRACE"}}, "config.log_level"),
    ("no-policies", {"policies": None}, ""),
    (
        "policy-name-not-cedar",
        {"policies": {"10-tools.txt": "permit(principal, action, resource);"}},
        "policies",
    ),
    (
        "signing-key-name",
        {"signingKeys": {"files": {"tool.pem": "-----BEGIN PRIVATE KEY-----"}}},
        "signingKeys.files",
    ),
    (
        "signing-keys-twice",
        {
            "signingKeys": {
                "existingSecret": "k",
                "files": {"1-tool-" + "a" * 43 + ".pem": "-----BEGIN PRIVATE KEY-----\n"},
            }
        },
        "signingKeys",
    ),
    ("socket-path-relative", {"spiffe": {"socketPath": "spire-agent.sock"}}, "spiffe.socketPath"),
    ("csi-driver-uppercase", {"spiffe": {"csiDriver": "CSI.spiffe.io"}}, "spiffe.csiDriver"),
    ("anti-affinity-unknown", {"podAntiAffinity": "sometimes"}, "podAntiAffinity"),
    ("run-as-root", {"securityContext": {"runAsUser": 0}}, "securityContext.runAsUser"),
    ("service-type-unknown", {"service": {"type": "Ingress"}}, "service.type"),
    ("memory-not-a-quantity", {"resources": {"limits": {"memory": "lots"}}}, "resources.limits.memory"),
    (
        "pdb-bad-percent",
        {"podDisruptionBudget": {"maxUnavailable": "half"}},
        "podDisruptionBudget.maxUnavailable",
    ),
]


@pytest.mark.parametrize(("overrides", "where"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_schema_rejects_bad_values(schema, values, overrides, where):
    document = merge_values(values, ISSUER)
    if callable(overrides):
        overrides(document)
    else:
        document = merge_values(document, overrides)
    errors = schema_errors(schema, document)
    assert errors, "accepted"
    assert any(e.split(": ", 1)[0] == where for e in errors), errors


GOOD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("replicas-3-with-redis-url", {"replicaCount": 3, "redis": {"url": "redis://redis.redis.svc:6379/0"}}),
    (
        "autoscaling-with-redis-secret",
        {"autoscaling": {"enabled": True}, "redis": {"existingSecret": "sts-redis"}},
    ),
    ("autoscaling-capped-at-one", {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}}),
    (
        "federated-and-file-bundles",
        {
            "config": {
                "trust_domains": {
                    "partner.test": {"bundle": "workload-api"},
                    "legacy.test": {"bundle_file": "/etc/bundles/legacy.json"},
                    "web.test": {"bundle_endpoint": "https://b.web.test/", "endpoint_profile": "https_web"},
                }
            }
        },
    ),
    ("issuer-with-port-and-path", {"config": {"issuer": "https://idp.example.org:8443/sts"}}),
    ("tls-own-svid", {"config": {"listen": {"tls": {"certificate": "workload-api"}}}}),
    (
        "tls-file-pair",
        {
            "config": {
                "listen": {
                    "tls": {
                        "cert": "/tls/tls.crt",
                        "key": "/tls/tls.key",
                        "public_url": "https://sts.example.org",
                    }
                }
            }
        },
    ),
    ("platform-picks-uid", {"securityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}),
]


@pytest.mark.parametrize("overrides", [c[1] for c in GOOD_VALUES], ids=[c[0] for c in GOOD_VALUES])
def test_schema_accepts_good_values(schema, values, overrides):
    assert schema_errors(schema, merge_values(merge_values(values, ISSUER), overrides)) == []


# The schema's config sections against sts.config's settings: a key the server learns must be taught to
# the chart too (or the chart would refuse it), and the chart must not accept a key the server refuses.
# Keys the chart sets itself from the pod's layout are not values.
CHART_OWNED = {"workload_api": {"socket"}, "keys": {"dir"}}
SECTIONS = {
    "listen": ListenSettings,
    "workload_api": WorkloadApiSettings,
    "keys": KeySettings,
    "limits": LimitSettings,
    "tasks": TaskSettings,
    "tokens": TokenSettings,
    "server": ServerSettings,
}
# Settings field -> the top-level key it comes from, when the names differ.
TOP_LEVEL_KEYS = {
    "store_url": "store",
    "policy_dir": "policy",
    "audit_path": "audit",
    "audit_stdout": "audit",  # audit.stdout: the chart's audit.stdout value
    "log_format": "logging",
}


def test_schema_config_sections_match_sts_config(schema):
    config = schema["definitions"]["stsConfig"]["properties"]
    top = {TOP_LEVEL_KEYS.get(f.name, f.name) for f in dataclasses.fields(Settings) if f.name != "source"}
    assert set(config) == top - {"store", "policy", "audit"}, "store, policy and audit are the chart's"
    for name, settings_class in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(settings_class)} - CHART_OWNED.get(name, set())
        assert set(config[name]["properties"]) == fields, name
    entry = {f.name for f in dataclasses.fields(CatalogEntry)} - {"token_class"} | {"class"}
    assert set(config["catalog"]["items"]["properties"]) == entry


def documented_keys(path: Path) -> list[tuple[int, str, bool]]:
    """(line, key, has a comment) for every key of a block mapping: a comment on the line or just above."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out: list[tuple[int, str, bool]] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if not node.flow_style:
                    line = key.start_mark.line
                    inline = "#" in lines[line].split(":", 1)[-1]
                    above = line > 0 and lines[line - 1].lstrip().startswith("#")
                    out.append((line + 1, key.value, inline or above))
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text))
    return out


def test_every_values_key_is_documented():
    keys = documented_keys(CHART / "values.yaml")
    assert len(keys) > 100
    assert [f"line {line}: {key}" for line, key, ok in keys if not ok] == []


def test_default_policies_are_the_demo_policies(values):
    demo = {
        p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "sts/dev/policies").glob("*.cedar"))
    }
    assert values["policies"] == demo, (
        "helm/sts/values.yaml policies must be the demo policies of sts/dev/policies, byte for byte"
    )


TEMPLATES = sorted((CHART / "templates").iterdir())


# Values the templates read that are absent by default: each is shown as a commented example in
# values.yaml (e.g. "# tls: {certificate: workload-api}") and described by the schema.
OPTIONAL_VALUES = {"config.listen.tls": ("config", "listen", "tls")}


def test_every_values_reference_in_the_templates_exists(values, schema):
    missing = []
    for template in TEMPLATES:
        for match in re.finditer(
            r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text(encoding="utf-8")
        ):
            path = match.group(1).strip(".")
            node: Any = values
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    if path not in OPTIONAL_VALUES:
                        missing.append(f"{template.name}: .Values.{path}")
                    break
                node = node[part]
    assert missing == []
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    for path, (section, *parents) in OPTIONAL_VALUES.items():
        assert re.search(rf"^\s*# {re.escape(path.rsplit('.', 1)[1])}: ", text, re.MULTILINE), (
            f"{path} has no commented example"
        )
        node = schema["definitions"]["stsConfig"] if section == "config" else schema
        for part in parents:
            node = node["properties"][part]
        assert node, path
    assert "index .Values" not in "".join(t.read_text(encoding="utf-8") for t in TEMPLATES), (
        "paths must be greppable"
    )


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_template_actions_balance(template):
    text = template.read_text(encoding="utf-8")
    assert text.count("{{") == text.count("}}"), "unbalanced delimiters"
    stack: list[str] = []
    for match in re.finditer(r"\{\{-?\s*(.*?)\s*-?\}\}", text, re.DOTALL):
        action = match.group(1)
        if action.startswith("/*"):
            assert action.endswith("*/"), f"unterminated comment: {action[:40]}"
            continue
        word = action.split(maxsplit=1)[0] if action else ""
        line = text.count("\n", 0, match.start()) + 1
        if word in ("if", "range", "with", "define", "block"):
            stack.append(f"{word} (line {line})")
        elif word == "else":
            assert stack and not stack[-1].startswith(("define", "block")), (
                f"line {line}: else outside if/range/with"
            )
        elif word == "end":
            assert stack, f"line {line}: end without an opening action"
            stack.pop()
    assert stack == [], f"not closed: {stack}"


def test_chart_metadata(values):
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "sts"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'version = "{chart["appVersion"]}"' in pyproject, (
        "appVersion is the sts release the chart installs"
    )
    assert values["image"]["tag"] == "", "the tag defaults to appVersion"
    assert re.fullmatch(r">=\s*1\.\d+\.\d+-0", chart["kubeVersion"])


# ---------------------------------------------------------------------------------- the STS config in the pod


RELEASE, NAMESPACE = "sts", "sts-system"  # the release test_helm_* renders; its full name is "sts"


def chart_config(values: dict[str, Any]) -> dict[str, Any]:
    """What templates/_helpers.tpl "sts.config" writes to config.yaml (test_helm_* compares the two)."""
    config = copy.deepcopy(values["config"])
    tls = config["listen"].get("tls")
    if tls is not None and "public_url" not in tls:
        port = values["service"]["port"]
        tls["public_url"] = f"https://{RELEASE}.{NAMESPACE}.svc" + ("" if port == 443 else f":{port}")
    config.setdefault("workload_api", {})["socket"] = "unix://" + values["spiffe"]["socketPath"]
    provisioned = values["signingKeys"]["existingSecret"] or values["signingKeys"]["files"]
    config.setdefault("keys", {})["dir"] = "/run/sts/keys" if provisioned else f"{STATE_DIR}/keys"
    config["policy"] = {"dir": POLICY_DIR}
    config["audit"] = {"path": "-" if values["audit"]["stdout"] else f"{STATE_DIR}/audit.jsonl"}
    if values["redis"]["url"]:
        config["store"] = {"url": values["redis"]["url"]}
    elif not values["redis"]["existingSecret"]:
        config["store"] = {"url": f"sqlite://{STATE_DIR}/sts.db"}
    return config


def load_pod_config(
    config: dict[str, Any], policies: dict[str, str], tmp: Path, secret_store_url: bool
) -> Settings:
    """Load the pod's config.yaml with sts.config, its directories moved under tmp; and its policies."""
    config = copy.deepcopy(config)
    (tmp / "policies").mkdir()
    for name, text in policies.items():
        (tmp / "policies" / name).write_text(text, encoding="utf-8")
    config["policy"]["dir"] = str(tmp / "policies")
    config["keys"]["dir"] = str(tmp / "keys")
    if config["audit"]["path"] != "-":
        config["audit"]["path"] = str(tmp / "audit.jsonl")
    if config.get("store", {}).get("url", "").startswith("sqlite:"):
        config["store"]["url"] = f"sqlite://{tmp / 'sts.db'}"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # The Deployment's environment: STS_STORE_URL only when the Redis URL comes from a Secret.
    environ = {"STS_STORE_URL": "redis://redis.redis.svc:6379/0"} if secret_store_url else {}
    settings = load_settings(path, environ=environ)
    CedarPolicy.from_directory(settings.policy_dir, settings.catalog)
    return settings


VALUE_SETS = [("values.yaml+issuer", ISSUER)] + [(f.name, load_yaml(f)) for f in CI_FILES]


@pytest.mark.parametrize("overrides", [v[1] for v in VALUE_SETS], ids=[v[0] for v in VALUE_SETS])
def test_configmap_config_and_policies_load(values, overrides, tmp_path):
    merged = merge_values(values, overrides)
    config = chart_config(merged)
    settings = load_pod_config(config, merged["policies"], tmp_path, bool(merged["redis"]["existingSecret"]))
    assert settings.issuer == merged["config"]["issuer"]
    if settings.listen.tls is not None:
        assert settings.listen.tls.cert is None, "the STS's own X.509-SVID"
        assert (
            settings.listen.tls.public_url == f"https://{RELEASE}.{NAMESPACE}.svc:{merged['service']['port']}"
        )
    assert ipaddress.ip_address(settings.listen.host).is_unspecified, (
        "the Service and the kubelet probes reach the pod"
    )
    assert settings.workload_api.socket == "unix://" + merged["spiffe"]["socketPath"]
    assert settings.store_url.startswith(
        ("redis://", "rediss://")
        if (merged["redis"]["url"] or merged["redis"]["existingSecret"])
        else "sqlite://"
    )
    assert {str(t.trust_domain) for t in settings.trust_domains} >= {merged["spiffe"]["trustDomain"]}


def test_default_config_has_no_partner_until_federated(values):
    """An unfederated trust domain is a standing /readyz warning and its SVIDs are refused: partner.test
    is opt-in."""
    assert list(values["config"]["trust_domains"]) == [values["spiffe"]["trustDomain"]]


# ------------------------------------------------------------------------------ signing keys (init container)


def kubelet_secret_dir(root: Path, files: dict[str, bytes]) -> Path:
    """A Secret volume as the kubelet writes it: files in a timestamped dir, ..data and per-key symlinks,
    mode 0400 widened to 0440 by the pod's fsGroup."""
    payload = root / "..2026_01_01_00_00_00.000000001"
    payload.mkdir(parents=True)
    for name, content in files.items():
        (payload / name).write_bytes(content)
        (payload / name).chmod(0o440)
        (root / name).symlink_to(f"..data/{name}")
    (root / "..data").symlink_to(payload.name)
    return root


def run_install_script(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    script = CHART / "files" / "install-signing-keys.sh"
    return subprocess.run(
        ["sh", str(script), str(source), str(target)], capture_output=True, text=True, check=False, timeout=30
    )


def test_init_script_installs_secret_keys_the_sts_accepts(tmp_path):
    made = tmp_path / "made"
    kids = create_provisioned_keys(KeySettings(dir=made))
    files = {p.name: p.read_bytes() for p in made.glob("*/*.pem")}
    secret = kubelet_secret_dir(tmp_path / "secret", files)
    target = tmp_path / "keys"
    target.mkdir()
    result = run_install_script(secret, target)
    assert result.returncode == 0, result.stderr
    installed = sorted(target.glob("*/*.pem"))
    assert [p.relative_to(target).as_posix() for p in installed] == sorted(
        p.relative_to(made).as_posix() for p in made.glob("*/*.pem")
    )
    for path in installed:
        assert stat.S_IMODE(path.stat().st_mode) == 0o400
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ring = KeyRing.load_or_create(KeySettings(dir=target))
    assert sorted(ring.active(c).kid for c in TokenClass) == sorted(kids)
    assert not any(ring.active(c).generated_for_development for c in TokenClass)


def test_the_kubelets_secret_files_alone_are_refused(tmp_path):
    """Why the init container exists: keys the way a Secret volume shows them (0440) are refused."""
    made = tmp_path / "made"
    create_provisioned_keys(KeySettings(dir=made))
    for path in made.glob("*/*.pem"):
        path.chmod(0o440)
    with pytest.raises(Exception, match="readable by group or others"):
        KeyRing.load_or_create(KeySettings(dir=made))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tool.pem": b"x"}, "is not named"),
        ({"1795000000-tool-" + "a" * 43 + ".pem": b"x"}, "no data key"),
        ({}, "no tool key"),
    ],
    ids=["bad-name", "data-missing", "empty-secret"],
)
def test_init_script_refuses_an_incomplete_secret(tmp_path, files, message):
    secret = kubelet_secret_dir(tmp_path / "secret", files)
    (tmp_path / "keys").mkdir()
    result = run_install_script(secret, tmp_path / "keys")
    assert result.returncode != 0
    assert message in result.stderr


# ----------------------------------------------------------------------------------------------- spire/deploy

# kubernetes-validate has no schema for CRDs; these hold the fields of spire-controller-manager's
# spire.spiffe.io/v1alpha1 kinds (config/crd/bases), with unknown fields refused so a typo is caught.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_CLUSTER_SCOPED_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "not": {"required": ["namespace"]},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ClusterSPIFFEID": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "spire.spiffe.io/v1alpha1"},
            "metadata": _CLUSTER_SCOPED_METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["spiffeIDTemplate"],
                "properties": {
                    "spiffeIDTemplate": {"type": "string", "pattern": "^spiffe://"},
                    "className": {"type": "string"},
                    "hint": {"type": "string"},
                    "namespaceSelector": _LABEL_SELECTOR,
                    "podSelector": _LABEL_SELECTOR,
                    "workloadSelectorTemplates": {
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[a-z0-9_]+:"},
                    },
                    "dnsNameTemplates": {"type": "array", "items": {"type": "string"}},
                    "federatesWith": {
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[a-z0-9._-]+$"},
                    },
                    "ttl": _GO_DURATION,
                    "jwtTtl": _GO_DURATION,
                    "admin": {"type": "boolean"},
                    "downstream": {"type": "boolean"},
                    "autoPopulateDNSNames": {"type": "boolean"},
                    "fallback": {"type": "boolean"},
                },
            },
        },
    },
    "ClusterFederatedTrustDomain": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "spire.spiffe.io/v1alpha1"},
            "metadata": _CLUSTER_SCOPED_METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["trustDomain", "bundleEndpointURL", "bundleEndpointProfile"],
                "properties": {
                    "trustDomain": {"type": "string", "pattern": "^[a-z0-9._-]{1,255}$"},
                    "bundleEndpointURL": {"type": "string", "pattern": "^https://"},
                    "bundleEndpointProfile": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type"],
                        "properties": {
                            "type": {"enum": ["https_spiffe", "https_web"]},
                            "endpointSPIFFEID": {"type": "string", "pattern": "^spiffe://"},
                        },
                        "if": {"properties": {"type": {"const": "https_spiffe"}}},
                        "then": {"required": ["endpointSPIFFEID"]},
                    },
                    "trustDomainBundle": {"type": "string"},
                    "className": {"type": "string"},
                },
            },
        },
    },
}


def kubernetes_versions() -> tuple[str, str]:
    """The chart's oldest Kubernetes (Chart.yaml kubeVersion) and the newest kubernetes-validate knows."""
    floor = re.search(r"(\d+\.\d+)\.\d+", load_yaml(CHART / "Chart.yaml")["kubeVersion"])
    assert floor
    return f"{floor.group(1)}.0", kubernetes_validate.latest_version()


def validate_manifest(document: dict[str, Any]) -> None:
    """Core kinds: the Kubernetes OpenAPI schemas, strictly; spire.spiffe.io kinds: CRD_SCHEMAS."""
    if document["apiVersion"].startswith("spire.spiffe.io/"):
        jsonschema.Draft7Validator(CRD_SCHEMAS[document["kind"]]).validate(document)
        return
    for version in kubernetes_versions():
        kubernetes_validate.validate(document, version, strict=True)


MANIFESTS = [
    (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
    for path in sorted(DEPLOY.glob("*.yaml"))
    if path.name != "spire-values.yaml"  # values for the upstream chart, not a manifest
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
    if doc
]


@pytest.mark.parametrize("document", [m[1] for m in MANIFESTS], ids=[m[0] for m in MANIFESTS])
def test_spire_deploy_manifests_validate(document):
    validate_manifest(document)


def test_the_validators_do_reject_mistakes():
    pod = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "Pod"))
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(pod)
    spiffe_id = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "ClusterSPIFFEID"))
    spiffe_id["spec"]["jwtTTL"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(spiffe_id)


def render_spiffe_id(template: str, trust_domain: str, namespace: str, service_account: str) -> str:
    """spire-controller-manager's template, for the fields these examples use."""
    fields = {
        ".TrustDomain": trust_domain,
        ".PodMeta.Namespace": namespace,
        ".PodSpec.ServiceAccountName": service_account,
    }
    return re.sub(r"\{\{\s*([.\w]+)\s*\}\}", lambda m: fields[m.group(1)], template)


def selects(spec: dict[str, Any], namespace: str, service_account: str) -> bool:
    labels = spec.get("namespaceSelector", {}).get("matchLabels", {})
    if labels.get("kubernetes.io/metadata.name", namespace) != namespace:
        return False
    required_sa = [
        t.split(":", 2)[2] for t in spec.get("workloadSelectorTemplates", []) if t.startswith("k8s:sa:")
    ]
    return all(sa == service_account for sa in required_sa)


# Demo workload (spire/dev-workloads.yaml) -> where cluster-spiffe-ids.yaml expects it to run.
PLACEMENT = {
    "agent": ("agents", "researcher"),
    "orchestrator": ("orchestration", "orchestrator"),
    "tool": ("tools", "web-search"),
    "data": ("data", "crm"),
    "admin": ("ops", "sts-admin"),
}


def test_cluster_spiffe_ids_give_the_demo_workloads_their_ids(values):
    dev = load_yaml(ROOT / "spire/dev-workloads.yaml")
    entries = [
        d["spec"]
        for d in yaml.safe_load_all((DEPLOY / "cluster-spiffe-ids.yaml").read_text(encoding="utf-8"))
        if d
    ]
    trust_domain = values["spiffe"]["trustDomain"]
    assert dev["trust_domain"] == trust_domain
    for name, (namespace, service_account) in PLACEMENT.items():
        matching = [e for e in entries if selects(e, namespace, service_account)]
        assert len(matching) == 1, (
            f"{name}: {len(matching)} ClusterSPIFFEIDs select {namespace}/{service_account}"
        )
        rendered = render_spiffe_id(matching[0]["spiffeIDTemplate"], trust_domain, namespace, service_account)
        assert rendered == dev["workloads"][name]["spiffe_id"], name
    sts_id = render_spiffe_id(
        values["spiffe"]["clusterSPIFFEID"]["spiffeIDTemplate"], trust_domain, "sts-system", "sts"
    )
    assert sts_id == dev["workloads"]["sts"]["spiffe_id"], "the chart's own ClusterSPIFFEID"
    classes = {e.get("className") for e in entries}
    assert classes == {values["spiffe"]["clusterSPIFFEID"]["className"]}


def test_federation_is_the_trust_domain_the_sts_config_expects():
    (federation,) = [
        d for d in yaml.safe_load_all((DEPLOY / "federation.yaml").read_text(encoding="utf-8")) if d
    ]
    partner = federation["spec"]["trustDomain"]
    assert partner in load_yaml(ROOT / "spire/dev-workloads.yaml")["federated_trust_domains"]
    assert load_yaml(ROOT / "examples/config.yaml")["trust_domains"][partner] == {"bundle": "workload-api"}
    ha = load_yaml(CHART / "ci/ha-redis-values.yaml")
    assert ha["config"]["trust_domains"][partner] == {"bundle": "workload-api"}
    assert federation["spec"]["bundleEndpointProfile"]["endpointSPIFFEID"].startswith(f"spiffe://{partner}/")


def hcl_of(manifest: str, key: str) -> dict[str, Any]:
    return hcl.loads(load_yaml(DEPLOY / manifest)["data"][key])


def test_spire_server_and_agent_configs_match_the_sts_and_each_other(values):
    server = hcl_of("spire-server-config.yaml", "server.conf")
    agent = hcl_of("spire-agent-config.yaml", "agent.conf")
    chart_values = load_yaml(DEPLOY / "spire-values.yaml")
    trust_domain = values["spiffe"]["trustDomain"]
    assert server["server"]["trust_domain"] == agent["agent"]["trust_domain"] == trust_domain
    assert chart_values["global"]["spire"]["trustDomain"] == trust_domain

    # Node attestation: k8s_psat on both sides, the same cluster, the agent's service account allowed.
    clusters = server["plugins"]["NodeAttestor"]["k8s_psat"]["plugin_data"]["clusters"]
    cluster = agent["plugins"]["NodeAttestor"]["k8s_psat"]["plugin_data"]["cluster"]
    assert list(clusters) == [cluster] == [chart_values["global"]["spire"]["clusterName"]]
    assert clusters[cluster]["service_account_allow_list"] == ["spire-system:spire-agent"]
    assert "k8s" in agent["plugins"]["WorkloadAttestor"]

    # JWT-SVIDs are short-lived bearer tokens: at most the STS's longest token.
    jwt_ttl = parse_duration(server["server"]["default_jwt_svid_ttl"])
    assert jwt_ttl == parse_duration(chart_values["spire-server"]["defaultJwtSvidTTL"])
    assert jwt_ttl is not None and jwt_ttl <= parse_duration(values["config"]["tokens"]["max_ttl"])  # type: ignore[operator]
    assert "bundle_endpoint" in server["server"]["federation"]

    # The socket: agent -> CSI driver -> the STS pod.
    socket = agent["agent"]["socket_path"]
    assert (
        socket
        == chart_values["spire-agent"]["socketPath"]
        == chart_values["spiffe-csi-driver"]["agentSocketPath"]
    )
    assert Path(socket).name == Path(values["spiffe"]["socketPath"]).name
    assert chart_values["spiffe-csi-driver"]["pluginName"] == values["spiffe"]["csiDriver"]
    assert (
        chart_values["spire-server"]["controllerManager"]["className"]
        == values["spiffe"]["clusterSPIFFEID"]["className"]
    )


def test_example_agent_pod_mounts_the_workload_api_like_the_chart(values):
    pod = next(d for _, d in MANIFESTS if d["kind"] == "Pod")
    (volume,) = pod["spec"]["volumes"]
    assert volume["csi"] == {"driver": values["spiffe"]["csiDriver"], "readOnly": True}
    for container in pod["spec"]["containers"]:
        (mount,) = container.get("volumeMounts", [None])
        if mount:
            assert mount["mountPath"] == str(Path(values["spiffe"]["socketPath"]).parent)
            assert mount["readOnly"] is True


# --------------------------------------------------------------- with the real helm (helm/tool, pinned)


@functools.cache
def helm_binary() -> str:
    """helm from ``STS_HELM_BIN``, else built from the Go module proxy by ``helm/tool/build.sh`` (the
    version pinned in helm/tool/go.mod, cached outside the repository). Never skipped: a machine
    that cannot build it fails these tests, saying why."""
    if os.environ.get("STS_HELM_BIN"):
        return str(Path(os.environ["STS_HELM_BIN"]) / "helm")
    built = subprocess.run(
        [str(ROOT / "helm/tool/build.sh")], capture_output=True, text=True, check=False, timeout=1800
    )
    if built.returncode != 0:
        pytest.fail(f"cannot build helm (helm/tool/build.sh): {built.stderr[-2000:]}")
    return str(Path(built.stdout.strip().splitlines()[-1]) / "helm")


def helm(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``helm`` with private homes; ``template`` and ``lint`` for the chart's oldest Kubernetes (a
    helm built from source assumes v1.20 unless told, where official builds stamp a newer one)."""
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    kube = ["--kube-version", kubernetes_versions()[0]] if args and args[0] in ("template", "lint") else []
    return subprocess.run(
        [helm_binary(), *args, *kube], capture_output=True, text=True, env=env, check=False, timeout=60
    )


@pytest.mark.parametrize("ci_file", CI_FILES, ids=[f.name for f in CI_FILES])
def test_helm_lint_and_render_ci_values(values, ci_file, tmp_path):
    lint = helm(tmp_path, "lint", "--strict", str(CHART), "-f", str(ci_file))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    result = helm(tmp_path, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(ci_file))
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    merged = merge_values(values, load_yaml(ci_file))
    kinds = set()
    for document in documents:
        kinds.add(document["kind"])
        if document["apiVersion"] != "monitoring.coreos.com/v1":
            validate_manifest(document)
    assert {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "ClusterSPIFFEID"} <= kinds
    configmap = next(d for d in documents if d["kind"] == "ConfigMap")
    rendered = yaml.safe_load(configmap["data"]["config.yaml"])
    assert rendered == chart_config(merged), "chart_config() must say what the template writes"
    assert {k: v for k, v in configmap["data"].items() if k.endswith(".cedar")} == merged["policies"]
    load_pod_config(rendered, merged["policies"], tmp_path, bool(merged["redis"]["existingSecret"]))
    spiffe_id = next(d for d in documents if d["kind"] == "ClusterSPIFFEID")
    federated = [
        t
        for t, s in merged["config"]["trust_domains"].items()
        if t != merged["spiffe"]["trustDomain"] and s.get("bundle") == "workload-api"
    ]
    assert spiffe_id["spec"].get("federatesWith", []) == federated
    tls = "tls" in merged["config"]["listen"]
    if tls:
        dns_names = spiffe_id["spec"]["dnsNameTemplates"]
        assert f"{RELEASE}.{NAMESPACE}.svc" in dns_names, "the SVID the STS serves names its Service"
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]
    assert "checksum/config" in pod["metadata"]["annotations"]
    (sts,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert sts[probe]["httpGet"]["scheme"] == ("HTTPS" if tls else "HTTP")
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}


# (id, --set arguments, a fragment of the error): refusals by the schema or by the templates' fail.
HELM_REFUSALS = [
    ("no-issuer", [], "config/issuer"),
    ("replicas-without-redis", ["--set", "replicaCount=3"], "redis"),
    (
        "replicas-without-keys",
        ["--set", "replicaCount=3", "--set", "redis.url=redis://r:6379/0"],
        "signing keys",
    ),
    (
        "replicas-without-redis-no-schema",
        ["--set", "replicaCount=2", "--skip-schema-validation"],
        "need Redis",
    ),
    (
        "http-issuer-no-schema",
        ["--set", "config.issuer=http://sts.example.org", "--skip-schema-validation"],
        "https",
    ),
    (
        "trust-domain-missing",
        ["--set", "spiffe.trustDomain=other.org", "--set", "config.keys.generate=true"],
        "other.org",
    ),
    ("no-signing-keys", [], "no signing keys: set signingKeys.existingSecret"),
]


@pytest.mark.parametrize(
    ("arguments", "message"), [r[1:] for r in HELM_REFUSALS], ids=[r[0] for r in HELM_REFUSALS]
)
def test_helm_refuses(arguments, message, tmp_path):
    issuer = (
        []
        if not arguments and message == "config/issuer"
        else ["--set", "config.issuer=https://sts.example.org"]
    )
    if "config.issuer=http://sts.example.org" in arguments:
        issuer = []
    result = helm(tmp_path, "template", "sts", str(CHART), *issuer, *arguments)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_helm_renders_chart_made_signing_key_secret(tmp_path):
    made = tmp_path / "made"
    create_provisioned_keys(KeySettings(dir=made))
    files = {p.name: p.read_text(encoding="utf-8") for p in made.glob("*/*.pem")}
    (tmp_path / "keys.yaml").write_text(
        yaml.safe_dump({"config": ISSUER["config"], "signingKeys": {"files": files}}), encoding="utf-8"
    )
    result = helm(tmp_path, "template", "sts", str(CHART), "-f", str(tmp_path / "keys.yaml"))
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    secret = next(d for d in documents if d["kind"] == "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == files
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]
    assert "checksum/signing-keys" in pod["metadata"]["annotations"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "keys-secret")
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}
    assert fnmatch.fnmatch(pod["spec"]["initContainers"][0]["command"][1], "*/install-signing-keys.sh")


# ------------------------------------------------------------- the rendered config through `sts config check`

STS_CLI = ROOT / ".venv" / "bin" / "sts"


def pod_layout(merged: dict[str, Any], config: dict[str, Any], tmp: Path) -> tuple[Path, dict[str, str]]:
    """The pod's files under ``tmp``: config.yaml (its paths moved there), the policies the ConfigMap
    mounts, the signing keys the init container installs from the Secret (``sts keys create``'s
    files) when the values provision them, and the environment the Deployment sets."""
    config = copy.deepcopy(config)
    policies = tmp / "policies"
    policies.mkdir()
    for name, text in merged["policies"].items():
        (policies / name).write_text(text, encoding="utf-8")
    config["policy"]["dir"] = str(policies)
    config["keys"]["dir"] = str(tmp / "keys")
    if merged["signingKeys"]["existingSecret"] or merged["signingKeys"]["files"]:
        create_provisioned_keys(KeySettings(dir=tmp / "keys"))
    if config["audit"]["path"] != "-":
        config["audit"]["path"] = str(tmp / "audit.jsonl")
    if config.get("store", {}).get("url", "").startswith("sqlite:"):
        config["store"]["url"] = f"sqlite://{tmp / 'sts.db'}"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
    if merged["redis"]["existingSecret"]:  # the Deployment's STS_STORE_URL from the Secret
        environ["STS_STORE_URL"] = "redis://redis.redis.svc:6379/0"
    return path, environ


def sts_config_check(path: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STS_CLI), "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=120,
    )


def provisioned(overrides: dict[str, Any]) -> dict[str, Any]:
    """The default values cannot be installed without signing keys (the chart fails): give them a Secret."""
    if "signingKeys" in overrides or overrides.get("config", {}).get("keys", {}).get("generate"):
        return overrides
    return merge_values(overrides, {"signingKeys": {"existingSecret": "sts-signing-keys"}})


@pytest.mark.parametrize("overrides", [v[1] for v in VALUE_SETS], ids=[v[0] for v in VALUE_SETS])
def test_sts_config_check_accepts_the_charts_config(values, overrides, tmp_path):
    merged = merge_values(values, provisioned(overrides))
    path, environ = pod_layout(merged, chart_config(merged), tmp_path)
    result = sts_config_check(path, environ)
    assert result.returncode == 0, result.stdout + result.stderr
    assert merged["config"]["issuer"] in result.stdout


@pytest.mark.parametrize("ci_file", CI_FILES, ids=[f.name for f in CI_FILES])
def test_helm_rendered_config_passes_sts_config_check(values, ci_file, tmp_path):
    """The ConfigMap's config.yaml as helm writes it, not its Python model."""
    result = helm(tmp_path, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(ci_file))
    assert result.returncode == 0, result.stderr
    configmap = next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ConfigMap")
    merged = merge_values(values, load_yaml(ci_file))
    assert {k: v for k, v in configmap["data"].items() if k.endswith(".cedar")} == merged["policies"]
    path, environ = pod_layout(merged, yaml.safe_load(configmap["data"]["config.yaml"]), tmp_path)
    checked = sts_config_check(path, environ)
    assert checked.returncode == 0, checked.stdout + checked.stderr


BROKEN_VALUE_SETS = [
    # Valid for the schema and helm; only the STS finds out (a Cedar syntax error, a policy on an
    # unknown target, an unreadable bundle file).
    (
        "cedar-syntax",
        {"policies": {"10-tools.cedar": "permit(principal, action, resource"}},
        "10-tools.cedar",
    ),
    (
        "bundle-file-missing",
        {"config": {"trust_domains": {"example.org": {"bundle_file": "/nonexistent/bundle.json"}}}},
        "/nonexistent/bundle.json",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), [b[1:] for b in BROKEN_VALUE_SETS], ids=[b[0] for b in BROKEN_VALUE_SETS]
)
def test_sts_config_check_refuses_a_broken_value_set(schema, values, overrides, message, tmp_path):
    merged = merge_values(values, provisioned(merge_values(ISSUER, overrides)))
    if "trust_domains" in overrides.get("config", {}):
        merged["config"]["trust_domains"] = overrides["config"]["trust_domains"]
    assert schema_errors(schema, merged) == [], "the schema lets it through: only sts config check can tell"
    path, environ = pod_layout(merged, chart_config(merged), tmp_path)
    result = sts_config_check(path, environ)
    assert result.returncode == 2, result.stdout + result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert problems and any(message in line for line in problems), result.stderr
