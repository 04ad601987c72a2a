"""Which server, by measurement: ``sts serve`` as shipped (uvicorn, one event loop per worker; also
with the ``memory://`` store) and the same app as WSGI under gunicorn sync / gthread, same config,
same port, same load.

gunicorn is run from this interpreter when importable, else installed into a throwaway directory under
the bench's temp dir (``pip install --target``) and put on ``PYTHONPATH``: nothing is added to the
project's environment. It serves ``sts.web.app:create_app_from_env()`` with ``STS_CONFIG`` set, which is
the same application ``sts serve`` runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load, ours
from tests.authority import TestAuthority


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    kind: str  # "granian": sts serve as shipped (the name is historical); "gunicorn": WSGI, same app
    server: str = ""  # sts serve: the config's server: section
    gunicorn_args: tuple[str, ...] = ()
    store: str | None = None  # None: the embedded SQLite file


def variants(cores: int) -> list[Variant]:
    threads = 2 * cores
    return [
        Variant(f"sts serve: uvicorn {cores}w (default)", "granian"),
        # Not a deployable setting (rate limits per process): what the SQLite round trips cost end to end.
        Variant(f"sts serve: uvicorn {cores}w, memory:// store", "granian", store="memory://"),
        Variant(f"gunicorn sync {cores}w", "gunicorn", gunicorn_args=("-k", "sync", "-w", str(cores))),
        Variant(
            f"gunicorn gthread {cores}w x {threads}t",
            "gunicorn",
            gunicorn_args=("-k", "gthread", "-w", str(cores), "--threads", str(threads), "--keep-alive", "5"),
        ),
    ]


def gunicorn_pythonpath(scratch: Path, log: Callable[[str], None]) -> str | None:
    """``PYTHONPATH`` that makes gunicorn importable (None: it already is)."""
    if importlib.util.find_spec("gunicorn") is not None:
        return None
    target = scratch / "gunicorn-lib"
    log(f"installing gunicorn into {target} (throwaway)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "gunicorn"], check=True
    )
    return str(target)


def compare(
    directory: Path,
    port: int,
    authority: TestAuthority,
    requests_file: Path,
    issuer: str,
    *,
    connections: Sequence[int],
    seconds: float,
    repeats: int,
    cores: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, object]]:
    """Every variant in turn on ``port``, each configured with the pool's ``issuer`` (the SVIDs' audience)."""
    url = f"http://{ours.HOST}:{port}"
    extra_path = None
    results: dict[str, dict[str, object]] = {}
    for variant in variants(cores):
        config = ours.write_config(
            directory,
            port,
            authority,
            server=variant.server,
            name=f"sts-{len(results)}.yaml",
            issuer=issuer,
            store=variant.store,
        )
        env: dict[str, str] = {}
        if variant.kind == "granian":
            command = ours.serve_command(config)
        else:
            if extra_path is None:
                try:
                    extra_path = gunicorn_pythonpath(directory, log) or ""
                except subprocess.SubprocessError as e:
                    results[variant.name] = {"error": f"gunicorn could not be installed: {e}"}
                    continue
            if extra_path:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, os.environ.get("PYTHONPATH")]))
            env["STS_CONFIG"] = str(config)
            command = [
                sys.executable,
                "-m",
                "gunicorn",
                *variant.gunicorn_args,
                "-b",
                f"{ours.HOST}:{port}",
                "--log-level",
                "warning",
                "sts.web.app:create_app_from_env()",
            ]
        log(f"server variant: {variant.name}")
        try:
            summaries = _measure(
                command, env, url, directory, requests_file, connections, seconds, repeats, log
            )
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            log(f"  {variant.name}: not measured: {e}")
            results[variant.name] = {"error": str(e)}
            continue
        results[variant.name] = {str(n): s.to_json() for n, s in summaries.items()}
    return results


def _measure(
    command: list[str],
    env: dict[str, str],
    url: str,
    directory: Path,
    requests_file: Path,
    connections: Sequence[int],
    seconds: float,
    repeats: int,
    log: Callable[[str], None],
) -> dict[int, load.Summary]:
    with ours.running(
        command, ready_url=f"{url}/readyz", log=directory / "variants.log", env=ours.clean_env(env)
    ) as process:
        load.run_wrk(f"{url}/token", requests_file, connections=16, seconds=2)  # warm-up
        return load.sweep(
            f"{url}/token",
            requests_file,
            connections=connections,
            seconds=seconds,
            repeats=repeats,
            server_pid=process.pid,
            log=log,
        )
