"""Fixtures of the real-SPIRE suite: the SPIRE binaries, one shared deployment with the STS, and the
log tails of every SPIRE and STS process a failing test touched.

The binaries come from ``STS_SPIRE_BIN`` or ``spire/real/build.sh``; when neither gives them, every
test *fails* with the reason (CI treats a skipped real-SPIRE test as a failure).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.spire_real.harness import (
    DIRECTORIES,
    PARTNER,
    PROCESSES,
    TRUST_DOMAIN,
    Deployment,
    HarnessError,
    Sts,
    deployment,
    kill_all,
    remove_directories,
    spire_bin,
)

_STARTED = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout) kills SPIRE and the STS before the session dies with it."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # set outside Python: restore the default
        previous = signal.SIG_DFL

    def on_term(signum: int, frame: FrameType | None) -> None:
        kill_all()
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


@pytest.fixture(scope="session")
def spire_bin_dir() -> Path:
    try:
        return spire_bin()
    except HarnessError as e:
        pytest.fail(f"no SPIRE binaries: {e}")


@pytest.fixture(scope="session")
def spire(spire_bin_dir: Path) -> Iterator[Deployment]:
    """The shared SPIRE server + agent; tests that stop, rotate or re-federate it make their own."""
    try:
        with deployment(spire_bin_dir) as running:
            yield running
    except HarnessError as e:
        pytest.fail(f"SPIRE did not come up: {e}")


@pytest.fixture(scope="session")
def sts(spire: Deployment) -> Iterator[Sts]:
    """The STS on the shared agent: plain and TLS listeners; ``partner.test`` is configured but not
    federated, so ``/readyz`` warns about it."""
    server = Sts(spire.directory / "sts", spire.socket, trust_domains=(TRUST_DOMAIN, PARTNER), tls=True)
    try:
        server.start(server_ca=spire.server.bundle_show())
    except HarnessError as e:
        server.stop()
        pytest.fail(f"the STS did not start on real SPIRE: {e}\n{server.logs()}")
    yield server
    server.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """On failure, the tails of the logs of every process whose log changed since the test began
    (its setup included: a fixture that brings SPIRE up)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    started = item.stash.get(_STARTED, 0.0)
    seen: set[Path] = set()
    for process in PROCESSES:
        if process.log in seen:
            continue
        seen.add(process.log)
        try:
            changed = process.log.stat().st_mtime >= started - 1
        except OSError:
            continue
        if changed:
            report.sections.append((f"log tail: {process.name} ({process.log})", process.tail(60)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The deployments' directories (configs, logs, sockets) stay for a session that failed."""
    if session.testsfailed == 0 and exitstatus == 0:
        remove_directories()
    elif DIRECTORIES:
        print(f"\nreal-SPIRE logs kept in: {' '.join(str(d) for d in DIRECTORIES)}")
