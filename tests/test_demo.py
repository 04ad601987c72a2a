"""``sts demo`` as a user runs it (a subprocess): the whole agent story must behave, step by step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_client import running_dev

STEPS = 8


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sts.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_story_passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"all {STEPS} steps behaved as expected" in result.stdout
    assert "FAIL" not in result.stdout
    for number in range(1, STEPS + 1):
        assert f"{number:2d}. " in result.stdout


def test_demo_starts_its_own_dev_environment() -> None:
    result = demo()
    assert_story_passed(result)
    assert "starting a private sts dev" in result.stdout


def test_demo_against_a_running_dev_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_dev(tmp_path_factory) as dev:
        result = demo("--state-dir", str(dev.state_dir))
        assert_story_passed(result)
        assert dev.issuer in result.stdout
        assert dev.process.poll() is None  # the demo leaves a dev environment it did not start running


def test_demo_without_an_environment_says_what_to_start(tmp_path: Path) -> None:
    result = demo("--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "sts dev" in result.stdout
