"""``sts dev --spire`` as a user runs it (``make run SPIRE=1``): a subprocess on real SPIRE v1.13.3.

The environment is started with ``--state-dir`` and ``--port`` like ``make run`` does, ``sts demo``
plays the whole story against it, the SVIDs are checked to be SPIRE's (the STS's TLS certificate
chains to ``spire-server bundle show``, every identity is a SPIRE registration entry, ``dev.json``'s
``server_ca`` is SPIRE's bundle), and a SIGTERM must leave no process behind. A second start on the
same state directory must come up again (SPIRE recreated, the STS's keys kept). Without the binaries
``sts dev --spire`` refuses with exit 2 and the build command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sts.dev.spire_real import SPIRE_VERSION
from sts.dev.story import free_port_pair
from tests.spire_real.harness import REPO, short_tempdir, spire_version, tls_peer_chain, wait_for

READY_LINE = "sts dev is ready"
READY_TIMEOUT_SECONDS = 120.0  # SPIRE, six agents and two STS processes on 2 busy cores
STOP_TIMEOUT_SECONDS = 40.0  # the STS's drain (10 s) + its margin, then SPIRE's SIGTERM
PARTIES = {
    "agent": "spiffe://example.org/agent/researcher",
    "orchestrator": "spiffe://example.org/orchestrator",
    "tool": "spiffe://example.org/tool/web-search",
    "data": "spiffe://example.org/data/crm",
    "admin": "spiffe://example.org/ops/sts-admin",
}


@dataclass
class DevSpire:
    process: subprocess.Popen[bytes]
    state_dir: Path
    log: Path
    port: int

    def description(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads((self.state_dir / "dev.json").read_text())
        return value


def _env(spire_bin: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
    env["STS_SPIRE_BIN"] = spire_bin
    return env


def _ours(state_dir: Path, dev: DevSpire | None = None) -> list[str]:
    """Every live process whose command line names ``state_dir`` (SPIRE's configs and the STS's
    live there), except zombies and ``sts dev`` itself: what a clean stop must leave none of."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (dev is not None and int(proc.name) == dev.process.pid):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(state_dir) in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def _start(spire_bin_dir: Path, state_dir: Path, log: Path) -> DevSpire:
    port = free_port_pair()
    offset = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sts.cli",
                "dev",
                "--spire",
                "--state-dir",
                str(state_dir),
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=_env(str(spire_bin_dir)),
        )
    dev = DevSpire(process, state_dir, log, port)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"sts dev --spire exited {process.returncode}:\n{log.read_text()[-4000:]}")
        with log.open("rb") as text:
            text.seek(offset)
            return READY_LINE.encode() in text.read()

    try:
        wait_for("sts dev --spire ready", ready, timeout=READY_TIMEOUT_SECONDS, interval=0.3)
    except Exception:
        _stop(dev)
        raise
    return dev


def _stop(dev: DevSpire) -> int:
    if dev.process.poll() is None:
        dev.process.send_signal(signal.SIGTERM)
    try:
        return dev.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        dev.process.kill()
        dev.process.wait()
        raise AssertionError(f"sts dev --spire did not stop within {STOP_TIMEOUT_SECONDS:.0f}s") from None


@pytest.fixture(scope="module")
def state_dir() -> Path:
    return short_tempdir("sdv-")  # short: SPIRE's Unix sockets live under it


@pytest.fixture(scope="module")
def dev(spire_bin_dir: Path, state_dir: Path) -> Iterator[DevSpire]:
    running = _start(spire_bin_dir, state_dir, state_dir / "sts-dev.log")
    try:
        yield running
    finally:
        _stop(running)


def test_the_pinned_version_is_the_one_the_product_names() -> None:
    assert spire_version() == SPIRE_VERSION


def test_sts_demo_plays_the_whole_story_on_dev_spire(dev: DevSpire) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sts.cli", "demo", "--state-dir", str(dev.state_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    assert "all 8 steps behaved as expected" in done.stdout, done.stdout


