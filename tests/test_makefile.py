"""The README's two commands: ``make run`` installs only what running needs (the server extra) and follows ``PORT``;
``make test`` installs everything the tests need (the dev extra, redis-server, the npm clients) and
refuses a Python that is too old. Checked with ``make -n -B`` (what make would run, from scratch)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*arguments: str) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *arguments], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout


def test_make_run_installs_the_package_only_and_follows_the_port() -> None:
    commands = dry_run("run", "PORT=9443")
    assert "pip install --quiet -e '.[server]'" in commands
    assert ".[dev]" not in commands and "npm" not in commands
    assert commands.strip().endswith("sts dev --state-dir state/dev --port 9443")


def test_make_test_installs_what_the_tests_need() -> None:
    commands = dry_run("test")
    for needed in ("pip install --quiet -e '.[dev]'", "redis-server", "npm ci", "ruff check", "mypy", "pytest"):
        assert needed in commands, needed


def test_a_python_too_old_is_refused_with_the_version_needed(tmp_path: Path) -> None:
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\ncase \"$1\" in -V) echo 'Python 3.9.18';; *) exit 1;; esac\n")
    old.chmod(0o755)
    result = subprocess.run(
        ["make", "python-version", f"PYTHON={old}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "this project needs Python >= 3.11" in result.stdout + result.stderr
    assert "Python 3.9.18" in result.stdout + result.stderr
