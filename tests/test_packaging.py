"""The ``spiffe-sts`` distribution: the base install is the libraries only, the rest are extras.

* The wheel's metadata: name, the base requirements, the extras.
* A fresh virtual environment (``python -m venv``) with ``pip install <the wheel>`` (its base
  dependencies for real, from PyPI through pip's cache): ``import sts.verify, sts.client`` loads no
  web framework, server, policy engine or store client; ``sts serve`` and ``sts dev`` exit 2 naming
  the pip command of the ``server`` extra.
* The public API: ``__all__`` of ``sts.client``, ``sts.verify`` (and the integrations) is pinned, and
  every name in it exists.
"""

from __future__ import annotations

import email.parser
import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sts.extras import EXTRAS, install_command, missing_extra_message, require_extras_for

ROOT = Path(__file__).resolve().parent.parent
# What `import sts.verify, sts.client` must never load in a base install (nor anywhere).
FORBIDDEN = ("flask", "werkzeug", "uvicorn", "cedarpy", "redis", "granian", "gunicorn", "yaml", "starlette", "fastapi", "mcp", "httptools", "uvloop")
BASE_REQUIREMENTS = {"cryptography", "pyjwt", "requests", "httpx", "anyio", "spiffe"}
EXTRA_NAMES = {"server", "flask", "asgi", "mcp", "redis", "test", "dev"}

CLIENT_API = [
    "CLIENT_ASSERTION_TYPE_JWT_SPIFFE",
    "GRANT_TYPE_TOKEN_EXCHANGE",
    "TOKEN_TYPE_JWT",
    "AccessToken",
    "AsyncTokenClient",
    "CachedJwtSvid",
    "DpopKey",
    "HttpxTokenAuth",
    "RequestsTokenAuth",
    "SvidSource",
    "TokenClient",
    "TokenRequest",
    "WorkloadApiSvids",
    "error_from_response",
]
VERIFY_API = [
    "NOT_OURS",
    "RESOURCE_METADATA_PATH",
    "RULES",
    "DpopProofRefused",
    "InsufficientScope",
    "Introspection",
    "InvalidAccessToken",
    "MissingToken",
    "RedisReplayCache",
    "Refusal",
    "ReplayCache",
    "RevocationCheck",
    "TokenVerifier",
    "VerifiedToken",
    "WorkloadApiUnavailable",
    "challenge",
    "challenge_text",
    "client_certificate",
    "current_token",
    "error_response",
    "refusal",
    "resource_metadata_path",
]
ASGI_API = ["STATE_KEY", "TokenAuth", "TokenMiddleware", "TokenRefused", "client_certificate", "render", "verified_token"]
MCP_API = ["McpTokenVerifier", "auth_settings"]


@pytest.mark.parametrize(
    ("module", "expected"),
    [("sts.client", CLIENT_API), ("sts.verify", VERIFY_API), ("sts.asgi_verifier", ASGI_API), ("sts.mcp_verifier", MCP_API)],
)
def test_the_public_api_is_pinned(module: str, expected: list[str]) -> None:
    loaded = importlib.import_module(module)
    assert list(loaded.__all__) == expected, f"{module}.__all__ changed: update docs/libraries.md and this list"
    missing = [name for name in expected if not hasattr(loaded, name)]
    assert not missing, missing


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout (no dependencies fetched for it)."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel is made of (as the Dockerfile does): setuptools writes its
    # build/ and *.egg-info next to the sources, which must not land in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("sts", "spire"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("spiffe_sts-*.whl")
    return built


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_wheel_is_spiffe_sts_with_the_libraries_as_base(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == "spiffe-sts"
    requirements = meta.get_all("Requires-Dist") or []
    base = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in requirements if "extra ==" not in r}
    assert base == BASE_REQUIREMENTS
    assert set(meta.get_all("Provides-Extra") or []) == EXTRA_NAMES
    server = {r.split(">")[0].split("<")[0].strip().lower() for r in requirements if 'extra == "server"' in r}
    assert {"flask", "uvicorn", "cedarpy", "pyyaml", "redis", "grpcio", "protobuf", "h11"} <= server
    dev = [r for r in requirements if 'extra == "dev"' in r]
    assert any(r.startswith("spiffe-sts[") and "server" in r for r in dev), dev  # dev includes server
    with zipfile.ZipFile(wheel) as archive:
        scripts = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "sts = sts.extras:main" in archive.read(scripts).decode()


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv with ``pip install <wheel>``: the base dependencies come from PyPI (pip's cache)."""
    venv = tmp_path_factory.mktemp("base-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def test_a_base_install_imports_no_server_and_no_framework(base_venv: Path) -> None:
    probe = (
        "import json, sys\n"
        "import sts.verify, sts.client\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [str(base_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "sts" in loaded and "spiffe" in loaded
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    installed = subprocess.run(
        [str(base_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, timeout=60, check=True
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert not names & {"flask", "uvicorn", "cedarpy", "redis", "pyyaml", "starlette", "fastapi", "mcp"}, names


@pytest.mark.parametrize("command", [["serve", "--config", "/nonexistent.yaml"], ["dev", "--state-dir", "/nonexistent"]])
def test_server_commands_without_the_server_extra_exit_2_with_the_pip_command(base_venv: Path, command: list[str]) -> None:
    done = subprocess.run([str(base_venv / "bin" / "sts"), *command], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"sts: sts {command[0]} needs the server extra")
    assert "pip install 'spiffe-sts[server]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_library_integrations_name_their_extra_when_missing(base_venv: Path) -> None:
    for module, extra in (("sts.asgi_verifier", "asgi"), ("sts.mcp_verifier", "mcp")):
        done = subprocess.run(
            [str(base_venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True, text=True, timeout=60, check=False, cwd="/"
        )
        assert done.returncode == 1 and f"pip install 'spiffe-sts[{extra}]'" in done.stderr, done.stderr


def test_with_every_extra_the_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """Here (the dev extra) every extra is installed: nothing is printed, nothing exits."""
    for command in ("serve", "dev", "demo", "config", "svid"):
        require_extras_for([command, "--help"])
    assert capsys.readouterr().err == ""
    assert set(EXTRAS) == EXTRA_NAMES - {"test", "dev"}
    assert install_command("server") == "pip install 'spiffe-sts[server]'"
    assert missing_extra_message("server", needed_by="sts serve", missing=["flask"]) == (
        "sts serve needs the server extra of spiffe-sts, which is not installed (missing: flask); "
        "install it: pip install 'spiffe-sts[server]'"
    )
