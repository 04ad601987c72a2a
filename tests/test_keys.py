"""Signing keys: one set per class, persisted 0600, kid = class + RFC 7638 thumbprint, rotation."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest

from sts.catalog import TokenClass
from sts.config import KeySettings
from sts.errors import ConfigError
from sts.keys import KeyRing, create_provisioned_keys, thumbprint

NOW = 1_800_000_000


def test_generated_on_first_start_and_reloaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = KeySettings(dir=tmp_path / "keys")
    with caplog.at_level(logging.WARNING):
        ring = KeyRing.load_or_create(settings, now=NOW)
    assert "GENERATED DEVELOPMENT SIGNING KEY" in caplog.text
    files = sorted((tmp_path / "keys").rglob("*.pem"))
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyRing.load_or_create(settings, now=NOW + 10)
    assert again.active(TokenClass.TOOL).kid == ring.active(TokenClass.TOOL).kid
    assert len(list((tmp_path / "keys").rglob("*.pem"))) == 2


def test_classes_have_separate_keys(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)
    tool, data = ring.public_keys(TokenClass.TOOL), ring.public_keys(TokenClass.DATA)
    assert not set(tool) & set(data)
    assert all(kid.startswith("tool-") for kid in tool)
    assert all(kid.startswith("data-") for kid in data)
    assert ring.active(TokenClass.TOOL).kid == "tool-" + thumbprint(ring.active(TokenClass.TOOL).public_key)


def test_jwks_and_signature(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)
    token = ring.sign(TokenClass.DATA, {"sub": "x", "aud": "data:crm", "exp": NOW + 60})
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": ring.active(TokenClass.DATA).kid, "typ": "at+jwt"}
    jwks = jwt.PyJWKSet.from_dict(dict(ring.jwks()))
    key = next(k for k in jwks.keys if k.key_id == header["kid"])
    claims = jwt.decode(
        token, key.key, algorithms=["ES256"], audience="data:crm", options={"verify_exp": False}
    )
    assert claims["sub"] == "x"
    for jwk in ring.jwks()["keys"]:
        assert jwk["use"] == "sig" and "d" not in jwk


def test_rotation_keeps_previous_key_published(tmp_path: Path) -> None:
    settings = KeySettings(dir=tmp_path, rotate_after=3600)
    first = KeyRing.load_or_create(settings, now=NOW)
    second = KeyRing.load_or_create(settings, now=NOW + 3600)
    assert second.active(TokenClass.TOOL).kid != first.active(TokenClass.TOOL).kid
    assert first.active(TokenClass.TOOL).kid in second.public_keys(TokenClass.TOOL)
    third = KeyRing.load_or_create(settings, now=NOW + 2 * 3600 + 1)
    assert first.active(TokenClass.TOOL).kid not in third.public_keys(TokenClass.TOOL)


def test_provisioned_keys_are_not_development_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = KeySettings(dir=tmp_path)
    kids = create_provisioned_keys(settings, now=NOW)
    with caplog.at_level(logging.WARNING):
        ring = KeyRing.load_or_create(settings, now=NOW + 1)
    assert "DEVELOPMENT" not in caplog.text
    assert {ring.active(TokenClass.TOOL).kid, ring.active(TokenClass.DATA).kid} == set(kids)


def test_refuses_key_readable_by_others(tmp_path: Path) -> None:
    KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)
    path = next(tmp_path.rglob("*.pem"))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)


def test_refuses_key_that_does_not_match_its_name(tmp_path: Path) -> None:
    KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)
    tool, data = next((tmp_path / "tool").glob("*.pem")), next((tmp_path / "data").glob("*.pem"))
    tool.write_bytes(data.read_bytes())
    with pytest.raises(ConfigError, match="does not match its name"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)


def test_refuses_garbage_key(tmp_path: Path) -> None:
    (tmp_path / "tool").mkdir()
    bad = tmp_path / "tool" / f"{NOW}-tool-x.pem"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PKCS#8"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)


def read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount cannot be made without privileges here, so its one symptom is produced: EROFS."""
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)


def test_read_only_directory_of_provisioned_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mounted Secret: keys load without a lock file, and nothing is generated there."""
    settings = KeySettings(dir=tmp_path / "keys", rotate_after=3600)
    kids = create_provisioned_keys(settings, now=NOW)
    read_only(monkeypatch)
    ring = KeyRing.load_or_create(settings, now=NOW + 7200)  # rotation is due but cannot happen
    assert {ring.active(TokenClass.TOOL).kid, ring.active(TokenClass.DATA).kid} == set(kids)


def test_read_only_directory_without_keys_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keys").mkdir()
    read_only(monkeypatch)
    with pytest.raises(ConfigError, match="read-only and holds no tool key"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys"), now=NOW)


def test_per_class_jwks(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(KeySettings(dir=tmp_path), now=NOW)
    assert [k["kid"] for k in ring.jwks(TokenClass.DATA)["keys"]] == [ring.active(TokenClass.DATA).kid]
    assert len(ring.jwks()["keys"]) == 2


def test_workers_converge_on_a_rotated_key(tmp_path: Path) -> None:
    """A worker started after rotation made a new key: an older worker verifies and publishes it too."""
    settings = KeySettings(dir=tmp_path, rotate_after=3600)
    older = KeyRing.load_or_create(settings, now=NOW)
    newer = KeyRing.load_or_create(settings, now=NOW + 3700)  # rotates: a new key per class
    new_kid = newer.active(TokenClass.TOOL).kid
    assert new_kid not in older.public_keys(TokenClass.TOOL)
    token = newer.sign(
        TokenClass.TOOL,
        {
            "iss": "https://sts",
            "sub": "s",
            "aud": "a",
            "exp": 4_000_000_000,
            "iat": 1,
            "nbf": 1,
            "jti": "j",
            "token_class": "tool",
        },
    )
    assert (
        older.verify_issued(token, issuer="https://sts", now=2) is not None
    )  # forced refresh on unknown kid
    assert new_kid in {k["kid"] for k in older.jwks(TokenClass.TOOL)["keys"]}
    assert older.active(TokenClass.TOOL).kid == new_kid


def test_generate_false_refuses_an_empty_key_directory(tmp_path: Path) -> None:
    """keys.generate: false (production): no development key is ever made, start-up says what to do."""
    with pytest.raises(ConfigError, match=r"holds no tool signing key and keys\.generate is false"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys", generate=False), now=NOW)
    assert not list((tmp_path / "keys").rglob("*.pem"))


def test_generate_false_refuses_development_keys(tmp_path: Path) -> None:
    KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys"), now=NOW)  # a development start earlier
    with pytest.raises(ConfigError, match="only generated development tool keys"):
        KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys", generate=False), now=NOW + 10)


def test_generate_false_serves_provisioned_keys(tmp_path: Path) -> None:
    create_provisioned_keys(KeySettings(dir=tmp_path / "keys"), now=NOW)
    ring = KeyRing.load_or_create(KeySettings(dir=tmp_path / "keys", generate=False), now=NOW + 10)
    assert not ring.active(TokenClass.TOOL).generated_for_development
