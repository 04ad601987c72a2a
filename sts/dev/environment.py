"""``sts dev``: the development Workload API server and the STS together, on embedded defaults.

The Workload API server runs in this process (one socket per demo workload under ``DIR/sockets``);
the STS runs as the production server (``sts serve``) in a child process, configured by
``DIR/sts.yaml`` to take its trust bundles from its own Workload API socket. Once the STS reports
ready, ``DIR/dev.json`` says where everything is (DESIGN.md). SIGINT/SIGTERM stop both and remove
the sockets; SIGUSR1 rotates the development CA of the main trust domain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

import spire
from spire.registry import Registry
from spire.server import DevWorkloadApi
from sts.dev.lock import StateDirLock
from sts.netcheck import check_port_free

log = logging.getLogger(__name__)

DEMO_REGISTRATION = Path(spire.__file__).resolve().parent / "dev-workloads.yaml"
DEMO_POLICIES = Path(__file__).resolve().parent / "policies"
DEMO_WORKLOADS = ("agent", "orchestrator", "tool", "data", "admin", "partner")
STS_WORKLOAD = "sts"
READY_TIMEOUT_SECONDS = 60.0
DRAIN_SECONDS = 10  # server.drain_timeout of both servers (the default)
STOP_MARGIN_SECONDS = 5.0  # after the drain: the servers' own kill of late workers, and exit
DEMO_CATALOG = [
    {
        "id": "tool:web-search",
        "class": "tool",
        "resource": "https://search.internal/",
        "scopes": ["invoke"],
        "sensitivity": "internal",
        "max_ttl": "300s",
        "resource_servers": ["spiffe://example.org/tool/web-search"],
    },
    {
        "id": "data:crm",
        "class": "data",
        "sensitivity": "confidential",
        "scopes": ["read", "write"],
        "max_ttl": "120s",
        "resource_servers": ["spiffe://example.org/data/crm"],
    },
]


def dev_config(registry: Registry, api: DevWorkloadApi, state_dir: Path, port: int) -> dict[str, Any]:
    """The STS configuration ``sts dev`` runs with: every registered trust domain from the Workload API."""
    domains = registry.trust_domains
    return {
        "issuer": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port},
        "trust_domains": {str(td): {"bundle": "workload-api"} for td in domains},
        "workload_api": {"socket": api.socket_for(STS_WORKLOAD), "max_staleness": "5m"},
        "keys": {"dir": str(state_dir / "keys")},
        "store": {"url": f"sqlite:///{state_dir / 'sts.db'}"},
        "admins": [str(w.spiffe_id) for name, w in registry.workloads.items() if name == "admin"],
        "catalog": DEMO_CATALOG,
        "policy": {"dir": str(DEMO_POLICIES)},
        "audit": {"path": str(state_dir / "audit.jsonl")},
        "server": {"workers": 1, "drain_timeout": DRAIN_SECONDS},
    }


def dev_description(registry: Registry, api: DevWorkloadApi, port: int) -> dict[str, Any]:
    """The contents of ``dev.json`` (DESIGN.md, development environment)."""
    issuer = f"http://127.0.0.1:{port}"
    by_name = registry.workloads
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "trust_domain": str(registry.trust_domain),
        "workloads": {
            name: {"spiffe_id": str(by_name[name].spiffe_id), "socket": api.socket_for(name)}
            for name in DEMO_WORKLOADS
            if name in by_name
        },
    }


def run(state_dir: Path, port: int, registration: Path = DEMO_REGISTRATION) -> int:
    """Run until a signal; returns the exit code (non-zero when the STS could not start or died).

    Raises :class:`~sts.errors.ConfigError` (exit 2) before touching anything when another
    ``sts dev`` holds ``state_dir`` or a port is taken.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with StateDirLock(state_dir):
        for listener_port in (port, port + 1):
            check_port_free("127.0.0.1", listener_port, "--port (sts dev uses --port and --port + 1)")
        return _run_locked(state_dir, port, registration)


