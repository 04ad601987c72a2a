"""``sts dev``: the development Workload API server and the STS together, on embedded defaults.

The Workload API server runs in this process (one socket per demo workload under ``DIR/sockets``);
the STS runs as the production server (``sts serve``) in a child process, configured by
``DIR/sts.yaml`` to take its trust bundles from its own Workload API socket. Once the STS reports
ready, ``DIR/dev.json`` says where everything is (DESIGN.md). SIGINT/SIGTERM stop both and remove
the sockets; SIGUSR1 rotates the development CA of the main trust domain.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

DEMO_REGISTRATION = Path(spire.__file__).resolve().parent / "dev-workloads.yaml"
DEMO_POLICIES = Path(__file__).resolve().parent / "demo" / "policies"
DEMO_WORKLOADS = ("agent", "orchestrator", "tool", "data", "admin", "partner")
STS_WORKLOAD = "sts"
READY_TIMEOUT_SECONDS = 60.0
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
        "server": {"workers": 1},
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
    """Run until a signal; returns the exit code (non-zero when the STS could not start or died)."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry.load(registration)
    stop = threading.Event()
    api = DevWorkloadApi(registry, state_dir / "sockets")
    api.start()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_rotate(signum: int, frame: FrameType | None) -> None:
        log.info("SIGUSR1: rotating the development CA of %s", registry.trust_domain)
        threading.Thread(target=api.rotate_ca, daemon=True).start()

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
    server_ca = b"".join(
        c.public_bytes(serialization.Encoding.PEM)
        for c in api.state.ca(registry.trust_domain).x509_authorities()
    ).decode("ascii")
    description_path = state_dir / "dev.json"
    children = [
        subprocess.Popen([sys.executable, "-m", "sts.cli", "serve", "--config", str(path)])  # noqa: S603
        for path in (config_path, tls_config_path)
    ]
    try:
        ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", children[0], stop, None) and _wait_ready(
            f"https://localhost:{tls_port}/readyz", children[1], stop, server_ca
        )
        if not ready:
            return 1 if not stop.is_set() else 0
        description = dev_description(registry, api, port) | {
            "mtls_token_endpoint": f"https://localhost:{tls_port}/token",
            "server_ca": server_ca,
        }
        _write_atomically(description_path, json.dumps(description, indent=2) + "\n")
        _print_welcome(description_path, api, port)
        while not stop.wait(0.5):
            if any(child.poll() is not None for child in children):
                log.error("an STS process exited; stopping")
                return 1
        return 0
    finally:
        description_path.unlink(missing_ok=True)
        for child in children:
            _stop_child(child)
        api.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


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
