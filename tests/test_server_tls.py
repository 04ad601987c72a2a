"""The TLS listener's context from the server's own X.509-SVID never leaves its key on disk."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sts.config import TlsSettings
from sts.workload_api import OwnSvid
from tests.authority import TestAuthority, trust_store
from tests.test_mtls_http import issue


class _Watcher:
    def __init__(self, own: OwnSvid | None) -> None:
        self.own = own

    def own_svid(self) -> OwnSvid | None:
        return self.own


def _own_svid(authority: TestAuthority, directory: Path) -> OwnSvid:
    _, key_path, certificate = issue(authority, directory, "sts", uris=("spiffe://example.org/sts",), dns=("localhost",))
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key_path.unlink()
    return OwnSvid(version=1, chain=(certificate,), private_key=key)


def _files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def _handshake(context: ssl.SSLContext, ca: bytes) -> str:
    """A real handshake over a socket pair: the context serves the SVID it loaded."""
    server_side, client_side = socket.socketpair()
    client = ssl.create_default_context(cadata=ca.decode())
    results: dict[str, Any] = {}

    def serve() -> None:
        with context.wrap_socket(server_side, server_side=True) as tls:
            results["ok"] = True
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(client_side, server_hostname="localhost") as tls:
        version = tls.version() or ""
        tls.sendall(b"x")
    thread.join(5)
    return version


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "private-temp-dir"])
def test_the_svid_key_is_loaded_without_leaving_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example_org: TestAuthority, memfd: bool
) -> None:
    from sts.web.tls import ServerTls

    own = _own_svid(example_org, tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    watcher = _Watcher(own)
    tls = ServerTls(TlsSettings(None, None, "https://localhost:1"), trust_store(example_org), watcher)  # type: ignore[arg-type]
    context = tls.context()
    assert _files_under(scratch) == [], "no key file is left behind"
    assert _handshake(context, example_org.ca_pem()).startswith("TLS")
    watcher.own = dataclasses.replace(own, version=2)  # a rotation builds a new context, leaving nothing
    assert tls.context() is not context
    assert _files_under(scratch) == []


def test_no_svid_yet_is_temporarily_unavailable(example_org: TestAuthority) -> None:
    from sts.errors import TemporarilyUnavailable
    from sts.web.tls import ServerTls

    tls = ServerTls(TlsSettings(None, None, "https://localhost:1"), trust_store(example_org), _Watcher(None))  # type: ignore[arg-type]
    with pytest.raises(TemporarilyUnavailable):
        tls.context()
