"""The development registration: which workloads exist, their SPIFFE IDs and SVID lifetimes.

Owns :class:`Registry` and :class:`Workload`, parsed strictly from a YAML file such as
``spire/dev-workloads.yaml``::

    trust_domain: example.org
    federated_trust_domains: [partner.test]
    workloads:
      agent: {spiffe_id: spiffe://example.org/agent/researcher, x509_ttl: 1h, jwt_ttl: 5m}

Each workload name becomes a socket file name (the stand-in for SPIRE's attestation), so names are
restricted to safe file names. Unknown keys, malformed SPIFFE IDs, workloads of an undeclared trust
domain, bad durations and duplicate keys are refused with a :class:`RegistryError` naming the file,
line and key.

Imports only ``sts.spiffeid`` of the project; must not import gRPC, protobuf or the other ``spire``
modules. Does no I/O except :meth:`Registry.load` reading its file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

DEFAULT_X509_TTL = 3600
DEFAULT_JWT_TTL = 300
MIN_X509_TTL = 2
"""Certificates count whole seconds and are renewed at half-life: shorter would renew in a busy loop."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_DURATION = re.compile(r"(\d+)(s|m|h|d)")
_UNITS: Mapping[str, int] = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400})
_TOP_KEYS = frozenset({"trust_domain", "federated_trust_domains", "workloads"})
_WORKLOAD_KEYS = frozenset({"spiffe_id", "x509_ttl", "jwt_ttl", "dns_names"})
_DNS_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class RegistryError(ValueError):
    """The registration file is invalid; the message names the file, line and key."""


@dataclass(frozen=True, slots=True)
class Workload:
    """One registered workload: ``name`` is also its socket's file name; TTLs are in seconds."""

    name: str
    spiffe_id: SpiffeId
    x509_ttl: int = DEFAULT_X509_TTL
    jwt_ttl: int = DEFAULT_JWT_TTL
    dns_names: tuple[str, ...] = ()
    """Extra DNS SANs on the X.509-SVID (as SPIRE's ``dns_names``), e.g. ``localhost`` for a TLS server."""

    def __post_init__(self) -> None:
        if _NAME.fullmatch(self.name) is None:
            raise ValueError(f"workload name {self.name!r} is not a safe file name")
        if not self.spiffe_id.path:
            raise ValueError(f"workload {self.name}: a workload's SPIFFE ID needs a path")
        if self.x509_ttl < MIN_X509_TTL or self.jwt_ttl < 1:
            raise ValueError(
                f"workload {self.name}: TTLs must be positive (x509_ttl at least {MIN_X509_TTL}s)"
            )


@dataclass(frozen=True, slots=True)
class Registry:
    """The main trust domain, the federated ones (each with its own CA) and the workloads by name."""

    trust_domain: TrustDomain
    federated_trust_domains: tuple[TrustDomain, ...]
    workloads: Mapping[str, Workload]

    def __post_init__(self) -> None:
        object.__setattr__(self, "federated_trust_domains", tuple(self.federated_trust_domains))
        object.__setattr__(self, "workloads", MappingProxyType(dict(self.workloads)))
        declared = self.trust_domains
        if len(set(declared)) != len(declared):
            raise ValueError("a trust domain is declared more than once")
        for name, workload in self.workloads.items():
            if name != workload.name:
                raise ValueError(f"workload {workload.name} is registered under the name {name}")
            if workload.spiffe_id.trust_domain not in declared:
                raise ValueError(
                    f"workload {name}: trust domain {workload.spiffe_id.trust_domain} is not declared"
                )

    @property
    def trust_domains(self) -> tuple[TrustDomain, ...]:
        """The main trust domain first, then the federated ones."""
        return (self.trust_domain, *self.federated_trust_domains)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"{path}: cannot read the registration file ({e})") from e
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<registry>") -> Registry:
        """Parse the YAML registration; ``source`` names it in error messages."""
        return _Parser(text, source).registry()