def test_the_svids_come_from_spire(dev: DevSpire, spire_bin_dir: Path) -> None:
    description = dev.description()
    server_socket = description["spire"]["server_socket"]
    server = str(spire_bin_dir / "spire-server")
    bundle = subprocess.run(
        [server, "bundle", "show", "-socketPath", server_socket],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert x509.load_pem_x509_certificates(description["server_ca"].encode()) == (
        x509.load_pem_x509_certificates(bundle.encode())
    )
    # The STS's TLS listener presents its X.509-SVID from the agent: it verifies against SPIRE's CA.
    chain = tls_peer_chain("localhost", dev.port + 1, bundle)
    leaf = x509.load_der_x509_certificate(chain[0])
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/sts"]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == "SPIRE"
    # Every party of the story is a SPIRE registration entry, and dev.json names its socket.
    shown = json.loads(
        subprocess.run(
            [server, "entry", "show", "-socketPath", server_socket, "-output", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    registered = {
        f"spiffe://{e['spiffe_id']['trust_domain']}{e['spiffe_id']['path']}" for e in shown["entries"]
    }
    assert set(PARTIES.values()) | {"spiffe://example.org/sts"} <= registered
    assert {n: w["spiffe_id"] for n, w in description["workloads"].items()} == PARTIES
    for workload in description["workloads"].values():
        assert workload["socket"].startswith(f"unix://{dev.state_dir}/spire/")


def test_sigterm_stops_everything_and_the_state_dir_serves_again(
    dev: DevSpire, spire_bin_dir: Path, state_dir: Path
) -> None:
    running = " ".join(_ours(state_dir, dev))
    assert "spire-server" in running, "the check sees no SPIRE process: it would see no stray one"
    assert "spire-agent" in running
    assert "sts.cli serve" in running
    dev.process.send_signal(signal.SIGUSR1)  # the development CA's rotation: a hint here, not death
    time.sleep(1)
    assert dev.process.poll() is None, dev.log.read_text()[-3000:]
    assert "localauthority" in dev.log.read_text()
    started = time.monotonic()
    assert _stop(dev) == 0, dev.log.read_text()[-3000:]
    print(f"stopped in {time.monotonic() - started:.1f}s")
    assert _ours(state_dir) == []
    assert not (state_dir / "dev.json").exists()
    keys = sorted(p.name for p in (state_dir / "keys").iterdir())
    # A second start on the same directory: SPIRE is recreated, the STS's signing keys are kept.
    again = _start(spire_bin_dir, state_dir, dev.log)
    try:
        assert sorted(p.name for p in (state_dir / "keys").iterdir()) == keys
        assert set(again.description()["workloads"]) == set(PARTIES)
        assert "recreating" in dev.log.read_text()
    finally:
        assert _stop(again) == 0
    assert _ours(state_dir) == []


def test_a_sigterm_while_spire_starts_stops_what_was_started(spire_bin_dir: Path) -> None:
    state_dir = short_tempdir("sdv-")
    log = state_dir / "sts-dev.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sts.cli",
                "dev",
                "--spire",
                "--state-dir",
                str(state_dir),
                "--port",
                str(free_port_pair()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=_env(str(spire_bin_dir)),
        )
    dev = DevSpire(process, state_dir, log, 0)
    try:
        wait_for(
            "spire-server started",
            lambda: "spire-server" in " ".join(_ours(state_dir, dev)),
            timeout=READY_TIMEOUT_SECONDS,
            interval=0.05,
        )
        assert not (state_dir / "dev.json").exists()  # still starting: the signal lands mid-start
    finally:
        code = _stop(dev)
    assert code == 0, log.read_text()[-3000:]
    assert _ours(state_dir) == []
    assert READY_LINE not in log.read_text()
    assert "stopped while SPIRE was starting" in log.read_text()


def test_without_the_binaries_it_refuses_with_the_build_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sts.cli", "dev", "--spire", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=_env(str(tmp_path / "no-spire-here")),
    )
    assert done.returncode == 2, done.stderr
    assert "`make spire`" in done.stderr
    assert str(tmp_path / "no-spire-here") in done.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything
