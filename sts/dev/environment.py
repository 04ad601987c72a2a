"""``sts dev``: the development Workload API server and the STS together, on embedded defaults.

The Workload API server runs in this process (one socket per demo workload under ``DIR/sockets``);
the STS runs as the production server (``sts serve``) in a child process, configured by
``DIR/sts.yaml`` to take its trust bundles from its own Workload API socket. Once the STS reports
ready, ``DIR/dev.json`` says where everything is (DESIGN.md). SIGINT/SIGTERM stop both and remove
the sockets; SIGUSR1 rotates the development CA of the main trust domain.

``sts dev --spire`` runs the same STS and writes the same ``dev.json`` on a real SPIRE server and
agents instead (:mod:`sts.dev.spire_real`, :func:`_run_spire`), so that the demo and the printed
commands show SPIRE's behaviour rather than the development server's (``spire/README.md``).
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
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

import spire
from spire.registry import Registry
from spire.server import DevWorkloadApi
from sts.dev import spire_real
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


def run(state_dir: Path, port: int, registration: Path = DEMO_REGISTRATION, *, spire: bool = False) -> int:
    """Run until a signal; returns the exit code (non-zero when the STS could not start or died).

    With ``spire`` the Workload API is a real SPIRE server and agents (:func:`_run_spire`) instead of
    the development server. Raises :class:`~sts.errors.ConfigError` (exit 2) before touching
    anything when another ``sts dev`` holds ``state_dir``, a port is taken, or (``spire``) the SPIRE
    binaries are missing.
    """
    state_dir = state_dir.resolve()
    bin_dir = spire_real.spire_bin_dir() if spire else None
    state_dir.mkdir(parents=True, exist_ok=True)
    with StateDirLock(state_dir):
        for listener_port in (port, port + 1):
            check_port_free("127.0.0.1", listener_port, "--port (sts dev uses --port and --port + 1)")
        if bin_dir is not None:
            return _run_spire(state_dir, port, bin_dir)
        return _run_locked(state_dir, port, registration)


def _run_locked(state_dir: Path, port: int, registration: Path) -> int:
    registry = Registry.load(registration)
    api = DevWorkloadApi(registry, state_dir / "sockets")
    api.start()
    description: dict[str, Any] = {}
    description_path = state_dir / "dev.json"

    def rotate() -> None:
        api.rotate_ca()
        if description:  # the STS is ready: clients reading server_ca must see the new CA
            description["server_ca"] = _server_ca(registry, api)
            _write_atomically(description_path, json.dumps(description, indent=2) + "\n")

    def on_rotate(signum: int, frame: FrameType | None) -> None:
        log.info("SIGUSR1: rotating the development CA of %s", registry.trust_domain)
        threading.Thread(target=rotate, daemon=True).start()

    previous = signal.signal(signal.SIGUSR1, on_rotate)
    try:
        return _run_sts(
            state_dir,
            port,
            dev_config(registry, api, state_dir, port),
            contents=dev_description(registry, api, port),
            server_ca=lambda: _server_ca(registry, api),
            description=description,
            check_workload_api=lambda: None,
            welcome_extra=f"Rotate the development CA: kill -USR1 {os.getpid()}     ",
        )
    finally:
        api.stop()
        signal.signal(signal.SIGUSR1, previous)


def _run_spire(state_dir: Path, port: int, bin_dir: Path) -> int:
    """``sts dev --spire``: the same STS and ``dev.json`` on a real SPIRE (:mod:`sts.dev.spire_real`).

    Every identity of the story (and the STS's own) gets a SPIRE agent of its own under
    ``DIR/spire``, so that ``sts demo``, one process playing several parties, gets each party's SVIDs
    from that party's socket. The partner trust domain is not part of it (it would take a second
    SPIRE server and federation): ``dev.json`` names no ``partner``. ``DIR/spire`` is recreated at
    every start (a memory key manager: a new CA each time); the STS's keys and database are kept.
    """
    registry = Registry.load(DEMO_REGISTRATION)
    identities = {
        name: (str(w.spiffe_id), list(w.dns_names))
        for name, w in registry.workloads.items()
        if w.spiffe_id.trust_domain == registry.trust_domain
        and (name in DEMO_WORKLOADS or name == STS_WORKLOAD)
    }
    spire_dir = state_dir / "spire"
    if spire_dir.exists():
        log.info("recreating %s: SPIRE keeps its CA and agent keys in memory, each start is new", spire_dir)
    log.info("starting SPIRE %s (%d agents) in %s", spire_real.SPIRE_VERSION, len(identities), spire_dir)
    # From here until the end, a stop signal raises _Stopped wherever it lands: while SPIRE comes up
    # (start_dev_spire stops what it started), or before _run_sts has installed its own handlers;
    # the default action would kill this process and leave SPIRE running.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _no_rotation)  # its default kills
    try:
        try:
            spire = spire_real.start_dev_spire(bin_dir, spire_dir, identities)
        except spire_real.SpireError as e:
            log.error("SPIRE did not come up: %s", e)  # noqa: TRY400 (the message is the whole story)
            return 1
        except _Stopped:
            log.info("stopped while SPIRE was starting")
            return 0
        try:
            return _serve_on_spire(state_dir, port, registry, spire)
        except _Stopped:
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _already_stopping)
            log.info("stopping SPIRE")
            spire.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_on_spire(state_dir: Path, port: int, registry: Registry, spire: spire_real.DevSpire) -> int:
    """The STS and ``dev.json`` on a running :class:`~sts.dev.spire_real.DevSpire`."""
    issuer = f"http://127.0.0.1:{port}"
    admins = [i for name, i in spire.identities.items() if name == "admin"]
    config = {
        "issuer": issuer,
        "listen": {"host": "127.0.0.1", "port": port},
        "trust_domains": {str(registry.trust_domain): {"bundle": "workload-api"}},
        "workload_api": {"socket": spire.socket(STS_WORKLOAD), "max_staleness": "5m"},
        "keys": {"dir": str(state_dir / "keys")},
        "store": {"url": f"sqlite:///{state_dir / 'sts.db'}"},
        "admins": admins,
        "catalog": DEMO_CATALOG,
        "policy": {"dir": str(DEMO_POLICIES)},
        "audit": {"path": str(state_dir / "audit.jsonl")},
        "server": {"workers": 1, "drain_timeout": DRAIN_SECONDS},
    }
    description = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "trust_domain": str(registry.trust_domain),
        "workloads": {
            name: {"spiffe_id": spire.identities[name], "socket": spire.socket(name)}
            for name in DEMO_WORKLOADS
            if name in spire.identities
        },
        "spire": {"version": spire_real.SPIRE_VERSION, "server_socket": str(spire.server.socket)},
    }
    return _run_sts(
        state_dir,
        port,
        config,
        contents=description,
        server_ca=spire.server_ca,
        description={},
        check_workload_api=spire.check_alive,
        welcome_extra=(f"SPIRE entries: {spire.server.bin} entry show -socketPath {spire.server.socket}\n"),
    )


class _Stopped(BaseException):
    """SIGINT/SIGTERM while SPIRE starts (a BaseException: nothing on the way may swallow it)."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _no_rotation(signum: int, frame: FrameType | None) -> None:
    log.warning("SIGUSR1: on SPIRE, rotate with `spire-server localauthority x509|jwt prepare|activate`")


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    """A second Ctrl-C while SPIRE stops: every stop is bounded (SIGKILL after a deadline)."""
    log.info(
        "already stopping (each SPIRE process gets SIGKILL after %.0fs)", spire_real.STOP_TIMEOUT_SECONDS
    )


def _run_sts(
    state_dir: Path,
    port: int,
    config: dict[str, Any],
    *,
    contents: dict[str, Any],
    server_ca: Callable[[], str],
    description: dict[str, Any],
    check_workload_api: Callable[[], None],
    welcome_extra: str,
) -> int:
    """Both STS processes on ``config`` until a signal; ``dev.json`` (``contents`` + ``server_ca``)
    exists exactly while they are ready. ``description`` is the live copy (the caller may rewrite it
    on a CA rotation); ``check_workload_api`` raises when the Workload API behind them died."""
    stop = threading.Event()
    description_path = state_dir / "dev.json"

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The same STS (same issuer, keys, store, policies) on a second port, with TLS and client
    # certificates; the plain listener names it (mtls_url), so both serve one metadata document.
    tls_port = port + 1
    config = config | {"mtls_url": f"https://localhost:{tls_port}"}
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
    # STS_SPIRE_BIN is ours, not the server's (which warns about every STS_* variable it does not know).
    env = {k: v for k, v in os.environ.items() if k != "STS_SPIRE_BIN"}
    children = [
        subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "sts.cli", "serve", "--config", str(path)], start_new_session=True, env=env
        )
        for path in (config_path, tls_config_path)
    ]
    try:
        ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", children[0], stop, None) and _wait_ready(
            f"https://localhost:{tls_port}/readyz", children[1], stop, server_ca()
        )
        if not ready:
            return 1 if not stop.is_set() else 0
        description.update(contents)
        description["mtls_token_endpoint"] = f"https://localhost:{tls_port}/token"
        description["server_ca"] = server_ca()
        _write_atomically(description_path, json.dumps(description, indent=2) + "\n")
        _print_welcome(description_path, description["workloads"]["agent"]["socket"], port, welcome_extra)
        while not stop.wait(0.5):
            if any(child.poll() is not None for child in children):
                log.error("an STS process exited; stopping")
                return 1
            try:
                check_workload_api()
            except spire_real.SpireError as e:
                log.error("the Workload API behind the STS died; stopping: %s", e)  # noqa: TRY400
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


def _print_welcome(description_path: Path, agent: str, port: int, extra: str) -> None:
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
{extra}Stop: Ctrl-C
""",
        flush=True,
    )