def _run_locked(state_dir: Path, port: int, registration: Path) -> int:
    registry = Registry.load(registration)
    stop = threading.Event()
    api = DevWorkloadApi(registry, state_dir / "sockets")
    api.start()
    description_path = state_dir / "dev.json"
    description: dict[str, Any] = {}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def rotate() -> None:
        api.rotate_ca()
        if description:  # the STS is ready: clients reading server_ca must see the new CA
            description["server_ca"] = _server_ca(registry, api)
            _write_atomically(description_path, json.dumps(description, indent=2) + "\n")

    def on_rotate(signum: int, frame: FrameType | None) -> None:
        log.info("SIGUSR1: rotating the development CA of %s", registry.trust_domain)
        threading.Thread(target=rotate, daemon=True).start()

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_rotate)
    # The same STS (same issuer, keys, store, policies) on a second port, with TLS and client
    # certificates; the plain listener names it (mtls_url), so both serve one metadata document.
    tls_port = port + 1
    config = dev_config(registry, api, state_dir, port) | {"mtls_url": f"https://localhost:{tls_port}"}
    config_path = state_dir / "sts.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    tls_config = {
        **config,
        "listen": {
            "host": "127.0.0.1",
            "port": tls_port,
            "tls": {"certificate": "workload-api", "public_url": f"https://localhost:{tls_port}"},
        },
    }
    tls_config_path = state_dir / "sts-tls.yaml"
    tls_config_path.write_text(yaml.safe_dump(tls_config, sort_keys=False))
    # Each server in a process group of its own: a stop signal reaches it once, from here, and
    # whatever of it survives the drain deadline is killed as a group.
    children = [
        subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "sts.cli", "serve", "--config", str(path)], start_new_session=True
        )
        for path in (config_path, tls_config_path)
    ]
    try:
        server_ca = _server_ca(registry, api)
        ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", children[0], stop, None) and _wait_ready(
            f"https://localhost:{tls_port}/readyz", children[1], stop, server_ca
        )
        if not ready:
            return 1 if not stop.is_set() else 0
        description.update(dev_description(registry, api, port))
        description["mtls_token_endpoint"] = f"https://localhost:{tls_port}/token"
        description["server_ca"] = _server_ca(registry, api)
        _write_atomically(description_path, json.dumps(description, indent=2) + "\n")
        _print_welcome(description_path, api, port)
        while not stop.wait(0.5):
            if any(child.poll() is not None for child in children):
                log.error("an STS process exited; stopping")
                return 1
        return 0
    finally:
        description.clear()
        description_path.unlink(missing_ok=True)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            _reap_group(child, DRAIN_SECONDS + STOP_MARGIN_SECONDS)
        api.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _server_ca(registry: Registry, api: DevWorkloadApi) -> str:
    """PEM of every X.509 authority of the main trust domain (old and new while a rotation runs)."""
    return b"".join(
        c.public_bytes(serialization.Encoding.PEM)
        for c in api.state.ca(registry.trust_domain).x509_authorities()
    ).decode("ascii")


def _reap_group(child: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``child`` to stop by itself, then SIGKILL its whole process group (workers included)."""
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.error("the STS process %d did not stop within %.0fs; killing it", child.pid, timeout)  # noqa: TRY400
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)  # a worker that outlived its supervisor
    child.wait()


def _wait_ready(url: str, child: subprocess.Popen[bytes], stop: threading.Event, ca: str | None) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    context = ssl.create_default_context(cadata=ca) if ca else None
    while time.monotonic() < deadline and not stop.is_set():
        if child.poll() is not None:
            log.error("the STS exited with %s before it was ready", child.returncode)
            return False
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:  # noqa: S310 (loopback)
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.1)
    if not stop.is_set():
        log.error("the STS did not become ready within %.0fs", READY_TIMEOUT_SECONDS)
    return False


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _print_welcome(description_path: Path, api: DevWorkloadApi, port: int) -> None:
    agent = api.socket_for("agent")
    installed = Path(sys.executable).parent / "sts"
    sts = str(installed) if installed.exists() else f"{sys.executable} -m sts.cli"
    print(
        f"""
sts dev is ready: {description_path}
  issuer / audience: http://127.0.0.1:{port}
Try an exchange as the agent (its JWT-SVID comes from its own Workload API socket):
  TOKEN=$({sts} svid --socket {agent} --audience http://127.0.0.1:{port})
  curl -s http://127.0.0.1:{port}/token -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt -d subject_token=$TOKEN \\
    -d audience=tool:web-search -d scope=invoke
The whole agent story (task, tool and data tokens, binding, revocation), in another terminal:
  {sts} demo --state-dir {description_path.parent}
Rotate the development CA: kill -USR1 {os.getpid()}     Stop: Ctrl-C
""",
        flush=True,
    )
