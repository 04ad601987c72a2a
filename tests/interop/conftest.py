"""One issuer on two listeners, as clients nobody on the team wrote see it (issue 12).

The plain-HTTP listener and the TLS (mTLS) listener are two ``sts serve`` processes sharing one
configuration (issuer, keys, store, policies); the plain one names the TLS one in ``mtls_url``, so both
serve the same RFC 8414 document with RFC 8705 ``mtls_endpoint_aliases``. Real processes, real sockets,
loopback only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config
from tests.test_mtls_http import issue, with_tls_listener

AGENT = "spiffe://example.org/agent/researcher"
RESOURCE_SERVER = "spiffe://example.org/tool/calc"


@dataclass(frozen=True)
class Interop:
    """Both listeners of one issuer, and PEM files a client needs for mTLS."""

    plain: RunningServer  # http://127.0.0.1:P, the issuer
    tls: RunningServer  # https://localhost:T, named by mtls_endpoint_aliases
    directory: Path
    ca: Path  # the CA that signed the TLS listener's certificate and the client certificates
    client_cert: Path  # an X.509-SVID of AGENT
    client_key: Path

    @property
    def issuer(self) -> str:
        return self.plain.issuer


@pytest.fixture(scope="session")
def interop(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[Interop]:
    directory = tmp_path_factory.mktemp("interop")
    plain_port, tls_port = free_port(), free_port()
    plain_config = write_config(directory, plain_port, example_org, partner_test)
    plain_text = plain_config.read_text()
    tls_config = directory / "sts-tls.yaml"
    tls_config.write_text(plain_text.replace(f"port: {plain_port}}}", f"port: {tls_port}}}", 1))
    ca = with_tls_listener(tls_config, tls_port, example_org)
    plain_config.write_text(plain_text + f"mtls_url: https://localhost:{tls_port}\n")
    client_cert, client_key, _ = issue(example_org, directory, "agent", uris=(AGENT,))
    with running_server(plain_config, plain_port) as plain, running_server(
        tls_config, tls_port, scheme="https", ca=ca
    ) as tls:
        yield Interop(plain, tls, directory, ca, client_cert, client_key)