class _Parser:
    """Turns the YAML node tree into a :class:`Registry`, remembering each key's line for messages."""

    def __init__(self, text: str, source: str) -> None:
        self._source = source
        self._lines: dict[str, int] = {}
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                self._data = self._convert(loader, node, "") if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            raise RegistryError(f"{source}: not valid YAML: {e}") from e

    def registry(self) -> Registry:
        top = self._mapping("", self._data, "the registration must be a mapping")
        self._known_keys("", top, _TOP_KEYS)
        trust_domain = self._trust_domain("trust_domain", self._required(top, "", "trust_domain"))
        federated = self._federated(top.get("federated_trust_domains"))
        if trust_domain in federated:
            self._fail("federated_trust_domains", f"must not repeat the main trust domain {trust_domain}")
        declared = (trust_domain, *federated)

        workloads_value = self._required(top, "", "workloads")
        entries = self._mapping("workloads", workloads_value, "must map workload names to registrations")
        if not entries:
            self._fail("workloads", "must register at least one workload")
        workloads: dict[str, Workload] = {}
        owners: dict[SpiffeId, str] = {}
        for name, value in entries.items():
            workload = self._workload(name, value, declared)
            if workload.spiffe_id in owners:
                self._fail(
                    f"workloads.{name}.spiffe_id",
                    f"is already the SPIFFE ID of workload '{owners[workload.spiffe_id]}'",
                )
            owners[workload.spiffe_id] = name
            workloads[name] = workload
        return Registry(trust_domain, federated, workloads)

    def _workload(self, name: str, value: Any, declared: tuple[TrustDomain, ...]) -> Workload:
        path = f"workloads.{name}"
        if _NAME.fullmatch(name) is None:
            self._fail(
                path,
                "is not a safe workload name: it names a socket file, so use 1 to 32 letters, digits, "
                "'-' or '_', starting with a letter or digit",
            )
        fields = self._mapping(path, value, "must be a mapping with at least 'spiffe_id'")
        self._known_keys(path, fields, _WORKLOAD_KEYS)
        id_path = f"{path}.spiffe_id"
        text = self._required(fields, path, "spiffe_id")
        if not isinstance(text, str):
            self._fail(id_path, "must be a string such as spiffe://example.org/agent")
        try:
            spiffe_id = SpiffeId.parse(text)
        except SpiffeIdError as e:
            self._fail(id_path, f"is not a valid SPIFFE ID: {e}")
        if not spiffe_id.path:
            self._fail(id_path, "names a trust domain; a workload's SPIFFE ID needs a path")
        if spiffe_id.trust_domain not in declared:
            self._fail(
                id_path,
                f"is in trust domain {spiffe_id.trust_domain}, which is neither trust_domain nor in "
                "federated_trust_domains",
            )
        x509_ttl = self._duration(f"{path}.x509_ttl", fields.get("x509_ttl"), DEFAULT_X509_TTL, MIN_X509_TTL)
        jwt_ttl = self._duration(f"{path}.jwt_ttl", fields.get("jwt_ttl"), DEFAULT_JWT_TTL, 1)
        dns_names = fields.get("dns_names", [])
        if not isinstance(dns_names, list) or not all(
            isinstance(n, str) and _DNS_NAME.fullmatch(n) for n in dns_names
        ):
            self._fail(f"{path}.dns_names", "must be a list of lowercase DNS names")
        return Workload(name, spiffe_id, x509_ttl, jwt_ttl, tuple(dns_names))

    def _federated(self, value: Any) -> tuple[TrustDomain, ...]:
        path = "federated_trust_domains"
        if value is None:
            return ()
        if not isinstance(value, list):
            self._fail(path, "must be a list of trust domain names")
        result: list[TrustDomain] = []
        for index, item in enumerate(value):
            trust_domain = self._trust_domain(f"{path}[{index}]", item)
            if trust_domain in result:
                self._fail(f"{path}[{index}]", f"repeats trust domain {trust_domain}")
            result.append(trust_domain)
        return tuple(result)

    def _trust_domain(self, path: str, value: Any) -> TrustDomain:
        if not isinstance(value, str):
            self._fail(path, "must be a trust domain name such as example.org")
        try:
            return TrustDomain.parse(value)
        except SpiffeIdError as e:
            self._fail(path, f"is not a valid trust domain: {e}")

    def _duration(self, path: str, value: Any, default: int, minimum: int) -> int:
        """Whole seconds from ``300``, ``300s``, ``5m``, ``1h`` or ``1d``."""
        if value is None:
            return default
        seconds: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        elif isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match is not None:
                seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds is None:
            self._fail(path, f"is not a duration: {value!r} (use seconds or e.g. 30s, 5m, 1h, 1d)")
        if seconds < minimum:
            self._fail(path, f"must be at least {minimum}s")
        return seconds

    # Tree helpers.

    def _convert(self, loader: yaml.SafeLoader, node: yaml.Node, path: str) -> Any:
        self._lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                child = f"{path}.{key}" if path else str(key)
                if not isinstance(key, str):
                    self._lines[child] = key_node.start_mark.line + 1
                    self._fail(child, "is not a string key")
                if key in result:
                    self._lines[child] = key_node.start_mark.line + 1
                    self._fail(child, "appears twice")
                result[key] = self._convert(loader, value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    def _mapping(self, path: str, value: Any, message: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self._fail(path, message)
        return value

    def _required(self, fields: dict[str, Any], path: str, key: str) -> Any:
        if fields.get(key) is None:
            self._fail(f"{path}.{key}" if path else key, "is required")
        return fields[key]

    def _known_keys(self, path: str, fields: dict[str, Any], known: frozenset[str]) -> None:
        for key in fields:
            if key not in known:
                self._fail(
                    f"{path}.{key}" if path else key,
                    f"is not a known key (known: {', '.join(sorted(known))})",
                )

    def _fail(self, path: str, message: str) -> NoReturn:
        """Raise the error for ``path``, located at its line (or its parent's, for a missing key)."""
        probe = path
        while probe and probe not in self._lines:
            probe = probe.rpartition(".")[0]
        line = self._lines.get(probe or "")
        where = f"{self._source}, line {line}" if line else self._source
        raise RegistryError(f"{where}: '{path}' {message}" if path else f"{where}: {message}")
