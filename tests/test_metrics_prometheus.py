"""``/metrics`` of a real ``sts serve`` with two worker processes, checked by Prometheus's own tools.

The counters of both workers are summed (multiprocess directory), so one scrape of either worker
must add up exactly to the exchanges made; ``promtool check metrics`` must accept the text; and a
real Prometheus server scraping the STS must hold the same issued count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import sts
from tests.authority import TestAuthority
from tests.conftest import ISSUER_HOST, RunningServer, free_port, running_server, write_config

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"
ISSUED = {"tool:web-search": 5, "tool:calc": 3, "data:crm": 2}
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def form(subject_token: str, **extra: str) -> dict[str, str]:
    return {"grant_type": GRANT, "subject_token": subject_token, "subject_token_type": JWT_TYPE, **extra}


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def total(found: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return float(
        sum(s.value for s in found[family].samples if s.name == sample and labels.items() <= s.labels.items())
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[tuple[RunningServer, str]]:
    """``sts serve`` (2 workers) after a known set of exchanges; the scraped text with it."""
    directory = tmp_path_factory.mktemp("metrics-server")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    config.write_text(config.read_text().replace("server: {workers: 1}", "server: {workers: 2}"))
    private_tmp = directory / "tmp"
    private_tmp.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(private_tmp))  # where sts serve makes its multiprocess directory
        patch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
        with running_server(config, port) as server:
            yield from _exchanged(server, example_org, private_tmp)
    assert list(private_tmp.iterdir()) == [], "the multiprocess directory outlived sts serve"


def _exchanged(
    server: RunningServer, example_org: TestAuthority, private_tmp: Path
) -> Iterator[tuple[RunningServer, str]]:
    (metrics_dir,) = private_tmp.iterdir()
    assert metrics_dir.name.startswith("sts-metrics-")
    assert metrics_dir.stat().st_mode & 0o777 == 0o700
    svid = example_org.mint(AGENT, server.issuer)
    with contextlib.ExitStack() as stack:
        # Eight connections, so that both workers answer some (the kernel picks a worker per connection).
        sessions = [stack.enter_context(requests.Session()) for _ in range(8)]
        n = 0
        for target, count in ISSUED.items():
            scope = "read" if target.startswith("data:") else "invoke"
            for _ in range(count):
                answer = sessions[n % 8].post(
                    f"{server.url}/token", data=form(svid, audience=target, scope=scope), timeout=10
                )
                assert answer.status_code == 200, answer.text
                n += 1
        refusals = [
            (form(svid, audience="data:vault", scope="read"), "invalid_target"),
            (form(svid, audience="tool:unknown", scope="invoke"), "invalid_target"),
            (form("not-a-jwt", audience="tool:calc", scope="invoke"), "invalid_request"),
            ({**form(svid, audience="tool:calc"), "grant_type": "password"}, "unsupported_grant_type"),
        ]
        for body, code in refusals:
            answer = sessions[n % 8].post(f"{server.url}/token", data=body, timeout=10)
            assert answer.json()["error"] == code, answer.text
            n += 1
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    # One file per worker (the supervisor's own holds zeros: created when it imported the module).
    pids = {int(path.stem.split("_")[1]) for path in metrics_dir.glob("counter_*.db")}
    assert len(pids - {server.process.pid}) == 2
    yield server, response.text


def test_counts_of_both_workers_add_up_exactly(served: tuple[RunningServer, str]) -> None:
    server, text = served
    found = families(text)
    issued = sum(ISSUED.values())
    exchanges = "sts_token_exchanges"
    assert total(found, exchanges, "sts_token_exchanges_total", result="issued") == issued
    assert total(found, exchanges, "sts_token_exchanges_total", result="refused") == 4
    assert total(found, exchanges, "sts_token_exchanges_total", error="invalid_target") == 2
    assert total(found, exchanges, "sts_token_exchanges_total", error="invalid_request") == 1
    assert total(found, exchanges, "sts_token_exchanges_total", error="unsupported_grant_type") == 1
    duration = "sts_token_exchange_duration_seconds"
    assert total(found, duration, f"{duration}_count") == issued + 4
    for target, count in ISSUED.items():
        assert total(found, "sts_tokens_issued", "sts_tokens_issued_total", target=target) == count
    assert total(found, "sts_build_info", "sts_build_info", version=sts.__version__) == 1
    assert total(found, "sts_break_glass_active", "sts_break_glass_active") == 0
    assert {s.labels["trust_domain"] for s in found["sts_trust_bundle_sequence"].samples} == {
        "example.org",
        "partner.test",
    }
    # Metrics and the audit log agree, summed over every worker's chain (each worker writes its own).
    records = [r for r in server.audit_records() if r.get("event") == "token_exchange"]
    assert sum(r["decision"] == "allow" for r in records) == issued
    assert sum(r["decision"] == "deny" for r in records) == 4
    assert "spiffe://" not in text and "not-a-jwt" not in text


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_accepts_the_exposition(served: tuple[RunningServer, str]) -> None:
    _, text = served
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"error" not in result.stderr.lower()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_a_real_prometheus_scrapes_the_issued_count(
    served: tuple[RunningServer, str], tmp_path: Path
) -> None:
    server, _ = served
    assert PROMETHEUS is not None
    port = free_port()
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: sts\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={ISSUER_HOST}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    query = f"http://{ISSUER_HOST}:{port}/api/v1/query"
    expr = 'sum(sts_token_exchanges_total{job="sts",result="issued"})'
    seen: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                answer = requests.get(query, params={"query": expr}, timeout=2).json()
            except (requests.ConnectionError, requests.Timeout, ValueError):
                answer = {}
            seen = answer.get("data", {}).get("result", [])
            if seen:
                break
            time.sleep(0.5)
        assert seen, "Prometheus never held the series: " + (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(seen[0]["value"][1]) == sum(ISSUED.values())
        up = requests.get(query, params={"query": 'up{job="sts"}'}, timeout=2).json()["data"]["result"]
        assert float(up[0]["value"][1]) == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_a_killed_worker_s_counts_survive_its_restart(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counters are totals: a worker SIGKILLed and restarted by the supervisor leaves its counts in."""
    port = free_port()
    config = write_config(tmp_path, port, example_org, partner_test)
    config.write_text(config.read_text().replace("server: {workers: 1}", "server: {workers: 2}"))
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with running_server(config, port) as server:
        (metrics_dir,) = private_tmp.iterdir()
        svid = example_org.mint(AGENT, server.issuer)
        for _ in range(6):
            body = form(svid, audience="tool:calc", scope="invoke")
            assert requests.post(f"{server.url}/token", data=body, timeout=10).status_code == 200
        answered = {r["chain"] for r in server.audit_records() if r.get("event") == "token_exchange"}
        workers = {int(p.stem.split("_")[1]) for p in metrics_dir.glob("counter_*.db")} - {server.process.pid}
        assert len(workers) == 2 and answered
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the supervisor notices and starts another worker
            now = {int(p.stem.split("_")[1]) for p in metrics_dir.glob("counter_*.db")} - {server.process.pid}
            if len(now - workers) == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no replacement worker started")
        found: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                found = families(requests.get(f"{server.url}/metrics", timeout=5).text)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert total(found, "sts_token_exchanges", "sts_token_exchanges_total", result="issued") == 6
        assert total(found, "sts_tokens_issued", "sts_tokens_issued_total", target="tool:calc") == 6
    assert list(private_tmp.iterdir()) == []
